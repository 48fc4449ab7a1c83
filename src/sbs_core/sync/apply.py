"""Writing replicated files on the receiving node: checked, atomic, durable.

Each incoming file goes to a temporary file (named :data:`~.paths.TEMP_PREFIX`
+ random + its name) in the folder of its target, so the final rename stays
on one filesystem and is atomic: a reader sees the old file or the new one,
never a mix, and a crash leaves at worst a temporary file, which
:meth:`Applier.cleanup_temp_files` removes. A file is renamed over its target
only once its size and content hash match what the sender announced.

:meth:`Applier.commit` makes a whole batch durable before any of it becomes
visible: for a large batch on Linux one ``syncfs`` per filesystem instead of
one ``fsync`` per file (thousands of small files would otherwise cost
thousands of disk flushes), then the renames, then one ``fsync`` per folder.
A small batch (:data:`FLUSH_EACH_MAX` files), and every batch elsewhere, has
each temporary file fsynced, a few at a time in worker threads: ``syncfs``
would also wait for other programs' unwritten data. On macOS the files'
``fsync`` calls are followed by one flush of the drive's cache, and so are
the folders' (see :mod:`sbs_core.durable`). The flush
(:meth:`Applier.flush`) may run apart, while the next batch is written.

A file whose folder does not exist yet (most of a first sync) needs no rename
of its own: the first such file makes the topmost missing folder under a hidden
name (:data:`~.paths.STAGING_PREFIX` + random + its name), every file for that
folder or below is written there under its own name, and the commit renames the
hidden folder into place, once, after the flush: a new folder of a hundred
files costs one rename instead of a hundred. If anything appeared at the
folder's name meanwhile, or some of its files belong to a later batch, the
files are renamed one by one out of the hidden folder instead, as any other
file.

Every path from the peer goes through :func:`~.paths.check_wire_path` and
:func:`~.paths.resolve_inside`: nothing outside the configured folders is ever
written or deleted, and no symbolic link is followed on the way.

:func:`deletion_allowed` is the strict-sync safety rule: a missing, unreadable
or suddenly empty source never wipes the standby.

Everything here blocks; callers run it in worker threads. One :class:`Applier`
may serve several threads, but each :class:`Incoming` belongs to one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import xxhash

from sbs_core import durable
from sbs_core.errors import LocalProtocolError, SbsError, os_reason
from sbs_core.state import write_atomically
from sbs_core.sync import direct
from sbs_core.sync.paths import (
    MAX_COMPONENT_BYTES,
    STAGING_PREFIX,
    TEMP_PREFIX,
    UnsafePathError,
    _is_link,
    check_wire_name,
    check_wire_path,
    resolve_inside,
)
from sbs_core.sync.scan import digest_of, new_hasher
from sbs_core.wire import SealedFrame

__all__ = (
    "DEFAULT_MAX_DELETE_COUNT",
    "DEFAULT_MAX_DELETE_SHARE",
    "READ_FLAGS",
    "WHOLE_FILE_MAX",
    "Applier",
    "FileIdentity",
    "Incoming",
    "IntegrityError",
    "Outcome",
    "OutcomeStatus",
    "deletion_allowed",
    "identity_of",
)

DEFAULT_MAX_DELETE_COUNT: int | None = None
"""No absolute cap by default: a folder of 10 files and one of 100,000 differ too much."""

DEFAULT_MAX_DELETE_SHARE: float | None = 0.5
"""Refuse a cycle that would delete more than half of the standby's files in one folder."""

OutcomeStatus = Literal["applied", "retry", "refused"]

_WINDOWS = sys.platform == "win32"
_FSYNC_THREADS = 8
#: A batch of at most this many files is flushed file by file even where
#: ``syncfs`` exists: ``syncfs`` also waits for every other program's unwritten
#: data on the filesystem. A change of 10 files took 4-5 ms to ``fsync`` one by
#: one, and 0.6 s with ``syncfs`` while another program had 300 MB unwritten
#: there (1 ms without); 256 files 36-55 ms one by one (docs/benchmarks.md).
FLUSH_EACH_MAX = 256
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
#: How a replicated file is opened for reading: never through a link, and with
#: O_NONBLOCK, so that a FIFO planted where a file was expected cannot hang the open.
READ_FLAGS = os.O_RDONLY | _NO_FOLLOW | _BINARY | getattr(os, "O_NONBLOCK", 0)
#: Files smaller than this may be given to :meth:`Applier.write_whole`: larger
#: ones go past the page cache (see :mod:`sbs_core.sync.direct`), streamed.
WHOLE_FILE_MAX = direct.MIN_SIZE
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _BINARY
# Windows flushes only through a handle that may write (and sbs copies no read-only
# flag there). Elsewhere a descriptor for reading flushes as well, and a file may
# have no write permission: a copy that took a read-only file's permissions.
_FLUSH_FLAGS = (os.O_RDWR if _WINDOWS else os.O_RDONLY) | _NO_FOLLOW | _BINARY


class IntegrityError(SbsError, ValueError):
    """A received file does not match the size or content hash its sender announced."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one file of a commit or a deletion.

    ``applied``: done (for a deletion, also "was already gone"). ``retry``: not
    done this time for a local reason (a file locked by an application, a
    folder in the way, a disk error), so the sender should try again later.
    ``refused``: will not be done, ever, as asked (a folder or a link where a
    file should be deleted, a path that became unsafe). ``reason`` says why.
    """

    root_id: str
    path: str
    status: OutcomeStatus
    reason: str = ""
    #: This node's copy, kept in the conflicts folder because it changed here
    #: while the peer's version was being applied (see :meth:`Incoming.guard`).
    kept: Path | None = None


FileIdentity = tuple[int, int, int]
"""What tells two versions of a file apart without reading it: inode, size, mtime (ns)."""


def identity_of(info: os.stat_result) -> FileIdentity:
    """The identity of a file from its ``lstat``: a new version has a new one."""
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _find_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None  # a libc older than glibc 2.14, or no libc symbols at all
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


# Looked up at call time, so tests can count the calls or force the fallback.
_SYNCFS = _find_syncfs()

# Times set through the open file: no path lookup (not on Windows).
_FD_TIMES = os.utime in os.supports_fd

if sys.platform == "darwin":
    # renameatx_np (macOS 10.12): its RENAME_EXCL and RENAME_SWAP are Linux's
    # RENAME_NOREPLACE and RENAME_EXCHANGE, under other numbers.
    _RENAME_FUNCTION = "renameatx_np"
    _AT_FDCWD = -2
    _RENAME_NOREPLACE = 0x4
    _RENAME_EXCHANGE = 0x2
else:
    _RENAME_FUNCTION = "renameat2"
    _AT_FDCWD = -100
    _RENAME_NOREPLACE = 1
    _RENAME_EXCHANGE = 2


def _find_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """``renameat2`` on Linux, ``renameatx_np`` on macOS: the same arguments."""
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc[_RENAME_FUNCTION]
    except (OSError, AttributeError):
        return None  # glibc older than 2.28, macOS older than 10.12
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


# Looked up at call time, like _SYNCFS: tests force the portable fallback.
_RENAMEAT2 = _find_renameat2()


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _encoded(path: str | Path) -> bytes:
    # os.fsencode, without its Python-level checks: two calls per file renamed.
    return path.encode(_FS_ENCODING, _FS_ERRORS) if isinstance(path, str) else os.fsencode(path)


class _NoAtomicSwap(Exception):
    """This system or filesystem cannot exchange two names atomically."""


def _rename2(source: str | Path, target: str | Path, flags: int) -> None:
    """``renameat2(2)``: OSError as the kernel says, :class:`_NoAtomicSwap` if unsupported."""
    function = _RENAMEAT2
    if function is None:
        raise _NoAtomicSwap
    if function(_AT_FDCWD, _encoded(source), _AT_FDCWD, _encoded(target), flags) == 0:
        return
    code = ctypes.get_errno()
    # (ENOTSUP is EOPNOTSUPP on Linux; on macOS a filesystem without the swap says it.)
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        raise _NoAtomicSwap
    raise OSError(code, os.strerror(code), str(source), None, str(target))


@dataclass(frozen=True, slots=True)
class _ConflictPlace:
    """Where one kept copy goes: ``folder / inner``, and the folders made for it."""

    now: datetime
    folder: Path
    created: list[Path]
    inner: Path

    @property
    def kept(self) -> Path:
        return self.folder / self.inner


class _Staging:
    """A folder missing on this node, filled under a hidden name beside it (see the module)."""

    __slots__ = ("folder", "hidden", "moved", "top")

    def __init__(self, folder: Path, hidden: Path) -> None:
        self.top = folder  # the missing folder
        self.folder = str(folder)
        self.hidden = str(hidden)  # where its files are written until the commit
        self.moved = False  # renamed into place: its files are at their targets

    def __repr__(self) -> str:
        return f"<_Staging {self.folder} {'moved' if self.moved else self.hidden}>"


class Incoming:
    """One file being received, written to a temporary file beside its target.

    Made by :meth:`Applier.begin`. Feed it with :meth:`write`, check it with
    :meth:`finish`, then hand it to :meth:`Applier.commit`; :meth:`abort`
    throws it away. Whatever fails on the way removes the temporary file, and
    so does the garbage collector if an unfinished one is simply dropped.
    """

    # Thousands of them per batch: slots, and the bare descriptor (no file object).
    __slots__ = (
        "__weakref__",
        "_applier",
        "_at_name",
        "_closing",
        "_digest",
        "_fd",
        "_finished_info",
        "_guarded",
        "_hasher",
        "_replaces",
        "_staging",
        "_state",
        "_target",
        "_temp",
        "_writer",
        "_written",
        "folder",
        "found",
        "mtime_ns",
        "path",
        "root_id",
        "size",
    )

    def __init__(
        self,
        applier: Applier,
        *,
        root_id: str,
        path: str,
        folder: Path,
        target: str,
        temp: str,
        fd: int,
        size: int,
        mtime_ns: int,
        digest: str,
        writer: direct.DirectWriter | None = None,
        finished: os.stat_result | None = None,
    ) -> None:
        self.root_id = root_id
        self.path = path
        #: The target's folder (checked); the target and temporary file as text:
        #: a Path per file costs more than the system calls (see Applier._locate).
        self.folder = folder
        self._target = target
        self.size = size
        self.mtime_ns = mtime_ns
        self._digest = digest.lower()
        self._applier = applier
        self._temp = temp
        self._fd = fd  # -1 once closed
        # Set when the temporary file was opened with O_DIRECT (see sbs_core.sync.direct).
        self._writer = writer
        # Its close, going on in the writer's thread (see close): the file's lstat.
        self._closing: Future[os.stat_result] | None = None
        self._state: Literal["open", "finished", "aborted", "committed"] = "open"
        # The temporary file's own lstat once finished (its device, and its
        # identity, which the rename keeps): no path lookup needed later.
        self._finished_info: os.stat_result | None = finished
        if finished is None:
            self._hasher: xxhash.xxh3_128 | None = new_hasher()
            self._written = 0
        else:  # written whole and checked already (Applier.write_whole)
            self._hasher = None
            self._written = size
            self._state = "finished"
        self._guarded = False
        self._replaces: FileIdentity | None = None
        #: What ``begin`` found at the target: its lstat, or None when nothing was there.
        self.found: os.stat_result | None = None
        # Written in the hidden folder of a missing folder (see _Staging); with
        # _at_name, under its own name there: moving the folder in applies it.
        self._staging: _Staging | None = None
        self._at_name = False

    @property
    def digest(self) -> str:
        """The expected content hash (lower-case hex), "" until it is known."""
        return self._digest

    @property
    def written(self) -> int:
        return self._written

    @property
    def target(self) -> Path:
        return Path(self._target)

    @property
    def temp_path(self) -> Path:
        return Path(self._temp)

    @property
    def pending(self) -> bool:
        """True while the temporary file exists: open or finished, not yet committed."""
        return self._state in ("open", "finished")

    def guard(self, replaces: FileIdentity | None) -> None:
        """Keep this node's file if it is not ``replaces`` when this one replaces it.

        The caller has looked at the target (and kept it as a conflict if it
        had changed here); ``replaces`` is the identity of the file it looked
        at, None if there was none. If anything else is at the target at the
        instant of the rename (a local program wrote it in between), it goes to
        the conflicts folder and the Outcome names the copy. On Linux the
        rename is an atomic exchange, so nothing written at any moment is lost;
        elsewhere the target is looked at once more just before the rename.
        """
        self._guarded = True
        self._replaces = replaces

    def expect(self, digest: str) -> None:
        """Set the content hash to check, when it arrives after the data (a ``Seal``)."""
        self._require("open")
        digest = digest.lower()
        if self._digest and digest != self._digest:
            self.abort()
            raise IntegrityError(f"{self.path}: the sender announced two different content hashes")
        self._digest = digest

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; more bytes than the announced size abort the file."""
        self._require("open")
        if self._fd < 0:
            raise LocalProtocolError(f"{self.path}: written after close()")
        view = memoryview(data)
        if self._written + view.nbytes > self.size:
            self.abort()
            raise IntegrityError(f"{self.path}: received more than the announced {self.size} bytes")
        try:
            if self._writer is not None:
                self._writer.write(view)
            else:
                _write_out(self._fd, view, self._temp)
        except BaseException:
            self.abort()
            raise
        if self._hasher is not None:  # always, while open
            self._hasher.update(view)
        self._written += view.nbytes

    def write_sealed(self, frame: SealedFrame) -> None:
        """Append a sealed data frame's payload, opened straight into the write buffer if it can be.

        A frame that fails its integrity check aborts the file and raises
        :class:`~sbs_core.errors.RemoteProtocolError`.
        """
        space = self._writer.reserve(frame.size) if self._writer is not None else None
        if space is None:
            try:
                data = frame.open()
            except BaseException:
                self.abort()
                raise
            self.write(data)
            return
        self._require("open")
        if self._written + frame.size > self.size:
            self.abort()
            raise IntegrityError(f"{self.path}: received more than the announced {self.size} bytes")
        try:
            frame.open_into(space)
            if self._hasher is not None:  # always, while open
                self._hasher.update(space)
            assert self._writer is not None
            self._writer.commit(frame.size)
        except BaseException:
            self.abort()
            raise
        self._written += frame.size

    def close(self) -> None:
        """Close the temporary file once every byte is in; :meth:`finish` checks it later.

        Frees the file descriptor early: a batch of thousands of small files
        need not hold one each until its content hashes arrive. Does nothing
        if closed already; on a failure (a full disk) the file is aborted.

        A file written past the page cache is closed in the writing thread,
        after its last writes, and this returns at once: the next file is
        received while the disk writes this one. Its failure is then found
        by :meth:`Applier.flush`, which waits for the close.
        """
        self._require("open")
        fd = self._fd
        if fd < 0:
            return
        if self._writer is not None:
            self._fd = -1  # the writing thread's now
            self._closing = self._writer.close_later(functools.partial(self._close_fd, fd))
            return
        try:
            self._close_fd(fd)
        except BaseException:
            self.abort()
            raise

    def _close_fd(self, fd: int) -> os.stat_result:
        """Set the times, note the file's lstat, close it (even on a failure); the lstat."""
        try:
            if self._applier.preserve_timestamps and _FD_TIMES:
                # Set on the temporary file, so the target never shows the copy time.
                os.utime(fd, ns=(time.time_ns(), self.mtime_ns))
            self._finished_info = os.fstat(fd)
        finally:
            self._fd = -1
            os.close(fd)  # a full disk may only show up here
        return self._finished_info

    def wait_closed(self) -> None:
        """Wait for a close going on in the writing thread; on its failure, abort and raise it."""
        closing, self._closing = self._closing, None
        if closing is None:
            return
        try:
            closing.result()
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        """Close the temporary file and check its size and hash; on a mismatch, abort."""
        self.close()
        if self._written != self.size:
            self.abort()
            raise IntegrityError(
                f"{self.path}: received {self._written} bytes, the sender announced {self.size}"
            )
        if not self._digest:
            self.abort()
            raise LocalProtocolError(f"{self.path}: finish() before the content hash was known")
        actual = self._hasher.hexdigest() if self._hasher is not None else ""
        if actual != self._digest:
            self.abort()
            raise _hash_mismatch(self.path, actual, self._digest)
        self._state = "finished"

    def abort(self) -> None:
        """Close and delete the temporary file. Harmless if done already or committed."""
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.exception()  # the file is the writing thread's until its close ends
        if self.pending:
            self._state = "aborted"
            fd, self._fd = self._fd, -1
            _discard_temp(fd, self._temp, self._writer)

    def __del__(self) -> None:
        # A dropped Incoming must not leave its temporary file for the next
        # cleanup, nor an unclosed file for the garbage collector to warn about.
        # (A method rather than a weakref.finalize: that costs a registry entry
        # per file, and thousands of files per batch pass through here.)
        if getattr(self, "_state", None) in ("open", "finished"):
            self.abort()

    @property
    def finished_info(self) -> os.stat_result | None:
        """The temporary file's lstat once finished: a rename keeps its inode, size and times."""
        return self._finished_info

    def _require(self, state: str) -> None:
        if self._state != state:
            raise LocalProtocolError(f"{self.path}: this file is {self._state}, not {state}")

    def _drop(self, status: OutcomeStatus, reason: str) -> Outcome:
        self.abort()
        return Outcome(self.root_id, self.path, status, reason)

    def _committed(self) -> Outcome:
        self._state = "committed"
        return Outcome(self.root_id, self.path, "applied")

    def __repr__(self) -> str:
        return f"<Incoming {self.root_id}:{self.path} {self._state} {self._written}/{self.size}>"


def _write_out(fd: int, data: memoryview, name: str) -> None:
    """Write all of ``data``: unbuffered, a short write happens only on a full disk or a signal."""
    while data:
        took = os.write(fd, data)
        if not took:
            raise OSError(errno.EIO, "the file took no bytes", name)
        data = data[took:]


def _hash_mismatch(path: str, actual: str, announced: str) -> IntegrityError:
    return IntegrityError(
        f"{path}: content hash {actual[:16]}... differs from the announced {announced[:16]}..."
    )


def _discard_temp(fd: int, temp: str, writer: direct.DirectWriter | None) -> None:
    # A write error was reported already; cleanup_temp_files gets a file that stays.
    if writer is not None:
        writer.release()
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(temp)


class Applier:
    """Writes and deletes the files the peer sends, inside the configured folders.

    ``roots`` maps each root id (``settings``, ``folder:...``) to its local
    folder, created with its parents when its first file arrives.
    ``conflicts_dir`` receives this node's copy of a file changed on both nodes
    before it is overwritten; it must lie outside every root. With
    ``preserve_timestamps`` a file gets the sender's modification time, else
    the time it was written here. ``durable=False`` skips every flush to disk
    (tests, or folders whose loss on a power cut does not matter).
    """

    def __init__(
        self,
        roots: Mapping[str, Path],
        *,
        conflicts_dir: Path,
        preserve_timestamps: bool,
        durable: bool = True,
    ) -> None:
        self.roots: dict[str, Path] = dict(roots)
        self.conflicts_dir = conflicts_dir
        self.preserve_timestamps = preserve_timestamps
        self.durable = durable
        kept = Path(os.path.realpath(conflicts_dir))
        for root_id, root in self.roots.items():
            real = Path(os.path.realpath(root))
            if kept == real or real in kept.parents or kept in real.parents:
                # Kept copies would be replicated, deleted or cleaned up as sync files.
                raise ValueError(
                    f"conflicts folder {conflicts_dir} overlaps folder {root_id!r} ({root})"
                )
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Incoming] = weakref.WeakSet()
        # Folders checked (and made) since the last commit: thousands of files
        # of a batch share a few folders, and checking every folder of every
        # path twice per file cost dozens of system calls a file. Each commit
        # starts afresh, so its renames check every folder once more.
        # Keyed by the wire path's folder as text: wire paths are canonical (no
        # empty, "." or ".." component), and hashing a PurePath costs more.
        self._checked: dict[tuple[str, str], tuple[Path, str]] = {}  # folder, as text + sep
        # Where the files of a target folder (as text + sep) are written since
        # the last commit: the folder itself, or its place in a hidden one.
        self._placed: dict[str, tuple[str, _Staging | None]] = {}
        self._stagings: dict[str, _Staging] = {}  # by missing folder, until moved or given up
        self._hidden: dict[str, _Staging] = {}  # by hidden folder, while it exists
        self._new_folders: list[Path] = []  # made since the last commit
        self._direct = direct.O_DIRECT != 0  # False once a filesystem refused it
        self._buffers = direct.BufferPool()

    def target_of(self, root_id: str, path: str) -> Path:
        """The local file a wire path names; :class:`UnsafePathError` if it may not be used."""
        return Path(self._locate(root_id, path)[2])

    def _locate(
        self, root_id: str, path: str, *, name_checked: bool = False
    ) -> tuple[Path, str, str]:
        """:meth:`target_of` as its folder, the folder as text + separator, the target as text.

        ``name_checked``: the path's text passed the checks before (only its
        folders on disk may have changed since).
        """
        root = self.roots.get(root_id)
        if root is None:
            raise UnsafePathError.broken_rule(path, f"names the unknown folder {root_id!r}")
        folder, _, name = path.rpartition("/")
        known = self._checked.get((root_id, folder))
        if known is not None:
            if not name_checked:
                check_wire_name(path)
            return known[0], known[1], known[1] + name
        target = resolve_inside(root, check_wire_path(path))
        parent = target.parent
        prefix = os.path.join(parent, "")
        self._checked[(root_id, folder)] = (parent, prefix)
        return parent, prefix, prefix + name

    def _forget_checks(self, *, take_made: bool = False) -> list[Path]:
        """Start afresh (see ``_checked``); with ``take_made``, the folders made meanwhile."""
        with self._lock:
            self._checked = {}
            self._placed = {}
            made: list[Path] = []
            if take_made:
                made, self._new_folders = self._new_folders, []
        return made

    def begin(self, root_id: str, path: str, *, size: int, mtime_ns: int, digest: str) -> Incoming:
        """Start receiving one file of ``size`` bytes whose content hash is ``digest``.

        ``digest`` may be "" if it arrives after the data; then call
        :meth:`Incoming.expect` before :meth:`Incoming.finish`. Raises
        :class:`UnsafePathError` for a path that may not be written (before
        anything is created), :class:`OSError` if the folder or the temporary
        file cannot be made (a file in the way of a folder, a full disk).
        """
        if size < 0:
            raise ValueError(f"{path}: negative size {size}")
        folder, target, where, staging = self._prepare(root_id, path)
        temp, fd, straight = self._open_new(where, path, staging, size)
        found = None
        writer = None
        try:
            # In a folder that is not there yet there is nothing to replace.
            if staging is None:
                found = _copy_mode(fd, target)
            if straight:
                writer = direct.DirectWriter(fd, self._buffers)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        incoming = Incoming(
            self,
            root_id=root_id,
            path=path,
            folder=folder,
            target=target,
            temp=temp,
            fd=fd,  # closed by close() or abort()
            size=size,
            mtime_ns=mtime_ns,
            digest=digest,
            writer=writer,
        )
        return self._track(incoming, found, staging)

    def write_whole(
        self, root_id: str, path: str, data: memoryview, *, mtime_ns: int, digest: str
    ) -> Incoming:
        """:meth:`begin`, write, close and finish for a file whose bytes are all here.

        The content hash is checked first: a mismatch raises
        :class:`IntegrityError` and creates nothing. Returns the file finished,
        for :meth:`commit`. For files below :data:`WHOLE_FILE_MAX` bytes (a
        batch of small files held in memory): the per-file calls of the
        streaming path cost more than writing such a file.
        """
        digest = digest.lower()
        actual = digest_of(data)
        if actual != digest:
            raise _hash_mismatch(path, actual, digest)
        folder, target, where, staging = self._prepare(root_id, path)
        temp, fd, _ = self._open_new(where, path, staging, 0)
        try:
            # In a folder that is not there yet there is nothing to replace.
            found = None if staging is not None else _copy_mode(fd, target)
            _write_out(fd, data, temp)
            if self.preserve_timestamps and _FD_TIMES:
                # Set on the temporary file, so the target never shows the copy time.
                os.utime(fd, ns=(time.time_ns(), mtime_ns))
            info = os.fstat(fd)
        except BaseException:
            _discard_temp(fd, temp, None)
            raise
        try:
            os.close(fd)  # a full disk may only show up here; closed even then
        except BaseException:
            _unlink_quietly(temp)
            raise
        incoming = Incoming(
            self,
            root_id=root_id,
            path=path,
            folder=folder,
            target=target,
            temp=temp,
            fd=-1,
            size=len(data),
            mtime_ns=mtime_ns,
            digest=digest,
            finished=info,
        )
        return self._track(incoming, found, staging)

    def _track(
        self, incoming: Incoming, found: os.stat_result | None, staging: _Staging | None
    ) -> Incoming:
        """Note what was at the target, and keep ``incoming`` for :meth:`abort_all`."""
        incoming.found = found
        if staging is not None:
            incoming._staging = staging
            incoming._at_name = not incoming._temp.rpartition(os.sep)[2].startswith(TEMP_PREFIX)
        with self._lock:
            self._live.add(incoming)
        return incoming

    def _prepare(self, root_id: str, path: str) -> tuple[Path, str, str, _Staging | None]:
        """:meth:`_locate`, plus where to write: the target's folder, or its hidden stand-in.

        Returns the target's folder, the target, where to write the file (the
        target, or its place in a hidden folder) and the :class:`_Staging` of
        that hidden folder (None: the target's own folder, which exists). The
        folder is looked up once per batch.
        """
        folder, prefix, target = self._locate(root_id, path)
        placed = self._placed.get(prefix)
        if placed is None:
            placed = self._place(root_id, folder, path)
            with self._lock:
                self._placed[prefix] = placed
        where, staging = placed
        return folder, target, where + target[len(prefix) :], staging

    def _place(self, root_id: str, folder: Path, path: str) -> tuple[str, _Staging | None]:
        """Where the files of ``folder`` go now (see :meth:`_prepare`), made if needed."""
        real_root = Path(os.path.realpath(self.roots[root_id]))
        created = _make_root(real_root)
        if created:
            with self._lock:
                self._new_folders.extend(created)
        missing = _first_missing(real_root, folder, path)
        if missing is None:
            return os.path.join(folder, ""), None
        with self._lock:
            staging = self._stagings.get(str(missing))
            if staging is None:
                hidden = missing.parent / _hidden_name(missing.name)
                os.mkdir(hidden)
                staging = _Staging(missing, hidden)
                self._stagings[staging.folder] = staging
                self._hidden[staging.hidden] = staging
        inside = Path(staging.hidden, folder.relative_to(missing))
        os.makedirs(inside, exist_ok=True)
        return os.path.join(inside, ""), staging

    def _open_new(
        self, where: str, path: str, staging: _Staging | None, size: int
    ) -> tuple[str, int, bool]:
        """Create the file to write ``path`` into: its name, descriptor, and :meth:`_create`'s flag.

        ``where`` is the target in the folder to write in. In a hidden folder
        the file gets its own name, unless this batch has it already (the
        second version then waits under a temporary name, renamed after).
        """
        if staging is not None:
            try:
                fd, straight = self._create(where, size)
            except FileExistsError:
                pass
            else:
                return where, fd, straight
        head, _, name = where.rpartition(os.sep)
        temp = f"{head}{os.sep}{_temp_name(name)}"
        fd, straight = self._create(temp, size)
        return temp, fd, straight

    def _create(self, temp: str, size: int) -> tuple[int, bool]:
        """Create a temporary file; True with it if its data goes past the page cache.

        A large file is written with O_DIRECT (see :mod:`sbs_core.sync.direct`)
        unless this filesystem refused it once.
        """
        if not (self._direct and size >= direct.MIN_SIZE):
            return os.open(temp, _CREATE_FLAGS, 0o666), False
        try:
            return os.open(temp, _CREATE_FLAGS | direct.O_DIRECT, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # The filesystem refuses O_DIRECT (it may have made the file first).
        self._direct = False
        _unlink_quietly(temp)
        return os.open(temp, _CREATE_FLAGS, 0o666), False

    def flush(self, batch: Sequence[Incoming]) -> list[str | None]:
        """Make the data of a finished ``batch`` durable: the first step of :meth:`commit`.

        Returns, for each file, why it could not be flushed (None: flushed),
        for ``commit(batch, flushed=...)``. It may run in another thread while
        more files are received (the disk writes while the next batch is
        written); nothing else may use the batch's files meanwhile.
        """
        self._check_batch(batch)
        reasons: list[str | None] = [None] * len(batch)
        by_device: dict[int, list[int]] = {}
        for i, incoming in enumerate(batch):
            try:
                incoming.wait_closed()
                info = incoming._finished_info
                if info is None or (self.preserve_timestamps and not _FD_TIMES):
                    info = os.stat(incoming._temp)
                    if self.preserve_timestamps:
                        os.utime(incoming._temp, ns=(info.st_atime_ns, incoming.mtime_ns))
                        info = os.stat(incoming._temp)
                    incoming._finished_info = info
            except OSError as exc:
                reasons[i] = f"cannot prepare the file: {os_reason(exc)}"
                continue
            by_device.setdefault(info.st_dev, []).append(i)
        if self.durable:
            for indexes in by_device.values():
                failed = _flush_files([batch[i]._temp for i in indexes])
                for i, reason in zip(indexes, failed, strict=True):
                    if reason is not None:
                        reasons[i] = f"cannot flush the file: {reason}"
        return reasons

    def commit(
        self, batch: Sequence[Incoming], *, flushed: Sequence[str | None] | None = None
    ) -> list[Outcome]:
        """Make every finished file of ``batch`` durable, then visible; one Outcome each.

        ``flushed``: what :meth:`flush` returned for this batch, if it ran
        already. A file that cannot be renamed over its target (locked by an
        application, a folder in the way) gets a ``retry`` Outcome and its
        temporary file is removed; the rest of the batch still applies. Files
        of one batch naming the same target apply in order, the last one wins.
        """
        if flushed is None:
            flushed = self.flush(batch)  # which checks the batch first
        else:
            if len(flushed) != len(batch):
                raise LocalProtocolError("commit: flush results of another batch")
            self._check_batch(batch)
        made = self._forget_checks(take_made=True)
        outcomes: list[Outcome | None] = [
            None if reason is None else batch[i]._drop("retry", reason)
            for i, reason in enumerate(flushed)
        ]

        folders: dict[Path, list[int]] = {}
        stagings = self._move_stagings(batch, outcomes, folders)
        repeated = {t for t, n in Counter(i._target for i in batch).items() if n > 1}
        placed: dict[str, FileIdentity] = {}
        for i, incoming in enumerate(batch):
            if outcomes[i] is not None:
                continue
            staging, incoming._staging = incoming._staging, None
            if staging is not None and staging.moved:
                # Its folder is in place: the file is at its target, or beside it.
                incoming._temp = staging.folder + incoming._temp[len(staging.hidden) :]
                if incoming._at_name:
                    outcomes[i] = incoming._committed()
                    _note_folder(folders, incoming.folder, staging.top, i)
                    if incoming._target in repeated:
                        with contextlib.suppress(OSError):
                            placed[incoming._target] = identity_of(os.lstat(incoming._target))
                    continue
            elif staging is not None:
                failed = self._unstage(incoming, folders)
                if failed is not None:
                    outcomes[i] = failed
                    continue
            if incoming._target in placed and incoming._guarded:
                # What the batch put there is no change of this node's.
                incoming._replaces = placed[incoming._target]
            outcome = outcomes[i] = self._rename(incoming)
            if outcome.status == "applied":
                folders.setdefault(incoming.folder, []).append(i)
                if incoming._target in repeated:
                    with contextlib.suppress(OSError):
                        placed[incoming._target] = identity_of(os.lstat(incoming._target))
        for created in made:
            # A new folder's own name lives in its parent.
            folders.setdefault(created.parent, [])
        self._forget_checks()  # the next batch checks its folders again
        self._remove_hidden(stagings)

        if self.durable:
            for i, why in _flush_folders(folders).items():
                outcomes[i] = Outcome(
                    batch[i].root_id,
                    batch[i].path,
                    "retry",
                    f"written, but its folder could not be flushed: {why}",
                )
        return [o for o in outcomes if o is not None]

    def _move_stagings(
        self,
        batch: Sequence[Incoming],
        outcomes: Sequence[Outcome | None],
        folders: dict[Path, list[int]],
    ) -> list[_Staging]:
        """Rename into place the hidden folders whose files are all in ``batch``.

        Returns every staging of the batch: those not moved (some of their
        files come with a later batch, or something is at the folder's name
        now) have their files renamed one by one by :meth:`commit`.
        """
        mine: dict[int, tuple[_Staging, Incoming]] = {}
        for incoming, outcome in zip(batch, outcomes, strict=True):
            staging = incoming._staging
            if outcome is None and staging is not None and id(staging) not in mine:
                mine[id(staging)] = (staging, incoming)
        if not mine:
            return []
        in_batch = {id(incoming) for incoming in batch}
        with self._lock:
            later = {
                id(incoming._staging)
                for incoming in self._live
                if incoming._staging is not None
                and incoming.pending
                and id(incoming) not in in_batch
            }
            for staging, _ in mine.values():
                # Files of this folder from now on see what is at its name.
                self._stagings.pop(staging.folder, None)
        for key, (staging, member) in mine.items():
            if key in later:
                continue
            try:
                # Checked again, as each file's rename would: the folders may have changed.
                found = self._locate(member.root_id, member.path, name_checked=True)[2]
                if found != member._target:
                    continue
                _move_noreplace(Path(staging.hidden), staging.top)
            except (OSError, UnsafePathError):
                continue  # one by one: each file's rename says why
            staging.moved = True
            with self._lock:
                self._hidden.pop(staging.hidden, None)
            folders.setdefault(staging.top.parent, [])
        return [staging for staging, _ in mine.values()]

    def _unstage(self, incoming: Incoming, folders: dict[Path, list[int]]) -> Outcome | None:
        """Make the real folder of a file written in a hidden one, for its own rename.

        None when made; else the file is dropped and the Outcome says why.
        """
        real_root = Path(os.path.realpath(self.roots[incoming.root_id]))
        try:
            created = _make_folders_inside(real_root, incoming.folder, incoming.path)
        except UnsafePathError as exc:
            return incoming._drop("refused", exc.reason or str(exc))
        except OSError as exc:
            return incoming._drop("retry", f"cannot make its folder: {os_reason(exc)}")
        for folder in created:
            folders.setdefault(folder.parent, [])
        return None

    def _remove_hidden(self, stagings: Iterable[_Staging]) -> None:
        """Remove the hidden folders of ``stagings`` left empty (files renamed out or aborted)."""
        with self._lock:
            live = {
                id(incoming._staging)
                for incoming in self._live
                if incoming._staging is not None and incoming.pending
            }
        for staging in stagings:
            if staging.moved or id(staging) in live:
                continue
            if _remove_empty_tree(Path(staging.hidden)):
                with self._lock:
                    self._hidden.pop(staging.hidden, None)

    def delete(self, root_id: str, path: str) -> Outcome:
        """Delete one regular file; see :meth:`delete_many`."""
        return self.delete_many(root_id, [path])[0]

    def delete_many(
        self,
        root_id: str,
        paths: Iterable[str],
        *,
        replaces: Mapping[str, FileIdentity | None] | None = None,
    ) -> list[Outcome]:
        """Delete regular files of one root, flushing each folder once.

        Every path is checked first, so an unsafe one raises
        :class:`UnsafePathError` before anything is deleted. A missing file
        counts as applied. A folder, a symbolic link or any other non-regular
        file is refused, never removed or followed. Folders emptied by a
        deletion are kept: sbs only replicates files, and an empty folder may
        matter to the application (or be receiving a file in another thread).

        ``replaces`` guards deletions as :meth:`Incoming.guard` guards
        replacements: a path in it is first moved aside (atomically), and the
        file found there is kept as a conflict unless it has the identity given.
        """
        wanted = [(path, self.target_of(root_id, path)) for path in paths]
        outcomes: list[Outcome] = []
        folders: dict[Path, list[int]] = {}
        for path, target in wanted:
            if replaces is not None and path in replaces:
                outcome, deleted = self._delete_guarded(root_id, path, target, replaces[path])
            else:
                outcome, deleted = _delete_file(root_id, path, target)
            if deleted:
                folders.setdefault(target.parent, []).append(len(outcomes))
            outcomes.append(outcome)
        if self.durable:
            for i, why in _flush_folders(folders).items():
                outcomes[i] = Outcome(
                    root_id,
                    outcomes[i].path,
                    "retry",
                    f"deleted, but its folder could not be flushed: {why}",
                )
        return outcomes

    def keep_conflict(
        self, root_id: str, path: str, *, reason: str, source: Path | None = None
    ) -> Path | None:
        """Copy this node's file to ``conflicts_dir`` before the peer's version replaces it.

        The copy goes to ``<conflicts_dir>/<UTC time>/<root id>/<path>`` with
        the file's modification time, beside a ``README.txt`` and a
        ``conflict.json`` that say where it came from and why. Returns the
        copy, or None if there is no regular file to keep. An :class:`OSError`
        (the file is locked, the disk is full) propagates: then the file must
        not be overwritten either.

        ``source`` is where this node's file is now, if not at its own path
        (moved aside the instant the peer's version took its place); it is
        moved into the conflicts folder when both are on one filesystem.
        """
        original = self.target_of(root_id, path)
        if source is not None:
            moved = self._move_conflict(root_id, path, original, source, reason)
            if moved is not None:
                return moved
        else:
            source = original
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                # A folder blocks the rename; a link is replaced, never what it points to.
                return None
            fd = os.open(source, READ_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None  # became a link since the check above
            raise
        with open(fd, "rb") as src:
            place = self._conflict_place(root_id, path)
            kept = place.kept
            # Private until it has the source's permissions: it may be a secret.
            with open(os.open(kept, _CREATE_FLAGS, 0o600), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            info = os.fstat(fd)  # after the copy: the times of what was copied
        if not _WINDOWS:
            os.chmod(kept, stat.S_IMODE(info.st_mode))
        # By path, once closed: Windows sets times only on a file nobody else has open.
        os.utime(kept, ns=(info.st_atime_ns, info.st_mtime_ns))
        if self.durable:
            _fsync_path(kept)
        self._describe_conflict(place, root_id, path, original, reason, info)
        return kept

    def _move_conflict(
        self, root_id: str, path: str, original: Path, source: Path, reason: str
    ) -> Path | None:
        """Move ``source`` into a new conflict folder; None if they are on two filesystems."""
        place = self._conflict_place(root_id, path)
        kept = place.kept
        try:
            os.rename(source, kept)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.rmtree(place.folder, ignore_errors=True)  # empty: the copy makes its own
            return None
        info = os.lstat(kept)
        if self.durable:
            durable.flush_folder(source.parent)  # the name left the synced folder
        self._describe_conflict(place, root_id, path, original, reason, info)
        return kept

    def _conflict_place(self, root_id: str, path: str) -> _ConflictPlace:
        """A new dated folder for one kept copy, with the folders of its path made."""
        now = datetime.now(UTC)
        folder, created = self._new_conflict_folder(now)
        inner = Path(_folder_name(root_id), *check_wire_path(path).parts)
        for parent in reversed(inner.parents[:-1]):
            os.mkdir(folder / parent)
            created.append(folder / parent)
        return _ConflictPlace(now=now, folder=folder, created=created, inner=inner)

    def _describe_conflict(  # noqa: PLR0917 - one kept copy, described
        self,
        place: _ConflictPlace,
        root_id: str,
        path: str,
        source: Path,
        reason: str,
        info: os.stat_result,
    ) -> None:
        """Write the README and conflict.json beside a kept file, and flush the folders."""
        folder, created, inner, now, kept = (
            place.folder,
            place.created,
            place.inner,
            place.now,
            place.kept,
        )
        details = {
            "format": 1,
            "root": root_id,
            "path": path,
            "kept": inner.as_posix(),
            "original": str(source),
            "reason": reason,
            "kept_at": now.isoformat(),
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
        }
        readme = (
            f"sbs kept this node's copy of {path!r} (folder {root_id!r})\n"
            f"before replacing it with the version of the other node.\n\n"
            f"Reason:   {reason}\n"
            f"Kept at:  {now.isoformat()}\n"
            f"Original: {source}\n"
            f"Copy:     {inner.as_posix()} (in this folder)\n\n"
            f"To restore it, copy it back over the original on the primary node.\n"
        )
        write_atomically(folder / "conflict.json", (json.dumps(details, indent=1) + "\n").encode())
        write_atomically(folder / "README.txt", readme.encode("utf-8"))
        if self.durable:
            for flushed in sorted({kept.parent, *(c.parent for c in created)}):
                durable.flush_folder(flushed)

    def abort_all(self) -> int:
        """Abort every transfer still pending through this Applier; return how many.

        For the end of a session: its temporary files go at once, not when the
        garbage collector finds them or the next session's cleanup runs.
        """
        with self._lock:
            pending = [incoming for incoming in self._live if incoming.pending]
        for incoming in pending:
            incoming.abort()
        with self._lock:
            stagings = list(self._hidden.values())
            self._stagings = {}
        self._remove_hidden(stagings)
        # The hidden folders went: the next file of their folders is placed afresh.
        self._forget_checks()
        return len(pending)

    def cleanup_temp_files(self) -> int:
        """Remove temporary files left under every root by a crash; return how many.

        A hidden folder of a new folder (see the module) left by a crash goes
        whole, and counts as its files.

        Files of transfers still in progress through this Applier are kept, so
        it is safe at any time; best run before the first transfer. Links are
        never followed, and a file that cannot be removed is skipped.
        """
        with self._lock:
            live = {incoming.temp_path for incoming in self._live if incoming.pending}
            filling = set(self._hidden)
        removed = 0
        seen: set[str] = set()
        for root in self.roots.values():
            real_root = os.path.realpath(root)
            for folder, folders, names in os.walk(real_root):
                if folder in seen:
                    continue  # one root nested in another is walked once
                seen.add(folder)
                for name in [n for n in folders if n.startswith(STAGING_PREFIX)]:
                    folders.remove(name)  # not walked: removed whole, or in use
                    hidden = os.path.join(folder, name)
                    if hidden not in filling:
                        removed += _remove_hidden_tree(hidden)
                for name in names:
                    if not name.startswith(TEMP_PREFIX):
                        continue
                    temp = Path(folder, name)
                    if temp in live:
                        continue
                    try:
                        if not stat.S_ISREG(os.lstat(temp).st_mode):
                            continue
                        temp.unlink()
                    except OSError:
                        continue
                    removed += 1
        return removed

    def _check_batch(self, batch: Sequence[Incoming]) -> None:
        # Checked before anything moves, so a misuse never half-applies a batch.
        seen: set[int] = set()
        for incoming in batch:
            if incoming._applier is not self:
                raise LocalProtocolError(f"{incoming.path}: begun by another Applier")
            incoming._require("finished")
            if id(incoming) in seen:
                raise LocalProtocolError(f"{incoming.path}: twice in one batch")
            seen.add(id(incoming))

    def _rename(self, incoming: Incoming) -> Outcome:
        try:
            # Checked again: the folders may have changed since begin().
            target = self._locate(incoming.root_id, incoming.path, name_checked=True)[2]
        except UnsafePathError as exc:
            return incoming._drop("refused", exc.reason or str(exc))
        except OSError as exc:
            return incoming._drop("retry", f"cannot check the path: {os_reason(exc)}")
        if target != incoming._target:
            return incoming._drop("retry", "its folder moved while the file was received")
        kept = None
        try:
            if incoming._guarded:
                kept = self._replace_guarded(incoming, target)
            else:
                os.replace(incoming._temp, target)
        except IsADirectoryError:
            return incoming._drop("retry", "a folder is in the way")
        except OSError as exc:
            if _WINDOWS and os.path.isdir(target):
                return incoming._drop("retry", "a folder is in the way")
            return incoming._drop("retry", f"cannot replace the file: {os_reason(exc)}")
        outcome = incoming._committed()
        return outcome if kept is None else dataclasses.replace(outcome, kept=kept)

    def _replace_guarded(self, incoming: Incoming, target: str) -> Path | None:
        """Rename ``incoming`` over ``target``, keeping an unexpected file found there."""
        temp, expected = incoming._temp, incoming._replaces
        try:
            if expected is None:
                try:
                    _rename2(temp, target, _RENAME_NOREPLACE)
                except FileExistsError:
                    pass  # made here since it was looked at: exchanged and kept below
                else:
                    return None
            try:
                _rename2(temp, target, _RENAME_EXCHANGE)
            except FileNotFoundError:
                _rename2(temp, target, _RENAME_NOREPLACE)  # gone since: nothing to keep
                return None
        except _NoAtomicSwap:
            return self._replace_checked(incoming, target)
        # Whatever was at the target at that instant now has the temporary name.
        return self._settle_displaced(
            incoming.root_id, incoming.path, Path(target), Path(temp), expected, swapped=True
        )

    def _replace_checked(self, incoming: Incoming, target: str) -> Path | None:
        """Without an atomic exchange: look once more, just before ``os.replace``."""
        try:
            info: os.stat_result | None = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            info = None
        kept = None
        unexpected = info is not None and identity_of(info) != incoming._replaces
        if unexpected and info is not None and stat.S_ISREG(info.st_mode):
            kept = self.keep_conflict(incoming.root_id, incoming.path, reason=_CHANGED_MEANWHILE)
        os.replace(incoming._temp, target)
        return kept

    def _delete_guarded(
        self, root_id: str, path: str, target: Path, expected: FileIdentity | None
    ) -> tuple[Outcome, bool]:
        outcome, deleted = _delete_file(root_id, path, target, dry_run=True)
        if not deleted:
            return outcome, False
        aside = target.parent / _temp_name(target.name)
        try:
            os.rename(target, aside)  # a random new name: nothing is replaced
        except (FileNotFoundError, NotADirectoryError):
            return Outcome(root_id, path, "applied", "already absent"), False
        except OSError as exc:
            reason = f"cannot delete the file: {os_reason(exc)}"
            return Outcome(root_id, path, "retry", reason), False
        try:
            if not stat.S_ISREG(os.lstat(aside).st_mode):
                # Became a folder or a link since the check: never deleted, put back.
                _move_noreplace(aside, target)
                return Outcome(root_id, path, "refused", "not a regular file any more"), False
            kept = self._settle_displaced(root_id, path, target, aside, expected, swapped=False)
        except OSError as exc:
            return Outcome(
                root_id, path, "retry", f"cannot keep this node's copy: {os_reason(exc)}"
            ), False
        return Outcome(root_id, path, "applied", kept=kept), True

    def _settle_displaced(
        self,
        root_id: str,
        path: str,
        target: Path,
        displaced: Path,
        expected: FileIdentity | None,
        *,
        swapped: bool,
    ) -> Path | None:
        """Keep or remove the file moved from ``target`` to ``displaced``.

        ``swapped``: the two names were exchanged (a new file is at the target),
        else the file was only moved aside. A folder found there goes back
        (IsADirectoryError); a file that is not ``expected`` is kept as a
        conflict first, and if that fails it goes back too, and the error
        propagates: nothing of this node's is ever deleted unkept.
        """

        def put_back() -> None:
            try:
                if swapped:
                    _rename2(displaced, target, _RENAME_EXCHANGE)
                else:
                    _move_noreplace(displaced, target)
            except OSError:
                # Never left under a temporary name, which the next cleanup removes.
                aside = target.with_name(f"{target.name}.sbs-kept-{secrets.token_hex(4)}")
                os.rename(displaced, aside)
                raise OSError(
                    errno.EIO, f"could not keep this node's file; it is at {aside}", str(target)
                ) from None

        info = os.lstat(displaced)
        if stat.S_ISDIR(info.st_mode):
            put_back()
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way", str(target))
        kept = None
        if stat.S_ISREG(info.st_mode) and identity_of(info) != expected:
            try:
                kept = self.keep_conflict(
                    root_id, path, reason=_CHANGED_MEANWHILE, source=displaced
                )
            except OSError:
                if os.path.lexists(displaced):
                    put_back()
                raise
        _unlink_quietly(displaced)
        return kept

    def _new_conflict_folder(self, now: datetime) -> tuple[Path, list[Path]]:
        created = list(_make_root(Path(os.path.realpath(self.conflicts_dir))))
        stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        for attempt in range(1000):
            folder = self.conflicts_dir / (stamp if attempt == 0 else f"{stamp}-{attempt}")
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            return folder, [*created, folder]
        raise FileExistsError(errno.EEXIST, "no free conflict folder name", str(folder))


def deletion_allowed(
    *,
    source_complete: bool,
    source_count: int,
    target_count: int,
    to_delete: int,
    max_delete_count: int | None,
    max_delete_share: float | None,
) -> tuple[bool, str]:
    """May a strict sync delete ``to_delete`` of the ``target_count`` files of one folder?

    Returns ``(True, "")`` or ``(False, reason)``. Refused, whatever the
    limits: a source scan that was incomplete (folder missing, unreadable, an
    I/O error), and a source that became empty while the target is not (an
    unmounted share looks exactly like that). Then ``to_delete`` may not exceed
    ``max_delete_count``, nor ``max_delete_share`` of ``target_count`` (the
    idea of rsync's ``--max-delete`` and Unison's ``confirmbigdeletes``); None
    turns a limit off. Recommended: :data:`DEFAULT_MAX_DELETE_COUNT` (None)
    and :data:`DEFAULT_MAX_DELETE_SHARE` (0.5).
    """
    if min(source_count, target_count, to_delete) < 0:
        raise ValueError("file counts cannot be negative")
    if to_delete > target_count:
        raise ValueError(f"cannot delete {to_delete} of {target_count} files")
    if max_delete_count is not None and max_delete_count < 0:
        raise ValueError(f"max_delete_count must be >= 0 or None, not {max_delete_count}")
    if max_delete_share is not None and not (
        math.isfinite(max_delete_share) and max_delete_share >= 0
    ):
        raise ValueError(f"max_delete_share must be >= 0 or None, not {max_delete_share}")
    if not source_complete:
        return False, (
            "the source folder could not be read completely (missing, unreadable "
            "or an I/O error); nothing is deleted until a complete scan"
        )
    if source_count == 0 and target_count > 0:
        return False, (
            f"the source folder is empty but the standby holds {target_count} files; "
            "an unmounted or wiped source must not empty the standby"
        )
    if to_delete == 0:
        return True, ""
    if max_delete_count is not None and to_delete > max_delete_count:
        return False, (
            f"{to_delete} deletions exceed the limit of {max_delete_count} files per cycle"
        )
    if max_delete_share is not None and to_delete > max_delete_share * target_count:
        return False, (
            f"{to_delete} deletions of {target_count} files exceed the limit of "
            f"{max_delete_share:.0%} per cycle"
        )
    return True, ""


def _flush_files(paths: Sequence[str]) -> list[str | None]:
    """Make the data of ``paths`` (all on one filesystem) durable; a failure reason each.

    One ``syncfs`` for a large batch (thousands of flushes cost more), an
    ``fsync`` per file for a small one (see :data:`FLUSH_EACH_MAX`) and where
    there is no ``syncfs``.
    """
    syncfs = _SYNCFS
    if syncfs is not None and len(paths) > FLUSH_EACH_MAX:
        try:
            fd = os.open(os.path.dirname(paths[0]), os.O_RDONLY)
        except OSError as exc:
            return [os_reason(exc)] * len(paths)
        try:
            # A fresh fd still reports writeback errors nobody has seen yet,
            # but not which file had them: the whole group must come again.
            if syncfs(fd) != 0:
                code = ctypes.get_errno()
                return [f"syncfs failed: {os.strerror(code)}"] * len(paths)
        finally:
            os.close(fd)
        return [None] * len(paths)
    with ThreadPoolExecutor(max_workers=min(_FSYNC_THREADS, len(paths))) as pool:
        reasons = list(pool.map(_fsync_file, paths))
    flushed = [i for i, reason in enumerate(reasons) if reason is None]
    if flushed and durable.DRIVE_APART:
        # One flush of the drive's cache for the whole batch (see sbs_core.durable).
        try:
            _fsync_path(paths[flushed[0]])
        except OSError as exc:
            for i in flushed:
                reasons[i] = os_reason(exc)
    return reasons


def _fsync_file(path: str | Path) -> str | None:
    """Hand one file of a batch to the drive (:func:`_flush_files` flushes its cache after)."""
    try:
        _fsync_path(path, drive=False)
    except OSError as exc:
        return os_reason(exc)
    return None


def _fsync_path(path: str | Path, *, drive: bool = True) -> None:
    """Flush one file, past the drive's cache unless ``drive`` is False (see sbs_core.durable)."""
    fd = os.open(path, _FLUSH_FLAGS)
    try:
        if drive:
            durable.flush(fd)
        else:
            durable.hand_over(fd)
    finally:
        os.close(fd)


def _flush_folders(folders: Mapping[Path, list[int]]) -> dict[int, str]:
    """Flush each folder's entries, then the drive's cache once; why each file failed.

    ``folders`` maps each folder to the indexes of the files it holds (or no
    longer holds); the answer maps the index of each file whose folder could
    not be flushed to the reason. Nothing on Windows (see sbs_core.durable).
    """
    failed: dict[int, str] = {}
    flushed: list[int] = []
    last: Path | None = None
    for folder, indexes in sorted(folders.items()):
        try:
            durable.flush_folder(folder, drive=False)
        except OSError as exc:
            failed.update(dict.fromkeys(indexes, os_reason(exc)))
        else:
            flushed.extend(indexes)
            last = folder
    if last is not None and durable.DRIVE_APART:
        try:
            durable.flush_folder(last)
        except OSError as exc:
            failed.update(dict.fromkeys(flushed, os_reason(exc)))
    return failed


def _make_root(root: Path) -> tuple[Path, ...]:
    """Create ``root`` and its missing parents (links allowed: the user chose the path)."""
    missing: list[Path] = []
    folder = root
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        created.append(folder)
    return tuple(created)


def _make_folders_inside(root: Path, folder: Path, path: str) -> tuple[Path, ...]:
    """Create ``folder`` below ``root`` one level at a time, never through a link."""
    created = []
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        try:
            os.mkdir(current)
        except FileExistsError:
            _check_folder(os.lstat(current), current, part, path)
            continue
        created.append(current)
    return tuple(created)


def _first_missing(root: Path, folder: Path, path: str) -> Path | None:
    """The topmost folder from ``root`` down to ``folder`` that is not there (None: all are).

    Refuses what :func:`_make_folders_inside` refuses: a link or a file in the way.
    """
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return current
        _check_folder(info, current, part, path)
    return None


def _check_folder(info: os.stat_result, folder: Path, part: str, path: str) -> None:
    """A folder found on the way to ``path``'s target must be a real one."""
    if _is_link(info):
        raise UnsafePathError.broken_rule(path, f"folder {part!r} is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of a folder", str(folder))


def _note_folder(folders: dict[Path, list[int]], folder: Path, top: Path, index: int) -> None:
    """File ``index`` landed in ``folder``, moved in with ``top``: flush them and all between."""
    if folder not in folders:
        below = folder
        while below not in (top, below.parent):
            below = below.parent  # a folder's name lives in its parent, moved in too
            folders.setdefault(below, [])
    folders.setdefault(folder, []).append(index)


def _remove_empty_tree(top: Path) -> bool:
    """Remove ``top`` and the folders below it if no file is left there; True if gone."""
    try:
        for current, _folders, _names in os.walk(top, topdown=False):
            os.rmdir(current)
    except OSError:
        return False
    return True


def _remove_hidden_tree(hidden: str) -> int:
    """Remove a crashed transfer's hidden folder whole; how many files it held."""
    try:
        if not stat.S_ISDIR(os.lstat(hidden).st_mode):
            return 0
        count = sum(len(names) for _f, _d, names in os.walk(hidden))
        shutil.rmtree(hidden)
    except OSError:
        return 0
    return count


# Temporary names: random per process, then counted (no system call per file);
# O_EXCL refuses the improbable clash with a crashed process's leftover.
_TEMP_STAMP = secrets.token_hex(3)
_TEMP_COUNT = itertools.count()


def _hidden_name(name: str) -> str:
    """The hidden name a missing folder is filled under (see the module)."""
    return _temp_name(name, STAGING_PREFIX)


def _temp_name(name: str, kind: str = TEMP_PREFIX) -> str:
    prefix = f"{kind}{_TEMP_STAMP}{next(_TEMP_COUNT):06x}-"
    room = MAX_COMPONENT_BYTES - len(prefix.encode("ascii"))
    # Cut on a character boundary so that a long UTF-8 name still fits one component.
    return prefix + name.encode("utf-8")[:room].decode("utf-8", "ignore")


def _copy_mode(fd: int, target: str | Path) -> os.stat_result | None:
    """Give the new file the permissions of the one it replaces (0600 settings stay 0600).

    Returns the target's lstat, None if there is nothing there.
    """
    try:
        info = os.lstat(target)
    except OSError:
        return None
    # Windows has only a read-only flag, and it would block the rename.
    if sys.platform != "win32" and stat.S_ISREG(info.st_mode):
        os.fchmod(fd, stat.S_IMODE(info.st_mode))
    return info


def _move_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` unless something is there (FileExistsError)."""
    try:
        _rename2(source, target, _RENAME_NOREPLACE)
    except _NoAtomicSwap:
        if not _WINDOWS and os.path.lexists(target):  # Windows' rename never replaces
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)


def _delete_file(
    root_id: str, path: str, target: Path, *, dry_run: bool = False
) -> tuple[Outcome, bool]:
    """The outcome of deleting ``target``, and whether this call removed a file.

    With ``dry_run``, only the checks: ``True`` means a regular file to delete.
    """
    try:
        info = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return Outcome(root_id, path, "applied", "already absent"), False
    except OSError as exc:
        return Outcome(root_id, path, "retry", f"cannot read the file: {os_reason(exc)}"), False
    if _is_link(info):
        reason = "a symbolic link, which sync never deletes"
        return Outcome(root_id, path, "refused", reason), False
    if stat.S_ISDIR(info.st_mode):
        return Outcome(root_id, path, "refused", "a folder, which sync never deletes"), False
    if not stat.S_ISREG(info.st_mode):
        return Outcome(root_id, path, "refused", "not a regular file"), False
    if dry_run:
        return Outcome(root_id, path, "applied"), True
    try:
        os.unlink(target)
    except FileNotFoundError:
        return Outcome(root_id, path, "applied", "already absent"), False
    except OSError as exc:
        return Outcome(root_id, path, "retry", f"cannot delete the file: {os_reason(exc)}"), False
    return Outcome(root_id, path, "applied"), True


_CHANGED_MEANWHILE = "changed on this node while the peer's version was applied"

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _folder_name(root_id: str) -> str:
    """A folder name for a root id such as ``folder:labels|*.lab`` that any OS accepts."""
    cleaned = _UNSAFE_NAME_CHARS.sub("_", root_id)[:80].strip("._ ")
    if cleaned == root_id:
        try:
            check_wire_path(cleaned, windows=True)
        except UnsafePathError:
            pass
        else:
            return cleaned
    # Two ids that clean up alike must still land in two folders.
    tag = hashlib.blake2b(root_id.encode("utf-8"), digest_size=4).hexdigest()
    return f"{cleaned or 'root'}-{tag}"


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
