"""The event loop never waits for the hash index: heartbeats must not wait for a disk.

The index is an SQLite file shared by several worker threads under one lock. A
commit can take seconds when the disk is busy (the secondary writing a large
first sync on the same disk was measured stalling one for 1.3 s), and any call
made meanwhile waits for the lock. Made from the event loop, such a call stops
the heartbeats, and the peer takes over from a healthy primary. So every index
call of a running node happens in a worker thread; this checks it during a real
replication between two nodes (in memory, real files), small files and large.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from sbs_core.config import load_config
from sbs_core.driver import Node
from sbs_core.lab import write_node_config
from sbs_core.sync import index as index_module
from sbs_core.sync.direct import MIN_SIZE
from sbs_core.testing import FakeController
from sbs_core.transport import MemoryNetwork

SENTINELS = ("labels",)
FOLDERS = '\n[[folders]]\npath = "data"\nfilter = "*"\n'


class LoopCalls:
    """Wraps every public method of HashIndex to note the calls made on the loop's thread."""

    def __init__(self, loop_thread: int) -> None:
        self.loop_thread = loop_thread
        self.on_loop: list[str] = []
        self.in_threads: list[str] = []

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def noted(*args: Any, **kwargs: Any) -> Any:
            here = threading.get_ident() == self.loop_thread
            (self.on_loop if here else self.in_threads).append(name)
            return method(*args, **kwargs)

        return noted


@pytest.fixture
def loop_calls(monkeypatch: pytest.MonkeyPatch) -> LoopCalls:
    calls = LoopCalls(threading.get_ident())  # anyio runs the test in this thread
    cls = index_module.HashIndex
    for name, method in vars(cls).items():
        if callable(method) and not name.startswith("_"):
            monkeypatch.setattr(cls, name, calls.wrap(name, method))
    return calls


def make_node(tmp_path: Path, network: MemoryNetwork, name: str, local: str, remote: str) -> Node:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s" * 32)
    path = write_node_config(
        tmp_path / name,
        name=name,
        local=local,
        remote=remote,
        port=4445,
        secret_file=secret,
        heartbeat_interval=0.05,
        dead_time=1.0,
        node_extra={"strict_sync": True},
        probe_interval=0.1,
        sentinels={s: ["unused"] for s in SENTINELS},
        extra=FOLDERS,
    )
    return Node(
        load_config(path),
        transport=network.transport(local),
        controller=FakeController(SENTINELS),
    )


def tree(root: Path) -> dict[str, bytes]:
    """The visible files under ``root``; the receiver's hidden staging (dot names) left out."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder, name)
                # Renamed away while looked at: the next look sees it.
                with contextlib.suppress(FileNotFoundError):
                    found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.mark.anyio
async def test_no_hash_index_call_runs_on_the_event_loop(
    tmp_path: Path, loop_calls: LoopCalls
) -> None:
    src = tmp_path / "a" / "data"
    dst = tmp_path / "b" / "data"
    for i in range(30):  # small files: sent in batches
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.lab").write_bytes(os.urandom(100 + i))
    for i in range(2):  # large files: streamed one by one
        (src / f"big{i}.bin").write_bytes(os.urandom(MIN_SIZE * 3 + i))
    network = MemoryNetwork()
    a = make_node(tmp_path, network, "a", "10.9.0.1", "10.9.0.2")
    b = make_node(tmp_path, network, "b", "10.9.0.2", "10.9.0.1")

    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        with anyio.fail_after(10):
            while a.status().get("role") != "primary":
                await anyio.sleep(0.01)
        tg.start_soon(b.run)
        with anyio.fail_after(20):
            while not (dst.exists() and tree(dst) == tree(src)):
                await anyio.sleep(0.02)
        # A change and a deletion: the cycles after the first use the index too.
        (src / "big0.bin").write_bytes(os.urandom(MIN_SIZE * 2))
        (src / "d0" / "f0.lab").unlink()
        with anyio.fail_after(20):
            while tree(dst) != tree(src):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()

    # The wrapper saw the work, to the end.
    assert {"put_many", "digests", "close"} <= set(loop_calls.in_threads)
    assert loop_calls.on_loop == []
