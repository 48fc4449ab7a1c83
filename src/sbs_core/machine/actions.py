"""Outputs of the role machine: commands for the driver to carry out, in order.

Actions that take time and whose end the machine waits for are answered by an
event: ``StopAll`` by :class:`~.events.AllStopped`, ``RunFinalCycle`` by
:class:`~.events.FinalCycleDone`, ``Connect`` by ``PeerConnected`` or
``ConnectFailed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sbs_core.machine.events import ConnId
from sbs_core.messages import Goodbye, Message, Role

__all__ = (
    "Action",
    "Alert",
    "AlertKind",
    "Close",
    "Connect",
    "Exit",
    "PersistState",
    "RunFinalCycle",
    "Send",
    "StartSentinels",
    "StopAll",
    "StopSentinels",
)

AlertKind = Literal[
    "started",
    "stopped",
    "promoted",
    "demoted",
    "handback",
    "split_brain",
    "peer_connected",
    "peer_lost",
    "refused",
    "stale",
    "replication_failed",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Connect:
    """Open a connection to the peer's port and run the handshake."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Send:
    conn: ConnId
    message: Message


@dataclass(frozen=True, kw_only=True, slots=True)
class Close:
    """Close a connection, sending ``goodbye`` first when given."""

    conn: ConnId
    goodbye: Goodbye | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class StartSentinels:
    """Make sure the managed application runs, then start these sentinels with this epoch."""

    names: tuple[str, ...]
    epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StopSentinels:
    """Stop just these sentinels (the operator deactivated them)."""

    names: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StopAll:
    """Stop every sentinel, then the managed application; answer with ``AllStopped``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFinalCycle:
    """Push every local change to the peer on ``conn``; answer with ``FinalCycleDone``."""

    conn: ConnId


@dataclass(frozen=True, kw_only=True, slots=True)
class PersistState:
    """Write the durable state before anything that depends on it happens."""

    epoch: int
    role: Role
    sentinels: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Alert:
    """Something an operator should hear about (log line, email, notify hook)."""

    kind: AlertKind
    message: str
    level: Literal["info", "warning", "error"] = "info"
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Exit:
    """The planned stop is complete: the driver may close everything and return."""


Action = (
    Connect
    | Send
    | Close
    | StartSentinels
    | StopSentinels
    | StopAll
    | RunFinalCycle
    | PersistState
    | Alert
    | Exit
)
