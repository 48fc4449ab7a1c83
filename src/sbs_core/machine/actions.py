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
from sbs_core.messages import Goodbye, HandoverReason, Message, Role

__all__ = (
    "Action",
    "Alert",
    "AlertKind",
    "Close",
    "Connect",
    "Exit",
    "PersistState",
    "PromotionKind",
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
    "state_not_saved",
]

PromotionKind = Literal["startup", "takeover", "handover"]
"""How a node became primary: alone at startup or elected, from a lost peer, or handed over."""


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
    """Make sure the managed application runs, then start these sentinels with this epoch.

    ``how`` says how this node became primary for this relay (``startup``,
    ``takeover`` or ``handover``): a policy such as a backup-only licence may
    allow sentinels for a takeover only.
    """

    names: tuple[str, ...]
    epoch: int
    how: PromotionKind = "startup"


@dataclass(frozen=True, kw_only=True, slots=True)
class StopSentinels:
    """Stop just these sentinels (the operator deactivated them)."""

    names: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StopAll:
    """Stop every sentinel, then the managed application; answer with ``AllStopped``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFinalCycle:
    """Push every local change to the peer on ``conn``; answer with ``FinalCycleDone``.

    ``reason`` is why this node hands over: after a lost split brain (``yield``)
    files changed on both nodes stay the peer's and this node keeps its copies aside.
    """

    conn: ConnId
    reason: HandoverReason = "stopping"


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
