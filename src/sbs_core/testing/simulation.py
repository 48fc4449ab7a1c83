"""A seeded, discrete-event simulation of a pair of nodes, with faults on demand.

Each node is a :class:`~sbs_core.machine.RoleMachine` driven exactly as the real
driver drives it: ``Started`` at start, every returned action carried out in
order, a ``TimerFired`` at each ``next_deadline()``. Around it: a
:class:`~sbs_core.testing.fakes.FakeController`, a
:class:`~sbs_core.testing.fakes.FakeStore` that survives crashes, and a
:class:`~sbs_core.testing.network.FakeNetwork` between the two nodes.

Every latency and delay is drawn from ``random.Random(seed)``, so a seed names
one run exactly; every failure message starts with it, followed by the end of
the trace. What each fault means:

``crash``
    SIGKILL: the machine and its sentinels are gone at once; the kernel closes
    its connections (the peer reads a FIN, after the latency, or after the heal
    if partitioned). The store keeps what was persisted.
``hang`` / ``resume``
    SIGSTOP / SIGCONT: the node handles nothing while hung, everything that
    arrives waits, and its kernel still accepts connections; its sentinels keep
    running, and controller work already under way still finishes. On resume
    the backlog is handled, in arrival order, at the current time.
``stop``
    A planned stop (``StopRequested``); the node is down once it emits ``Exit``.
``start`` / ``restart``
    A new machine from the persisted state, then ``Started``.
``partition`` / ``heal``
    Cuts both directions; nothing is lost (see the network module).

Connections behave as the driver's do over TCP. ``Connect`` to a node whose
process is down is refused after one round trip; to a hung node, or across a
partition that does not heal in time, it fails after ``connect_timeout``. The
responder speaks first: its machine's Hello reaches the initiator, whose
machine gets ``PeerConnected`` two latencies after ``Connect`` and answers with
its own Hello, which gives the responder's machine its ``PeerConnected`` one
latency later. Each Hello is taken when it is sent, so it can be older than what
its machine says next, as with the real driver.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from sbs_core.errors import ControlError, NotPrimaryError, SbsError
from sbs_core.machine import (
    Action,
    Alert,
    AllStopped,
    Close,
    Connect,
    ConnectFailed,
    ConnectionClosed,
    ConnId,
    Event,
    Exit,
    FinalCycleDone,
    MachineSettings,
    MessageReceived,
    PeerConnected,
    PersistedState,
    PersistState,
    RoleMachine,
    RunFinalCycle,
    Send,
    SentinelChangeRequested,
    Started,
    StartSentinels,
    StopAll,
    StopRequested,
    StopSentinels,
    TimerFired,
)
from sbs_core.messages import Goodbye, Handover, Heartbeat, Hello, Message, Mode, NodeState, Role
from sbs_core.testing.clock import ScheduledCall, Timeline, VirtualClock
from sbs_core.testing.fakes import FakeController, FakeStore
from sbs_core.testing.network import (
    DataArrived,
    Delivery,
    FakeNetwork,
    FinArrived,
    HelloArrived,
    Incoming,
    Link,
    Refused,
)

__all__ = (
    "NODE_IDS",
    "InvariantViolation",
    "NodeConfig",
    "SentinelStart",
    "SimNode",
    "Simulation",
    "SimulationError",
    "SimulationTimeout",
)

NODE_IDS: Final = ("node-a", "node-b")
"""The two nodes of every simulation; ``node-a`` has the lower node id."""

# A machine that keeps asking to be woken at the instant it was just woken would
# spin a real driver at 100 % CPU; past this many wakes in a row it is a bug.
_MAX_WAKES_AT_ONE_INSTANT: Final = 100
_TRACE_SHOWN: Final = 80


class SimulationError(SbsError, RuntimeError):
    """A fault that cannot apply now, or a machine that raised or spun (then with the
    seed and the trace)."""


class InvariantViolation(SbsError, AssertionError):
    """A check registered with :meth:`Simulation.add_check` failed; seed and trace included."""


class SimulationTimeout(SbsError, TimeoutError):
    """:meth:`Simulation.run_until` ran out of virtual time; seed and trace included."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    """One node's settings, and what its store holds before its first start."""

    mode: Mode = "auto"
    name: str | None = None  # defaults to the node id
    port: int = 4445
    heartbeat_interval: float = 1.0
    dead_time: float = 3.0
    probe_interval: float = 1.0
    connect_timeout: float = 2.0
    final_cycle_timeout: float = 5.0
    software: str = ""
    persisted: PersistedState = field(default_factory=PersistedState)
    known_sentinels: frozenset[str] | None = None  # None: the controller accepts any name

    def machine_settings(self, node_id: str) -> MachineSettings:
        return MachineSettings(
            node_id=node_id,
            name=self.name or node_id,
            mode=self.mode,
            port=self.port,
            heartbeat_interval=self.heartbeat_interval,
            dead_time=self.dead_time,
            probe_interval=self.probe_interval,
            final_cycle_timeout=self.final_cycle_timeout,
            software=self.software,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class SentinelStart:
    """A ``StartSentinels`` as carried out, with what was durable at that moment."""

    at: float
    names: tuple[str, ...]
    epoch: int
    persisted_epoch: int


@dataclass(eq=False, kw_only=True, slots=True)
class _End:
    """The driver's view of one connection at one node."""

    link: Link
    initiated: bool
    conn: ConnId | None = None
    established: bool = False  # the machine got PeerConnected for it
    open: bool = True
    timeout: ScheduledCall | None = None


class SimNode:
    """One simulated node: its process state, machine, controller, store and records."""

    def __init__(self, node_id: str, config: NodeConfig, clock: VirtualClock) -> None:
        self.node_id = node_id
        self.config = config
        self.settings = config.machine_settings(node_id)
        self.store = FakeStore(config.persisted)
        self.controller = FakeController(config.known_sentinels, clock=clock)
        self.alerts: list[Alert] = []
        self.starts: list[SentinelStart] = []
        # When the node emitted Exit with something still running (a machine bug).
        self.unclean_exits: list[float] = []
        self.machine: RoleMachine | None = None
        self.process: Literal["down", "up", "hung"] = "down"
        self.stop_requested = False
        self.incarnation = 0
        self._backlog: list[Callable[[], None]] = []
        self._ends: dict[int, _End] = {}  # open ends, by link id
        self._by_conn: dict[ConnId, _End] = {}  # every end of this incarnation
        self._next_conn = 0
        self._timer: ScheduledCall | None = None
        self._wakes_at_now = 0
        self._controller_busy = False
        self._controller_queue: deque[Action] = deque()

    @property
    def role(self) -> Role:
        return self.machine.role if self.machine is not None else "stopped"

    @property
    def epoch(self) -> int | None:
        """The in-memory epoch; None while the node is down."""
        return self.machine.epoch if self.machine is not None else None

    @property
    def up(self) -> bool:
        return self.process == "up"

    def __repr__(self) -> str:
        return f"<SimNode {self.node_id} {self.process} {self.role}>"


class Simulation:
    """Two nodes, ``node-a`` and ``node-b``, on a fake network, in virtual time.

    Nothing starts by itself: call :meth:`start` for each node, then move time
    with :meth:`run_for` or :meth:`run_until`. Checks added with
    :meth:`add_check` run after every event the simulation processes and after
    every fault.
    """

    def __init__(
        self,
        seed: int,
        *,
        a: NodeConfig | None = None,
        b: NodeConfig | None = None,
        latency: tuple[float, float] = (0.001, 0.02),
        action_delay: tuple[float, float] = (0.005, 0.05),
        trace_limit: int = 20_000,
    ) -> None:
        low, high = action_delay
        if not 0 < low <= high:
            raise ValueError(f"action_delay must satisfy 0 < low <= high, got {action_delay}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = VirtualClock()
        self.timeline = Timeline(self.clock)
        self.network = FakeNetwork(
            self.timeline,
            self.rng,
            latency=latency,
            listening=self._listening,
            deliver=self._on_delivery,
        )
        self.action_delay = (low, high)
        configs = (a or NodeConfig(), b or NodeConfig())
        self._nodes = {
            node_id: SimNode(node_id, c, self.clock)
            for node_id, c in zip(NODE_IDS, configs, strict=True)
        }
        self.trace: deque[str] = deque(maxlen=trace_limit)
        self._checks: list[Callable[[Simulation], None]] = []
        self._checking = False
        self._disturbed_at = 0.0
        self._on_heal: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ queries

    @property
    def now(self) -> float:
        return self.clock.now

    @property
    def max_latency(self) -> float:
        return self.network.max_latency

    @property
    def max_action_delay(self) -> float:
        return self.action_delay[1]

    @property
    def nodes(self) -> tuple[SimNode, ...]:
        return tuple(self._nodes.values())

    def node(self, node_id: str) -> SimNode:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise SimulationError(f"no node {node_id!r}; the nodes are {NODE_IDS}") from None

    def peer_of(self, node_id: str) -> SimNode:
        return self._nodes[NODE_IDS[1] if node_id == NODE_IDS[0] else NODE_IDS[0]]

    def role(self, node_id: str) -> Role:
        return self.node(node_id).role

    def roles(self) -> dict[str, Role]:
        return {n.node_id: n.role for n in self.nodes}

    def primaries(self) -> tuple[str, ...]:
        """Nodes whose machine says primary (a hung node still says what it last knew)."""
        return tuple(n.node_id for n in self.nodes if n.role == "primary")

    def sentinel_nodes(self) -> tuple[str, ...]:
        """Nodes where at least one sentinel runs."""
        return tuple(n.node_id for n in self.nodes if n.controller.running_sentinels())

    def active_nodes(self) -> tuple[str, ...]:
        """Nodes where the managed application or a sentinel runs."""
        return tuple(n.node_id for n in self.nodes if n.controller.active)

    def running(self, node_id: str) -> frozenset[str]:
        return self.node(node_id).controller.running_sentinels()

    def connected(self) -> bool:
        """Both nodes hold the same established connection (their machines saw it open)."""
        a, b = self.nodes
        return any(
            end.established and other.established
            for link_id, end in a._ends.items()
            if (other := b._ends.get(link_id)) is not None
        )

    def open_connections(self, node_id: str) -> int:
        """Connections this node's machine was told of and that are still open."""
        return sum(1 for end in self.node(node_id)._ends.values() if end.established)

    def alerts(self, node_id: str) -> list[Alert]:
        return self.node(node_id).alerts

    def persisted(self, node_id: str) -> PersistedState:
        return self.node(node_id).store.state

    def persisted_epoch(self, node_id: str) -> int:
        return self.node(node_id).store.state.epoch

    def epoch(self, node_id: str) -> int | None:
        return self.node(node_id).epoch

    def stable_since(self) -> float | None:
        """Since when both nodes have been up (not hung, not stopping) and the network
        whole; None if that is not the case now."""
        if self.network.partitioned:
            return None
        if any(n.process != "up" or n.stop_requested for n in self.nodes):
            return None
        return self._disturbed_at

    def describe(self, last: int = _TRACE_SHOWN) -> str:
        """The seed, each node's state, and the end of the trace: for failure messages."""
        lines = [f"simulation seed={self.seed} at t={self.now:.4f}"]
        for n in self.nodes:
            running = sorted(n.controller.running_sentinels())
            application = " + application" if n.controller.application_running else ""
            lines.append(
                f"  {n.node_id}: {n.process}, {n.role}, epoch {n.epoch} "
                f"(persisted {n.store.state.epoch}), running {running}{application}"
            )
        lines.append(f"  network: {'partitioned' if self.network.partitioned else 'whole'}")
        tail = list(self.trace)[-last:]
        lines.append(f"last {len(tail)} trace lines:")
        lines.extend(tail)
        return "\n".join(lines)

    # ------------------------------------------------------------------ checks and time

    def add_check(self, check: Callable[[Simulation], None]) -> None:
        """Run ``check(sim)`` after every processed event and fault; it fails by raising
        AssertionError, which becomes an :class:`InvariantViolation` with the trace."""
        self._checks.append(check)

    def check(self) -> None:
        """Run the registered checks now."""
        if self._checking:
            return
        self._checking = True
        try:
            for check in self._checks:
                check(self)
        except AssertionError as exc:
            raise InvariantViolation(f"{exc}\n{self.describe()}") from exc
        finally:
            self._checking = False

    def run_for(self, seconds: float) -> None:
        """Process everything due within ``seconds`` of virtual time, then move to its end."""
        if seconds < 0:
            raise ValueError(f"cannot run for {seconds} s")
        end = self.now + seconds
        while (at := self.timeline.next_at()) is not None and at <= end:
            self._step()
        self.clock.advance_to(end)

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> float:
        """Run until ``predicate()`` holds; return the virtual time that took.

        Raises :class:`SimulationTimeout` if it does not hold within ``timeout``.
        """
        start = self.now
        end = start + timeout
        while not predicate():
            at = self.timeline.next_at()
            if at is None or at > end:
                self.clock.advance_to(max(end, self.now))
                raise SimulationTimeout(
                    f"condition not reached within {timeout} s\n{self.describe()}"
                )
            self._step()
        return self.now - start

    def _step(self) -> None:
        self.timeline.run_next()
        self.check()

    # ------------------------------------------------------------------ faults

    def start(self, node_id: str) -> None:
        """Start a node that is down: a new machine from its store, then ``Started``."""
        node = self.node(node_id)
        if node.process != "down":
            raise SimulationError(f"{node_id} is {node.process}; crash or stop it first")
        node.incarnation += 1
        node.process = "up"
        node.stop_requested = False
        node._by_conn = {}
        node._wakes_at_now = 0
        node.machine = RoleMachine(node.settings, node.store.load())
        self._disturb(f"{node_id} starts (epoch {node.store.state.epoch})")
        self._feed(node, Started(now=self.now))
        self.check()

    def restart(self, node_id: str) -> None:
        """Crash the node if it runs or hangs, then start it again."""
        if self.node(node_id).process != "down":
            self.crash(node_id)
        self.start(node_id)

    def crash(self, node_id: str) -> None:
        node = self._require(node_id, "up", "hung")
        self._disturb(f"{node_id} crashes")
        self._go_down(node)
        node.controller.kill()
        self.check()

    def hang(self, node_id: str) -> None:
        node = self._require(node_id, "up")
        node.process = "hung"
        self._disturb(f"{node_id} hangs")
        self.check()

    def resume(self, node_id: str) -> None:
        node = self._require(node_id, "hung")
        node.process = "up"
        self._disturb(f"{node_id} resumes with {len(node._backlog)} waiting")
        backlog, node._backlog = node._backlog, []
        for handle in backlog:
            if node.process != "up":
                break  # it exited while catching up
            handle()
        if node.process == "up":
            self._arm_timer(node, woken=False)
        self.check()

    def stop(self, node_id: str) -> None:
        """A planned stop: the operator stops the service."""
        node = self._require(node_id, "up", "hung")
        node.stop_requested = True
        self._disturb(f"{node_id} asked to stop")
        self._post(node, lambda: self._feed(node, StopRequested(now=self.now)))
        self.check()

    def partition(self) -> None:
        self._disturb("network partitioned")
        self.network.partition()
        self.check()

    def heal(self) -> None:
        self._disturb("network healed")
        self.network.heal()
        waiting, self._on_heal = self._on_heal, []
        for resume in waiting:
            resume()
        self.check()

    def set_sentinel(self, node_id: str, name: str, active: bool = True) -> None:
        """The operator activates (or deactivates) a sentinel on this node.

        Raises :class:`~sbs_core.errors.NotPrimaryError` as the machine does, and
        :class:`~sbs_core.errors.ControlError` when the node cannot answer.
        """
        node = self.node(node_id)
        if node.process != "up":
            raise ControlError(f"{node_id} is {node.process}: its control channel does not answer")
        self._feed(node, SentinelChangeRequested(now=self.now, name=name, active=active))
        self.check()

    def _require(self, node_id: str, *states: str) -> SimNode:
        node = self.node(node_id)
        if node.process not in states:
            raise SimulationError(f"{node_id} is {node.process}, expected {' or '.join(states)}")
        return node

    def _disturb(self, what: str) -> None:
        self._disturbed_at = self.now
        self._log(f"*** {what}")

    # ------------------------------------------------------------------ driving a machine

    def _post(self, node: SimNode, handle: Callable[[], None]) -> None:
        """Hand something to the node's process: now if it runs, later if it hangs."""
        incarnation = node.incarnation

        def guarded() -> None:
            if node.incarnation == incarnation and node.process == "up":
                handle()

        if node.incarnation != incarnation or node.process == "down":
            return
        if node.process == "hung":
            node._backlog.append(guarded)
        else:
            handle()

    def _feed(self, node: SimNode, event: Event) -> None:
        machine = node.machine
        assert machine is not None
        before = machine.role
        try:
            actions = machine.handle(event)
        except NotPrimaryError:
            if isinstance(event, SentinelChangeRequested):
                raise
            raise SimulationError(self._failure(node, event, "NotPrimaryError")) from None
        except Exception as exc:
            raise SimulationError(self._failure(node, event, repr(exc))) from exc
        after = machine.role
        roles = before if before == after else f"{before}->{after}"
        shown = "; ".join(_describe_action(a) for a in actions) or "-"
        self._log(f"{node.node_id} [{roles}] {_describe_event(event)} => {shown}")
        for action in actions:
            self._carry_out(node, action)
        if node.machine is machine and node.process == "up":
            self._arm_timer(node, woken=isinstance(event, TimerFired))
        self.check()

    def _failure(self, node: SimNode, event: Event, what: str) -> str:
        return f"{node.node_id} raised {what} on {_describe_event(event)}\n{self.describe()}"

    def _arm_timer(self, node: SimNode, *, woken: bool) -> None:
        if node._timer is not None:
            node._timer.cancel()
            node._timer = None
        assert node.machine is not None
        deadline = node.machine.next_deadline()
        if deadline is None:
            return
        if woken and deadline <= self.now:
            node._wakes_at_now += 1
            if node._wakes_at_now > _MAX_WAKES_AT_ONE_INSTANT:
                raise SimulationError(
                    f"{node.node_id} keeps asking to be woken at {deadline} right after "
                    f"TimerFired({self.now}): a busy loop\n{self.describe()}"
                )
        else:
            node._wakes_at_now = 0
        incarnation = node.incarnation

        def wake() -> None:
            # A hung node sleeps through it; resume arms the timer again.
            if node.incarnation == incarnation and node.process == "up":
                node._timer = None
                self._feed(node, TimerFired(now=self.now))

        node._timer = self.timeline.call_at(deadline, wake)

    def _carry_out(self, node: SimNode, action: Action) -> None:
        match action:
            case Connect():
                self._connect(node)
            case Send(conn=conn, message=message):
                end = self._end_for(node, conn, action)
                if end.open and end.established:
                    self.network.send(end.link, node.node_id, message)
            case Close(conn=conn, goodbye=goodbye):
                end = self._end_for(node, conn, action)
                if end.open:
                    if goodbye is not None:
                        self.network.send(end.link, node.node_id, goodbye)
                    self._close_end(node, end)
            case StartSentinels() | StopSentinels() | StopAll():
                if node._controller_busy:
                    node._controller_queue.append(action)
                else:
                    self._control(node, action)
            case RunFinalCycle(conn=conn):
                end = self._end_for(node, conn, action)
                self._final_cycle(node, end)
            case PersistState(epoch=epoch, role=role, sentinels=sentinels):
                node.store.save(PersistedState(epoch=epoch, role=role, sentinels=sentinels))
            case Alert():
                node.alerts.append(action)
            case Exit():
                self._disturb(f"{node.node_id} exits")
                self._go_down(node)
                # What the driver's cleanup does; a correct machine left nothing running.
                if node.controller.active:
                    node.unclean_exits.append(self.now)
                    self._log(f"!!! {node.node_id} exits with something still running")
                node.controller.stop_sentinels_nowait()
                node.controller.stop_application_nowait()

    def _end_for(self, node: SimNode, conn: ConnId, action: Action) -> _End:
        end = node._by_conn.get(conn)
        if end is None:
            raise SimulationError(
                f"{node.node_id}: {_describe_action(action)} names connection {conn}, "
                f"which this node never had\n{self.describe()}"
            )
        return end

    def _go_down(self, node: SimNode) -> None:
        node.process = "down"
        node.machine = None
        node.incarnation += 1
        node._backlog.clear()
        node._controller_queue.clear()
        node._controller_busy = False
        if node._timer is not None:
            node._timer.cancel()
            node._timer = None
        for end in list(node._ends.values()):
            self._close_end(node, end)

    # ------------------------------------------------------------------ controller and syncer

    def _delay(self) -> float:
        return self.rng.uniform(*self.action_delay)

    def _control(self, node: SimNode, action: Action) -> None:
        controller = node.controller
        match action:
            case StartSentinels(names=names, epoch=epoch):
                node.starts.append(
                    SentinelStart(
                        at=self.now,
                        names=names,
                        epoch=epoch,
                        persisted_epoch=node.store.state.epoch,
                    )
                )
                controller.start_application_nowait(epoch=epoch)
                controller.start_sentinels_nowait(names, epoch=epoch)
            case StopSentinels(names=names):
                controller.stop_sentinels_nowait(names)
            case StopAll():
                # Stopping takes time; the driver carries out later controller
                # actions only after it, in order.
                node._controller_busy = True
                incarnation = node.incarnation
                self.timeline.call_later(
                    self._delay(), lambda: self._all_stopped(node, incarnation)
                )

    def _all_stopped(self, node: SimNode, incarnation: int) -> None:
        if node.incarnation != incarnation:
            return
        node.controller.stop_sentinels_nowait()
        node.controller.stop_application_nowait()
        node._controller_busy = False
        self._log(f"{node.node_id} controller: everything stopped")
        self._post(node, lambda: self._feed(node, AllStopped(now=self.now)))
        while node._controller_queue and not node._controller_busy:
            self._control(node, node._controller_queue.popleft())

    def _final_cycle(self, node: SimNode, end: _End) -> None:
        incarnation = node.incarnation

        def done() -> None:
            if node.incarnation != incarnation:
                return
            if self.network.partitioned and end.open:
                self._on_heal.append(lambda: self._final_cycle(node, end))
                return
            peer_end = self.peer_of(node.node_id)._ends.get(end.link.id)
            ok = end.open and peer_end is not None and peer_end.open
            detail = "" if ok else "the connection is gone"
            self._post(
                node, lambda: self._feed(node, FinalCycleDone(now=self.now, ok=ok, detail=detail))
            )

        self.timeline.call_later(self._delay(), done)

    # ------------------------------------------------------------------ connections

    def _listening(self, host: str) -> bool:
        return self._nodes[host].process != "down"

    def _connect(self, node: SimNode) -> None:
        link = self.network.connect(node.node_id, self.peer_of(node.node_id).node_id)
        end = _End(link=link, initiated=True)
        node._ends[link.id] = end
        self._arm_handshake_timeout(node, end)

    def _arm_handshake_timeout(self, node: SimNode, end: _End) -> None:
        # Both sides bound the handshake by connect_timeout, as the driver does.
        incarnation = node.incarnation

        def timed_out() -> None:
            if node.incarnation == incarnation:
                self._post(node, lambda: self._handshake_timed_out(node, end))

        end.timeout = self.timeline.call_later(node.config.connect_timeout, timed_out)

    def _handshake_timed_out(self, node: SimNode, end: _End) -> None:
        if not end.open or end.established:
            return
        self._close_end(node, end)
        if end.initiated:
            reason = f"timed out ({node.config.connect_timeout} s)"
            self._feed(node, ConnectFailed(now=self.now, answered=False, reason=reason))

    def _close_end(self, node: SimNode, end: _End) -> None:
        end.open = False
        if end.timeout is not None:
            end.timeout.cancel()
        node._ends.pop(end.link.id, None)
        self.network.close(end.link, node.node_id)

    def _on_delivery(self, host: str, delivery: Delivery) -> None:
        node = self._nodes[host]
        if isinstance(delivery, Incoming):
            # The kernel accepted it: the end exists even if the process is hung.
            accepted = _End(link=delivery.link, initiated=False)
            node._ends[delivery.link.id] = accepted
            self._post(node, lambda: self._accept(node, accepted))
            return
        end = node._ends.get(delivery.link.id)
        if end is not None:
            self._post(node, lambda: self._receive(node, end, delivery))

    def _accept(self, node: SimNode, end: _End) -> None:
        # The responder speaks first; it learns the initiator's Hello only if the
        # initiator is still there to answer, so an attempt the initiator gave up
        # on (a hung responder) never reaches the responder's machine.
        if not end.open:
            return
        assert node.machine is not None
        self.network.send_hello(end.link, node.node_id, node.machine.hello())
        self._arm_handshake_timeout(node, end)

    def _receive(self, node: SimNode, end: _End, delivery: Delivery) -> None:
        if not end.open:
            return
        now = self.now
        match delivery:
            case HelloArrived(hello=hello):
                if end.established:
                    return
                assert node.machine is not None
                if end.initiated:
                    self.network.send_hello(end.link, node.node_id, node.machine.hello())
                node._next_conn += 1
                conn = end.conn = node._next_conn
                end.established = True
                node._by_conn[conn] = end
                if end.timeout is not None:
                    end.timeout.cancel()
                event = PeerConnected(now=now, conn=conn, hello=hello, initiated=end.initiated)
                self._feed(node, event)
            case DataArrived(message=message):
                if end.conn is not None:
                    self._feed(node, MessageReceived(now=now, conn=end.conn, message=message))
            case FinArrived():
                # The driver reads end-of-stream and closes its side too.
                self._close_end(node, end)
                if end.conn is not None:
                    self._feed(
                        node, ConnectionClosed(now=now, conn=end.conn, reason="closed by peer")
                    )
                elif end.initiated:
                    reason = "reset in the handshake"
                    self._feed(node, ConnectFailed(now=now, answered=False, reason=reason))
            case Refused():
                self._close_end(node, end)
                reason = "connection refused"
                self._feed(node, ConnectFailed(now=now, answered=False, reason=reason))
            case Incoming():  # pragma: no cover - handled by _on_delivery
                pass

    # ------------------------------------------------------------------ trace

    def _log(self, line: str) -> None:
        self.trace.append(f"{self.now:10.4f} {line}")


def _describe_state(state: NodeState) -> str:
    handing = " handing-over" if state.handing_over else ""
    return (
        f"{state.node_id}:{state.role}/{state.mode} e{state.epoch}{handing} {list(state.sentinels)}"
    )


def _describe_message(message: Message) -> str:
    match message:
        case Hello(state=state):
            return f"hello {_describe_state(state)}"
        case Heartbeat(state=state):
            return f"heartbeat {_describe_state(state)}"
        case Handover(reason=reason, epoch=epoch, sentinels=sentinels):
            return f"handover({reason}, e{epoch}, {list(sentinels)})"
        case Goodbye(reason=reason, detail=detail):
            return f"goodbye({reason}{': ' + detail if detail else ''})"
        case _:
            return message.type


def _describe_event(event: Event) -> str:
    match event:
        case PeerConnected(conn=conn, hello=hello, initiated=initiated):
            way = "out" if initiated else "in"
            return f"PeerConnected(#{conn} {way}, {_describe_state(hello.state)})"
        case MessageReceived(conn=conn, message=message):
            return f"Received(#{conn} {_describe_message(message)})"
        case ConnectFailed(reason=reason, answered=answered):
            return f"ConnectFailed({reason}{', answered' if answered else ''})"
        case ConnectionClosed(conn=conn, reason=reason):
            return f"ConnectionClosed(#{conn} {reason})"
        case FinalCycleDone(ok=ok):
            return f"FinalCycleDone(ok={ok})"
        case SentinelChangeRequested(name=name, active=active):
            return f"SentinelChange({name}={'on' if active else 'off'})"
        case _:
            return type(event).__name__


def _describe_action(action: Action) -> str:
    match action:
        case Send(conn=conn, message=message):
            return f"Send(#{conn} {_describe_message(message)})"
        case Close(conn=conn, goodbye=goodbye):
            return f"Close(#{conn}{' ' + _describe_message(goodbye) if goodbye else ''})"
        case StartSentinels(names=names, epoch=epoch):
            return f"StartSentinels({list(names)}, e{epoch})"
        case StopSentinels(names=names):
            return f"StopSentinels({list(names)})"
        case RunFinalCycle(conn=conn):
            return f"RunFinalCycle(#{conn})"
        case PersistState(epoch=epoch, role=role, sentinels=sentinels):
            return f"Persist({role}, e{epoch}, {list(sentinels)})"
        case Alert(kind=kind, message=message, level=level):
            return f"Alert({'' if level == 'info' else level + ' '}{kind}: {message})"
        case _:
            return type(action).__name__
