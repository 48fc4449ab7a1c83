"""A primary waiting for its secondary keeps its folder's listing current; the first cycle uses it.

Real nodes over the in-memory network, real folders and the real file
watcher: the listing is made once, the watcher's events keep it current, and
the first cycle of the secondary that connects starts from it. It is never
trusted alone to delete, and a replaced folder is scanned again.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio
import pytest
from memorypair import A_HOST, B_HOST, make_node, tree

from sbs_core.driver import Node
from sbs_core.sync import engine
from sbs_core.sync import listing as listing_module
from sbs_core.sync.listing import FolderListing
from sbs_core.transport import MemoryNetwork

USED = "first cycle from the listing of"
LACKED = "the listing of"


@pytest.fixture(autouse=True)
def sync_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sbs.sync")


async def until(test: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not test():
            await anyio.sleep(0.02)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def kept(node: Node) -> FolderListing | None:
    """The listing ``node`` keeps of its one folder, once made."""
    listing = node._sync._listing  # type: ignore[attr-defined]
    if not listing:
        return None
    [one] = listing.values()
    return one if one.listed else None


def holds(node: Node, files: Iterable[str]) -> Callable[[], bool]:
    """Whether ``node``'s kept listing holds just ``files``, every change noted applied."""
    wanted = set(files)

    def test() -> bool:
        one = kept(node)
        return (
            one is not None
            and not one.pending
            and one._scan is not None
            and set(one._scan.files) == wanted
        )

    return test


def two_nodes(tmp_path: Path) -> tuple[Node, Node]:
    """a and b, replicating ``tmp_path/a/data`` to ``tmp_path/b/data`` strictly; not started."""
    network = MemoryNetwork()
    return (
        make_node(tmp_path, network, "a", A_HOST, B_HOST),
        make_node(tmp_path, network, "b", B_HOST, A_HOST),
    )


def fill(folder: Path, files: Iterable[str]) -> None:
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name} as first written\n".encode())


def first_cycle_logged(caplog: pytest.LogCaptureFixture) -> tuple[int, int] | None:
    """Files sent and deletions of the sender's cycle 1, from its log, once there."""
    for text in messages(caplog):
        found = re.match(r"cycle 1: sent (\d+) files \(.*\), (\d+) deletes", text)
        if found:
            return int(found[1]), int(found[2])
    return None


async def first_cycle(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """:func:`first_cycle_logged`, waited for: the sender logs its cycle once the
    receiver's acknowledgement is in, a moment after the receiver's folder is complete."""
    await until(lambda: first_cycle_logged(caplog) is not None)
    logged = first_cycle_logged(caplog)
    assert logged is not None
    return logged


@pytest.mark.anyio
async def test_the_first_cycle_starts_from_the_listing_kept_while_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    keep = [f"keep{i}.txt" for i in range(20)]
    before = [*keep, "changed.txt", "gone.txt", "old/x.txt", "old/deeper/y.txt", "moved/m.txt"]
    fill(src, before)
    fill(tmp_path / "a" / "outside", ["q.txt", "sub/r.txt"])
    # b holds copies of what a keeps, and of what a deletes while it waits (few
    # enough of b's files for node.max_delete to let the deletions through).
    fill(dst, [*keep, "gone.txt", "old/x.txt", "old/deeper/y.txt", "moved/m.txt"])
    a, b = two_nodes(tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await until(holds(a, before))

        # Changes only the watcher tells the listing of.
        (src / "changed.txt").write_bytes(b"longer than it was, and different\n")
        (src / "gone.txt").unlink()
        shutil.rmtree(src / "old")
        fill(src, ["new.txt", "fresh/deep/z.txt", "fresh/w.txt"])
        # Folders moved out and in: one event each, none for the files they hold.
        (src / "moved").rename(tmp_path / "a" / "moved-out")
        (tmp_path / "a" / "outside").rename(src / "arrived")
        now = ["new.txt", "fresh/deep/z.txt", "fresh/w.txt", "arrived/q.txt", "arrived/sub/r.txt"]
        await until(holds(a, [*keep, "changed.txt", *now]))

        tg.start_soon(b.run)
        await until(lambda: tree(dst) == tree(src))
        assert f"{USED} {src} kept while no secondary was connected (26 files)" in messages(caplog)
        # b's 20 copies of the kept files agree: 6 files sent, 4 deleted.
        assert await first_cycle(caplog) == (6, 4)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_file_the_listing_missed_is_not_deleted_and_a_scan_follows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_note = FolderListing.note

    def note_all_but_missed(self: FolderListing, paths: Iterable[str]) -> int:
        # An event lost on the way (an overflowing queue): the listing never hears of it.
        return real_note(self, [p for p in paths if "missed" not in p])

    monkeypatch.setattr(listing_module.FolderListing, "note", note_all_but_missed)
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    fill(src, ["one.txt", "two.txt"])
    fill(dst, ["missed.txt"])  # an older copy than the one a writes
    a, b = two_nodes(tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await until(holds(a, ["one.txt", "two.txt"]))
        (src / "missed.txt").write_bytes(b"the primary's newer copy\n")
        fill(src, ["three.txt"])
        await until(holds(a, ["one.txt", "two.txt", "three.txt"]))

        tg.start_soon(b.run)
        await until(lambda: tree(dst) == tree(src))
        assert (dst / "missed.txt").read_bytes() == b"the primary's newer copy\n"
        # The first cycle believed the listing for what to send, not for what to delete.
        assert await first_cycle(caplog) == (3, 0)
        lacked = [m for m in messages(caplog) if m.startswith("1 files " + LACKED)]
        assert lacked == [f"1 files {LACKED} {src} lacked are there: a full scan follows"]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_folder_replaced_while_waiting_is_scanned_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    fill(src, ["before/a.txt", "before/b.txt"])
    a, b = two_nodes(tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await until(holds(a, ["before/a.txt", "before/b.txt"]))
        # A share unmounted and another mounted in its place: no event inside it.
        src.rename(tmp_path / "a" / "moved-away")
        fill(src, ["after.txt"])

        tg.start_soon(b.run)
        await until(lambda: tree(dst) == tree(src))
        assert tree(dst) == {"after.txt": b"after.txt as first written\n"}
        assert not [m for m in messages(caplog) if m.startswith(USED)]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_only_a_primary_keeps_a_listing(tmp_path: Path) -> None:
    src = tmp_path / "a" / "data"
    fill(src, ["one.txt"])
    a, b = two_nodes(tmp_path)
    fill(tmp_path / "b" / "data", ["on-b.txt"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await until(holds(a, ["one.txt"]))
        assert a.status()["watch_state"] == "watching"
        tg.start_soon(b.run)
        await until(
            lambda: (
                b.status().get("role") == "secondary" and tree(tmp_path / "b" / "data") == tree(src)
            )
        )
        # The secondary neither watches nor lists: its folders are the primary's to fill.
        assert b.status()["watch_state"] == "off"
        assert b._sync._listing is None  # type: ignore[attr-defined]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_waiting_primary_whose_watcher_fails_says_so_and_scans_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:

    class FailingWatch:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.watched = 0

        def run(self, stop: object) -> None:
            raise OSError("the system's limit on file watches is too low for 1 folders")

    monkeypatch.setattr(engine, "FolderWatch", FailingWatch)
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    fill(src, ["one.txt", "two.txt"])
    a, b = two_nodes(tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await until(lambda: a.status().get("watch_state") == "failed")
        assert "too low for 1 folders" in a.status()["watch_error"]
        assert kept(a) is None

        tg.start_soon(b.run)
        await until(lambda: tree(dst) == tree(src))
        assert not [m for m in messages(caplog) if m.startswith(USED)]
        tg.cancel_scope.cancel()
