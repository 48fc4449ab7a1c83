"""The role machine, scenario by scenario.

Most scenarios run a pair in the simulation kit, which drives two machines the
way the real driver does; the rest feed one machine events by hand, where the
exact order of its actions is the point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbs_core.errors import NotPrimaryError
from sbs_core.machine import (
    Action,
    Alert,
    AllStopped,
    Close,
    Connect,
    ConnectFailed,
    ConnectionClosed,
    FinalCycleDone,
    MachineSettings,
    MessageReceived,
    PeerConnected,
    PersistedState,
    PersistState,
    RoleMachine,
    RunFinalCycle,
    Send,
    Started,
    StartSentinels,
    StopAll,
    TimerFired,
    rules,
)
from sbs_core.messages import Goodbye, Handover, Heartbeat, Hello, Mode, NodeState, Role
from sbs_core.testing import NodeConfig, Simulation

A, B = "node-a", "node-b"
SENTINELS = ("labels", "orders")
HEARTBEAT, DEAD, PROBE = 1.0, 3.0, 1.0


def make_pair(
    seed: int = 1,
    *,
    mode_a: Mode = "auto",
    mode_b: Mode = "auto",
    a: NodeConfig | None = None,
    b: NodeConfig | None = None,
) -> Simulation:
    """A pair whose node-a holds the active sentinel list (as after a first install)."""
    a = a or NodeConfig(mode=mode_a, persisted=PersistedState(sentinels=SENTINELS))
    b = b or NodeConfig(mode=mode_b)
    return Simulation(seed, a=a, b=b)


def settle(sim: Simulation, seconds: float = 5.0) -> None:
    sim.run_for(seconds)


def started_pair(seed: int = 1, *, mode_a: Mode = "auto", mode_b: Mode = "auto") -> Simulation:
    """node-a up first and primary, node-b joined as its secondary."""
    sim = make_pair(seed, mode_a=mode_a, mode_b=mode_b)
    sim.start(A)
    sim.run_for(0.5)
    sim.start(B)
    settle(sim)
    assert sim.roles() == {A: "primary", B: "secondary"}
    return sim


def never_both_active(sim: Simulation) -> None:
    """The strict form of "no overlap": not even while the nodes are apart."""
    assert len(sim.active_nodes()) < 2, "sentinels run on both nodes"


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind for a in alerts]


def first_start_after(sim: Simulation, node: str, since: float) -> float:
    starts = [
        c.at
        for c in sim.node(node).controller.calls
        if c.op == "start_application" and c.at is not None and c.at >= since
    ]
    assert starts, f"{node} started nothing since t={since}"
    return starts[0]


def last_stop_at(sim: Simulation, node: str) -> float:
    stops = [c.at for c in sim.node(node).controller.calls if c.op in ("stop", "stop_application")]
    assert stops, f"{node} never stopped anything"
    assert stops[-1] is not None
    return stops[-1]


# ---------------------------------------------------------------------- startup


@pytest.mark.parametrize("mode", ["auto", "primary"])
def test_alone_a_willing_node_becomes_primary(mode: Mode) -> None:
    sim = make_pair(mode_a=mode)
    sim.start(A)
    sim.run_for(0.2)  # one round trip to learn that nobody listens
    assert sim.role(A) == "primary"
    assert sim.running(A) == frozenset(SENTINELS)
    assert sim.node(A).controller.sentinel_epochs == dict.fromkeys(SENTINELS, 1)
    assert sim.persisted(A) == PersistedState(epoch=1, role="primary", sentinels=SENTINELS)
    promoted = [a for a in sim.alerts(A) if a.kind == "promoted"]
    assert [a.details["how"] for a in promoted] == ["startup"]


def test_alone_a_backup_node_waits_as_secondary() -> None:
    sim = make_pair(mode_a="backup")
    sim.start(A)
    sim.run_for(30)
    assert sim.role(A) == "secondary"
    assert sim.active_nodes() == ()
    assert sim.persisted_epoch(A) == 0
    assert kinds(sim.alerts(A)) == ["started", "demoted"]  # said once, not at every probe
    # It kept probing all along, and takes the first primary that comes.
    sim.start(B)
    sim.run_until(lambda: sim.role(B) == "primary" and sim.connected(), timeout=2 * PROBE)
    assert sim.role(A) == "secondary"


def test_a_node_joins_the_existing_primary_as_secondary() -> None:
    sim = started_pair()
    assert sim.connected()
    assert sim.active_nodes() == (A,)
    assert sim.persisted(B) == PersistedState(epoch=1, role="secondary", sentinels=SENTINELS)
    assert "promoted" not in kinds(sim.alerts(B))


def test_two_nodes_started_together_agree_on_one_primary_over_one_connection() -> None:
    sim = make_pair()
    sim.start(A)
    sim.start(B)
    settle(sim)
    # Both probed at once: each accepted the other's connection, kept the one
    # node-a opened and closed the other.
    assert sim.roles() == {A: "primary", B: "secondary"}
    assert sim.open_connections(A) == sim.open_connections(B) == 1
    assert sim.connected()
    assert any("goodbye(duplicate)" in line for line in sim.trace)
    assert sim.active_nodes() == (A,)


# ---------------------------------------------------------------------- failover


def test_failover_when_the_primary_crashes() -> None:
    sim = started_pair()
    sim.crash(A)
    took = sim.run_until(lambda: sim.role(B) == "primary", timeout=1)
    assert took <= 2 * sim.max_latency  # the kernel's FIN, not a timeout
    assert sim.running(B) == frozenset(SENTINELS)
    assert set(sim.node(B).controller.sentinel_epochs.values()) == {2}
    assert sim.persisted(B) == PersistedState(epoch=2, role="primary", sentinels=SENTINELS)
    promoted = [a for a in sim.alerts(B) if a.kind == "promoted"]
    assert promoted[-1].level == "warning"
    assert promoted[-1].details["how"] == "takeover"


def test_failover_when_the_primary_hangs_after_dead_time() -> None:
    sim = started_pair()
    hung_at = sim.now
    sim.hang(A)
    sim.run_until(lambda: sim.role(B) == "primary", timeout=DEAD + HEARTBEAT)
    # Silence is counted from the last heartbeat heard, sent at most one
    # heartbeat interval before the hang.
    assert hung_at + DEAD - HEARTBEAT <= sim.now <= hung_at + DEAD + 2 * sim.max_latency
    assert sim.running(B) == frozenset(SENTINELS)
    assert sim.role(A) == "primary"  # the hung node does not know yet
    assert sim.running(A) == frozenset(SENTINELS)  # and its sentinels run on
    assert not sim.connected()


def test_a_resumed_hung_primary_steps_down_by_epoch() -> None:
    sim = started_pair()
    sim.hang(A)
    sim.run_until(lambda: sim.role(B) == "primary", timeout=DEAD + HEARTBEAT)
    b_calls = len(sim.node(B).controller.calls)
    sim.resume(A)
    # It learns it lost b, looks for it at once, meets a primary with a higher
    # epoch and yields: its sentinels stop within a few round trips and a stop.
    took = sim.run_until(lambda: not sim.node(A).controller.active, timeout=PROBE)
    assert took <= 4 * sim.max_latency + sim.max_action_delay
    settle(sim)
    assert sim.roles() == {A: "secondary", B: "primary"}
    assert sim.epoch(A) == sim.epoch(B) == 2
    assert "split_brain" in kinds(sim.alerts(A))
    assert sim.node(B).controller.calls[b_calls:] == []  # b never stopped anything


# ---------------------------------------------------------------------- planned switchover


def test_a_planned_stop_hands_over_at_once() -> None:
    sim = started_pair()
    sim.add_check(never_both_active)
    asked_at = sim.now
    sim.stop(A)
    sim.run_until(lambda: sim.role(B) == "primary", timeout=1)
    assert sim.now - asked_at < 0.5 < DEAD  # no waiting for a timeout
    sim.run_until(lambda: sim.node(A).process == "down", timeout=1)
    assert sim.role(A) == "stopped"
    assert last_stop_at(sim, A) <= first_start_after(sim, B, 0.0)
    assert sim.running(B) == frozenset(SENTINELS)
    trace = "\n".join(sim.trace)
    assert trace.index("RunFinalCycle") < trace.index("handover(stopping")
    assert "promoted: primary (epoch 2): planned handover: node-a is stopping" in trace
    sim.run_for(1)
    lost = [a.level for a in sim.alerts(B) if a.kind == "peer_lost"]
    assert lost == ["info"]  # a planned stop is not a failure


def test_a_planned_stop_of_the_secondary_changes_nothing_on_the_primary() -> None:
    sim = started_pair()
    sim.stop(B)
    sim.run_until(lambda: sim.node(B).process == "down", timeout=1)
    assert sim.role(A) == "primary"
    assert sim.running(A) == frozenset(SENTINELS)
    assert sim.node(A).controller.calls[-1].op == "start"


def test_a_planned_stop_without_peer_stops_everything_then_exits() -> None:
    sim = make_pair()
    sim.start(A)
    sim.run_for(1)
    sim.stop(A)
    sim.run_until(lambda: sim.node(A).process == "down", timeout=1)
    assert sim.active_nodes() == ()
    assert sim.node(A).unclean_exits == []


# ---------------------------------------------------------------------- handback


def test_handback_to_a_returning_primary_mode_node() -> None:
    sim = started_pair(mode_a="primary")
    sim.add_check(never_both_active)
    sim.crash(A)
    sim.run_until(lambda: sim.role(B) == "primary", timeout=1)
    sim.set_sentinel(B, "reports")  # a change made during the relay
    sim.run_for(2)
    returned_at = sim.now
    sim.start(A)
    sim.run_until(lambda: sim.roles() == {A: "primary", B: "secondary"}, timeout=2)
    assert sim.now - returned_at < 0.5
    settle(sim)
    assert sim.roles() == {A: "primary", B: "secondary"}
    assert sim.running(A) == frozenset({*SENTINELS, "reports"})
    assert sim.active_nodes() == (A,)
    assert last_stop_at(sim, B) <= first_start_after(sim, A, returned_at)
    assert "handback" in kinds(sim.alerts(A))
    trace = "\n".join(sim.trace)
    assert trace.index("RunFinalCycle") < trace.index("handover(handback")


def test_handback_from_a_backup_node_that_relayed() -> None:
    sim = make_pair(mode_a="backup")
    sim.add_check(never_both_active)
    sim.start(B)
    sim.run_for(0.5)
    sim.start(A)
    settle(sim)
    assert sim.roles() == {A: "secondary", B: "primary"}
    sim.crash(B)
    sim.run_until(lambda: sim.role(A) == "primary", timeout=1)
    sim.run_for(3)
    sim.start(B)
    sim.run_until(lambda: sim.roles() == {A: "secondary", B: "primary"}, timeout=2)
    settle(sim)
    assert sim.roles() == {A: "secondary", B: "primary"}
    assert sim.active_nodes() == (B,)
    assert sim.epoch(A) == sim.epoch(B) == 3  # startup, takeover, handback


# ---------------------------------------------------------------------- split brain


def both_primary_apart(sim: Simulation) -> None:
    """Start both nodes during a partition: each becomes primary at epoch 1."""
    sim.partition()
    sim.start(A)
    sim.start(B)
    sim.run_for(5)
    assert sim.roles() == {A: "primary", B: "primary"}
    assert sim.epoch(A) == sim.epoch(B) == 1


def test_split_brain_with_equal_epochs_the_lower_node_id_wins() -> None:
    sim = make_pair()
    both_primary_apart(sim)
    sim.heal()
    settle(sim)
    assert sim.roles() == {A: "primary", B: "secondary"}
    assert sim.active_nodes() == (A,)
    for node in (A, B):
        split = [a for a in sim.alerts(node) if a.kind == "split_brain"]
        assert split
        assert "node-b yields" in split[0].message


def test_split_brain_with_equal_epochs_the_primary_mode_node_wins() -> None:
    sim = make_pair(mode_b="primary")
    both_primary_apart(sim)
    sim.heal()
    settle(sim)
    assert sim.roles() == {A: "secondary", B: "primary"}
    assert sim.active_nodes() == (B,)


def test_split_brain_the_lower_epoch_yields_first() -> None:
    sim = started_pair()
    sim.partition()
    sim.run_until(lambda: sim.role(B) == "primary", timeout=DEAD + HEARTBEAT)
    sim.run_for(2)
    assert (sim.epoch(A), sim.epoch(B)) == (1, 2)
    sim.heal()
    settle(sim)
    # node-a has the lower id, but its term is the older one.
    assert sim.roles() == {A: "secondary", B: "primary"}
    assert sim.epoch(A) == sim.epoch(B) == 2


def test_split_brain_a_stale_primary_mode_node_yields_then_gets_the_role_back() -> None:
    sim = started_pair(mode_a="primary")
    sim.partition()
    sim.run_until(lambda: sim.role(B) == "primary", timeout=DEAD + HEARTBEAT)
    assert len(sim.active_nodes()) == 2  # apart, both run: that is the partition's doing
    sim.heal()
    settle(sim)
    assert sim.roles() == {A: "primary", B: "secondary"}
    assert sim.epoch(A) == sim.epoch(B) == 3  # b's takeover, then the handback
    # a yielded first (its term was older), then b gave the role back.
    sent = [line for line in sim.trace if "handover(" in line.partition("=>")[2]]
    assert len(sent) == 2
    assert "node-a" in sent[0].split()[1]
    assert "handover(yield" in sent[0]
    assert "handover(handback" in sent[1]


# ---------------------------------------------------------------------- refusals


def test_mismatched_settings_are_refused_naming_both_values() -> None:
    sim = make_pair(b=NodeConfig(dead_time=5.0))
    sim.start(A)
    sim.run_for(1)
    sim.start(B)
    sim.run_for(10)
    assert sim.roles() == {A: "primary", B: "starting"}  # nothing starts half-paired
    assert not sim.connected()
    refused = [a for a in sim.alerts(B) if a.kind == "refused"]
    assert len(refused) == 1  # said once, though every probe is refused again
    assert refused[0].level == "error"
    assert "node.dead_time differs: 5.0 on this node, 3.0 on node-a" in refused[0].message
    assert "node.dead_time differs: 3.0 on this node, 5.0 on node-b" in sim.alerts(A)[-1].message
    b = sim.node(B).machine
    assert b is not None
    assert b.status().last_error is not None


@pytest.mark.parametrize(("mode", "first_role"), [("primary", "primary"), ("backup", "secondary")])
def test_a_pair_of_two_primary_or_two_backup_nodes_is_refused(mode: Mode, first_role: Role) -> None:
    sim = make_pair(mode_a=mode, mode_b=mode)
    sim.start(A)
    sim.run_for(1)
    sim.start(B)
    sim.run_for(10)
    assert sim.roles() == {A: first_role, B: "starting"}
    message = next(a.message for a in sim.alerts(B) if a.kind == "refused")
    assert f'both nodes have node.mode = "{mode}"' in message
    assert "node-a" in message


def test_a_node_refuses_to_pair_with_itself() -> None:
    m = machine(A)
    m.handle(Started(now=0))
    actions = m.handle(connected(1, hello(A, "starting"), now=0.1))
    assert any(
        isinstance(x, Close) and x.goodbye and x.goodbye.reason == "refused" for x in actions
    )
    assert m.role == "starting"


# ---------------------------------------------------------------------- sentinels


def test_sentinels_are_activated_on_the_primary_and_reach_the_secondary() -> None:
    sim = started_pair()
    sim.set_sentinel(A, "reports")
    assert "reports" in sim.running(A)
    assert sim.node(A).controller.sentinel_epochs["reports"] == 1
    assert "reports" in sim.persisted(A).sentinels
    sim.run_for(0.1)
    assert sim.persisted(B).sentinels == ("labels", "orders", "reports")
    assert sim.running(B) == frozenset()
    with pytest.raises(NotPrimaryError, match="sentinels are changed on the primary"):
        sim.set_sentinel(B, "reports", active=False)
    sim.set_sentinel(A, "labels", active=False)
    assert sim.running(A) == frozenset({"orders", "reports"})
    sim.run_for(0.1)
    assert sim.persisted(B).sentinels == ("orders", "reports")


def test_the_epoch_is_persisted_before_any_sentinel_carries_it() -> None:
    sim = started_pair()
    sim.crash(A)
    sim.run_for(2)
    sim.start(A)
    sim.stop(B)
    settle(sim)
    for node in sim.nodes:
        for start in node.starts:
            assert start.epoch <= start.persisted_epoch


# ---------------------------------------------------------------------- hand-fed


def make_settings(node_id: str, mode: Mode = "auto") -> MachineSettings:
    return MachineSettings(
        node_id=node_id,
        name=node_id,
        mode=mode,
        port=4445,
        heartbeat_interval=HEARTBEAT,
        dead_time=DEAD,
        probe_interval=PROBE,
        final_cycle_timeout=5.0,
    )


def machine(
    node_id: str = A, mode: Mode = "auto", epoch: int = 0, sentinels: tuple[str, ...] = SENTINELS
) -> RoleMachine:
    return RoleMachine(
        make_settings(node_id, mode), PersistedState(epoch=epoch, sentinels=sentinels)
    )


def state(
    node_id: str,
    role: Role,
    epoch: int = 0,
    mode: Mode = "auto",
    *,
    sentinels: tuple[str, ...] = SENTINELS,
    handing_over: bool = False,
) -> NodeState:
    return NodeState(
        node_id=node_id,
        name=node_id,
        mode=mode,
        role=role,
        epoch=epoch,
        sentinels=sentinels,
        handing_over=handing_over,
    )


def hello(node_id: str, role: Role, epoch: int = 0, mode: Mode = "auto") -> Hello:
    return Hello(
        state=state(node_id, role, epoch, mode),
        heartbeat_interval=HEARTBEAT,
        dead_time=DEAD,
        port=4445,
    )


def connected(conn: int, peer_hello: Hello, *, now: float, initiated: bool = True) -> PeerConnected:
    return PeerConnected(now=now, conn=conn, hello=peer_hello, initiated=initiated)


def heard(conn: int, peer: NodeState, now: float) -> MessageReceived:
    return MessageReceived(now=now, conn=conn, message=Heartbeat(state=peer))


T = TypeVar("T")


def only(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def primary_with_secondary(mode: Mode = "auto") -> RoleMachine:
    """node-a primary at epoch 1 with node-b connected as secondary on conn 1."""
    m = machine(A, mode)
    m.handle(Started(now=0))
    m.handle(ConnectFailed(now=0.01, answered=False, reason="refused"))
    m.handle(connected(1, hello(B, "secondary", 1), now=1, initiated=False))
    assert m.role == "primary"
    return m


def _alone(m: RoleMachine) -> list[Action]:
    m.handle(Started(now=0))
    return m.handle(ConnectFailed(now=0.1, answered=False, reason="refused"))


def _takeover(m: RoleMachine) -> list[Action]:
    m.handle(Started(now=0))
    m.handle(connected(1, hello(B, "primary", 4), now=0.1))
    return m.handle(ConnectionClosed(now=2, conn=1, reason="reset"))


def _handover(m: RoleMachine) -> list[Action]:
    m.handle(Started(now=0))
    m.handle(connected(1, hello(B, "primary", 4), now=0.1))
    handover = Handover(epoch=4, sentinels=SENTINELS, reason="stopping")
    return m.handle(MessageReceived(now=2, conn=1, message=handover))


def _elected(m: RoleMachine) -> list[Action]:
    m.handle(Started(now=0))
    return m.handle(connected(1, hello(B, "starting", 4), now=0.1))


@pytest.mark.parametrize(
    "promote",
    [_alone, _takeover, _handover, _elected],
    ids=["alone", "takeover", "handover", "elected"],
)
def test_every_promotion_persists_its_epoch_before_starting_sentinels(
    promote: Callable[[RoleMachine], list[Action]],
) -> None:
    m = machine(A, epoch=4)
    actions = promote(m)
    assert m.role == "primary"
    persist = next(i for i, a in enumerate(actions) if isinstance(a, PersistState))
    start = next(i for i, a in enumerate(actions) if isinstance(a, StartSentinels))
    assert persist < start
    assert only(actions, PersistState)[0].epoch == only(actions, StartSentinels)[0].epoch == 5


@pytest.mark.parametrize(
    ("promote", "how"),
    [(_alone, "startup"), (_takeover, "takeover"), (_handover, "handover"), (_elected, "startup")],
    ids=["alone", "takeover", "handover", "elected"],
)
def test_sentinels_are_started_saying_how_the_node_became_primary(
    promote: Callable[[RoleMachine], list[Action]], how: str
) -> None:
    # A backup-only licence allows sentinels for a takeover, not at startup:
    # the start says which it is, and so does the status, for that relay.
    m = machine(A, epoch=4)
    assert only(promote(m), StartSentinels)[0].how == how
    assert m.status().promoted_how == how


def test_a_node_that_yields_runs_its_final_cycle_as_the_loser() -> None:
    m = primary_with_secondary()
    m.handle(connected(2, hello(B, "primary", 5), now=2))
    assert only(m.handle(AllStopped(now=2.1)), RunFinalCycle) == [
        RunFinalCycle(conn=2, reason="yield")
    ]
    assert m.status().promoted_how == "startup"  # still primary until the handover


def test_duplicate_connections_collapse_to_the_one_the_lower_id_opened() -> None:
    m = machine(B)
    m.handle(Started(now=0))
    m.handle(connected(1, hello(A, "starting"), now=0.1, initiated=True))  # b opened it
    actions = m.handle(connected(2, hello(A, "starting"), now=0.1, initiated=False))  # a opened it
    closes = only(actions, Close)
    assert [(c.conn, c.goodbye) for c in closes] == [(1, Goodbye(reason="duplicate"))]
    status = m.status()
    assert status.peer_connected
    assert m.role == "starting"  # node-a wins the election; b waits for it


def test_the_dead_time_deadline_is_the_instant_the_session_closes() -> None:
    # Floats: last_heard + dead_time can exceed now - last_heard >= dead_time's
    # reach by one unit in the last place; the machine must close at the very
    # deadline it asked to be woken at, or a driver spins on it.
    m = machine(B)
    m.handle(Started(now=0))
    heard_at = 6.511274721368609  # (heard_at + 3.0) - heard_at < 3.0
    m.handle(connected(1, hello(A, "primary", 1), now=heard_at))
    wakes = 0
    while m.status().peer_connected:
        deadline = m.next_deadline()
        assert deadline is not None
        m.handle(TimerFired(now=deadline))
        wakes += 1
        assert wakes < 10
    assert m.role == "primary"


def test_only_one_stop_at_a_time_and_starts_wait_for_it() -> None:
    m = primary_with_secondary()
    yielding = m.handle(connected(2, hello(B, "primary", 5), now=2))
    assert only(yielding, StopAll) == [StopAll()]
    assert m.status().handing_over
    # The peer goes away mid-yield: stay primary, but start nothing while the
    # stop is still under way (the controller would run it after the stop).
    aborted = m.handle(ConnectionClosed(now=2.1, conn=2, reason="reset"))
    assert only(aborted, StartSentinels) == []
    assert not m.status().handing_over
    # It comes back and must be yielded to again: the stop under way will do.
    again = m.handle(connected(3, hello(B, "primary", 5), now=2.2))
    assert only(again, StopAll) == []
    answered = m.handle(AllStopped(now=2.3))
    assert only(answered, RunFinalCycle) == [RunFinalCycle(conn=3, reason="yield")]
    assert only(answered, StartSentinels) == []


def test_a_yield_aborted_before_the_stop_ends_restarts_sentinels_after_it() -> None:
    m = primary_with_secondary()
    m.handle(connected(2, hello(B, "primary", 5), now=2))
    m.handle(ConnectionClosed(now=2.1, conn=2, reason="reset"))
    restarted = m.handle(AllStopped(now=2.3))
    assert restarted[0] == StartSentinels(names=SENTINELS, epoch=1)
    assert m.role == "primary"


def test_a_handover_moves_to_the_connection_both_nodes_keep() -> None:
    m = machine(B)  # node-b, so a connection node-a opens is preferred
    m.handle(Started(now=0))
    m.handle(ConnectFailed(now=0.01, answered=False, reason="refused"))
    m.handle(connected(1, hello(A, "primary", 3), now=1))  # b's own: split brain, b yields
    assert m.status().handing_over
    m.handle(AllStopped(now=1.1))  # RunFinalCycle(conn=1)
    actions = m.handle(connected(2, hello(A, "primary", 3), now=1.2, initiated=False))
    assert only(actions, Close) == [Close(conn=1, goodbye=Goodbye(reason="duplicate"))]
    assert only(actions, RunFinalCycle) == [RunFinalCycle(conn=2, reason="yield")]
    # The cycle on the dropped connection fails; only the one on conn 2 counts.
    assert only(m.handle(FinalCycleDone(now=1.3, ok=False)), Send) == []
    done = m.handle(FinalCycleDone(now=1.4, ok=True))
    handovers = [a for a in only(done, Send) if isinstance(a.message, Handover)]
    assert [h.conn for h in handovers] == [2]
    assert m.role == "secondary"


def test_a_stale_hello_does_not_hide_what_the_peer_said_since() -> None:
    m = machine(B, epoch=1)
    m.handle(Started(now=0))
    m.handle(connected(1, hello(A, "primary", 2), now=0.1))
    assert m.role == "secondary"
    # node-a closes b's connection as a duplicate; its own arrives with the
    # Hello it took before it became primary.
    m.handle(MessageReceived(now=0.2, conn=1, message=Goodbye(reason="duplicate")))
    m.handle(ConnectionClosed(now=0.2, conn=1, reason="closed"))
    actions = m.handle(connected(2, hello(A, "starting", 1), now=0.3, initiated=False))
    assert only(actions, StartSentinels) == []
    assert m.role == "secondary"
    peer = m.status().peer
    assert peer is not None
    assert (peer.role, peer.epoch) == ("primary", 2)


def yielded_to_a_restarted_peer() -> RoleMachine:
    """node-a (primary mode, epoch 1) yields to node-b (epoch 3), which restarts meanwhile.

    The Handover goes out on b's new connection, where b said it is starting: a
    state older than the Handover b is about to read.
    """
    m = machine(A, "primary")
    m.handle(Started(now=0))
    m.handle(ConnectFailed(now=0.01, answered=False, reason="refused"))
    m.handle(connected(1, hello(B, "primary", 3), now=1, initiated=False))
    assert m.status().handing_over
    m.handle(AllStopped(now=1.1))
    m.handle(connected(2, hello(B, "starting", 3), now=1.2, initiated=False))
    m.handle(FinalCycleDone(now=1.3, ok=False))  # the cycle on the dropped connection
    done = m.handle(FinalCycleDone(now=1.4, ok=True))
    sent = [a for a in only(done, Send) if isinstance(a.message, Handover)]
    assert [a.conn for a in sent] == [2]
    return m


def test_after_handing_over_an_older_state_of_the_peer_does_not_reelect() -> None:
    m = yielded_to_a_restarted_peer()
    # Without the wait, a would elect itself here (primary mode beats auto).
    assert m.role == "secondary"
    late = m.handle(heard(2, state(B, "secondary", 3), now=1.5))
    assert only(late, StartSentinels) == []
    assert m.role == "secondary"
    m.handle(heard(2, state(B, "primary", 4), now=1.6))
    assert m.role == "secondary"
    assert m.epoch == 4


def test_crossed_handovers_do_not_make_both_primary() -> None:
    m = yielded_to_a_restarted_peer()
    # b gives the role back before it read ours: taking it could make both primary.
    crossed = Handover(epoch=3, sentinels=SENTINELS, reason="handback")
    actions = m.handle(MessageReceived(now=1.5, conn=2, message=crossed))
    assert only(actions, StartSentinels) == []
    assert m.role == "secondary"
    # Neither claims the role: once the wait is over the election decides.
    m.handle(heard(2, state(B, "secondary", 3), now=1.6))
    assert m.role == "secondary"
    deadline = m.next_deadline()
    assert deadline is not None
    assert deadline <= 1.4 + DEAD
    m.handle(TimerFired(now=1.4 + DEAD))
    assert m.status().role == "primary"


def test_a_primary_that_loses_its_peer_looks_for_it_at_once_but_not_in_a_loop() -> None:
    m = primary_with_secondary()
    actions = m.handle(ConnectionClosed(now=1.2, conn=1, reason="reset"))
    assert Connect() in actions  # the peer may have taken over: find out now
    m.handle(connected(2, hello(B, "secondary", 1), now=1.3, initiated=True))
    again = m.handle(ConnectionClosed(now=1.4, conn=2, reason="reset"))
    assert Connect() not in again  # flapping: the next probe waits its interval
    assert m.next_deadline() == 1.4 + PROBE


# ---------------------------------------------------------------------- the rules

modes = st.sampled_from(["auto", "primary", "backup"])


@given(mode_a=modes, mode_b=modes, epoch_a=st.integers(0, 3), epoch_b=st.integers(0, 3))
def test_the_rules_always_pick_exactly_one_side(
    mode_a: Mode, mode_b: Mode, epoch_a: int, epoch_b: int
) -> None:
    a, b = state(A, "primary", epoch_a, mode_a), state(B, "primary", epoch_b, mode_b)
    assert rules.survives_split_brain(a, b) != rules.survives_split_brain(b, a)
    if epoch_a != epoch_b:
        assert rules.survives_split_brain(a, b) == (epoch_a > epoch_b)
    a, b = state(A, "starting", epoch_a, mode_a), state(B, "starting", epoch_b, mode_b)
    if mode_a == mode_b == "backup":
        assert not rules.elected(a, b)
        assert not rules.elected(b, a)
    else:
        assert rules.elected(a, b) != rules.elected(b, a)
