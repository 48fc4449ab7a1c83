"""The role state machine: every transition of a node, in one place, with no I/O.

Feed it events (:mod:`sbs_core.machine.events`) with :meth:`RoleMachine.handle`;
it returns the actions (:mod:`sbs_core.machine.actions`) to carry out, in order,
and says through :meth:`RoleMachine.next_deadline` when it next wants a
:class:`~sbs_core.machine.events.TimerFired`. It reads no clock, opens no socket
and draws no random number, so the same inputs always give the same outputs.

Roles and how a node moves between them::

    starting --(peer answers and is primary)----------------> secondary
    starting --(nobody answers; mode auto/primary)----------> primary
    starting --(nobody answers; mode backup)----------------> secondary (waiting)
    starting/secondary --(connected, no primary, elected)---> primary
    secondary --(primary lost: closed or silent dead_time)--> primary   (failover)
    secondary --(Handover received)-------------------------> primary   (switchover, handback)
    primary --(split brain lost / handback due)--> handing over --> secondary
    primary --(stop requested, peer connected)---> handing over --> stopped
    any --(stop requested, no peer to hand to)----------------------> stopped

Handing over is always: stop every sentinel, run the final replication cycle
towards the peer, send ``Handover``; only then does the peer start them. The
node that handed over then waits, up to dead_time, for the peer to say it is
primary, taking neither an older state of the peer nor a crossing ``Handover``
as a reason to be primary again. The rules that decide who should be primary
are in :mod:`sbs_core.machine.rules`.

What the machine assumes of its driver: actions are carried out in order, the
controller ones (``StartSentinels``, ``StopSentinels``, ``StopAll``) one after
the other; each ``StopAll`` and ``RunFinalCycle`` is answered once. The machine
keeps at most one ``StopAll`` under way and starts nothing until it is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from sbs_core.errors import NotPrimaryError
from sbs_core.machine import rules
from sbs_core.machine.actions import (
    Action,
    Alert,
    AlertKind,
    Close,
    Connect,
    Exit,
    PersistState,
    PromotionKind,
    RunFinalCycle,
    Send,
    StartSentinels,
    StopAll,
    StopSentinels,
)
from sbs_core.machine.events import (
    AllStopped,
    ConnectFailed,
    ConnectionClosed,
    ConnId,
    Event,
    FinalCycleDone,
    MessageReceived,
    PeerConnected,
    SentinelChangeRequested,
    Started,
    StopRequested,
    TimerFired,
)
from sbs_core.messages import (
    Goodbye,
    Handover,
    HandoverReason,
    Heartbeat,
    Hello,
    Mode,
    NodeState,
    Role,
)

__all__ = ("MachineSettings", "MachineStatus", "PersistedState", "RoleMachine")


@dataclass(frozen=True, kw_only=True, slots=True)
class MachineSettings:
    node_id: str
    name: str
    mode: Mode
    port: int
    heartbeat_interval: float
    dead_time: float
    probe_interval: float
    final_cycle_timeout: float
    software: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class PersistedState:
    """What a node keeps across restarts (the driver stores it in ``state_dir``)."""

    epoch: int = 0
    sentinels: tuple[str, ...] = ()
    role: Role = "stopped"


@dataclass(frozen=True, kw_only=True, slots=True)
class MachineStatus:
    node_id: str
    name: str
    mode: Mode
    role: Role
    epoch: int
    sentinels: tuple[str, ...]
    peer_connected: bool
    peer: NodeState | None
    handing_over: bool
    last_error: str | None
    promoted_how: PromotionKind | None = None


class _Phase(Enum):
    IDLE = "idle"  # constructed, not started
    NORMAL = "normal"
    HANDING_OVER = "handing_over"
    STOPPING = "stopping"  # stopping with no peer to hand over to
    EXITED = "exited"


@dataclass(kw_only=True, slots=True)
class _Session:
    conn: ConnId
    peer: NodeState
    initiator_id: str
    opened_at: float
    last_heard_at: float
    next_heartbeat_at: float
    replaced: bool = False  # the peer said it closes this one as a duplicate
    peer_stopping: bool = False

    def preference(self) -> tuple[str, float]:
        # Both nodes keep the connection opened by the lower node id; from one
        # opener, the newest (the older one was abandoned, e.g. half-open).
        return (self.initiator_id, -self.opened_at)


@dataclass(kw_only=True, slots=True)
class _Handover:
    conn: ConnId
    reason: HandoverReason
    stage: Literal["stopping_sentinels", "final_cycle"] = "stopping_sentinels"
    deadline_at: float | None = None
    cycles_pending: int = 0  # RunFinalCycles not yet answered; the last answer counts


@dataclass(kw_only=True, slots=True)
class _Out:
    actions: list[Action] = field(default_factory=list)

    def add(self, action: Action) -> None:
        self.actions.append(action)


_HANDOVER_REASONS: dict[HandoverReason, str] = {
    "stopping": "planned handover: {peer} is stopping",
    "handback": "handback: {peer} gave the role back",
    "yield": "split brain resolved: {peer} yielded",
}


class RoleMachine:
    """One node's view of the pair; see the module docstring for the transitions."""

    def __init__(self, settings: MachineSettings, persisted: PersistedState) -> None:
        self.settings = settings
        self._role: Role = "stopped"
        self._phase = _Phase.IDLE
        self._epoch = persisted.epoch
        self._sentinels = tuple(sorted(set(persisted.sentinels)))
        self._sessions: dict[ConnId, _Session] = {}
        self._connecting = False
        self._next_probe_at = 0.0
        self._quick_probe_at = float("-inf")
        self._grace_until: float | None = None
        # Set when this node handed the role to the peer, until the peer says it
        # is primary: a state the peer announced earlier (on this or another
        # connection) may still be on its way, and neither that stale
        # "secondary" nor a Handover the peer sent meanwhile may make this node
        # primary again. Bounded by dead_time, after which elections decide.
        self._takeover_until: float | None = None
        self._handover: _Handover | None = None
        # Set while this node follows (or is about to follow) a primary: losing
        # that peer then means failover. A backup that never saw a primary waits.
        self._had_primary = False
        self._sentinels_wanted = False
        # A StopAll is under way (at most one: see _stop_all and _start_sentinels).
        self._stopping_all = False
        self._last_error: str | None = None
        # How this node became primary for the current relay (licence policy).
        self._promoted_how: PromotionKind = "startup"
        self._last_refusal: str | None = None
        self._split_brain_alerted: set[ConnId] = set()
        # The peer's latest state heard on any connection (see _fresher).
        self._last_peer: NodeState | None = None
        self._out = _Out()

    # ------------------------------------------------------------------ queries

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int:
        return self._epoch

    def status(self) -> MachineStatus:
        session = self._preferred()
        return MachineStatus(
            node_id=self.settings.node_id,
            name=self.settings.name,
            mode=self.settings.mode,
            role=self._role,
            epoch=self._epoch,
            sentinels=self._sentinels,
            peer_connected=session is not None,
            peer=session.peer if session else None,
            handing_over=self._phase is _Phase.HANDING_OVER,
            last_error=self._last_error,
            promoted_how=self._promoted_how if self._role == "primary" else None,
        )

    def hello(self) -> Hello:
        """The Hello to send on a freshly authenticated connection."""
        s = self.settings
        return Hello(
            state=self._state(),
            heartbeat_interval=s.heartbeat_interval,
            dead_time=s.dead_time,
            port=s.port,
            software=s.software,
        )

    def replication_target(self) -> ConnId | None:
        """The connection to push files to: set while primary with a secondary attached."""
        session = self._preferred()
        if self._role != "primary" or session is None or session.peer.role != "secondary":
            return None
        return session.conn

    def next_deadline(self) -> float | None:
        """When the machine next needs a ``TimerFired``; None when only events matter."""
        times: list[float] = []
        for s in self._sessions.values():
            times.append(s.last_heard_at + self.settings.dead_time)
            times.append(s.next_heartbeat_at)
        if self._takeover_until is not None:
            times.append(self._takeover_until)
        if self._may_probe():
            times.append(self._next_probe_at)
        if self._grace_until is not None:
            times.append(self._grace_until)
        if self._handover and self._handover.deadline_at is not None:
            times.append(self._handover.deadline_at)
        return min(times) if times else None

    # ------------------------------------------------------------------ input

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions to carry out, in order."""
        self._out = _Out()
        match event:
            case Started():
                self._on_started(event.now)
            case PeerConnected():
                self._on_peer_connected(event)
            case ConnectFailed():
                self._on_connect_failed(event)
            case MessageReceived():
                self._on_message(event)
            case ConnectionClosed():
                self._on_closed(event.now, event.conn, f"connection lost ({event.reason})")
            case AllStopped():
                self._on_all_stopped(event.now)
            case FinalCycleDone():
                self._on_final_cycle_done(event)
            case StopRequested():
                self._on_stop_requested(event.now)
            case SentinelChangeRequested():
                self._on_sentinel_change(event)
            case TimerFired():
                self._on_timer(event.now)
        if self._phase is _Phase.NORMAL:
            self._reconcile(event.now)
        return self._out.actions

    # ------------------------------------------------------------------ handlers

    def _on_started(self, now: float) -> None:
        if self._phase is not _Phase.IDLE:
            return
        self._phase = _Phase.NORMAL
        self._role = "starting"
        self._alert("started", f"started in mode {self.settings.mode}, epoch {self._epoch}")
        self._connect()

    def _on_peer_connected(self, event: PeerConnected) -> None:
        if event.initiated:
            self._connecting = False
        if self._phase in (_Phase.EXITED, _Phase.STOPPING, _Phase.IDLE):
            self._out.add(Close(conn=event.conn, goodbye=Goodbye(reason="stopping")))
            return
        problem = rules.mismatch(self.hello(), event.hello)
        if problem is not None:
            self._out.add(Close(conn=event.conn, goodbye=Goodbye(reason="refused", detail=problem)))
            self._refused(event.now, problem)
            return
        peer = self._fresher(event.hello.state)
        self._last_peer = peer
        self._sessions[event.conn] = _Session(
            conn=event.conn,
            peer=peer,
            initiator_id=self.settings.node_id if event.initiated else peer.node_id,
            opened_at=event.now,
            last_heard_at=event.now,
            next_heartbeat_at=event.now + self.settings.heartbeat_interval,
        )
        self._grace_until = None
        self._last_refusal = None
        self._alert("peer_connected", f"connected to {peer.name} ({peer.role}, epoch {peer.epoch})")
        self._drop_duplicates()

    def _on_connect_failed(self, event: ConnectFailed) -> None:
        self._connecting = False
        self._next_probe_at = event.now + self.settings.probe_interval
        if event.answered:
            # Something answered but could not be trusted: not "nobody there".
            self._refused(event.now, event.reason)
        elif self._role == "starting" and not self._sessions:
            self._startup_alone(event.now)

    def _on_message(self, event: MessageReceived) -> None:
        session = self._sessions.get(event.conn)
        if session is None:
            return
        session.last_heard_at = event.now
        match event.message:
            case Heartbeat(state=state) | Hello(state=state):
                session.peer = self._last_peer = state
            case Handover() as handover:
                self._on_handover(event.now, session, handover)
            case Goodbye(reason="duplicate"):
                session.replaced = True
            case Goodbye(reason="stopping"):
                session.peer_stopping = True
            case Goodbye(reason="refused", detail=detail):
                self._last_error = f"{session.peer.name} refused the pairing: {detail}"

    def _on_handover(self, now: float, session: _Session, handover: Handover) -> None:
        why = _HANDOVER_REASONS[handover.reason].format(peer=session.peer.name)
        if self._role == "primary":
            # The split-brain loser yielded to us: nothing to take, we are primary.
            self._alert("split_brain", f"split brain over: {session.peer.name} yielded")
            return
        if self._phase is not _Phase.NORMAL:
            return
        if self._takeover_until is not None and handover.reason != "stopping":
            # It crossed our own Handover to the peer (say it yielded to us while
            # we gave the role back to it): each now waits for the other. Taking
            # it could make both primary; the election after the wait settles it.
            return
        self._epoch = max(self._epoch, handover.epoch)
        self._promote(now, why, sentinels=handover.sentinels, kind="handover")
        if handover.reason == "handback":
            self._alert("handback", f"handback done: {session.peer.name} gave the role back")

    def _on_closed(self, now: float, conn: ConnId, reason: str) -> None:
        session = self._sessions.pop(conn, None)
        self._split_brain_alerted.discard(conn)
        if session is None:
            return
        handover = self._handover
        if handover is not None and handover.conn == conn:
            self._handover_peer_lost(now, session)
            return
        if self._sessions or self._phase is not _Phase.NORMAL:
            return
        if session.replaced:
            # The peer keeps another connection to us; give it time to show up.
            self._grace_until = now + self.settings.dead_time
            return
        self._peer_gone(now, session, reason)

    def _on_all_stopped(self, now: float) -> None:
        self._stopping_all = False
        if self._sentinels_wanted:
            # Wanted again while stopping (an aborted handover): start them now.
            self._out.add(
                StartSentinels(names=self._sentinels, epoch=self._epoch, how=self._promoted_how)
            )
            return
        handover = self._handover
        if self._phase is _Phase.HANDING_OVER and handover is not None:
            if handover.stage == "stopping_sentinels":
                handover.stage = "final_cycle"
                handover.deadline_at = now + self.settings.final_cycle_timeout
                self._run_final_cycle(handover)
        elif self._phase is _Phase.STOPPING:
            self._exit()

    def _on_final_cycle_done(self, event: FinalCycleDone) -> None:
        handover = self._handover
        if handover is None or handover.stage != "final_cycle":
            return
        handover.cycles_pending = max(0, handover.cycles_pending - 1)
        if handover.cycles_pending:
            return  # the cycle on the connection kept is still running
        if not event.ok:
            self._alert(
                "replication_failed",
                f"final replication cycle failed: {event.detail}; handing over anyway",
                level="warning",
            )
        self._complete_handover(event.now)

    def _on_stop_requested(self, now: float) -> None:
        if self._phase in (_Phase.STOPPING, _Phase.EXITED):
            return
        if self._phase is _Phase.IDLE:
            self._exit()
            return
        if self._handover is not None:
            self._handover.reason = "stopping"
            return
        session = self._preferred()
        if self._role == "primary" and session is not None:
            self._begin_handover(now, session.conn, "stopping")
            return
        for s in self._sessions.values():
            self._out.add(Close(conn=s.conn, goodbye=Goodbye(reason="stopping")))
        self._sessions.clear()
        if self._role == "primary" or self._sentinels_wanted or self._stopping_all:
            self._phase = _Phase.STOPPING
            self._stop_all()
        else:
            self._exit()

    def _on_sentinel_change(self, event: SentinelChangeRequested) -> None:
        if self._role != "primary" or self._phase is not _Phase.NORMAL:
            raise NotPrimaryError(
                f"this node is {self._role}: sentinels are changed on the primary"
                + (f" ({self._preferred_name()})" if self._preferred() else "")
            )
        current = set(self._sentinels)
        if event.active == (event.name in current):
            return
        current.symmetric_difference_update({event.name})
        self._sentinels = tuple(sorted(current))
        self._persist()
        if event.active:
            self._start_sentinels((event.name,))
        else:
            self._out.add(StopSentinels(names=(event.name,)))
        self._broadcast(event.now)

    def _on_timer(self, now: float) -> None:
        for session in list(self._sessions.values()):
            silent_for = now - session.last_heard_at
            # Compare with the very deadline next_deadline() gave: the difference
            # can round to just under dead_time and the driver would spin.
            if now >= session.last_heard_at + self.settings.dead_time:
                self._out.add(Close(conn=session.conn))
                self._on_closed(now, session.conn, f"peer silent for {silent_for:.2f} s")
            elif now >= session.next_heartbeat_at:
                self._send_heartbeat(session, now)
        if self._takeover_until is not None and now >= self._takeover_until:
            self._takeover_until = None
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            if not self._sessions and self._phase is _Phase.NORMAL:
                self._peer_gone(now, None, "the replacement connection never came")
        handover = self._handover
        if handover and handover.deadline_at is not None and now >= handover.deadline_at:
            self._alert(
                "replication_failed",
                "final replication cycle timed out; handing over anyway",
                level="warning",
            )
            self._complete_handover(now)

    # ------------------------------------------------------------------ decisions

    def _reconcile(self, now: float) -> None:
        """Decide, from this node's role and its peer's last announced state, what to do."""
        session = self._preferred()
        if session is None:
            if self._may_probe() and now >= self._next_probe_at:
                self._connect()
            return
        me, peer = self._state(), session.peer
        if self._role in ("starting", "secondary"):
            if peer.role == "primary":
                if not peer.handing_over:
                    self._takeover_until = None  # the peer took the role
                self._follow(now, session)
            elif self._takeover_until is not None:
                pass  # the peer is taking the role from our Handover
            elif not peer.handing_over and rules.elected(me, peer):
                self._promote(now, f"elected: {peer.name} is {peer.role}", kind="startup")
        elif self._role == "primary":
            if peer.role == "primary":
                self._split_brain(now, session)
            elif peer.role == "secondary" and rules.outranks(peer, me):
                self._begin_handover(now, session.conn, "handback")
            elif peer.epoch > self._epoch:
                # A returning node knew a later term than ours: move past it so that
                # epochs stay a valid fencing token and never go backwards.
                self._epoch = peer.epoch + 1
                self._persist()
                self._alert("stale", f"{peer.name} knew epoch {peer.epoch}; now {self._epoch}")
                self._broadcast(now)

    def _follow(self, now: float, session: _Session) -> None:
        peer = session.peer
        self._had_primary = True
        changed = False
        if self._role == "starting":
            self._role = "secondary"
            changed = True
            self._alert("demoted", f"secondary of {peer.name} (epoch {peer.epoch})")
        if peer.epoch > self._epoch:
            self._epoch = peer.epoch
            changed = True
        if peer.sentinels != self._sentinels:
            self._sentinels = peer.sentinels
            changed = True
        if changed:
            self._persist()
            self._broadcast(now)

    def _split_brain(self, now: float, session: _Session) -> None:
        me, peer = self._state(), session.peer
        if peer.handing_over:
            return
        survives = rules.survives_split_brain(me, peer)
        if session.conn not in self._split_brain_alerted:
            self._split_brain_alerted.add(session.conn)
            loser = peer.name if survives else self.settings.name
            self._alert(
                "split_brain",
                f"split brain: {peer.name} is primary too (epoch {peer.epoch}, this node "
                f"{self._epoch}); {loser} yields",
                level="warning",
            )
        if not survives:
            self._begin_handover(now, session.conn, "yield")

    def _startup_alone(self, now: float) -> None:
        if self.settings.mode == "backup":
            self._role = "secondary"
            self._persist()
            self._alert("demoted", "nobody answered: waiting as secondary (mode backup)")
        else:
            self._promote(now, "nobody answered at startup", kind="startup")

    def _peer_gone(self, now: float, session: _Session | None, reason: str) -> None:
        name = session.peer.name if session else "the peer"
        self._next_probe_at = now + self.settings.probe_interval
        if self._role == "secondary" and self._had_primary:
            level: Literal["info", "warning"] = "warning"
            if session is not None and session.peer_stopping:
                level = "info"
            self._alert("peer_lost", f"primary {name} lost: {reason}", level=level)
            self._promote(now, f"took over from {name}: {reason}", kind="takeover")
        elif self._role == "starting":
            self._startup_alone(now)
        else:
            level = "info" if session is not None and session.peer_stopping else "warning"
            self._alert("peer_lost", f"{name} lost: {reason}", level=level)
            if now - self._quick_probe_at >= self.settings.probe_interval:
                # Look for the peer at once: it may have taken over while this node
                # could not hear it (a hang, a partition), and this node's sentinels
                # must not run beside its own for a whole probe interval. At most
                # once per probe interval, so a flapping link causes no storm.
                self._quick_probe_at = now
                self._next_probe_at = now

    # ------------------------------------------------------------------ moves

    def _promote(
        self,
        now: float,
        reason: str,
        *,
        sentinels: tuple[str, ...] | None = None,
        kind: PromotionKind,
    ) -> None:
        for s in self._sessions.values():
            self._epoch = max(self._epoch, s.peer.epoch)
        self._epoch += 1
        self._role = "primary"
        self._promoted_how = kind
        self._had_primary = False
        self._takeover_until = None
        if sentinels is not None:
            self._sentinels = tuple(sorted(set(sentinels)))
        self._next_probe_at = now + self.settings.probe_interval
        self._persist()  # the new epoch is durable before any sentinel carries it
        self._alert(
            "promoted",
            f"primary (epoch {self._epoch}): {reason}",
            level="warning" if kind == "takeover" else "info",
            details={"how": kind, "reason": reason},
        )
        self._start_sentinels(self._sentinels)
        self._broadcast(now)

    def _begin_handover(self, now: float, conn: ConnId, reason: HandoverReason) -> None:
        self._phase = _Phase.HANDING_OVER
        self._handover = _Handover(conn=conn, reason=reason)
        self._stop_all()
        self._broadcast(now)

    def _complete_handover(self, now: float) -> None:
        handover = self._handover
        assert handover is not None
        self._handover = None
        self._out.add(
            Send(
                conn=handover.conn,
                message=Handover(
                    epoch=self._epoch, sentinels=self._sentinels, reason=handover.reason
                ),
            )
        )
        if handover.reason == "stopping":
            for s in self._sessions.values():
                # Said, so that the peer reports our leaving as planned, not as a loss.
                self._out.add(Close(conn=s.conn, goodbye=Goodbye(reason="stopping")))
            self._sessions.clear()
            self._exit()
            return
        self._phase = _Phase.NORMAL
        self._role = "secondary"
        self._had_primary = True  # the peer is primary from the moment it reads this
        self._takeover_until = now + self.settings.dead_time
        self._persist()
        self._alert("demoted", f"secondary: handed over ({handover.reason})")
        self._broadcast(now)

    def _handover_peer_lost(self, now: float, session: _Session) -> None:
        handover = self._handover
        assert handover is not None
        self._handover = None
        if handover.reason == "stopping":
            self._phase = _Phase.STOPPING
            if handover.stage == "final_cycle":
                self._exit()
            return  # else AllStopped will finish the stop
        # Nobody to hand over to: stay primary and run the sentinels again.
        self._phase = _Phase.NORMAL
        self._alert(
            "peer_lost",
            f"{session.peer.name} lost during {handover.reason}; staying primary",
            level="warning",
        )
        self._start_sentinels(self._sentinels)
        if not self._sessions:
            self._next_probe_at = now + self.settings.probe_interval

    def _run_final_cycle(self, handover: _Handover) -> None:
        handover.cycles_pending += 1
        self._out.add(RunFinalCycle(conn=handover.conn, reason=handover.reason))

    def _exit(self) -> None:
        self._phase = _Phase.EXITED
        self._role = "stopped"
        self._alert("stopped", "stopped")
        self._out.add(Exit())

    def _start_sentinels(self, names: tuple[str, ...]) -> None:
        self._sentinels_wanted = True
        if self._stopping_all:
            # The controller works in order: a start queued behind a stop would
            # run them again right after it, even if a newer stop is on its way
            # (a yield to a peer that came back). AllStopped starts them instead.
            return
        self._out.add(StartSentinels(names=names, epoch=self._epoch, how=self._promoted_how))

    def _stop_all(self) -> None:
        self._sentinels_wanted = False
        if self._stopping_all:
            # Nothing was started since that StopAll (starts wait for it), so its
            # AllStopped already means what this one would. One at a time also
            # keeps a flapping peer from queueing stop after slow stop.
            return
        self._stopping_all = True
        self._out.add(StopAll())

    def _connect(self) -> None:
        self._connecting = True
        self._out.add(Connect())

    def _refused(self, now: float, problem: str) -> None:
        self._last_error = problem
        self._next_probe_at = now + self.settings.probe_interval
        if problem != self._last_refusal:  # say it once, not on every probe
            self._last_refusal = problem
            self._alert("refused", f"peer refused: {problem}", level="error")

    def _drop_duplicates(self) -> None:
        if len(self._sessions) < 2:
            return
        keep = min(self._sessions.values(), key=_Session.preference)
        keep.peer = self._fresher(keep.peer)
        for s in list(self._sessions.values()):
            if s is not keep:
                del self._sessions[s.conn]
                self._out.add(Close(conn=s.conn, goodbye=Goodbye(reason="duplicate")))
        handover = self._handover
        if handover is not None and handover.conn not in self._sessions:
            # Hand over on the connection both nodes keep; the dropped one will
            # never carry the final cycle or the Handover.
            handover.conn = keep.conn
            if handover.stage == "final_cycle":
                self._run_final_cycle(handover)

    # ------------------------------------------------------------------ helpers

    def _may_probe(self) -> bool:
        return (
            self._phase is _Phase.NORMAL
            and not self._sessions
            and not self._connecting
            and self._grace_until is None
            and self._role in ("starting", "primary", "secondary")
        )

    def _fresher(self, state: NodeState) -> NodeState:
        """``state`` from a Hello, or the peer's state last heard if that is later news.

        A Hello is taken when the connection is made, before the peer's machine
        sees it: the peer may have moved on meanwhile and said so on another
        connection. Its epoch never goes back, so a higher one is the later news.
        """
        known = self._last_peer
        if known is not None and known.node_id == state.node_id and known.epoch > state.epoch:
            return known
        return state

    def _preferred(self) -> _Session | None:
        if not self._sessions:
            return None
        return min(self._sessions.values(), key=_Session.preference)

    def _preferred_name(self) -> str:
        session = self._preferred()
        return session.peer.name if session else ""

    def _state(self) -> NodeState:
        return NodeState(
            node_id=self.settings.node_id,
            name=self.settings.name,
            mode=self.settings.mode,
            role=self._role,
            epoch=self._epoch,
            sentinels=self._sentinels,
            handing_over=self._phase is _Phase.HANDING_OVER,
        )

    def _persist(self) -> None:
        self._out.add(PersistState(epoch=self._epoch, role=self._role, sentinels=self._sentinels))

    def _broadcast(self, now: float) -> None:
        for session in self._sessions.values():
            self._send_heartbeat(session, now)

    def _send_heartbeat(self, session: _Session, now: float) -> None:
        self._out.add(Send(conn=session.conn, message=Heartbeat(state=self._state())))
        session.next_heartbeat_at = now + self.settings.heartbeat_interval

    def _alert(
        self,
        kind: AlertKind,
        message: str,
        *,
        level: Literal["info", "warning", "error"] = "info",
        details: dict[str, str] | None = None,
    ) -> None:
        self._out.add(Alert(kind=kind, message=message, level=level, details=details or {}))
