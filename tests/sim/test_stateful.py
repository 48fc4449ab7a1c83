"""Random faults on a simulated pair, with the pair's invariants checked after every
step and after every event the simulation processes.

The invariants:

(a) once both nodes are up (running, not hung, no stop asked) and the network has
    been whole for ``SETTLE_TIME``, exactly one node is primary, the two are
    connected, and the managed application and sentinels run on the primary only;
(b) under the same condition, a ``primary``-mode node is the primary;
(c) the application and sentinels never *begin* to run on both nodes while the
    two are connected. Both may run when the nodes connect (two primaries that
    find each other after a partition, a hung primary that comes back); that
    overlap began while they were apart, and (a) bounds how long it lasts;
(d) epochs never decrease, in memory or on disk; an epoch is durable before any
    sentinel is started with it, and a node never exits with anything running.

Two drivers apply the same faults: hypothesis' rule-based state machine, and a
plain seeded walk that runs many long fault sequences cheaply. Both are
deterministic; a failure names the simulation seed and ends with its trace.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
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
from sbs_core.testing import NODE_IDS, NodeConfig, Simulation, SimulationError

HEARTBEAT_INTERVAL = 1.0
DEAD_TIME = 3.0
PROBE_INTERVAL = 1.0
CONNECT_TIMEOUT = 2.0
FINAL_CYCLE_TIMEOUT = 5.0
LATENCY = (0.001, 0.02)  # one way, per segment
ACTION_DELAY = (0.005, 0.05)  # a StopAll, a final replication cycle
MAX_LATENCY = LATENCY[1]
MAX_ACTION_DELAY = ACTION_DELAY[1]

# How long after the last fault the pair must have settled (invariants a and b).
# From the moment both nodes are up and the network is whole:
# - max(DEAD_TIME, CONNECT_TIMEOUT): the longest a node may still wait on its own
#   before it looks for its peer again: a handshake under way, the grace after
#   the peer closed a duplicate connection, the wait after handing the role over;
# - PROBE_INTERVAL: then it probes;
# - HEARTBEAT_INTERVAL: a Hello is taken before the sender's machine sees the
#   connection; a change made meanwhile reaches the peer with the next heartbeat;
# - 10 * MAX_LATENCY: segments held by a partition (1), the handshake (3), then
#   up to two handovers (a stale primary-mode node yields, then gets the role
#   back), each a Handover and the new primary's first heartbeat (2 * 2), and two
#   more for a heartbeat crossing a handover;
# - 6 * MAX_ACTION_DELAY: a stop already under way (1), a stop and a final cycle
#   for each of the two handovers (4), a final cycle run again on the connection
#   kept when a duplicate is dropped (1).
# Nothing else waits: every closed connection sends a FIN in the simulation, so
# silence (DEAD_TIME) only follows faults, which restart the clock.
SETTLE_TIME = (
    max(DEAD_TIME, CONNECT_TIMEOUT)
    + PROBE_INTERVAL
    + HEARTBEAT_INTERVAL
    + 10 * MAX_LATENCY
    + 6 * MAX_ACTION_DELAY
)

MODE_PAIRS: list[tuple[Mode, Mode]] = [
    ("auto", "auto"),
    ("primary", "auto"),
    ("backup", "auto"),
    ("primary", "backup"),
]
SENTINELS = ("labels", "orders", "reports")
STEPS = [0.003, 0.02, 0.1, 0.5, 1.0, 2.0, 3.5, 8.0]
START_GAPS = [0.0, 0.005, 0.5, 4.0]


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
            assert not node.unclean_exits, f"{name} exited with something still running"

    def check_overlap(self, sim: Simulation) -> None:
        both = len(sim.active_nodes()) == 2
        if both and sim.connected():
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


# ---------------------------------------------------------------------- the faults


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


def new_pair(seed: int, modes: tuple[Mode, Mode], first: str, gap: float) -> Simulation:
    """A checked pair whose node-a holds two active sentinels; both started, ``gap`` apart."""
    mode_a, mode_b = modes
    sim = Simulation(
        seed,
        a=node_config(mode_a, PersistedState(sentinels=SENTINELS[:2])),
        b=node_config(mode_b, PersistedState()),
        latency=LATENCY,
        action_delay=ACTION_DELAY,
    )
    sim.add_check(PairInvariants())
    sim.start(first)
    sim.run_for(gap)
    sim.start(sim.peer_of(first).node_id)
    return sim


NODE_FAULTS: dict[str, Callable[[Simulation, str], None]] = {
    "crash": Simulation.crash,
    "start": Simulation.start,
    "restart": Simulation.restart,
    "hang": Simulation.hang,
    "resume": Simulation.resume,
    "stop": Simulation.stop,
}


def candidates(sim: Simulation, fault: str) -> list[str]:
    """The nodes ``fault`` can be applied to now."""
    nodes = sim.nodes
    match fault:
        case "crash" | "restart":
            return [n.node_id for n in nodes if n.process != "down"]
        case "start":
            return [n.node_id for n in nodes if n.process == "down"]
        case "hang":
            return [n.node_id for n in nodes if n.process == "up"]
        case "resume":
            return [n.node_id for n in nodes if n.process == "hung"]
        case "stop":
            return [n.node_id for n in nodes if n.process != "down" and not n.stop_requested]
        case "change_sentinel":
            return [n.node_id for n in nodes if n.up and n.role == "primary"]
    raise ValueError(fault)


def change_sentinel(sim: Simulation, node: str, name: str, active: bool) -> None:
    # A primary that is handing over refuses: that is the right answer.
    with contextlib.suppress(NotPrimaryError):
        sim.set_sentinel(node, name, active)


def settle(sim: Simulation) -> None:
    sim.run_for(SETTLE_TIME + 1.0)


# ---------------------------------------------------------------------- hypothesis


class PairFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = Simulation(0)

    @initialize(
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        modes=st.sampled_from(MODE_PAIRS),
        swap=st.booleans(),
        first=st.sampled_from(NODE_IDS),
        gap=st.sampled_from(START_GAPS),
    )
    def setup(
        self, seed: int, modes: tuple[Mode, Mode], swap: bool, first: str, gap: float
    ) -> None:
        mode_a, mode_b = modes
        self.sim = new_pair(seed, (mode_b, mode_a) if swap else modes, first, gap)

    def apply(self, fault: str, data: st.DataObject) -> None:
        NODE_FAULTS[fault](self.sim, data.draw(st.sampled_from(candidates(self.sim, fault))))

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds: float) -> None:
        self.sim.run_for(seconds)

    @rule()
    def settle(self) -> None:
        settle(self.sim)

    @precondition(lambda self: bool(candidates(self.sim, "crash")))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.apply("crash", data)

    @precondition(lambda self: bool(candidates(self.sim, "start")))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.apply("start", data)

    @precondition(lambda self: bool(candidates(self.sim, "restart")))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.apply("restart", data)

    @precondition(lambda self: bool(candidates(self.sim, "hang")))
    @rule(data=st.data())
    def hang(self, data: st.DataObject) -> None:
        self.apply("hang", data)

    @precondition(lambda self: bool(candidates(self.sim, "resume")))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        self.apply("resume", data)

    @precondition(lambda self: bool(candidates(self.sim, "stop")))
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        self.apply("stop", data)

    @precondition(lambda self: not self.sim.network.partitioned)
    @rule()
    def partition(self) -> None:
        self.sim.partition()

    @precondition(lambda self: self.sim.network.partitioned)
    @rule()
    def heal(self) -> None:
        self.sim.heal()

    @precondition(lambda self: bool(candidates(self.sim, "change_sentinel")))
    @rule(data=st.data(), name=st.sampled_from(SENTINELS), active=st.booleans())
    def change_sentinel(self, data: st.DataObject, name: str, active: bool) -> None:
        node = data.draw(st.sampled_from(candidates(self.sim, "change_sentinel")))
        change_sentinel(self.sim, node, name, active)

    @invariant()
    def invariants_hold(self) -> None:
        self.sim.check()


PairFaults.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    derandomize=True,  # the same examples on every run
    database=None,
    deadline=None,
    # No shrinking: a failure already carries its seed, its steps and the trace,
    # and shrinking these runs takes minutes, past the suite's per-test timeout.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
test_pair_under_faults = PairFaults.TestCase


# ---------------------------------------------------------------------- seeded walks

WALKS = 400
WALK_STEPS = 80
WALK_CHUNK = 50


def walk(seed: int, log: list[str]) -> None:
    """One long random fault sequence, ``random.Random(seed)`` choosing every step."""
    rnd = random.Random(seed)
    modes = rnd.choice(MODE_PAIRS)
    sim = new_pair(rnd.getrandbits(32), modes, rnd.choice(NODE_IDS), rnd.choice(START_GAPS))
    log.append(f"modes {modes}, simulation seed {sim.seed}")
    for _ in range(WALK_STEPS):
        # Time passes in about half the steps, so faults also land close together.
        moves = ["advance", "advance", "advance", "settle"]
        moves += [f for f in (*NODE_FAULTS, "change_sentinel") if candidates(sim, f)]
        moves.append("heal" if sim.network.partitioned else "partition")
        move = rnd.choice(moves)
        log.append(f"t={sim.now:.4f} {move}")
        match move:
            case "advance":
                sim.run_for(rnd.choice(STEPS))
            case "settle":
                settle(sim)
            case "partition":
                sim.partition()
            case "heal":
                sim.heal()
            case "change_sentinel":
                node = rnd.choice(candidates(sim, move))
                change_sentinel(sim, node, rnd.choice(SENTINELS), rnd.random() < 0.6)
            case _:
                NODE_FAULTS[move](sim, rnd.choice(candidates(sim, move)))
        sim.check()


@pytest.mark.parametrize("first", range(0, WALKS, WALK_CHUNK))
def test_seeded_fault_walks(first: int) -> None:
    for seed in range(first, first + WALK_CHUNK):
        log: list[str] = []
        try:
            walk(seed, log)
        except (AssertionError, SimulationError) as exc:
            steps = "\n".join(log)
            raise AssertionError(f"walk seed {seed}, steps:\n{steps}\n{exc}") from exc
