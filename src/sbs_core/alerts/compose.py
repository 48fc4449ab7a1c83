"""The text of an alert mail: a subject an operator can triage from, a plain-text body.

The subject names the node by name *and* address (two machines may share a host
name), says what happened and the role and epoch after it, e.g.
``[sbs] print-1 (10.0.0.1): took over as primary (epoch 4) from print-2: silent for 3 s``.
The body repeats that and adds the time (local and UTC), the sentinels started and
stopped, the last replication, the conflicts kept and the alert's details.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sbs_core import __version__
from sbs_core.alerts.events import AlertEvent
from sbs_core.config import Config

__all__ = ("Mail", "Repeats", "compose_mail", "email_test_event")

_SUBJECT_REASON_CHARS: Final = 120
_LABEL_WIDTH: Final = 19


@dataclass(frozen=True, slots=True)
class Mail:
    subject: str
    body: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Repeats:
    """Alerts of the same kind held back since the last mail about it (rate limiting)."""

    count: int
    since: float
    """Wall time of the last mail sent about this kind."""


def compose_mail(event: AlertEvent, *, repeats: Repeats | None = None) -> Mail:
    headline = _headline(event)
    subject = f"[sbs] {_node(event)}: {headline}"
    if repeats is not None and repeats.count:
        subject += f" ({repeats.count} more since {_clock(repeats.since)})"
    return Mail(subject=_one_line(subject), body=_body(event, headline, repeats))


def email_test_event(config: Config, *, at: float | None = None) -> AlertEvent:
    """The event behind ``sbs email test``'s mail: says where it came from and how."""
    email = config.email
    login = f", user {email.username}" if email.username else ""
    return AlertEvent(
        kind="test",
        level="info",
        message="test mail sent by 'sbs email test'",
        node_name=config.node.name,
        node_address=config.node.local_address,
        role="unknown",
        epoch=0,
        at=time.time() if at is None else at,
        details={
            "server": f"{email.host}:{email.port} (security {email.security}{login})",
            "recipients": ", ".join(email.recipients),
        },
    )


# --- subject ---------------------------------------------------------------------------


def _headline(event: AlertEvent) -> str:
    epoch = f"epoch {event.epoch}"
    match event.kind:
        case "promoted":
            reason = _one_line(event.details.get("reason") or event.message)
            if event.details.get("how") == "startup":
                return f"became primary ({epoch}): {_shorten(reason)}"
            # The machine's takeover reasons read "took over from <peer>: <why>".
            if reason.startswith("took over from "):
                return f"took over as primary ({epoch}) {_shorten(reason[10:])}"
            return f"took over as primary ({epoch}): {_shorten(reason)}"
        case "handback":
            return f"handback done, now {event.role} ({epoch})"
        case "split_brain":
            return f"split brain, now {event.role} ({epoch})"
        case "replication_failed":
            return f"replication failed ({event.role}, {epoch})"
        case "state_not_saved":
            return f"cannot save its state ({event.role}, {epoch})"
        case "started":
            return f"service started ({event.role}, {epoch})"
        case "stopped":
            return f"service stopped ({epoch})"
        case "test":
            return "test mail"
        case _:
            return f"{event.kind.replace('_', ' ')} ({event.role}, {epoch})"


def _node(event: AlertEvent) -> str:
    return f"{event.node_name} ({event.node_address})"


def _shorten(text: str) -> str:
    if len(text) <= _SUBJECT_REASON_CHARS:
        return text
    return text[: _SUBJECT_REASON_CHARS - 1].rstrip() + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- body ------------------------------------------------------------------------------


def _body(event: AlertEvent, headline: str, repeats: Repeats | None) -> str:
    if event.kind == "test":
        lines = [
            f"This is a test mail from sbs on {_node(event)}, sent by 'sbs email test'.",
            "If you can read it, the alerts of this node will reach you.",
            "",
            _row("When", _when(event.at)),
        ]
        lines += [_row(key.capitalize(), value) for key, value in event.details.items()]
        return _finish(lines, event)
    lines = [
        f"{_node(event)}: {headline}",
        "",
        _row("Reason", event.message),
        _row("When", _when(event.at)),
        _row("Node", _node(event)),
        _row("Role", event.role),
        _row("Epoch", str(event.epoch)),
        _row("Event", f"{event.kind} ({event.level})"),
        _row("Sentinels started", ", ".join(event.sentinels_started) or "none"),
        _row("Sentinels stopped", ", ".join(event.sentinels_stopped) or "none"),
        _row("Last replication", _last_sync(event)),
    ]
    if event.conflicts:
        lines.append(_row("Conflicts kept", f"{len(event.conflicts)} file(s), this node's copies:"))
        lines += [f"  {path}" for path in event.conflicts]
    else:
        lines.append(_row("Conflicts kept", "none"))
    if repeats is not None and repeats.count:
        lines += [
            "",
            f"{repeats.count} more since {_when(repeats.since)}: alerts of this kind are"
            " gathered into one mail per email.repeat_interval; this is the latest.",
        ]
    if event.details:
        lines += ["", "Details:"]
        lines += [f"  {key}: {value}" for key, value in event.details.items()]
    return _finish(lines, event)


def _finish(lines: list[str], event: AlertEvent) -> str:
    lines += ["", "-- ", f"sbs {__version__} on {event.node_name}"]
    return "\n".join(lines) + "\n"


def _row(label: str, value: str) -> str:
    return f"{label + ':':<{_LABEL_WIDTH}}{value}"


def _when(at: float) -> str:
    local = datetime.fromtimestamp(at).astimezone()
    utc = datetime.fromtimestamp(at, UTC)
    return f"{local.isoformat(timespec='seconds')} ({utc.strftime('%Y-%m-%d %H:%M:%S')} UTC)"


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%H:%M")


def _last_sync(event: AlertEvent) -> str:
    if event.last_sync_at is None:
        return "never"
    before = event.at - event.last_sync_at
    ago = f", {before:.0f} s before this" if before >= 0 else ""
    return f"{_when(event.last_sync_at)}{ago}"
