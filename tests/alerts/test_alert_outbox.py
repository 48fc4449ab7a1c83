"""The outbox: one atomic JSON file per mail, in time order, old mails dropped."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from alertkit import make_event

from sbs_core.alerts import Outbox, Repeats


def test_mails_come_back_in_the_order_they_were_added(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    kinds = ["started", "promoted", "replication_failed", "split_brain", "stopped"]
    paths = [outbox.add(make_event(kind)) for kind in kinds]

    assert all(p.parent == tmp_path / "outbox" for p in paths)
    assert sorted(p.name for p in paths) == [p.name for p in paths]
    pending = outbox.pending()
    assert [m.event.kind for m in pending] == kinds
    assert [m.path for m in pending] == paths
    assert outbox.count() == 5

    outbox.remove(pending[1])
    outbox.remove(pending[1].path)  # twice is fine
    assert [m.event.kind for m in outbox.pending()] == [k for k in kinds if k != "promoted"]


def test_a_mail_keeps_its_event_and_repeats(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    event = make_event("replication_failed", node_name="Drucker-Süd", conflicts=("/a/ä.lab",))
    outbox.add(event, repeats=Repeats(count=2, since=1_700_000_000.5), now=1_700_000_100.0)

    (mail,) = Outbox(tmp_path).pending()  # a new instance: what a restarted node sees
    assert mail.event == event
    assert mail.repeats == Repeats(count=2, since=1_700_000_000.5)
    assert mail.created_at == pytest.approx(1_700_000_100.0)
    # Readable by an operator who looks into the folder.
    text = mail.path.read_text(encoding="utf-8")
    assert "Drucker-Süd" in text
    assert json.loads(text)["event"]["kind"] == "replication_failed"


def test_an_empty_or_missing_outbox(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "not-yet")
    assert outbox.pending() == []
    assert outbox.count() == 0
    assert outbox.drop_older_than(1.0) == []


def test_old_mails_are_dropped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path)
    now = time.time()
    outbox.add(make_event("promoted", message="very old"), now=now - 7200)
    outbox.add(make_event("stopped", message="recent"), now=now - 60)

    with caplog.at_level(logging.WARNING, logger="sbs.alerts"):
        dropped = outbox.drop_older_than(3600, now=now)

    assert [m.event.message for m in dropped] == ["very old"]
    assert [m.event.message for m in outbox.pending()] == ["recent"]
    assert "dropped an unsent mail about promoted" in caplog.text
    assert "email.max_age" in caplog.text


def test_unreadable_files_are_set_aside_and_temporary_files_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path)
    good = outbox.add(make_event("started"))
    bad = outbox.folder / "00000000000000000001-promoted.json"
    bad.write_text("{not json", encoding="utf-8")
    (outbox.folder / ".00000000000000000002-x.json.123.tmp").write_text("{}", encoding="utf-8")

    with caplog.at_level(logging.ERROR, logger="sbs.alerts"):
        pending = outbox.pending()

    assert [m.path for m in pending] == [good]
    assert not bad.exists()
    assert (outbox.folder / (bad.name + ".bad")).exists()
    assert "unreadable" in caplog.text


def test_names_stay_unique_within_one_clock_tick(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    paths = [outbox.add(make_event("replication_failed"), now=1_700_000_000.0) for _ in range(20)]
    assert len(set(paths)) == 20
    assert len(outbox.pending()) == 20
