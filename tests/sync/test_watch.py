"""What the primary's file watcher is given, and when it asks to be started again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from alertkit import primary_status

from sbs_core.cli import format_status
from sbs_core.sync import watch
from sbs_core.sync.watch import PER_FOLDER, FolderWatch, watch_targets

linux_only = pytest.mark.skipif(not PER_FOLDER, reason="folders are watched one by one on Linux")


def make_tree(root: Path) -> None:
    for rel in ("a/one.txt", "a/b/two.txt", "a/b/c/three.txt", "d/four.txt", "top.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "empty").mkdir()


def test_per_folder_lists_every_folder_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (root / "link").symlink_to(outside, target_is_directory=True)

    targets = watch_targets([root], per_folder=True)

    assert not targets.recursive
    found = sorted(p.relative_to(root).as_posix() for p in targets.paths)
    # Files are not watched on their own, and a link is not followed (the scan does not either).
    assert found == [".", "a", "a/b", "a/b/c", "d", "empty"]


def test_trees_are_given_whole_where_the_watcher_needs_no_visit(tmp_path: Path) -> None:
    roots = [tmp_path / "x", tmp_path / "y"]
    for root in roots:
        make_tree(root)
    targets = watch_targets(roots, per_folder=False)
    assert targets.recursive
    assert targets.paths == roots


def test_a_folder_that_cannot_be_listed_is_not_given(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    gone = tmp_path / "gone"
    targets = watch_targets([root, gone], per_folder=True)
    # The watcher could not read it either; the scan reports it as an error.
    assert gone not in targets.paths
    assert root / "a" / "b" in targets.paths


class Watching:
    """FolderWatch.run in a thread of its own, as the engine runs it."""

    def __init__(self, roots: list[Path], *, per_folder: bool = PER_FOLDER) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.seen: list[str] = []
        self.error: BaseException | None = None
        self.watch = FolderWatch(
            roots,
            on_ready=self.ready.set,
            on_changes=self.seen.extend,
            step_ms=20,
            return_ms=200,
            per_folder=per_folder,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5), "the watch did not start"

    def _run(self) -> None:
        try:
            self.watch.run(self.stop)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def wait_seen(self, path: Path, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while str(path) not in self.seen:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.finish()
                pytest.fail(f"no event for {path}; seen {self.seen}")
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the watch did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_tree(root)
    return root


@linux_only
def test_a_new_folder_is_watched_before_its_event_is_handed_over(tree: Path) -> None:
    watching = Watching([tree])
    try:
        (tree / "a" / "b" / "f.txt").write_text("a file changes: the same watch goes on")
        watching.wait_seen(tree / "a" / "b" / "f.txt")
        assert watching.watch.restarts == 0

        (tree / "a" / "new" / "inner").mkdir(parents=True)
        watching.wait_seen(tree / "a" / "new")
        assert watching.watch.restarts >= 1
        # Folders below the new one, made at once, are watched too.
        (tree / "a" / "new" / "inner" / "later.txt").write_text("later")
        watching.wait_seen(tree / "a" / "new" / "inner" / "later.txt")
    finally:
        watching.finish()


class RacingFolders:
    """A new folder made just after each of the first ``count`` listings (all: None).

    That is a folder made while a watcher is being built: the listing did not
    see it, and no watch of its parent raised an event for it yet.
    """

    def __init__(self, tree: Path, monkeypatch: pytest.MonkeyPatch, count: int | None) -> None:
        self.tree = tree
        self.count = count
        self.listings = 0
        self.made: list[Path] = []
        self._listed = watch.watch_targets
        monkeypatch.setattr(watch, "watch_targets", self._listing)

    def _listing(self, roots: list[Path], *, per_folder: bool) -> watch.WatchTargets:
        found = self._listed(roots, per_folder=per_folder)
        self.listings += 1
        if self.count is None or self.listings <= self.count:
            self.made.append(self.tree / f"racing{len(self.made)}")
            self.made[-1].mkdir()
        return found


@linux_only
def test_a_folder_made_while_the_watch_is_built_is_watched_too(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    racing = RacingFolders(tree, monkeypatch, count=1)
    watching = Watching([tree])
    try:
        assert racing.listings == 3  # listed, built; listed again (one more), built; stable
        (racing.made[0] / "f.txt").write_text("in the folder made meanwhile")
        watching.wait_seen(racing.made[0] / "f.txt")
    finally:
        watching.finish()


def test_stop_ends_the_watch_within_a_few_steps(tree: Path) -> None:
    watching = Watching([tree])
    (tree / "d" / "four.txt").write_text("changed")
    watching.wait_seen(tree / "d" / "four.txt")
    started = time.monotonic()
    watching.finish()
    assert time.monotonic() - started < 1.0


def test_a_recursive_watch_sees_changes_deep_down(tree: Path) -> None:
    watching = Watching([tree], per_folder=False)
    try:
        (tree / "a" / "b" / "c" / "deep.txt").write_text("deep")
        watching.wait_seen(tree / "a" / "b" / "c" / "deep.txt")
        (tree / "fresh" / "inner").mkdir(parents=True)
        time.sleep(0.2)  # notify adds the new folders' watches itself
        (tree / "fresh" / "inner" / "x.txt").write_text("x")
        watching.wait_seen(tree / "fresh" / "inner" / "x.txt")
        assert watching.watch.restarts == 0
    finally:
        watching.finish()


@linux_only
def test_folders_that_never_hold_still_end_the_start_with_an_error(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    racing = RacingFolders(tree, monkeypatch, count=None)
    fw = FolderWatch(
        [tree], on_ready=lambda: None, on_changes=lambda _: None, step_ms=20, return_ms=200
    )
    with pytest.raises(RuntimeError, match="kept changing"):
        fw.run(threading.Event())  # the engine logs it and tries again a period later
    assert racing.listings == 1 + watch.START_ATTEMPTS  # a bounded number of tries


def screen_with(**watch: object) -> list[str]:
    return format_status(primary_status(**watch)).splitlines()


def test_the_status_screen_tells_how_changes_are_found() -> None:
    assert "watch      file events from 201 folders" in screen_with(
        watch_state="watching", watched_folders=201, watch_error=None
    )
    assert "watch      paused while a large cycle reads the files" in screen_with(
        watch_state="paused", watched_folders=0, watch_error=None
    )
    failed = screen_with(
        watch_state="failed", watched_folders=0, watch_error="inotify watch limit reached"
    )
    assert (
        "watch      FAILED (inotify watch limit reached): a full scan every period until it "
        "recovers" in failed
    )
    # A secondary, or a node without a peer, has no watcher to speak of.
    assert not [
        line
        for line in screen_with(watch_state="off", watched_folders=0, watch_error=None)
        if line.startswith("watch")
    ]


def test_the_limit_on_watches_is_an_error_that_says_so(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # watchfiles words it for developers; the operator gets what to change.
    import watchfiles._rust_notify  # noqa: PLC0415 - patched for this test only

    def over_the_limit(*args: object) -> None:
        raise OSError('OS file watch limit reached. about ["/x"] (Error { kind: MaxFilesWatch })')

    monkeypatch.setattr(watchfiles._rust_notify, "RustNotify", over_the_limit)
    fw = FolderWatch(
        [tree], on_ready=lambda: None, on_changes=lambda _: None, step_ms=20, return_ms=200
    )
    with pytest.raises(OSError, match="limit on file watches is too low for 6 ") as raised:
        fw.run(threading.Event())
    assert "MaxFilesWatch" not in str(raised.value)
