"""What an operator hears about: one :class:`AlertEvent` per alert of the role machine.

An event is a small frozen fact with everything a mail or a notify command needs,
taken when the alert happened: which node, its new role and epoch, the reason,
the sentinels started or stopped, the last replication and the conflicts kept.
It travels as JSON (the outbox files, a notify command's standard input), so
:meth:`AlertEvent.to_dict` and :meth:`AlertEvent.from_dict` are exact inverses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from sbs_core.machine.actions import Alert, AlertKind

__all__ = (
    "EVENT_FORMAT",
    "MAIL_KINDS",
    "REPEATING_KINDS",
    "AlertEvent",
    "EventKind",
    "Level",
)

EventKind = AlertKind | Literal["test"]
"""The kinds of the role machine's alerts, and ``test`` for ``sbs email test``."""

Level = Literal["info", "warning", "error"]

EVENT_FORMAT: Final = 1
"""Version of the JSON form; a notify command can check it."""

MAIL_KINDS: Final[frozenset[str]] = frozenset(
    (
        "promoted",
        "handback",
        "split_brain",
        "replication_failed",
        "state_not_saved",
        "started",
        "stopped",
        "test",
    )
)
"""Kinds that send a mail. The others (a peer connecting or lost, a demotion, a refused
or stale peer) are logged and given to the notify command only: a demotion after a
split brain is told by the split-brain mail, a lost peer by the promotion that follows."""

REPEATING_KINDS: Final[frozenset[str]] = frozenset(("replication_failed",))
"""Kinds that can repeat every cycle: at most one mail per ``email.repeat_interval``."""

_KINDS: Final[frozenset[str]] = frozenset(
    arg for part in get_args(EventKind) for arg in get_args(part)
)
_LEVELS: Final[frozenset[str]] = frozenset(get_args(Level))


@dataclass(frozen=True, kw_only=True, slots=True)
class AlertEvent:
    """One alert with its context. Times are wall-clock seconds since the epoch."""

    kind: EventKind
    level: Level
    message: str
    """The reason, as the role machine (or the replication) put it."""
    node_name: str
    node_address: str
    """``node.local_address``: two nodes may share a host name, not an address."""
    role: str
    """The node's role after the event (``primary``, ``secondary``, ``stopped``...)."""
    epoch: int
    at: float
    sentinels_started: tuple[str, ...] = ()
    sentinels_stopped: tuple[str, ...] = ()
    last_sync_at: float | None = None
    """When replication last completed, if ever."""
    conflicts: tuple[str, ...] = ()
    """Paths of this node's copies kept aside because the file changed on both nodes."""
    details: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_alert(
        cls,
        alert: Alert,
        *,
        node_name: str,
        node_address: str,
        role: str,
        epoch: int,
        at: float | None = None,
        sentinels_started: tuple[str, ...] = (),
        sentinels_stopped: tuple[str, ...] = (),
        last_sync_at: float | None = None,
        conflicts: tuple[str, ...] = (),
    ) -> AlertEvent:
        """The event for a role machine's :class:`~sbs_core.machine.Alert`; ``at``: now."""
        return cls(
            kind=alert.kind,
            level=alert.level,
            message=alert.message,
            node_name=node_name,
            node_address=node_address,
            role=role,
            epoch=epoch,
            at=time.time() if at is None else at,
            sentinels_started=sentinels_started,
            sentinels_stopped=sentinels_stopped,
            last_sync_at=last_sync_at,
            conflicts=conflicts,
            details=dict(alert.details),
        )

    @property
    def sends_mail(self) -> bool:
        return self.kind in MAIL_KINDS

    def to_dict(self) -> dict[str, Any]:
        """The JSON object given to a notify command and kept in the outbox."""
        return {
            "format": EVENT_FORMAT,
            "kind": self.kind,
            "level": self.level,
            "message": self.message,
            "node_name": self.node_name,
            "node_address": self.node_address,
            "role": self.role,
            "epoch": self.epoch,
            "at": self.at,
            "sentinels_started": list(self.sentinels_started),
            "sentinels_stopped": list(self.sentinels_stopped),
            "last_sync_at": self.last_sync_at,
            "conflicts": list(self.conflicts),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertEvent:
        """Read back :meth:`to_dict`'s object; ``ValueError`` says what is wrong with it."""
        try:
            kind = data["kind"]
            level = data["level"]
            if kind not in _KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            if level not in _LEVELS:
                raise ValueError(f"unknown level {level!r}")
            last_sync_at = data.get("last_sync_at")
            details = data.get("details", {})
            if not isinstance(details, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in details.items()
            ):
                raise ValueError("details must map strings to strings")
            return cls(
                kind=kind,
                level=level,
                message=_text(data, "message"),
                node_name=_text(data, "node_name"),
                node_address=_text(data, "node_address"),
                role=_text(data, "role"),
                epoch=_integer(data, "epoch"),
                at=_number(data, "at"),
                sentinels_started=_texts(data, "sentinels_started"),
                sentinels_stopped=_texts(data, "sentinels_stopped"),
                last_sync_at=None if last_sync_at is None else _number(data, "last_sync_at"),
                conflicts=_texts(data, "conflicts"),
                details=dict(details),
            )
        except KeyError as exc:
            raise ValueError(f"missing key {exc}") from None


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _integer(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")
    return value


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


def _texts(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key} must be a list of strings")
    return tuple(value)
