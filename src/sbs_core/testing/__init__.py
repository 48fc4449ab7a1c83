"""A simulation kit for testing a pair of sbs nodes, and your integrations with it.

Everything runs in virtual time and is seeded: a :class:`Simulation` drives two
real :class:`~sbs_core.machine.RoleMachine` instances over a :class:`FakeNetwork`
with a :class:`FakeController` and a :class:`FakeStore` each, and lets a test
crash, hang, stop and restart nodes and partition the network::

    sim = Simulation(seed=7, a=NodeConfig(mode="primary"))
    sim.start("node-a")
    sim.start("node-b")
    sim.run_for(5)
    assert sim.primaries() == ("node-a",)
    sim.crash("node-a")
    sim.run_until(lambda: sim.primaries() == ("node-b",), timeout=10)

A failure message starts with the seed and ends with the trace of the run.
"""

from sbs_core.testing.clock import ScheduledCall, Timeline, VirtualClock
from sbs_core.testing.fakes import ControllerCall, FakeController, FakeNotifier, FakeStore
from sbs_core.testing.network import FakeNetwork, Link
from sbs_core.testing.simulation import (
    NODE_IDS,
    InvariantViolation,
    NodeConfig,
    SentinelStart,
    SimNode,
    Simulation,
    SimulationError,
    SimulationTimeout,
)

__all__ = (
    "NODE_IDS",
    "ControllerCall",
    "FakeController",
    "FakeNetwork",
    "FakeNotifier",
    "FakeStore",
    "InvariantViolation",
    "Link",
    "NodeConfig",
    "ScheduledCall",
    "SentinelStart",
    "SimNode",
    "Simulation",
    "SimulationError",
    "SimulationTimeout",
    "Timeline",
    "VirtualClock",
)
