"""The event loop never waits for the hash index, nor opens data frames: heartbeats go on.

The index is an SQLite file shared by several worker threads under one lock. A
commit can take seconds when the disk is busy (the secondary writing a large
first sync on the same disk was measured stalling one for 1.3 s), and any call
made meanwhile waits for the lock. Made from the event loop, such a call stops
the heartbeats, and the peer takes over from a healthy primary. So every index
call of a running node happens in a worker thread; this checks it during a real
replication between two nodes (in memory, real files), small files and large.

Opening (decrypting) the data frames of a large first sync is the receiver's
costliest step: 0.8 s of its event loop's time per GiB when the loop did it.
The thread that writes the payload opens them, a large file's straight into
its write buffer.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from memorypair import make_node, start_pair, tree

from sbs_core.sync import index as index_module
from sbs_core.sync.direct import MIN_SIZE, O_DIRECT
from sbs_core.transport import MemoryNetwork
from sbs_core.wire import SealedFrame


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


def wrap_public_methods(monkeypatch: pytest.MonkeyPatch, cls: type, calls: LoopCalls) -> None:
    for name, method in vars(cls).items():
        if callable(method) and not name.startswith("_"):
            monkeypatch.setattr(cls, name, calls.wrap(name, method))


@pytest.fixture
def loop_calls(monkeypatch: pytest.MonkeyPatch) -> LoopCalls:
    calls = LoopCalls(threading.get_ident())  # anyio runs the test in this thread
    wrap_public_methods(monkeypatch, index_module.HashIndex, calls)
    return calls


@pytest.fixture
def frame_calls(monkeypatch: pytest.MonkeyPatch) -> LoopCalls:
    calls = LoopCalls(threading.get_ident())
    wrap_public_methods(monkeypatch, SealedFrame, calls)
    return calls


async def replicate(tmp_path: Path) -> None:
    """A first sync of small and large files, then a change and a deletion."""
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
        await start_pair(tg, a, b)
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


@pytest.mark.anyio
async def test_no_hash_index_call_runs_on_the_event_loop(
    tmp_path: Path, loop_calls: LoopCalls
) -> None:
    await replicate(tmp_path)

    # The wrapper saw the work, to the end.
    assert {"put_many", "digests", "close"} <= set(loop_calls.in_threads)
    assert loop_calls.on_loop == []


@pytest.mark.anyio
async def test_data_frames_are_opened_by_the_writing_thread_large_files_in_place(
    tmp_path: Path, frame_calls: LoopCalls
) -> None:
    await replicate(tmp_path)

    assert frame_calls.on_loop == []
    # Small files' frames are opened into the receiver's reused buffer; each
    # large file's one frame (under 1 MiB), three in all, straight into its
    # O_DIRECT write buffer where the filesystem takes O_DIRECT (tmpfs before
    # Linux 6.6 does not), else whole.
    if takes_direct(tmp_path):
        assert "open" not in frame_calls.in_threads
        assert frame_calls.in_threads.count("open_into") >= 3 + 1
    else:
        assert frame_calls.in_threads.count("open") == 3
        assert frame_calls.in_threads.count("open_into") >= 1


def takes_direct(folder: Path) -> bool:
    if not O_DIRECT:
        return False
    probe = folder / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True
