"""Putting written data on the disk itself, on every system sbs runs on.

On Linux and Windows ``os.fsync`` (``FlushFileBuffers`` on Windows) returns
once the data is on the drive's permanent storage: it makes the drive write
its cache too. On macOS ``fsync`` only hands the data to the drive, whose cache
a power cut can still lose; ``fcntl(F_FULLFSYNC)`` is what makes the drive
write it there. :func:`flush` uses it. A filesystem without it (SMB and NTFS
answer ``ENOTSUP``, WebDAV ``EINVAL``, ZFS ``ENOTTY``) gets the plain ``fsync``,
as SQLite does; a real failure (``EIO``) is raised, never traded for a weaker
flush.

``F_FULLFSYNC`` writes the drive's whole cache, and takes as long as that: a
batch of many files is flushed with :func:`hand_over` each (the plain
``fsync``), then one :func:`flush` of any of them, instead of a cache flush
per file. Elsewhere that last flush has nothing left to do, and
:data:`DRIVE_APART` (False) tells the caller to skip it.

:func:`flush_folder` makes a folder's entries durable (a name renamed in or
out). Windows cannot open a folder to flush it, and NTFS journals its renames:
there it does nothing.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

__all__ = ("DRIVE_APART", "flush", "flush_folder", "hand_over")

if sys.platform == "darwin":
    import fcntl

    _FULLFSYNC: int | None = fcntl.F_FULLFSYNC

    def _fcntl(fd: int, command: int) -> object:
        return fcntl.fcntl(fd, command)

else:
    _FULLFSYNC: int | None = None

    def _fcntl(fd: int, command: int) -> object:
        raise OSError(errno.ENOTSUP, "no fcntl here")


#: True where the drive's cache is flushed apart from ``fsync`` (macOS).
DRIVE_APART = _FULLFSYNC is not None

# What a filesystem without F_FULLFSYNC answers (see the module's docstring).
_UNSUPPORTED = frozenset(
    code
    for code in (errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", None), errno.EINVAL, errno.ENOTTY)
    if code is not None
)


def hand_over(fd: int) -> None:
    """``fsync``: the data to the drive (on macOS not yet past its cache)."""
    os.fsync(fd)


def flush(fd: int) -> None:
    """Make the open file's data and metadata durable, past the drive's cache."""
    if _FULLFSYNC is None:
        os.fsync(fd)
        return
    try:
        _fcntl(fd, _FULLFSYNC)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        os.fsync(fd)


def flush_folder(folder: str | Path, *, drive: bool = True) -> None:
    """Make ``folder``'s entries durable; ``drive=False``: :func:`hand_over` only."""
    if sys.platform == "win32":
        return  # see the module's docstring
    fd = os.open(folder, os.O_RDONLY)
    try:
        if drive:
            flush(fd)
        else:
            hand_over(fd)
    finally:
        os.close(fd)
