"""A node's process keeps freed memory for reuse: what glibc's allocator reports."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from sbs_core import memory


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - looked up, not called
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


glibc_only = pytest.mark.skipif(
    not _has_mallinfo2(), reason="needs glibc's allocator (mallopt, mallinfo2)"
)

# Run in a fresh interpreter, so the allocator's state is its own: a buffer of
# 4 MiB is made and dropped, then one of 12 MiB; glibc's mallinfo2 tells where
# the first came from (mapped on its own, or the heap) and how big the heap
# stays once the second is freed (given back, or kept for reuse).
_PROBE = """
import ctypes, json, sys
from sbs_core.memory import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "tune" else None
mapped_before = libc.mallinfo2().hblkhd
small = bytearray(4 << 20)
mapped = libc.mallinfo2().hblkhd - mapped_before
del small
big = bytearray(12 << 20)
del big
print(json.dumps({"applied": applied, "mapped": mapped, "heap": libc.mallinfo2().arena}))
"""


def _probe(mode: str, **env: str) -> tuple[bool | None, int, int]:
    """Whether the thresholds were set, the bytes mapped for 4 MiB, the heap's size after."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout)
    return found["applied"], int(found["mapped"]), int(found["heap"])


@glibc_only
def test_buffers_come_from_the_heap_and_freed_memory_stays_for_reuse() -> None:
    _, mapped, heap = _probe("plain")
    # By default the 4 MiB buffer is mapped on its own, and so is the 12 MiB one.
    assert mapped >= 4 << 20
    assert heap < 12 << 20

    applied, mapped, heap = _probe("tune")
    # Tuned: both from the heap, and the 12 MiB freed stay there for the next buffers.
    assert applied is True
    assert mapped == 0
    assert heap >= 12 << 20


@glibc_only
def test_the_administrators_own_setting_wins() -> None:
    applied, mapped, _ = _probe("tune", MALLOC_MMAP_THRESHOLD_=str(1 << 20))

    assert applied is False
    assert mapped >= 4 << 20  # glibc still maps buffers over 1 MiB, as asked


def test_nothing_is_set_outside_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert memory.keep_freed_memory() is False


# A fresh interpreter imports what a node runs, freezes, then makes garbage of
# its own: a full collection must no longer visit the start-up objects, and
# must still free a reference cycle made afterwards.
_FREEZE_PROBE = """
import gc, json, weakref
import sbs_core.driver
from sbs_core.memory import freeze_startup_objects

class Node:
    pass

before = Node()
tracked = len(gc.get_objects())
frozen = freeze_startup_objects()
cycle = Node()
cycle.me = cycle
gone = weakref.ref(cycle)
del cycle
gc.collect()
print(json.dumps({
    "tracked": tracked,
    "frozen": frozen,
    "left": len(gc.get_objects()),
    "before_visited": any(o is before for o in gc.get_objects()),
    "cycle_freed": gone() is None,
}))
"""


def test_start_up_objects_are_frozen_and_later_garbage_still_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FREEZE_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout)

    assert found["frozen"] > 10_000  # the modules of a node: tens of thousands
    assert found["left"] < found["tracked"] // 10  # a full collection visits few now
    assert found["before_visited"] is False
    assert found["cycle_freed"] is True
