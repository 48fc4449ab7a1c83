"""The simulation kit itself: time, the fake network's TCP manners, the fakes, the runner."""

from __future__ import annotations

import random

import anyio
import pytest

from sbs_core.alerts.events import AlertEvent
from sbs_core.alerts.notifier import AlertPublisher
from sbs_core.controller import ServiceController
from sbs_core.errors import ControlError, UnknownSentinelError
from sbs_core.machine import Alert, PersistedState
from sbs_core.messages import Goodbye, Message
from sbs_core.testing import (
    ControllerCall,
    FakeController,
    FakeNetwork,
    FakeNotifier,
    FakeStore,
    InvariantViolation,
    NodeConfig,
    Simulation,
    SimulationError,
    SimulationTimeout,
    Timeline,
    VirtualClock,
)
from sbs_core.testing.network import (
    DataArrived,
    Delivery,
    FinArrived,
    HelloArrived,
    Incoming,
    Refused,
)

A, B = "node-a", "node-b"

# ---------------------------------------------------------------------- clock


def test_the_virtual_clock_moves_only_forward_and_only_when_told() -> None:
    clock = VirtualClock(10.0)
    assert clock() == clock.now == 10.0
    assert clock.advance(2.5) == 12.5
    assert clock.advance_to(12.5) == 12.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(3)


def test_the_timeline_runs_callbacks_in_time_order_then_in_scheduling_order() -> None:
    timeline = Timeline(VirtualClock())
    seen: list[str] = []
    timeline.call_at(2, lambda: seen.append("late"))
    timeline.call_at(1, lambda: seen.append("first"))
    timeline.call_at(1, lambda: seen.append("second"))
    timeline.call_at(1.5, lambda: seen.append("cancelled")).cancel()
    while timeline.run_next():
        pass
    assert seen == ["first", "second", "late"]
    assert timeline.clock.now == 2


# ---------------------------------------------------------------------- network


class Hosts:
    """Two hosts, ``x`` and ``y``, on a FakeNetwork; records what each receives."""

    def __init__(self, seed: int = 3) -> None:
        self.timeline = Timeline(VirtualClock())
        self.up = {"x": True, "y": True}
        self.received: dict[str, list[Delivery]] = {"x": [], "y": []}
        self.net = FakeNetwork(
            self.timeline,
            random.Random(seed),
            latency=(0.01, 0.05),
            listening=lambda host: self.up[host],
            deliver=lambda host, d: self.received[host].append(d),
        )

    def run(self, until: float = 1e9) -> None:
        while (at := self.timeline.next_at()) is not None and at <= until:
            self.timeline.run_next()

    def messages(self, host: str) -> list[Message]:
        return [d.message for d in self.received[host] if isinstance(d, DataArrived)]


def note(i: int) -> Message:
    return Goodbye(reason="stopping", detail=str(i))


def test_a_connection_to_a_host_without_listener_is_refused_in_one_round_trip() -> None:
    hosts = Hosts()
    hosts.up["y"] = False
    link = hosts.net.connect("x", "y")
    hosts.run()
    assert hosts.received["x"] == [Refused(link)]
    assert hosts.received["y"] == []
    assert hosts.timeline.clock.now <= 2 * hosts.net.max_latency


def test_messages_arrive_in_order_and_a_partition_only_delays_them() -> None:
    hosts = Hosts()
    link = hosts.net.connect("x", "y")
    hosts.run()
    assert hosts.received["y"] == [Incoming(link)]
    for i in range(5):
        hosts.net.send(link, "x", note(i))
    hosts.net.partition()
    for i in range(5, 10):
        hosts.net.send(link, "x", note(i))
    hosts.net.close(link, "x")
    hosts.run()
    assert hosts.messages("y") == []  # everything in flight is held
    assert link.in_flight("x") == 11
    hosts.net.heal()
    hosts.run()
    assert hosts.messages("y") == [note(i) for i in range(10)]
    assert isinstance(hosts.received["y"][-1], FinArrived)  # the FIN comes last


def test_an_attempt_given_up_during_a_partition_never_reaches_the_other_host() -> None:
    hosts = Hosts()
    hosts.net.partition()
    link = hosts.net.connect("x", "y")
    hosts.run()
    hosts.net.close(link, "x")  # the initiator's connect timeout
    hosts.net.heal()
    hosts.run()
    assert hosts.received == {"x": [], "y": []}
    assert hosts.net.links() == ()


def test_both_hellos_and_data_cross_in_order_in_both_directions() -> None:
    hosts = Hosts()
    link = hosts.net.connect("x", "y")
    hosts.run()
    hosts.net.send(link, "y", note(1))
    hosts.net.send(link, "x", note(2))
    hosts.net.close(link, "y")
    hosts.net.close(link, "x")
    hosts.run()
    assert hosts.messages("x") == [note(1)]
    assert hosts.messages("y") == [note(2)]
    assert hosts.net.links() == ()  # both FINs delivered: nothing left to track
    assert not any(isinstance(d, HelloArrived) for d in hosts.received["x"])


# ---------------------------------------------------------------------- fakes


def test_the_fake_controller_is_a_service_controller() -> None:
    clock = VirtualClock(7)
    fake = FakeController(["labels", "orders"], clock=clock)
    controller: ServiceController = fake

    async def main() -> None:
        await controller.start_application(epoch=3)
        await controller.start_sentinels(["labels"], epoch=3)
        await controller.start_sentinels(["labels", "orders"], epoch=4)  # labels runs already
        assert controller.running_sentinels() == {"labels", "orders"}
        with pytest.raises(UnknownSentinelError, match="ghost"):
            await controller.start_sentinels(["ghost", "labels"], epoch=4)
        await controller.stop_sentinels(["orders"])
        await controller.stop_sentinels(None)
        await controller.stop_sentinels(None)  # again: nothing to do
        await controller.stop_application()

    anyio.run(main)
    assert fake.calls == [
        ControllerCall(op="start_application", epoch=3, at=7),
        ControllerCall(op="start", names=("labels",), epoch=3, at=7),
        ControllerCall(op="start", names=("orders",), epoch=4, at=7),
        ControllerCall(op="stop", names=("orders",), at=7),
        ControllerCall(op="stop", names=("labels",), at=7),
        ControllerCall(op="stop_application", at=7),
    ]
    assert not fake.active


def test_the_fake_notifier_is_an_alert_publisher() -> None:
    fake = FakeNotifier()
    publisher: AlertPublisher = fake
    alert = Alert(kind="promoted", message="primary (epoch 2)", level="warning")
    event = AlertEvent.from_alert(
        alert, node_name="a", node_address="10.0.0.1", role="primary", epoch=2, at=0.0
    )
    publisher.publish(event)
    assert fake.events == [event]
    assert fake.kinds() == ["promoted"]


def test_the_fake_store_keeps_every_state_saved() -> None:
    store = FakeStore(PersistedState(epoch=2))
    store.save(PersistedState(epoch=3, role="primary"))
    assert store.load() == store.state == PersistedState(epoch=3, role="primary")
    assert store.history == [PersistedState(epoch=3, role="primary")]


# ---------------------------------------------------------------------- the runner


def script(seed: int) -> list[str]:
    sim = Simulation(seed, a=NodeConfig(persisted=PersistedState(sentinels=("labels",))))
    sim.start(A)
    sim.run_for(0.3)
    sim.start(B)
    sim.run_for(3)
    sim.hang(A)
    sim.run_for(5)
    sim.resume(A)
    sim.run_for(3)
    return list(sim.trace)


def test_a_seed_names_one_run_exactly() -> None:
    assert script(11) == script(11)
    assert script(11) != script(12)


def test_a_hung_responder_never_learns_of_an_attempt_given_up_on() -> None:
    sim = Simulation(5)
    sim.start(B)
    sim.run_for(1)
    sim.hang(B)
    sim.start(A)
    # The kernel of b accepts, nobody answers: a waits out connect_timeout.
    took = sim.run_until(lambda: sim.role(A) == "primary", timeout=5)
    assert took == pytest.approx(NodeConfig().connect_timeout)
    sim.run_for(0.5)
    sim.resume(B)
    sim.run_for(0.1)
    # b caught up on a dead handshake: its machine never saw that connection
    # (it may have opened one of its own since).
    incoming = [line for line in sim.trace if "node-b [" in line and " in, " in line]
    assert incoming == []
    sim.run_for(5)
    assert sim.connected()


def test_a_crash_during_a_partition_is_seen_when_it_heals() -> None:
    sim = Simulation(8)
    sim.start(A)
    sim.run_for(0.3)
    sim.start(B)
    sim.run_for(3)
    sim.partition()
    sim.crash(A)
    sim.run_for(1)
    assert sim.role(B) == "secondary"  # the FIN is held like everything else
    sim.heal()
    took = sim.run_until(lambda: sim.role(B) == "primary", timeout=1)
    assert took <= sim.max_latency


def test_a_failed_check_reports_the_seed_and_the_trace() -> None:
    sim = Simulation(42)

    def no_primary(s: Simulation) -> None:
        assert not s.primaries(), "a primary appeared"

    sim.add_check(no_primary)
    sim.start(A)
    with pytest.raises(InvariantViolation, match="a primary appeared") as caught:
        sim.run_for(1)
    assert "seed=42" in str(caught.value)
    assert "ConnectFailed(connection refused)" in str(caught.value)


def test_run_until_names_the_seed_when_time_runs_out() -> None:
    sim = Simulation(9)
    with pytest.raises(SimulationTimeout, match="seed=9"):
        sim.run_until(lambda: sim.role(A) == "primary", timeout=2)
    assert sim.now == 2


def test_the_simulation_refuses_impossible_faults() -> None:
    sim = Simulation(1)
    with pytest.raises(SimulationError, match="node-a is down"):
        sim.hang(A)
    sim.start(A)
    with pytest.raises(SimulationError, match="crash or stop it first"):
        sim.start(A)
    with pytest.raises(SimulationError, match="no node"):
        sim.node("node-c")
    sim.crash(A)
    with pytest.raises(ControlError):
        sim.set_sentinel(A, "labels")
