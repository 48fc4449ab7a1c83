"""Writing a large received file straight to the disk, past the page cache.

A replicated copy has to reach the disk anyway, and the standby has no use
for it in its cache. Through the page cache every byte is first copied into
freshly allocated cache pages and written back later (the flush before the
rename of a durable copy waits for all of it): on the machines measured this
costs 4-5 s of kernel CPU per GiB, several times the disk's own write time
(see docs/benchmarks.md), and the copies push out of the cache what this
node's own programs read. With ``O_DIRECT`` the data goes from reused,
aligned buffers to the disk, and a flush only has the metadata left to write.

``O_DIRECT`` wants the buffer, the file offset and the length aligned to the
device's block size: :class:`DirectWriter` collects the data in an aligned
buffer, writes it in whole buffers, and writes the unaligned tail through the
page cache once ``O_DIRECT`` is switched off. A filesystem that refuses
``O_DIRECT`` (at the open or at the first write) gets ordinary writes.

Linux only (``os.O_DIRECT``); elsewhere :data:`O_DIRECT` is 0 and nothing here
is used.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ("ALIGN", "BUFFER", "MIN_SIZE", "O_DIRECT", "QUEUED", "BufferPool", "DirectWriter")

T = TypeVar("T")

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
ALIGN = 4096  # a multiple of every logical block size in use (512 or 4096)
BUFFER = 1 << 20  # one data frame: a buffer fills once per frame of a large file
MIN_SIZE = 256 * 1024  # smaller files come in batches, mostly one or two blocks each
# Jobs waiting in the writing thread, every file's together: each holds one
# buffer (a full one, or a file's last to be written at its close), so this
# bounds the memory, and it is the disk's queue: a file's writes and its close
# go on there while the next file fills (see DirectWriter.close_later).
QUEUED = 8


class BufferPool:
    """Aligned buffers for :class:`DirectWriter`, and the one thread that writes them out, in order.

    Buffers are reused: a fresh one costs a page fault for each of its pages,
    and on the machine measured that doubled the time to open the frames of
    "mixed" into them (0.56 s against 0.29 s for 0.9 GB). :meth:`take` waits
    while :data:`QUEUED` jobs wait in the writing thread, which keeps the
    buffers in use, and so the ones kept, to a handful.
    """

    def __init__(self, keep: int = QUEUED + 2) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # a job ended
        self._queued = 0
        self._writer: ThreadPoolExecutor | None = None  # started with the first full buffer

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` in the pool's writing thread, after every job submitted before it."""
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="sbs-direct-write")
            writer = self._writer
            self._queued += 1
        try:
            return writer.submit(self._run, job)
        except BaseException:
            self._ended()
            raise

    def _run(self, job: Callable[[], T]) -> T:
        try:
            return job()
        finally:
            self._ended()

    def _ended(self) -> None:
        with self._lock:
            self._queued -= 1
            self._done.notify_all()

    def take(self) -> mmap.mmap:
        """A buffer, once fewer than :data:`QUEUED` jobs wait in the writing thread."""
        with self._lock:
            while self._queued >= QUEUED:
                self._done.wait()
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, BUFFER)  # anonymous mappings are page-aligned

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)
                return
        buffer.close()


class DirectWriter:
    """Appends to a file opened with ``O_DIRECT``, in aligned writes of a whole buffer.

    Full buffers are written in the pool's thread while the next one fills.
    :meth:`close_out` writes what is left and :meth:`release` gives the buffer
    back (after either); or :meth:`close_later` does both in the pool's thread.
    The file descriptor stays the caller's.
    """

    def __init__(self, fd: int, pool: BufferPool) -> None:
        self._fd = fd
        self._pool = pool
        self._buffer: mmap.mmap | None = pool.take()
        self._view = memoryview(self._buffer)
        self._filled = 0
        self.direct = True
        self._going: deque[Future[None]] = deque()  # full buffers being written, oldest first

    def write(self, data: memoryview) -> None:
        while data:
            take = min(len(data), BUFFER - self._filled)
            self._view[self._filled : self._filled + take] = data[:take]  # a fresh one after each
            self._filled += take
            data = data[take:]
            if self._filled == BUFFER:
                self._hand_off()

    def reserve(self, size: int) -> memoryview | None:
        """The buffer's next ``size`` bytes, to be filled in place; None if they do not fit.

        :meth:`commit` then appends them. A large file's data frames are as long
        as the buffer, so each one fits in the buffer its predecessor emptied.
        """
        if BUFFER - self._filled < size:
            return None
        return self._view[self._filled : self._filled + size]

    def commit(self, size: int) -> None:
        """Append the ``size`` bytes just filled in at :meth:`reserve`'s place."""
        self._filled += size
        if self._filled == BUFFER:
            self._hand_off()

    def close_out(self) -> None:
        """Write the rest: its aligned part directly, the tail through the page cache.

        Returns once every byte is written; raises the first error of a
        buffer written in the background (then :meth:`release` the writer).
        """
        while self._going:
            self._going.popleft().result()
        aligned = self._filled - self._filled % ALIGN
        if aligned:
            self._write_out(aligned)
        if self._filled:
            self._plain()
            self._write_out(self._filled)

    def release(self) -> None:
        """Give the buffer back, once no write of this file is on its way.

        The caller closes the file only after this: a write still on its
        way would otherwise go to whatever file gets the descriptor next.
        """
        while self._going:
            self._going.popleft().exception()  # reported by close_out, or moot: aborted
        if self._buffer is not None:
            self._view.release()
            self._pool.give(self._buffer)
            self._buffer = None

    def close_later(self, then: Callable[[], T]) -> Future[T]:
        """:meth:`close_out`, :meth:`release`, then ``then()``, in the pool's thread.

        The caller goes on at once: the next file fills while this one's last
        writes wait for the disk. ``then`` runs even after a failed write (it
        closes the file); the future gives its result, or the first error.
        The writer must not be used any more.
        """

        def close() -> T:
            try:
                self.close_out()
            finally:
                self.release()
                result = then()
            return result

        return self._pool.submit(close)

    def _hand_off(self) -> None:
        """Have the full buffer written in the pool's thread, and go on in a fresh one."""
        while self._going and self._going[0].done():
            self._going.popleft().result()  # its error is this write's
        assert self._buffer is not None
        full, view = self._buffer, self._view
        self._going.append(self._pool.submit(lambda: self._write_full(full, view)))
        self._buffer = self._pool.take()
        self._view = memoryview(self._buffer)
        self._filled = 0

    def _write_full(self, buffer: mmap.mmap, view: memoryview) -> None:
        try:
            self._write_all(view, BUFFER)
        finally:
            view.release()
            self._pool.give(buffer)

    def _write_out(self, length: int) -> None:
        """Write the buffer's first ``length`` bytes; keep what follows them in front."""
        self._write_all(self._view, length)
        rest = self._filled - length
        if rest:
            self._view[:rest] = self._view[length : self._filled]
        self._filled = rest

    def _write_all(self, view: memoryview, length: int) -> None:
        """Write ``view[:length]`` at the file's position, direct while the file allows."""
        done = 0
        while done < length:
            with view[done:length] as chunk:
                try:
                    took = os.write(self._fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    self._plain()  # this filesystem takes O_DIRECT at the open, not the write
                    continue
            if not took:
                raise OSError(errno.EIO, "the file took no bytes")
            done += took
            if done % ALIGN and self.direct:
                self._plain()  # a short write (a full disk?): the rest cannot be aligned

    def _plain(self) -> None:
        if sys.platform != "win32":  # only reached where O_DIRECT exists
            import fcntl  # noqa: PLC0415 - POSIX only

            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self.direct = False
