"""A replicated folder's listing, kept current from file events until a secondary connects.

A primary with no secondary has nothing to send, but a secondary that connects
wants its first files at once. While it waits, the primary watches its folders,
lists each one once and applies the watcher's events to that listing; the
session's first cycle starts from it instead of listing every folder while it
reads and sends (pair runs of a first sync of 20,000 small files: 0.76 s
against 0.85 s with the scan beside the reads).

A listing is only as good as the events it was told of. The engine trusts it
for what to send first, never alone for what to delete (:func:`still_absent`
looks at the disk again), and a full scan follows every session's first cycle.
Everything here but :meth:`FolderListing.note` blocks: run it in worker threads.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from sbs_core.errors import os_reason

from .paths import STAGING_PREFIX, TEMP_PREFIX, quoted
from .roots import LocalRoot, root_identity
from .scan import FileStat, ScanResult, matches, scan_root, unsendable_line

__all__ = ("FolderListing", "Look", "look", "still_absent")


@dataclass(slots=True)
class Look:
    """What is at one changed path of a root now (see :func:`look`).

    - ``exists``: something is at the path (a file, a folder, a link ...).
    - ``folder``: it is a folder; ``files`` then holds every replicable file
      under it, as a scan of it found them.
    - ``files``: the replicable files at or under the path.
    - ``unsendable``: lines for names that cannot be replicated, as a scan
      gives them.
    - ``error``: the path or a folder under it could not be read.
    """

    exists: bool
    folder: bool = False
    files: dict[str, FileStat] = field(default_factory=dict)
    unsendable: list[str] = field(default_factory=list)
    error: str | None = None


def look(root: LocalRoot, name: str) -> Look:
    """Look at ``name`` (a path relative to ``root``, with ``/``) as a scan would (blocks).

    A folder is scanned whole: the files it came with, or that were written in
    it before a watcher saw it, raise no events of their own.
    """
    if any(part.startswith(STAGING_PREFIX) for part in name.split("/")):
        return Look(exists=True)  # a new folder still being received (sync.apply)
    full = root.path / name
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return Look(exists=False)
    except OSError as exc:
        return Look(exists=True, error=f"cannot read {quoted(name)}: {os_reason(exc)}")
    if stat.S_ISDIR(st.st_mode):
        inside = scan_root(full, root.spec.filter, prefix=f"{name}/")
        return Look(
            exists=True,
            folder=True,
            files=inside.files,
            unsendable=inside.unsendable,
            error=inside.errors[0] if inside.errors else None,
        )
    base = name.rsplit("/", 1)[-1]
    if stat.S_ISLNK(st.st_mode) or base.startswith(TEMP_PREFIX):
        return Look(exists=True)  # never followed, never sent: as the scan does
    if not matches(root.spec.filter, base):
        return Look(exists=True)
    if not stat.S_ISREG(st.st_mode):
        return Look(
            exists=True, unsendable=[f"{quoted(name)} is not replicated: not a regular file"]
        )
    line = unsendable_line(name)
    if line is not None:
        return Look(exists=True, unsendable=[line])
    found = FileStat(path=name, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)
    return Look(exists=True, files={name: found})


def still_absent(root: LocalRoot, paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``paths`` into those with nothing at them on the disk and those present (blocks)."""
    absent: list[str] = []
    present: list[str] = []
    for path in paths:
        try:
            os.lstat(root.path / path)
        except (FileNotFoundError, NotADirectoryError):
            absent.append(path)
            continue
        except OSError:
            pass  # cannot tell: it stays
        present.append(path)
    return absent, present


class FolderListing:
    """One root's files: listed once, then brought up to date with the paths events name.

    :meth:`note` takes changed paths from the event loop at any time;
    :meth:`list` and :meth:`refresh` run in worker threads, one at a time.
    """

    def __init__(self, root: LocalRoot) -> None:
        self.root = root
        self._scan: ScanResult | None = None
        self._identity: tuple[int, int] | None = None
        self._noted: set[str] = set()
        self._noted_lock = threading.Lock()  # short: the event loop takes it
        self._apply_lock = threading.Lock()
        self.broken: str | None = None  # why the listing cannot be trusted, once it cannot

    @property
    def listed(self) -> bool:
        """Whether :meth:`list` ran (the listing may still be untrusted: see :meth:`refresh`)."""
        return self._scan is not None

    @property
    def pending(self) -> bool:
        """Whether changed paths wait for :meth:`refresh`."""
        with self._noted_lock:
            return bool(self._noted)

    @property
    def files(self) -> int:
        """How many files the listing holds (0 before :meth:`list`)."""
        return len(self._scan.files) if self._scan is not None else 0

    def note(self, paths: Iterable[str]) -> int:
        """Paths changed since (relative, with ``/``); how many wait to be applied."""
        with self._noted_lock:
            self._noted.update(paths)
            return len(self._noted)

    def list(self) -> None:
        """List the root (blocks). Paths noted meanwhile are applied by :meth:`refresh`."""
        with self._apply_lock:
            identity = root_identity(self.root)
            scan = scan_root(self.root.path, self.root.spec.filter)
            if not scan.complete:
                self.broken = "; ".join(scan.errors[:1]) or f"{self.root.path} is missing"
            self._scan, self._identity = scan, identity

    def refresh(self) -> ScanResult | None:
        """Apply the paths noted so far (blocks); the listing, or None if it cannot be trusted.

        Untrusted: never listed, listed with errors or a missing root, a changed
        path that could not be read, or a root that is no longer the folder
        listed (moved away, replaced, unmounted).
        """
        with self._apply_lock:
            with self._noted_lock:
                names, self._noted = self._noted, set()
            scan = self._scan
            if scan is None:
                return None
            if self.broken is None and root_identity(self.root) != self._identity:
                self.broken = f"{self.root.path} is no longer the folder listed"
            if self.broken is None and names:
                self._apply(scan, names)
            return scan if self.broken is None else None

    def _apply(self, scan: ScanResult, names: set[str]) -> None:
        dropped: set[str] = set()
        trees: set[str] = set()  # folders gone or listed again: their old files go
        added: dict[str, FileStat] = {}
        for name in sorted(names):
            found = look(self.root, name)
            if found.error is not None:
                self.broken = found.error
                return
            dropped.add(name)
            if found.folder or not found.exists:
                trees.add(name)
            added.update(found.files)
            scan.unsendable.extend(found.unsendable)
        files = scan.files
        for name in dropped:
            files.pop(name, None)
        if trees:
            for path in [p for p in files if _under_any(p, trees)]:
                del files[path]
        files.update(added)


def _under_any(path: str, folders: set[str]) -> bool:
    """Whether ``path`` lies under one of ``folders`` (relative paths, with ``/``)."""
    cut = path.rfind("/")
    while cut > 0:
        path = path[:cut]
        if path in folders:
            return True
        cut = path.rfind("/")
    return False
