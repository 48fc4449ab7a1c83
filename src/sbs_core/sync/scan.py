"""Listing and hashing the files of a replicated folder.

:func:`scan_root` lists the files of one root that match its filter, with the
size, modification time and inode that decide whether a file must be hashed
again; :func:`hash_file` hashes one file while checking that nobody wrote to it
meanwhile. Both block: callers run them in worker threads.

A scan never raises for a problem on the disk. It reports what it could not
read in :attr:`ScanResult.errors`, and :attr:`ScanResult.complete` says whether
the listing can be trusted to decide deletions: an unmounted share or an
unreadable folder must not look like a folder whose files were deleted.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from sbs_core.errors import os_reason

from .paths import MAX_PATH_BYTES, STAGING_PREFIX, TEMP_PREFIX, component_problem, quoted

__all__ = (
    "HASH_NAME",
    "FileDigest",
    "FileStat",
    "ScanResult",
    "digest_of",
    "hash_file",
    "matches",
    "new_hasher",
    "scan_root",
    "unsendable_line",
)

HASH_NAME = "xxh3-128"

# O_NONBLOCK keeps a FIFO that replaced a scanned file from blocking the open;
# O_BINARY stops Windows from translating line ends.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_BINARY", 0)
)


@dataclass(frozen=True, slots=True)
class FileStat:
    """One file found by a scan. ``path`` is relative to the root, with ``/``."""

    path: str
    size: int
    mtime_ns: int
    ino: int


@dataclass(frozen=True, slots=True)
class FileDigest:
    """The content hash of a file (hex, :data:`HASH_NAME`) and the stat it was read at."""

    digest: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class ScanResult:
    """What :func:`scan_root` found.

    - ``files``: every replicable file, keyed by its relative POSIX path.
    - ``missing``: the root does not exist or is not a folder.
    - ``errors``: folders or files that could not be listed or read, one line
      each, with the path and the OS error.
    - ``skipped_symlinks``: symbolic links (and Windows junctions) left alone.
    - ``unsendable``: files or folders whose names cannot be replicated (see
      :func:`~sbs_core.sync.paths.check_wire_path`), and special files such as
      FIFOs, one line each. They are a fact about names, not a failure to read
      the disk, so they do not make the scan incomplete.
    """

    files: dict[str, FileStat] = field(default_factory=dict)
    missing: bool = False
    errors: list[str] = field(default_factory=list)
    skipped_symlinks: int = 0
    unsendable: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True if the root was there and every folder and file in it was read."""
        return not self.missing and not self.errors


def matches(pattern: str, name: str) -> bool:
    """True if the file name ``name`` matches the filter ``pattern``.

    Filters use fnmatch wildcards (``*``, ``?``, ``[abc]``) on the file *name*
    only, never on its folder, and ignore case on every OS because the base
    product runs on Windows: ``*.lab`` matches ``A.LAB``. Scans are recursive,
    so a filter applies to the files of every subfolder too.

    As on Windows, a pattern ending in ``.*`` also matches names without any
    dot: ``*.*`` matches every file, ``README.*`` matches ``README``.
    """
    return _matcher(pattern)(name)


@functools.lru_cache(maxsize=64)
def _matcher(pattern: str) -> Callable[[str], bool]:
    full = re.compile(fnmatch.translate(pattern), re.IGNORECASE).match
    if not pattern.endswith(".*"):
        return lambda name: full(name) is not None
    stem = re.compile(fnmatch.translate(pattern[:-2]), re.IGNORECASE).match
    return lambda name: full(name) is not None or ("." not in name and stem(name) is not None)


def scan_root(
    root: Path,
    pattern: str,
    *,
    windows: bool = True,
    on_folder: Callable[[list[FileStat]], None] | None = None,
    prefix: str = "",
) -> ScanResult:
    """List every file under ``root`` (recursively) whose name matches ``pattern``.

    Symbolic links are never followed, only counted; sbs's temporary files are
    ignored; a file deleted between listing and stat is simply left out. Names
    that :func:`~sbs_core.sync.paths.check_wire_path` refuses go to
    ``unsendable``. ``windows=True`` (the default) also refuses names Windows
    cannot store, since a scan does not know the OS of the node receiving it.

    ``root`` itself may be a link to a folder: the user configured it.

    ``on_folder`` is called with the files of each folder as soon as it is
    listed, so a caller can start on them while the rest is scanned.

    ``prefix`` (``"sub/"``): ``root`` is that folder of a replicated one, and
    the paths found are given from there.
    """
    result = ScanResult()
    try:
        info = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        result.missing = True
        return result
    except OSError as exc:
        result.errors.append(f"cannot read folder {_printable(root)}: {os_reason(exc)}")
        return result
    if not stat.S_ISDIR(info.st_mode):
        result.missing = True
        return result

    walk = _Walk(pattern, windows=windows, on_folder=on_folder)
    return walk.run(os.fspath(root), prefix, result)


def unsendable_line(rel: str, *, windows: bool = True) -> str | None:
    """What a scan says of the file ``rel`` if its name keeps it from being replicated.

    None if its name is fine. For a file found another way than by a scan
    (a file event): the same rules, the same words. ``rel`` is a relative
    POSIX path.
    """
    *folders, name = rel.split("/")
    for depth, part in enumerate(folders):
        reason = component_problem(part, windows=windows)
        if reason is not None:
            folder = "/".join(folders[: depth + 1])
            return f"folder {quoted(folder)} is not replicated: its name {reason}"
    reason = _file_name_problem(name, rel, windows=windows)
    return None if reason is None else f"{quoted(rel)} is not replicated: its name {reason}"


def _file_name_problem(name: str, rel: str, *, windows: bool) -> str | None:
    reason = component_problem(name, windows=windows)
    if reason is None and len(rel.encode("utf-8")) > MAX_PATH_BYTES:
        reason = f"is longer than {MAX_PATH_BYTES} bytes"
    return reason


class _Walk:
    """One recursive listing; a stack instead of recursion keeps deep trees safe."""

    def __init__(
        self, pattern: str, *, windows: bool, on_folder: Callable[[list[FileStat]], None] | None
    ) -> None:
        self.match = _matcher(pattern)
        self.windows = windows
        self.on_folder = on_folder
        self.pending: list[tuple[str, str]] = []

    def run(self, root: str, prefix: str, result: ScanResult) -> ScanResult:
        self.pending.append((root, prefix))
        while self.pending:
            folder, prefix = self.pending.pop()
            found: list[FileStat] = []
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        st = self.visit(entry, prefix, result)
                        if st is not None:
                            found.append(st)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    reason = "it vanished during the scan"
                else:
                    reason = os_reason(exc)
                result.errors.append(f"cannot list folder {_printable(folder)}: {reason}")
            if found and self.on_folder is not None:
                self.on_folder(found)
        return result

    def visit(self, entry: os.DirEntry[str], prefix: str, result: ScanResult) -> FileStat | None:
        """Note one entry in ``result``; the file's stat if it is one to replicate."""
        name = entry.name
        try:
            if _is_link(entry):
                result.skipped_symlinks += 1
                return None
            if entry.is_dir(follow_symlinks=False):
                if name.startswith(STAGING_PREFIX):
                    return None  # a new folder still being received (sync.apply)
                reason = component_problem(name, windows=self.windows)
                if reason is not None:
                    result.unsendable.append(
                        f"folder {quoted(prefix + name)} is not replicated: its name {reason}"
                    )
                else:
                    self.pending.append((entry.path, f"{prefix}{name}/"))
                return None
            if name.startswith(TEMP_PREFIX) or not self.match(name):
                return None
            rel = prefix + name
            if not entry.is_file(follow_symlinks=False):
                result.unsendable.append(f"{quoted(rel)} is not replicated: not a regular file")
                return None
            reason = _file_name_problem(name, rel, windows=self.windows)
            if reason is not None:
                result.unsendable.append(f"{quoted(rel)} is not replicated: its name {reason}")
                return None
            info = entry.stat(follow_symlinks=False)
            # Windows leaves st_ino at 0 in a directory listing; inode() asks for it.
            ino = info.st_ino or entry.inode()
        except FileNotFoundError:
            # Deleted since the folder was listed: it is simply not there any more.
            return None
        except OSError as exc:
            result.errors.append(f"cannot read {_printable(entry.path)}: {os_reason(exc)}")
            return None
        st = result.files[rel] = FileStat(rel, info.st_size, info.st_mtime_ns, ino)
        return st


if sys.platform == "win32":

    def _is_link(entry: os.DirEntry[str]) -> bool:
        if entry.is_symlink():
            return True
        # A junction redirects like a link; its tag comes with the listing, no extra call.
        return (
            entry.is_dir(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_reparse_tag == stat.IO_REPARSE_TAG_MOUNT_POINT
        )

else:

    def _is_link(entry: os.DirEntry[str]) -> bool:
        return entry.is_symlink()


def new_hasher() -> xxhash.xxh3_128:
    """A fresh hash object of the kind :func:`hash_file` uses (:data:`HASH_NAME`).

    The digest checks that a file arrived as it left and tells two nodes' copies
    apart; the peer is authenticated and every frame is AEAD-protected, so no
    cryptographic strength is needed here, only speed: xxh3 hashes at memory
    speed (about 17 GiB/s here, against 0.5 GiB/s for blake2b).
    """
    return xxhash.xxh3_128()


def digest_of(data: bytes | memoryview) -> str:
    """The digest of bytes held whole in memory: what a :func:`new_hasher` fed them gives."""
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path, *, chunk_size: int = 1 << 20) -> FileDigest | None:
    """Hash the file at ``path`` in chunks, or return None if it changed meanwhile.

    The size and modification time are read from the open file before and after
    hashing; if they differ, or the number of bytes read is not the size, the
    file is being written and None asks the caller to try again next cycle.
    None is also returned if ``path`` is no longer a regular file.

    A symbolic link is not followed (on POSIX the open fails with ``ELOOP``).
    Other :class:`OSError`\\ s (a missing or unreadable file) propagate.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    fd = os.open(path, _OPEN_FLAGS)
    try:
        before = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(before.st_mode):
        # Checked before a file object wraps it: that refuses a folder with an error.
        os.close(fd)
        return None
    with open(fd, "rb", buffering=0) as file:
        hasher = new_hasher()
        buffer = memoryview(bytearray(chunk_size))
        total = 0
        while count := file.readinto(buffer):
            hasher.update(buffer[:count])
            total += count
        after = os.fstat(fd)
    if (
        total != before.st_size
        or after.st_size != before.st_size
        or after.st_mtime_ns != before.st_mtime_ns
    ):
        return None
    return FileDigest(hasher.hexdigest(), before.st_size, before.st_mtime_ns)


def _printable(path: str | os.PathLike[str]) -> str:
    """``path`` for a message, with undecodable bytes escaped instead of failing to log."""
    return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")
