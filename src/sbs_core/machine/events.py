"""Inputs of the role machine: past-tense facts, each carrying the time it happened.

``now`` is a monotonic clock reading in seconds supplied by whoever drives the
machine (the anyio driver passes ``anyio.current_time()``, the simulation kit
its virtual clock). The machine never reads a clock itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from sbs_core.messages import Hello, Message

__all__ = (
    "AllStopped",
    "ConnId",
    "ConnectFailed",
    "ConnectionClosed",
    "Event",
    "FinalCycleDone",
    "MessageReceived",
    "PeerConnected",
    "SentinelChangeRequested",
    "Started",
    "StopRequested",
    "TimerFired",
)

ConnId = int
"""Names one authenticated connection; chosen by the driver, unique within a node's run."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Started:
    """The node is listening and may now probe its peer."""

    now: float


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerConnected:
    """A connection finished the handshake and both Hellos were exchanged."""

    now: float
    conn: ConnId
    hello: Hello
    initiated: bool  # True when this node opened the connection


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectFailed:
    """The outgoing attempt the machine asked for (:class:`~.actions.Connect`) failed.

    ``answered`` is True when something did answer on the peer's port but the
    handshake was refused (wrong secret, wrong version): a node that is answered
    by something it cannot trust must not conclude that nobody is there.
    """

    now: float
    answered: bool
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageReceived:
    now: float
    conn: ConnId
    message: Message


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionClosed:
    """An established connection ended (closed by the peer, reset, or a protocol error)."""

    now: float
    conn: ConnId
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AllStopped:
    """Every sentinel and the managed application stopped (answer to ``StopAll``)."""

    now: float


@dataclass(frozen=True, kw_only=True, slots=True)
class FinalCycleDone:
    """The last replication cycle towards the peer ended (answer to ``RunFinalCycle``)."""

    now: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class StopRequested:
    """The operator asked this node to stop (SIGTERM, Ctrl+C, service stop): a planned stop."""

    now: float


@dataclass(frozen=True, kw_only=True, slots=True)
class SentinelChangeRequested:
    """The operator activated or deactivated one sentinel on this node."""

    now: float
    name: str
    active: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class TimerFired:
    """The deadline the machine asked for (``next_deadline()``) has come."""

    now: float


Event = (
    Started
    | PeerConnected
    | ConnectFailed
    | MessageReceived
    | ConnectionClosed
    | AllStopped
    | FinalCycleDone
    | StopRequested
    | SentinelChangeRequested
    | TimerFired
)
