"""The real driver, two nodes in one event loop, over the in-memory transport.

Same :class:`~sbs_core.driver.Node` as ``sbs run``, but with the transport and the
controller swapped for the in-memory network and fake controllers: proof that
they plug in, and fast checks of the driver's wiring (handshake, heartbeats,
handover flush, silence detection) in real time.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from memorypair import node_in_memory

from sbs_core import driver
from sbs_core.driver import Node
from sbs_core.machine import PersistedState
from sbs_core.testing import FakeController
from sbs_core.transport import MemoryNetwork

SENTINELS = ("labels", "spooler")
HB, DEAD = 0.05, 0.3


@dataclass
class Member:
    name: str
    node: Node
    controller: FakeController
    scope: anyio.CancelScope
    done: anyio.Event


@asynccontextmanager
async def pair_in_memory(
    tmp_path: Path,
) -> AsyncIterator[tuple[MemoryNetwork, Callable[..., Node]]]:
    network = MemoryNetwork()

    def make(name: str, local: str, remote: str, *, mode: str = "auto") -> Node:
        return node_in_memory(
            tmp_path,
            network,
            name,
            local,
            remote,
            sentinels=SENTINELS,
            mode=mode,
            heartbeat_interval=HB,
            dead_time=DEAD,
        )

    yield network, make


async def launch(tg: TaskGroup, name: str, node: Node) -> Member:
    scope = anyio.CancelScope()
    done = anyio.Event()

    async def run() -> None:
        with scope:
            await node.run()
        done.set()

    tg.start_soon(run)
    controller = node._controller_override
    assert isinstance(controller, FakeController)
    return Member(name=name, node=node, controller=controller, scope=scope, done=done)


async def until(test: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not test():
            await anyio.sleep(0.01)


def role(member: Member) -> str:
    return member.node.machine.role if member.node._machine is not None else "starting"


async def formed_pair(tg: TaskGroup, make: Callable[..., Node]) -> tuple[Member, Member]:
    """a started first and primary, then b, its connected secondary, each with its state saved.

    A node saves its state in a worker thread: a test that changes how saves go
    (a full disk, a slow one) must not catch the save of b's start instead.
    """
    a = await launch(tg, "a", make("a", "10.9.0.1", "10.9.0.2"))
    await until(lambda: role(a) == "primary")
    b = await launch(tg, "b", make("b", "10.9.0.2", "10.9.0.1"))
    await until(
        lambda: (
            role(b) == "secondary"
            and b.node.status()["peer_connected"]
            and b.node.status()["sentinels"] == list(SENTINELS)
            and not (a.node._saving or b.node._saving)
        )
    )
    return a, b


@pytest.mark.anyio
async def test_pair_forms_then_fails_over_when_the_primary_dies(tmp_path: Path) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a, b = await formed_pair(tg, make)

        assert a.controller.running_sentinels() == frozenset(SENTINELS)
        assert b.controller.running_sentinels() == frozenset()
        assert b.node.status()["sentinels"] == list(SENTINELS)

        a.scope.cancel()  # the process dies: its streams close under it
        await until(lambda: role(b) == "primary", timeout=DEAD)
        await until(lambda: b.controller.running_sentinels() == frozenset(SENTINELS))
        assert b.node.machine.epoch == 2
        b.scope.cancel()


@pytest.mark.anyio
async def test_planned_stop_hands_over_and_the_stopping_node_returns(tmp_path: Path) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a = await launch(tg, "a", make("a", "10.9.0.1", "10.9.0.2"))
        await until(lambda: role(a) == "primary")
        b = await launch(tg, "b", make("b", "10.9.0.2", "10.9.0.1"))
        await until(lambda: role(b) == "secondary")

        a.node.request_stop()
        with anyio.fail_after(5):
            await a.done.wait()
        await until(lambda: role(b) == "primary", timeout=1.0)
        # Its sentinels start once its new epoch is saved, in a worker thread.
        await until(lambda: b.controller.running_sentinels() == frozenset(SENTINELS))
        # Handed over, not lost: the peer never had to wait for silence.
        assert b.node.status()["last_error"] is None
        assert a.controller.running_sentinels() == frozenset()
        stop_of_a = [c.op for c in a.controller.calls]
        assert stop_of_a[-2:] == ["stop", "stop_application"]
        b.scope.cancel()


@pytest.mark.anyio
async def test_silent_partition_promotes_then_heals_to_one_primary(tmp_path: Path) -> None:
    async with pair_in_memory(tmp_path) as (network, make), anyio.create_task_group() as tg:
        a = await launch(tg, "a", make("a", "10.9.0.1", "10.9.0.2"))
        await until(lambda: role(a) == "primary")
        b = await launch(tg, "b", make("b", "10.9.0.2", "10.9.0.1"))
        await until(lambda: role(b) == "secondary")

        network.partition("10.9.0.1", "10.9.0.2")
        # Nothing closes in a silent partition: b must notice the silence itself.
        began = anyio.current_time()
        await until(lambda: role(b) == "primary", timeout=DEAD + 1.0)
        assert anyio.current_time() - began >= DEAD * 0.9
        assert role(a) == "primary"  # both primary while they cannot see each other

        network.heal("10.9.0.1", "10.9.0.2")
        await until(lambda: {role(a), role(b)} == {"primary", "secondary"}, timeout=DEAD + 2.0)
        # b promoted later with a higher epoch, so a was the stale one and yielded.
        assert role(b) == "primary"
        assert a.controller.running_sentinels() == frozenset()
        assert b.controller.running_sentinels() == frozenset(SENTINELS)
        a.scope.cancel()
        b.scope.cancel()


@pytest.mark.anyio
async def test_wrong_secret_gets_nothing_and_the_primary_keeps_running(tmp_path: Path) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a = await launch(tg, "a", make("a", "10.9.0.1", "10.9.0.2"))
        await until(lambda: role(a) == "primary")
        rogue = make("b", "10.9.0.2", "10.9.0.1")
        rogue._secret = b"not the shared secret at all"
        b = await launch(tg, "b", rogue)

        await anyio.sleep(DEAD * 2)
        assert role(a) == "primary"
        assert not a.node.status()["peer_connected"]
        # Answered but refused: b must not promote itself beside a, nor learn anything.
        assert role(b) == "starting"
        assert b.node.status()["sentinels"] == list(SENTINELS)  # its own autostart list only
        assert b.node.machine.epoch == 0
        assert b.controller.running_sentinels() == frozenset()
        a.scope.cancel()
        b.scope.cancel()


@pytest.mark.anyio
async def test_a_secondary_whose_disk_is_full_still_takes_over_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a, b = await formed_pair(tg, make)
        store = b.node._store
        saved = store.load()
        real_save = store.save

        def disk_full(state: PersistedState) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store.state_file))

        monkeypatch.setattr(store, "save", disk_full)
        caplog.set_level(logging.INFO, logger="sbs")
        a.scope.cancel()  # the primary dies while b's disk is full
        await until(lambda: role(b) == "primary", timeout=DEAD)
        await until(lambda: b.controller.running_sentinels() == frozenset(SENTINELS))

        status = b.node.status()
        assert status["state_save_error"] == f"No space left on device ({store.state_file})"
        alerts = [r.getMessage() for r in caplog.records if "state_not_saved" in r.getMessage()]
        assert len(alerts) == 1, alerts
        assert "epoch 2" in alerts[0]
        assert store.load() == saved  # the file saved last is intact

        # Space is freed: the next change of state is saved, and the error goes.
        monkeypatch.setattr(store, "save", real_save)
        state = PersistedState(epoch=2, role="primary", sentinels=SENTINELS)
        b.node._saved(state, b.node._write_state(state))
        assert b.node.status()["state_save_error"] is None
        loaded = store.load()
        assert loaded is not None
        assert loaded.epoch == 2
        b.scope.cancel()


def slow_save(store: Any, seconds: float, events: list[str]) -> Callable[[PersistedState], None]:
    """``store.save`` held up as by a disk busy with another program's writes (4 s measured)."""
    real_save = store.save

    def save(state: PersistedState) -> None:
        time.sleep(seconds)  # the node calls it in a worker thread
        real_save(state)
        events.append(f"saved {state.role} {state.epoch} {','.join(state.sentinels)}")

    return save


def noting(method: Callable[..., Any], events: list[str], what: str) -> Callable[..., Any]:
    async def noted(names: Any, **kwargs: Any) -> Any:
        events.append(f"{what} {','.join(sorted(names or ()))}")
        return await method(names, **kwargs)

    return noted


def slowed(
    monkeypatch: pytest.MonkeyPatch, member: Member, seconds: float, method: str
) -> list[str]:
    """``member``'s saves held ``seconds``; its saves and its controller's ``method`` in order.

    ``method`` is ``start_sentinels`` or ``stop_sentinels``, noted as "start" or "stop".
    """
    events: list[str] = []
    store, controller = member.node._store, member.controller
    monkeypatch.setattr(store, "save", slow_save(store, seconds, events))
    what = method.partition("_")[0]
    monkeypatch.setattr(controller, method, noting(getattr(controller, method), events, what))
    return events


@pytest.mark.anyio
async def test_a_slow_save_of_the_primarys_state_holds_its_actions_not_its_heartbeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a, b = await formed_pair(tg, make)
        events = slowed(monkeypatch, a, 3 * DEAD, "stop_sentinels")

        answer = await a.node._on_control({"cmd": "sentinel", "name": "spooler", "active": False})
        assert answer["ok"], answer
        await anyio.sleep(2 * DEAD)  # the save takes 3 * DEAD: b's dead_time passes meanwhile
        # a's event loop runs on, and b keeps hearing it as it was before the change.
        assert events == []
        assert a.controller.running_sentinels() == frozenset(SENTINELS)
        assert role(b) == "secondary"
        assert b.node.status()["sentinels"] == list(SENTINELS)

        await until(lambda: b.node.status()["sentinels"] == ["labels"])
        assert events == ["saved primary 1 labels", "stop spooler"]  # saved, then acted on
        assert a.controller.running_sentinels() == frozenset({"labels"})
        assert role(a) == "primary"
        assert role(b) == "secondary"
        assert a.node.machine.epoch == b.node.machine.epoch == 1
        peer = b.node.status()["peer"]
        assert peer is not None
        assert peer["longest_silence"] < DEAD  # heartbeats all through the save
        assert a.node.status()["loop_longest_stall"] < DEAD
        a.scope.cancel()
        b.scope.cancel()


@pytest.mark.anyio
async def test_a_node_taking_over_starts_its_sentinels_only_once_its_new_epoch_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pair_in_memory(tmp_path) as (_network, make), anyio.create_task_group() as tg:
        a, b = await formed_pair(tg, make)
        events = slowed(monkeypatch, b, 2 * DEAD, "start_sentinels")

        a.scope.cancel()  # the primary dies
        await until(lambda: role(b) == "primary", timeout=2 * DEAD)
        await until(lambda: b.controller.running_sentinels() == frozenset(SENTINELS), timeout=5)
        assert events == ["saved primary 2 labels,spooler", "start labels,spooler"]
        loaded = b.node._store.load()
        assert loaded is not None
        assert (loaded.role, loaded.epoch) == ("primary", 2)
        b.scope.cancel()


class _StuckController(FakeController):
    """Sentinels that never finish stopping: an unkillable child."""

    async def stop_sentinels(self, names: Sequence[str] | None = None) -> None:
        await anyio.sleep_forever()


@pytest.mark.anyio
async def test_a_planned_stop_that_hangs_ends_after_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(driver, "_STOP_GRACE", 0.3)
    node = node_in_memory(
        tmp_path,
        MemoryNetwork(),
        "a",
        "10.9.0.1",
        "10.9.0.2",
        sentinels=SENTINELS,
        heartbeat_interval=HB,
        dead_time=DEAD,
        node_extra={"final_cycle_timeout": 0.2},
    )
    controller = node._controller_override = _StuckController(SENTINELS)
    bound = 0.2 + 2.0 + 0.3  # final cycle, the controller's stop_timeout, the grace
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.run)
        # Primary, its sentinels running: a stop now has them to stop.
        await until(lambda: controller.running_sentinels() == frozenset(SENTINELS))
        began = anyio.current_time()
        node.request_stop()
        await until(lambda: node._tg is None, timeout=bound + 3)
    took = anyio.current_time() - began
    assert bound - 0.1 <= took < bound + 1.0
    assert f"planned stop did not finish within {bound:.0f} s" in caplog.text
