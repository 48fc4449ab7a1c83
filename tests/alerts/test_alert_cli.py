"""``sbs email test`` run against the test SMTP server, and the mail lines of ``sbs status``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pytest
from alertkit import (
    HOST,
    PASSWORD,
    RECIPIENT,
    closed_port,
    port_of,
    primary_status,
    silent_server,
    smtp_server,
    text_of,
    write_ca_file,
    write_config,
)

from sbs_core.cli import format_status

pytestmark = pytest.mark.anyio


async def sbs(*args: str) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        result = await anyio.run_process([sys.executable, "-m", "sbs_core", *args], check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_success(tmp_path: Path) -> None:
    async with smtp_server(security="starttls", users={"sbs": PASSWORD}) as server:
        config = write_config(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        code, out, err = await sbs("email", "test", "--config", str(config))
        (mail,) = await server.wait_for(1)
    assert (code, err) == (0, "")
    assert out == f"test mail sent to {RECIPIENT} via {HOST}:{server.port}\n"
    assert mail.message["Subject"] == f"[sbs] print-1 ({HOST}): test mail"
    assert "sent by 'sbs email test'" in text_of(mail)
    assert PASSWORD not in text_of(mail)


async def test_connection_refused(tmp_path: Path) -> None:
    with closed_port() as sock:
        port = port_of(sock)
        config = write_config(tmp_path, port=port)
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert err.startswith(f"sbs: test mail not sent: cannot connect to {HOST}:{port}: ")


async def test_authentication_refused(tmp_path: Path) -> None:
    async with smtp_server(security="starttls", users={"sbs": "another"}) as server:
        config = write_config(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert err.startswith(f"sbs: test mail not sent: authentication refused by {HOST}: 535")
    assert PASSWORD not in err


async def test_tls_failure(tmp_path: Path) -> None:
    async with smtp_server(security="ssl") as server:
        config = write_config(tmp_path, port=server.port, security="ssl")
        code, _, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert err.startswith("sbs: test mail not sent: TLS failed: ")
    assert "certificate verify failed" in err


async def test_email_disabled(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=25, enabled=False)
    code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert "email is disabled" in err
    assert "enabled = true" in err


async def test_recipient_refused(tmp_path: Path) -> None:
    async with smtp_server(refuse=frozenset({RECIPIENT})) as server:
        config = write_config(tmp_path, port=server.port)
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert (code, out) == (1, "")
    assert err.startswith(f"sbs: test mail not sent: recipient refused: {RECIPIENT}: 550")
    assert server.received == []


async def test_server_that_never_answers(tmp_path: Path) -> None:
    async with silent_server() as port:
        config = write_config(tmp_path, port=port, email={"timeout": 1.0})
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert (code, out) == (1, "")
    assert err.startswith(f"sbs: test mail not sent: timed out: {HOST}:{port} did not answer")


# --- sbs status, for a person ------------------------------------------------------------


def test_status_says_nothing_about_mail_before_there_is_any() -> None:
    screen = format_status(primary_status())
    assert "mail" not in screen
    assert "hook" not in screen


def test_status_shows_the_outbox_and_the_delivery_problems() -> None:
    sent_at = time.time() - 95
    screen = format_status(
        primary_status(
            outbox_size=3,
            last_mail_at=sent_at,
            last_mail_error=f"cannot connect to {HOST}:2525: Connection refused",
            last_hook_error="notify.command failed (exit code 3); its output: no",
        )
    )
    lines = screen.splitlines()
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sent_at))
    assert f"mail       3 waiting in the outbox, last sent {clock} (95 s ago)" in lines
    assert f"mail error cannot connect to {HOST}:2525: Connection refused" in lines
    assert "hook error notify.command failed (exit code 3); its output: no" in lines
    assert len(lines) <= 12, screen


def test_status_of_an_empty_outbox_after_a_mail() -> None:
    screen = format_status(primary_status(last_mail_at=time.time() - 4))
    (line,) = [line for line in screen.splitlines() if line.startswith("mail")]
    assert line.startswith("mail       outbox empty, last sent ")
    assert line.endswith("(4 s ago)")


def test_status_of_a_stopped_node_with_mail_waiting() -> None:
    # A stopped node's status has the outbox count from disk, and no times.
    screen = format_status(primary_status(role="stopped", active_sentinels=[], outbox_size=1))
    assert "mail       1 waiting in the outbox" in screen.splitlines()
