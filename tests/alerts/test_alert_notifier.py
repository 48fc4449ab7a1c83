"""The notifier against a real SMTP server: outbox, retries, restarts, rate limit."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import anyio
import pytest
from alertkit import (
    closed_port,
    load,
    make_event,
    port_of,
    running,
    silent_server,
    smtp_server,
    text_of,
    until,
)

from sbs_core.alerts import Notifier, Outbox

pytestmark = pytest.mark.anyio

FAST = {"retry_interval": 0.05, "max_retry_interval": 0.2}


async def test_mails_are_delivered_in_order_and_leave_the_outbox(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port)
        async with running(Notifier(config, **FAST)) as notifier:
            for kind in ("started", "promoted", "split_brain", "stopped"):
                notifier.publish(make_event(kind))
            mails = await server.wait_for(4)
            await until(lambda: notifier.snapshot()["outbox_size"] == 0)
            snapshot = notifier.snapshot()
    subjects = [m.message["Subject"] for m in mails]
    assert "service started" in subjects[0]
    assert "took over as primary" in subjects[1]
    assert "split brain" in subjects[2]
    assert "service stopped" in subjects[3]
    assert snapshot["last_mail_error"] is None
    assert isinstance(snapshot["last_mail_at"], float)
    assert Outbox(config.node.state_dir).pending() == []


async def test_quiet_kinds_send_no_mail(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port)
        async with running(Notifier(config, **FAST)) as notifier:
            for kind in ("peer_lost", "peer_connected", "demoted", "refused", "stale"):
                notifier.publish(make_event(kind))
            notifier.publish(make_event("handback"))
            (mail,) = await server.wait_for(1)
            await anyio.sleep(0.2)
    assert "handback done" in mail.message["Subject"]
    assert len(server.received) == 1


async def test_the_outbox_survives_a_restart(tmp_path: Path) -> None:
    with closed_port() as sock:
        config = load(tmp_path, port=port_of(sock))
        async with running(Notifier(config, **FAST)) as first:
            first.publish(make_event("promoted", message="while SMTP was down"))
            await until(lambda: first.snapshot()["last_mail_error"] is not None)
            assert first.snapshot()["outbox_size"] == 1
            assert "cannot connect to" in first.snapshot()["last_mail_error"]
        # The first node is gone; its mail waits on disk.
        assert len(Outbox(config.node.state_dir).pending()) == 1

        async with smtp_server(sock=sock) as server, running(Notifier(config, **FAST)) as second:
            (mail,) = await server.wait_for(1)
            await until(lambda: second.snapshot()["outbox_size"] == 0)
    assert "while SMTP was down" in text_of(mail)
    assert Outbox(config.node.state_dir).pending() == []


async def test_a_mail_arrives_once_smtp_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbs.alerts")
    with closed_port() as sock:
        config = load(tmp_path, port=port_of(sock))
        async with running(Notifier(config, **FAST)) as notifier:
            notifier.publish(make_event("split_brain"))
            notifier.publish(make_event("stopped"))
            await until(lambda: notifier.snapshot()["last_mail_error"] is not None)
            await anyio.sleep(0.5)  # several failed attempts, backing off
            async with smtp_server(sock=sock) as server:
                mails = await server.wait_for(2)
                await until(lambda: notifier.snapshot()["outbox_size"] == 0)
            assert notifier.snapshot()["last_mail_error"] is None
    assert ["split brain" in m.message["Subject"] for m in mails] == [True, False]
    # One warning for the problem, not one per retry; one line when it is over.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.fullmatch(
        r"mail not sent \([12] waiting in the outbox\): cannot connect to .*", warnings[0].message
    )
    assert "mail delivery works again" in caplog.text


async def test_a_new_mail_cuts_the_backoff_short(tmp_path: Path) -> None:
    # The backoff has grown long (an hour here) while the server was down; it is
    # back, and a takeover must not wait out the hour: a new mail tries at once.
    with closed_port() as sock:
        config = load(tmp_path, port=port_of(sock))
        slow = {"retry_interval": 3600.0, "max_retry_interval": 3600.0}
        async with running(Notifier(config, **slow)) as notifier:
            notifier.publish(make_event("stopped"))
            await until(lambda: notifier.snapshot()["last_mail_error"] is not None)
            async with smtp_server(sock=sock) as server:
                notifier.publish(make_event("promoted"))
                with anyio.fail_after(10):
                    mails = await server.wait_for(2)
    # The older mail goes first, with the new one.
    assert [("primary" in m.message["Subject"]) for m in mails] == [False, True]


async def test_repeated_replication_failures_are_rate_limited(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port, email={"repeat_interval": 0.6})
        async with running(Notifier(config, **FAST)) as notifier:
            started = anyio.current_time()
            for cycle in (1, 2, 3):
                notifier.publish(make_event("replication_failed", message=f"cycle {cycle}"))
            (first,) = await server.wait_for(1)
            assert anyio.current_time() - started < 0.5
            await anyio.sleep(0.2)
            assert len(server.received) == 1  # the two others are held back

            _, second = await server.wait_for(2)
            assert anyio.current_time() - started >= 0.6
            await anyio.sleep(0.9)  # a whole window with nothing new: no third mail
    assert "cycle 1" in text_of(first)
    assert "more since" not in first.message["Subject"]
    assert "(2 more since " in second.message["Subject"]
    assert "cycle 3" in text_of(second)
    assert "2 more since " in text_of(second)
    assert len(server.received) == 2


async def test_mails_older_than_max_age_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port, email={"max_age": 60.0})
        outbox = Outbox(config.node.state_dir)
        outbox.add(make_event("promoted", message="yesterday's news"), now=time.time() - 120)
        outbox.add(make_event("stopped", message="fresh"), now=time.time() - 5)
        with caplog.at_level(logging.WARNING, logger="sbs.alerts"):
            async with running(Notifier(config, **FAST)):
                (mail,) = await server.wait_for(1)
                await anyio.sleep(0.2)
    assert "fresh" in text_of(mail)
    assert len(server.received) == 1
    assert "dropped an unsent mail about promoted" in caplog.text
    assert outbox.pending() == []


async def publish_timings(notifier: Notifier) -> list[float]:
    notifier.publish(make_event("promoted"))
    await anyio.sleep(0.2)  # the delivery is now failing, or stuck talking to the server
    durations = []
    for _ in range(50):
        event = make_event("replication_failed")
        start = time.perf_counter()
        notifier.publish(event)
        durations.append(time.perf_counter() - start)
    return durations


SLEEPER = {"command": [sys.executable, "-c", "import time; time.sleep(5)"], "timeout": 10.0}


async def test_publish_never_waits_for_smtp_that_is_down(tmp_path: Path) -> None:
    with closed_port() as sock:
        config = load(tmp_path, port=port_of(sock), notify=SLEEPER)
        async with running(Notifier(config, **FAST)) as notifier:
            # Measured once delivery is known to fail (on a loaded machine that takes a while).
            notifier.publish(make_event("started"))
            await until(lambda: notifier.snapshot()["last_mail_error"] is not None)
            durations = await publish_timings(notifier)
    # A non-blocking check with a generous bound, not a benchmark.
    assert max(durations) < 0.010


async def test_publish_never_waits_for_smtp_that_hangs(tmp_path: Path) -> None:
    # A server that accepts and never answers: the worst case for a sender.
    async with silent_server() as port:
        config = load(tmp_path, port=port, notify=SLEEPER)
        async with running(Notifier(config, **FAST)) as notifier:
            durations = await publish_timings(notifier)
    assert max(durations) < 0.010


async def test_drain_lets_the_last_mail_leave(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port)
        async with running(Notifier(config, **FAST)) as notifier:
            notifier.publish(make_event("stopped"))
            assert await notifier.drain(5.0)
            assert len(server.received) == 1


async def test_drain_does_not_wait_for_a_server_that_is_down(tmp_path: Path) -> None:
    with closed_port() as sock:
        config = load(tmp_path, port=port_of(sock))
        notifier = Notifier(config, retry_interval=30.0)
        async with running(notifier):
            notifier.publish(make_event("stopped"))
            started = anyio.current_time()
            assert not await notifier.drain(5.0)
            assert anyio.current_time() - started < 2.0
    # Kept for the next start.
    assert len(Outbox(config.node.state_dir).pending()) == 1


async def test_disabled_email_keeps_no_mail(tmp_path: Path) -> None:
    config = load(tmp_path, port=25, enabled=False)
    async with running(Notifier(config)) as notifier:
        notifier.publish(make_event("promoted"))
        assert await notifier.drain(1.0)
    assert Outbox(config.node.state_dir).pending() == []
    assert notifier.snapshot()["outbox_size"] == 0


async def test_publish_before_run_is_kept(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port)
        notifier = Notifier(config, **FAST)
        notifier.publish(make_event("started"))
        assert notifier.snapshot()["outbox_size"] == 1
        async with running(notifier):
            await server.wait_for(1)


def test_offline_snapshot_counts_the_waiting_mails(tmp_path: Path) -> None:
    assert Notifier.offline_snapshot(tmp_path) == {
        "outbox_size": 0,
        "last_mail_error": None,
        "last_mail_at": None,
        "last_hook_error": None,
    }
    assert not (tmp_path / "outbox").exists()
    Outbox(tmp_path).add(make_event("stopped"))
    assert Notifier.offline_snapshot(tmp_path)["outbox_size"] == 1
