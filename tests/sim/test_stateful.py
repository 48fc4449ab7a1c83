"""Random fault sequences over a simulated pair, with the pair's invariants checked
after every step and after every event the simulation processes.

The invariants:

(a) once both nodes are up and the network has been whole for ``SETTLE_TIME``,
    exactly one node is primary, the two are connected, and the managed
    application and sentinels run on the primary only;
(b) under the same condition, a ``primary``-mode node is the primary;
(c) the application and sentinels never *begin* to run on both nodes while the
    two are connected. Both may run when the nodes connect (two primaries that
    found each other after a partition, or a hung primary that comes back); that
    overlap must have begun before the connection and ends within (a)'s bound;
(d) epochs never decrease, in memory or on disk, and an epoch is durable before
    any sentinel is started with it.
"""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sbs_core.errors import NotPrimaryError
from sbs_core.machine import PersistedState
from sbs_core.messages import Mode
from sbs_core.testing import NODE_IDS, NodeConfig, Simulation

HEARTBEAT_INTERVAL = 1.0
DEAD_TIME = 3.0
PROBE_INTERVAL = 1.0
CONNECT_TIMEOUT = 2.0
FINAL_CYCLE_TIMEOUT = 5.0
LATENCY = (0.001, 0.02)
ACTION_DELAY = (0.005, 0.05)

MAX_LATENCY = LATENCY[1]
MAX_ACTION_DELAY = ACTION_DELAY[1]

SETTLE_TIME = (
    DEAD_TIME + PROBE_INTERVAL + HEARTBEAT_INTERVAL + 10 * MAX_LATENCY + 4 * MAX_ACTION_DELAY
)

MODE_PAIRS: list[tuple[Mode, Mode]] = [
    ("auto", "auto"),
    ("primary", "auto"),
    ("backup", "auto"),
    ("primary", "backup"),
]
SENTINELS = ("labels", "orders", "reports")


def node_config(mode: Mode, persisted: PersistedState) -> NodeConfig:
    return NodeConfig(
        mode=mode,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        dead_time=DEAD_TIME,
        probe_interval=PROBE_INTERVAL,
        connect_timeout=CONNECT_TIMEOUT,
        final_cycle_timeout=FINAL_CYCLE_TIMEOUT,
        persisted=persisted,
    )


class PairInvariants:
    """The invariants, with the memory some of them need between two checks."""

    def __init__(self) -> None:
        self.epochs: dict[str, int] = dict.fromkeys(NODE_IDS, 0)
        self.saved: dict[str, int] = dict.fromkeys(NODE_IDS, 0)
        self.starts_seen: dict[str, int] = dict.fromkeys(NODE_IDS, 0)
        self.overlap_tolerated = False

    def __call__(self, sim: Simulation) -> None:
        self.check_epochs(sim)
        self.check_overlap(sim)
        since = sim.stable_since()
        if since is not None and sim.now - since >= SETTLE_TIME:
            self.check_settled(sim, since)

    def check_epochs(self, sim: Simulation) -> None:
        for node in sim.nodes:
            name = node.node_id
            history = node.store.history
            for state in history[self.saved[name] :]:
                assert state.epoch >= self.epochs[name], (
                    f"{name} persisted epoch {state.epoch} after {self.epochs[name]}"
                )
                self.epochs[name] = state.epoch
            self.saved[name] = len(history)
            if node.epoch is not None:
                assert node.epoch >= self.epochs[name], (
                    f"{name} holds epoch {node.epoch} after {self.epochs[name]}"
                )
                assert node.epoch <= node.store.state.epoch, (
                    f"{name} holds epoch {node.epoch}, only {node.store.state.epoch} is durable"
                )
                self.epochs[name] = node.epoch
            for start in node.starts[self.starts_seen[name] :]:
                assert start.epoch <= start.persisted_epoch, (
                    f"{name} started {start.names} with epoch {start.epoch} "
                    f"while {start.persisted_epoch} was durable"
                )
            self.starts_seen[name] = len(node.starts)

    def check_overlap(self, sim: Simulation) -> None:
        both = len(sim.active_nodes()) == 2
        connected = sim.connected()
        if both and connected:
            assert self.overlap_tolerated, "both nodes began running sentinels while connected"
        self.overlap_tolerated = both

    def check_settled(self, sim: Simulation, since: float) -> None:
        settled_for = f"both up and the network whole since t={since:.4f}"
        primaries = sim.primaries()
        assert len(primaries) == 1, f"primaries {primaries}, {settled_for}"
        assert sim.connected(), f"not connected, {settled_for}"
        active = sim.active_nodes()
        assert active == primaries, f"active on {active}, primary {primaries}, {settled_for}"
        for node in sim.nodes:
            if node.config.mode == "primary":
                assert node.role == "primary", (
                    f"{node.node_id} has mode primary but is {node.role}, {settled_for}"
                )


class PairFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = Simulation(0)

    @initialize(
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        modes=st.sampled_from(MODE_PAIRS),
        swap=st.booleans(),
        first=st.sampled_from(NODE_IDS),
        gap=st.sampled_from([0.0, 0.005, 0.5, 4.0]),
    )
    def setup(
        self, seed: int, modes: tuple[Mode, Mode], swap: bool, first: str, gap: float
    ) -> None:
        mode_a, mode_b = reversed(modes) if swap else modes
        self.sim = Simulation(
            seed,
            a=node_config(mode_a, PersistedState(sentinels=SENTINELS[:2])),
            b=node_config(mode_b, PersistedState()),
            latency=LATENCY,
            action_delay=ACTION_DELAY,
        )
        self.sim.add_check(PairInvariants())
        self.sim.start(first)
        self.sim.run_for(gap)
        self.sim.start(self.sim.peer_of(first).node_id)

    def nodes_in(self, *states: str) -> list[str]:
        return [n.node_id for n in self.sim.nodes if n.process in states]

    # ------------------------------------------------------------------ time

    @rule(seconds=st.sampled_from([0.003, 0.02, 0.1, 0.5, 1.0, 2.0, 3.5, 8.0]))
    def advance(self, seconds: float) -> None:
        self.sim.run_for(seconds)

    @rule()
    def settle(self) -> None:
        self.sim.run_for(SETTLE_TIME + 1.0)

    # ------------------------------------------------------------------ faults

    @precondition(lambda self: self.nodes_in("up", "hung"))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.sim.crash(data.draw(st.sampled_from(self.nodes_in("up", "hung"))))

    @precondition(lambda self: self.nodes_in("down"))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.sim.start(data.draw(st.sampled_from(self.nodes_in("down"))))

    @precondition(lambda self: self.nodes_in("up", "hung"))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.sim.restart(data.draw(st.sampled_from(self.nodes_in("up", "hung"))))

    @precondition(lambda self: self.nodes_in("up"))
    @rule(data=st.data())
    def hang(self, data: st.DataObject) -> None:
        self.sim.hang(data.draw(st.sampled_from(self.nodes_in("up"))))

    @precondition(lambda self: self.nodes_in("hung"))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        self.sim.resume(data.draw(st.sampled_from(self.nodes_in("hung"))))

    @precondition(
        lambda self: any(not n.stop_requested for n in self.sim.nodes if n.process != "down")
    )
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        candidates = [
            n.node_id for n in self.sim.nodes if n.process != "down" and not n.stop_requested
        ]
        self.sim.stop(data.draw(st.sampled_from(candidates)))

    @precondition(lambda self: not self.sim.network.partitioned)
    @rule()
    def partition(self) -> None:
        self.sim.partition()

    @precondition(lambda self: self.sim.network.partitioned)
    @rule()
    def heal(self) -> None:
        self.sim.heal()

    @precondition(lambda self: any(n.up and n.role == "primary" for n in self.sim.nodes))
    @rule(data=st.data(), name=st.sampled_from(SENTINELS), active=st.booleans())
    def change_sentinel(self, data: st.DataObject, name: str, active: bool) -> None:
        primaries = [n.node_id for n in self.sim.nodes if n.up and n.role == "primary"]
        # A primary that is handing over refuses: that is the right answer.
        with contextlib.suppress(NotPrimaryError):
            self.sim.set_sentinel(data.draw(st.sampled_from(primaries)), name, active)

    @invariant()
    def invariants_hold(self) -> None:
        self.sim.check()


PairFaults.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pair_under_faults = PairFaults.TestCase
