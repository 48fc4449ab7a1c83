"""How a node's process manages its memory: the C allocator's and the garbage collector's.

Replication allocates and frees buffers of about 1 MiB many times a second:
each file read, each sealed or opened frame, each joined batch. With glibc's
defaults a large buffer is mapped and unmapped, and a freed one at the top of
the heap is given back to the system and grown again for the next: either way
it returns as fresh pages, which the kernel zeroes and maps one page fault at a
time. On the machine measured (docs/benchmarks.md), that cost the primary
1.9-2.2 s of system time for the 1 GiB of the "large" benchmark, more than
reading and sending it. :func:`keep_freed_memory` has buffers up to
:data:`MMAP_THRESHOLD` come from the heap, which keeps up to
:data:`TRIM_THRESHOLD` of freed memory for the next ones: 0.5-0.6 s, for a
peak resident size 11 MB higher (77 MB against 66 MB).

An administrator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(glibc's environment variables) wins; another C library is left as it is.

:func:`freeze_startup_objects` moves what the node made before it runs (the
modules, the configuration, the node itself: some 40,000 objects) out of
Python's garbage collector's reach. Its full collections went through all of
them each time; during the first sync of the "small" benchmark they cost the
primary 0.23 s (4 collections, 58 ms each, the event loop stopped for each)
and the secondary 0.10 s (2 collections); with them frozen, 0.03 s and
0.02 s. Nothing frozen is ever freed, which is what a node's lifetime objects
are anyway; cyclic garbage made later is collected as before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

__all__ = ("MMAP_THRESHOLD", "TRIM_THRESHOLD", "freeze_startup_objects", "keep_freed_memory")

MMAP_THRESHOLD = 16 * 1024 * 1024
"""Larger allocations are mapped on their own (and unmapped when freed)."""

TRIM_THRESHOLD = 64 * 1024 * 1024
"""Freed memory at the top of the heap kept for reuse, at most."""

# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set the allocator's two thresholds (see the module); True if both were set."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # a C library without mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 when it took the value, 0 when it refused it.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def freeze_startup_objects() -> int:
    """Freeze every object made so far (see the module); how many froze.

    No collection first: after the imports it found 38 objects of garbage and
    took 15-45 ms, added to every start of a node (and to its takeover after a
    restart); they stay, frozen.
    """
    gc.freeze()
    return gc.get_freeze_count()
