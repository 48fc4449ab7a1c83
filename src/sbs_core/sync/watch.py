"""File events on the primary: what to watch, and the thread that waits for them.

watchfiles offers a recursive watch of a folder, but on Linux (inotify) it is
built by visiting every file below the folder with the interpreter lock held:
85 ms for 20,000 files and 0.6 s for 200,000, during which the node's event
loop, and so its heartbeats, stand still. It happened at every start of the
watcher: each session, each resume after a large cycle. There,
:func:`watch_targets` lists the folders instead (in the watcher's thread,
where the lock is free between system calls) and each is watched on its own: a
system call per folder, no visit per file.

A folder that appears later has no watch yet. :class:`FolderWatch` then builds
a watcher for the new list *before* it closes the old one and hands the event
of the new folder over only once the new watch runs: whatever is written in the
folder before that is found by the caller's look into the new folder, whatever
comes after raises events. No moment goes unwatched, so no full scan is needed.

Elsewhere (Windows, macOS) a recursive watch is one handle on the root, made
without visiting anything: the roots are watched recursively.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from watchfiles._rust_notify import RustNotify

__all__ = ("FolderWatch", "WatchTargets", "watch_targets")

# inotify watches folders one by one; the others watch a tree through its root.
PER_FOLDER = sys.platform.startswith("linux")
# The longest a burst of changes is grouped before it is handed over (watchfiles' default).
DEBOUNCE_MS = 1600
_ADDED = 1  # watchfiles.Change.added
# Watchers built in a row while folders appear or vanish, before the caller retries later.
START_ATTEMPTS = 5


class _Stop(Protocol):
    def is_set(self) -> bool: ...


class WatchTargets:
    """The paths to give the watcher, and whether each is watched with what is below it."""

    __slots__ = ("paths", "recursive")

    def __init__(self, paths: list[Path], *, recursive: bool) -> None:
        self.paths = paths
        self.recursive = recursive

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WatchTargets):
            return NotImplemented
        return self.recursive == other.recursive and set(self.paths) == set(other.paths)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"<WatchTargets {len(self.paths)} {'trees' if self.recursive else 'folders'}>"


def watch_targets(roots: Sequence[Path], *, per_folder: bool = PER_FOLDER) -> WatchTargets:
    """What to watch for ``roots`` (blocks: lists every folder when ``per_folder``).

    Symbolic links (and what they lead to) are not watched, as the scan does
    not follow them. A folder that cannot be listed is not watched either (nor
    what is below it): the watcher could not read it, and every scan reports
    it as an error.
    """
    if not per_folder:
        return WatchTargets(list(roots), recursive=True)
    folders: list[Path] = []
    pending = [str(root) for root in roots]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                pending.extend(
                    entry.path for entry in entries if entry.is_dir(follow_symlinks=False)
                )
        except OSError:
            continue  # gone or unreadable: not watched, and the scan reports it
        folders.append(Path(folder))
    return WatchTargets(folders, recursive=False)


class FolderWatch:
    """Watches ``roots`` until told to stop, handing over the paths that changed.

    :meth:`run` blocks (a worker thread's job). ``on_ready`` is called once the
    first watch runs: what changed before it is only known to a scan.
    ``on_changes`` gets each burst of changed paths, at most ``DEBOUNCE_MS``
    after its first change.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        on_ready: Callable[[], None],
        on_changes: Callable[[list[str]], None],
        step_ms: int,
        return_ms: int,
        per_folder: bool = PER_FOLDER,
    ) -> None:
        self.roots = list(roots)
        self.on_ready = on_ready
        self.on_changes = on_changes
        self.step_ms = step_ms
        self.return_ms = return_ms
        self.per_folder = per_folder
        self.restarts = 0  # watches built again for new folders
        self.watched = 0  # paths the running watch was given (folders, or trees)

    def run(self, stop: _Stop) -> None:
        """Watch until ``stop`` is set; raises OSError or RuntimeError if watching is impossible."""
        notify = self._start()
        try:
            self.on_ready()
            while True:
                found = notify.watch(DEBOUNCE_MS, self.step_ms, self.return_ms, stop)
                if found == "stop" or stop.is_set():
                    return
                if not isinstance(found, set):
                    continue  # "timeout", or "signal" (for the main thread only)
                changes = [path for _, path in found]
                if self.per_folder and any(
                    change == _ADDED and _is_folder(path) for change, path in found
                ):
                    notify = self._replace(notify, stop, changes)
                self.on_changes(changes)
        finally:
            notify.close()

    def _start(self) -> RustNotify:
        """A watcher for every folder there is once it runs (listed again until stable)."""
        from watchfiles._rust_notify import RustNotify  # noqa: PLC0415 - see the module doc

        targets = watch_targets(self.roots, per_folder=self.per_folder)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                notify = RustNotify(
                    [str(p) for p in targets.paths],
                    False,  # debug
                    False,  # force_polling
                    0,  # poll_delay_ms
                    targets.recursive,
                    # Not ignored: watchfiles would then also ignore, silently,
                    # the limit on watches (fs.inotify.max_user_watches).
                    False,  # ignore_permission_denied
                )
            except (FileNotFoundError, PermissionError):
                if targets.recursive or attempt == START_ATTEMPTS:
                    raise
                # A folder went away or was closed since the listing: list again.
                targets = watch_targets(self.roots, per_folder=True)
                continue
            except OSError as exc:
                if "watch limit" not in str(exc):
                    raise
                raise OSError(
                    f"the system's limit on file watches is too low for {len(targets.paths)} "
                    f"{'trees' if targets.recursive else 'folders'}"
                    + (" (fs.inotify.max_user_watches)" if PER_FOLDER else ""),
                ) from exc
            self.watched = len(targets.paths)
            if targets.recursive:
                return notify
            # A folder made while the watcher was built has no watch and raised
            # no event: list again, and build again until nothing is missing.
            again = watch_targets(self.roots, per_folder=True)
            if again == targets:
                return notify
            notify.close()
            targets = again
        raise RuntimeError(f"the folders kept changing while {START_ATTEMPTS} watchers were built")

    def _replace(self, old: RustNotify, stop: _Stop, changes: list[str]) -> RustNotify:
        """A watcher that covers new folders too, started before ``old`` is closed.

        What ``old`` saw meanwhile joins ``changes``.
        """
        fresh = self._start()
        self.restarts += 1
        drained = old.watch(DEBOUNCE_MS, self.step_ms, 1, stop)
        if isinstance(drained, set):
            changes.extend(path for _, path in drained)
        old.close()
        return fresh


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False  # gone again: nothing to watch
