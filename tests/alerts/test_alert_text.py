"""Events, the mail text and the rate limit of repeating kinds (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alertkit import load, make_event

from sbs_core.alerts import (
    MAIL_KINDS,
    AlertEvent,
    RepeatLimiter,
    Repeats,
    compose_mail,
    email_test_event,
)
from sbs_core.machine import Alert

AT = datetime(2024, 5, 1, 12, 3, 12, tzinfo=UTC).timestamp()


def test_event_from_a_machine_alert_round_trips_through_json() -> None:
    alert = Alert(
        kind="promoted",
        message="primary (epoch 4): took over from print-2: silent",
        level="warning",
        details={"how": "takeover", "reason": "took over from print-2: silent"},
    )
    event = AlertEvent.from_alert(
        alert,
        node_name="print-1",
        node_address="10.0.0.1",
        role="primary",
        epoch=4,
        at=AT,
        sentinels_started=("labels",),
        last_sync_at=AT - 5,
        conflicts=("/srv/a.lab",),
    )
    data = json.loads(json.dumps(event.to_dict()))
    assert data["format"] == 1
    assert data["kind"] == "promoted"
    assert data["sentinels_started"] == ["labels"]
    assert AlertEvent.from_dict(data) == event


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"kind": "exploded"}, "unknown kind"),
        ({"epoch": "4"}, "epoch must be an integer"),
        ({"conflicts": "a"}, "conflicts must be a list"),
        ({"details": {"a": 1}}, "details must map strings"),
    ],
)
def test_a_malformed_event_object_is_refused(change: dict[str, object], problem: str) -> None:
    data = make_event().to_dict() | change
    with pytest.raises(ValueError, match=problem):
        AlertEvent.from_dict(data)


def test_which_kinds_send_mail() -> None:
    assert {"promoted", "handback", "split_brain", "replication_failed"} <= MAIL_KINDS
    assert "state_not_saved" in MAIL_KINDS  # a node that cannot save its state must be heard
    assert {"started", "stopped"} <= MAIL_KINDS
    for quiet in ("peer_lost", "peer_connected", "demoted", "refused", "stale"):
        assert not make_event(quiet).sends_mail


def test_promotion_subject_names_node_address_role_epoch_and_reason() -> None:
    event = make_event(
        node_name="print-1",
        node_address="10.0.0.1",
        epoch=4,
        details={"how": "takeover", "reason": "took over from print-2: no heartbeat for 3 s"},
    )
    assert compose_mail(event).subject == (
        "[sbs] print-1 (10.0.0.1): took over as primary (epoch 4)"
        " from print-2: no heartbeat for 3 s"
    )
    startup = make_event(details={"how": "startup", "reason": "nobody answered at startup"})
    assert compose_mail(startup).subject.endswith(
        ": became primary (epoch 4): nobody answered at startup"
    )


@pytest.mark.parametrize(
    ("kind", "role", "expected"),
    [
        ("handback", "primary", "handback done, now primary (epoch 4)"),
        ("split_brain", "secondary", "split brain, now secondary (epoch 4)"),
        ("replication_failed", "primary", "replication failed (primary, epoch 4)"),
        ("state_not_saved", "primary", "cannot save its state (primary, epoch 4)"),
        ("started", "starting", "service started (starting, epoch 4)"),
        ("stopped", "stopped", "service stopped (epoch 4)"),
    ],
)
def test_subjects(kind: str, role: str, expected: str) -> None:
    event = make_event(kind, role=role, node_address="10.0.0.1")
    assert compose_mail(event).subject == f"[sbs] print-1 (10.0.0.1): {expected}"


def test_body_tells_when_where_what_and_why() -> None:
    event = make_event(
        at=AT,
        last_sync_at=AT - 14,
        sentinels_stopped=("archive",),
        conflicts=("/srv/labels/a.lab", "/srv/labels/b.lab"),
        message="took over from print-2: no heartbeat for 3.0 s",
    )
    body = compose_mail(event).body
    local = datetime.fromtimestamp(AT).astimezone().isoformat(timespec="seconds")
    assert f"When:              {local} (2024-05-01 12:03:12 UTC)" in body
    assert "Node:              print-1 (127.0.0.1)" in body
    assert "Role:              primary" in body
    assert "Epoch:             4" in body
    assert "Reason:            took over from print-2: no heartbeat for 3.0 s" in body
    assert "Sentinels started: labels, spooler" in body
    assert "Sentinels stopped: archive" in body
    assert "Last replication:  " in body
    assert "14 s before this" in body
    assert "Conflicts kept:    2 file(s)" in body
    assert "  /srv/labels/b.lab" in body
    assert "how: takeover" in body


def test_body_without_replication_or_conflicts() -> None:
    body = compose_mail(make_event(last_sync_at=None, conflicts=())).body
    assert "Last replication:  never" in body
    assert "Conflicts kept:    none" in body


def test_repeats_are_told_in_subject_and_body() -> None:
    mail = compose_mail(make_event("replication_failed"), repeats=Repeats(count=2, since=AT))
    clock = datetime.fromtimestamp(AT).astimezone().strftime("%H:%M")
    assert mail.subject.endswith(f"(2 more since {clock})")
    assert "2 more since " in mail.body


def test_the_test_mail_says_where_it_was_sent_from(tmp_path: Path) -> None:
    config = load(tmp_path, port=2525, username="sbs")
    mail = compose_mail(email_test_event(config))
    assert mail.subject == "[sbs] print-1 (127.0.0.1): test mail"
    assert "sent by 'sbs email test'" in mail.body
    assert "127.0.0.1:2525 (security none, user sbs)" in mail.body


# --- rate limit -------------------------------------------------------------------------


def test_a_repeating_kind_is_mailed_once_per_interval_then_summed_up() -> None:
    limiter = RepeatLimiter(interval=60)
    first = make_event("replication_failed", message="cycle 1", at=AT)
    sent = limiter.offer(first, now=0)
    assert sent is not None
    assert sent.event == first
    assert sent.repeats is None
    assert limiter.next_due() is None

    assert limiter.offer(make_event("replication_failed", message="cycle 2"), now=10) is None
    assert limiter.offer(make_event("replication_failed", message="cycle 3"), now=20) is None
    assert limiter.next_due() == 60
    assert limiter.take_due(now=59) == []

    (summary,) = limiter.take_due(now=60)
    assert summary.event.message == "cycle 3"
    assert summary.repeats == Repeats(count=2, since=AT)
    assert limiter.next_due() is None

    # A new window opened with the summary: the next failure inside it waits again.
    assert limiter.offer(make_event("replication_failed"), now=70) is None
    # A window that ends with nothing held lets the next failure through at once.
    quiet = RepeatLimiter(interval=60)
    quiet.offer(make_event("replication_failed"), now=0)
    assert quiet.take_due(now=100) == []
    assert quiet.offer(make_event("replication_failed"), now=101) is not None


def test_other_kinds_are_never_held_back() -> None:
    limiter = RepeatLimiter(interval=60)
    for now in range(5):
        assert limiter.offer(make_event("split_brain"), now=now) is not None
        assert limiter.offer(make_event("promoted"), now=now) is not None


def test_a_late_collection_reports_the_held_alerts_with_the_next_one() -> None:
    limiter = RepeatLimiter(interval=60)
    limiter.offer(make_event("replication_failed", at=AT), now=0)
    limiter.offer(make_event("replication_failed"), now=30)
    sent = limiter.offer(make_event("replication_failed", message="later"), now=90)
    assert sent is not None
    assert sent.event.message == "later"
    assert sent.repeats == Repeats(count=1, since=AT)
