"""A folder missing on the receiving node is filled under a hidden name, then moved in whole."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sbs_core import durable
from sbs_core.sync import apply, direct
from sbs_core.sync.apply import Applier, Incoming
from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX, UnsafePathError, check_wire_path
from sbs_core.sync.scan import digest_of, scan_root

ROOT = "settings"
MTIME_NS = 1_600_000_000_000_000_000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def make_applier(root: Path, *, durable: bool = False) -> Applier:
    return Applier(
        {ROOT: root},
        conflicts_dir=root.parent / "conflicts",
        preserve_timestamps=True,
        durable=durable,
    )


def write(applier: Applier, path: str, data: bytes) -> Incoming:
    """Receive ``path`` whole, as a held batch of small files is received."""
    incoming = applier.write_whole(
        ROOT, path, memoryview(data), mtime_ns=MTIME_NS, digest=digest_of(data)
    )
    incoming.guard(None)  # as the engine does: nothing was there
    return incoming


def stream(applier: Applier, path: str, data: bytes) -> Incoming:
    """Receive ``path`` in pieces, as a large file is."""
    incoming = applier.begin(ROOT, path, size=len(data), mtime_ns=MTIME_NS, digest=digest_of(data))
    for start in range(0, len(data), 1 << 16):
        incoming.write(data[start : start + (1 << 16)])
    incoming.finish()
    incoming.guard(None)
    return incoming


def hidden_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"{STAGING_PREFIX}*") if p.is_dir())


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_new_folder_appears_only_at_the_commit_and_whole(root: Path) -> None:
    applier = make_applier(root)
    batch = [
        write(applier, "new/a.lab", b"a"),
        write(applier, "new/deep/er/b.lab", b"b"),
        write(applier, "new/c.lab", b"c"),
    ]

    # Nothing at the folder's name yet; everything in one hidden folder beside it.
    assert not (root / "new").exists()
    [hidden] = hidden_folders(root)
    assert hidden.parent == root
    assert hidden.name.endswith("-new")
    assert sorted(p.name for p in hidden.rglob("*.lab")) == ["a.lab", "b.lab", "c.lab"]
    hidden_inode = hidden.stat().st_ino

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied"] * 3
    assert tree(root) == {"new/a.lab": b"a", "new/deep/er/b.lab": b"b", "new/c.lab": b"c"}
    assert hidden_folders(root) == []
    assert (root / "new").stat().st_ino == hidden_inode  # moved in whole, in one step
    for incoming in batch:
        # What the index records is what the target is: same inode, times kept.
        assert incoming.finished_info is not None
        found = os.lstat(incoming.target)
        assert found.st_ino == incoming.finished_info.st_ino
        assert found.st_mtime_ns == MTIME_NS


def test_files_below_an_existing_folder_go_to_the_topmost_missing_one(root: Path) -> None:
    (root / "old").mkdir()
    (root / "old" / "keep.lab").write_bytes(b"keep")
    applier = make_applier(root)
    batch = [write(applier, "old/new/x.lab", b"x"), write(applier, "old/y.lab", b"y")]

    [hidden] = hidden_folders(root)
    assert hidden.parent == root / "old"
    # A file of an existing folder is written beside its target, as ever.
    assert len([p for p in (root / "old").iterdir() if p.name.startswith(TEMP_PREFIX)]) == 1

    assert [o.status for o in applier.commit(batch)] == ["applied", "applied"]
    assert tree(root) == {"old/keep.lab": b"keep", "old/new/x.lab": b"x", "old/y.lab": b"y"}
    assert hidden_folders(root) == []


def test_a_large_file_streamed_into_a_new_folder(root: Path) -> None:
    applier = make_applier(root, durable=True)
    data = os.urandom(direct.MIN_SIZE + 12_345)
    batch = [stream(applier, "big/file.bin", data), write(applier, "big/small.lab", b"s")]

    assert not (root / "big").exists()
    assert [o.status for o in applier.commit(batch)] == ["applied", "applied"]
    assert (root / "big" / "file.bin").read_bytes() == data
    assert (root / "big" / "small.lab").read_bytes() == b"s"
    assert hidden_folders(root) == []


def test_a_folder_spread_over_two_batches_arrives_whole(root: Path) -> None:
    # The second batch is received before the first is committed (its flush
    # overlaps), so both write into the same hidden folder.
    applier = make_applier(root)
    first = [write(applier, "new/a.lab", b"a")]
    second = [write(applier, "new/b.lab", b"b"), write(applier, "new/sub/c.lab", b"c")]
    assert len(hidden_folders(root)) == 1

    assert [o.status for o in applier.commit(first)] == ["applied"]
    # The folder is made for the first batch's file; the second's are not visible yet.
    assert tree(root / "new") == {"a.lab": b"a"}
    third = [write(applier, "new/d.lab", b"d")]  # its folder is there now: written beside it

    assert [o.status for o in applier.commit(second)] == ["applied", "applied"]
    assert [o.status for o in applier.commit(third)] == ["applied"]
    assert tree(root) == {
        "new/a.lab": b"a",
        "new/b.lab": b"b",
        "new/sub/c.lab": b"c",
        "new/d.lab": b"d",
    }
    assert hidden_folders(root) == []


def test_a_file_still_arriving_keeps_its_new_folder_hidden_until_it_is_whole(
    root: Path,
) -> None:
    # A large file streams into a new folder while a batch with a small file of
    # the same folder commits: the folder must not appear with half a file in it.
    applier = make_applier(root, durable=True)
    data = os.urandom(direct.MIN_SIZE * 3)
    large = applier.begin(ROOT, "new/large.bin", size=len(data), mtime_ns=MTIME_NS, digest="")
    large.write(data[: direct.MIN_SIZE])
    small = [write(applier, "new/small.lab", b"s")]

    assert [o.status for o in applier.commit(small)] == ["applied"]
    assert tree(root / "new") == {"small.lab": b"s"}

    large.write(data[direct.MIN_SIZE :])
    large.expect(digest_of(data))
    large.finish()
    large.guard(None)
    assert [o.status for o in applier.commit([large])] == ["applied"]
    assert tree(root / "new") == {"small.lab": b"s", "large.bin": data}
    assert hidden_folders(root) == []


def test_a_folder_made_here_meanwhile_keeps_its_files_and_gets_the_new_ones(root: Path) -> None:
    applier = make_applier(root)
    batch = [write(applier, "new/a.lab", b"theirs"), write(applier, "new/b.lab", b"b")]
    # A local program makes the folder, with a file of the same name, before the commit.
    (root / "new").mkdir()
    (root / "new" / "a.lab").write_bytes(b"mine")
    (root / "new" / "local.txt").write_bytes(b"local")

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied", "applied"]
    assert tree(root / "new") == {"a.lab": b"theirs", "b.lab": b"b", "local.txt": b"local"}
    # The local version of a.lab is not lost: it is kept as a conflict.
    assert outcomes[0].kept is not None
    assert outcomes[0].kept.read_bytes() == b"mine"
    assert hidden_folders(root) == []


def test_a_file_in_the_way_of_the_new_folder_retries_its_files(root: Path) -> None:
    applier = make_applier(root)
    batch = [write(applier, "new/a.lab", b"a")]
    (root / "new").write_bytes(b"a file where the folder goes")

    [outcome] = applier.commit(batch)

    assert outcome.status == "retry"
    assert "in the way" in outcome.reason
    assert (root / "new").read_bytes() == b"a file where the folder goes"
    assert hidden_folders(root) == []


def test_the_same_file_twice_in_a_new_folder_the_last_one_wins(root: Path) -> None:
    applier = make_applier(root)
    batch = [write(applier, "new/a.lab", b"one"), write(applier, "new/a.lab", b"two")]

    outcomes = applier.commit(batch)

    assert [(o.status, o.kept) for o in outcomes] == [("applied", None), ("applied", None)]
    assert tree(root) == {"new/a.lab": b"two"}
    assert hidden_folders(root) == []


def test_the_new_folders_parent_swapped_for_a_link_writes_nothing_outside(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "sub").mkdir()
    applier = make_applier(root)
    batch = [write(applier, "sub/new/a.lab", b"a")]
    (root / "sub").rename(root / "moved")
    (root / "sub").symlink_to(outside)

    [outcome] = applier.commit(batch)

    assert outcome.status == "refused"
    assert "symbolic link" in outcome.reason
    assert list(outside.iterdir()) == []
    assert not (root / "moved" / "new").exists()


def test_a_flush_failure_retries_that_file_and_moves_the_rest(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applier = make_applier(root, durable=True)
    batch = [write(applier, "new/a.lab", b"a"), write(applier, "new/b.lab", b"b")]

    def flush_all_but_b(paths: list[str]) -> list[str | None]:
        return ["disk error" if p.endswith("b.lab") else None for p in paths]

    monkeypatch.setattr(apply, "_flush_files", flush_all_but_b)
    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied", "retry"]
    assert tree(root) == {"new/a.lab": b"a"}
    assert hidden_folders(root) == []


def test_a_batch_flushes_while_the_batch_before_it_in_the_same_new_folder_commits(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver flushes a batch while it renames the one before: the files of
    # the second, in a new folder the first also writes to, must stay where the
    # flush finds them while the first moves out of their hidden folder.
    applier = make_applier(root, durable=True)
    first = [write(applier, f"new/a{i}.lab", b"a%d" % i) for i in range(5)]
    first_flushed = applier.flush(first)
    second = [write(applier, f"new/b{i}.lab", b"b%d" % i) for i in range(5)]
    second += [write(applier, f"other/c{i}.lab", b"c%d" % i) for i in range(3)]
    real_flush = apply._flush_files
    committing, committed = threading.Event(), threading.Event()

    def flush_once_the_first_is_committed(paths: list[str]) -> list[str | None]:
        committing.set()
        assert committed.wait(10)
        return real_flush(paths)

    monkeypatch.setattr(apply, "_flush_files", flush_once_the_first_is_committed)
    answer: list[list[str | None]] = []
    worker = threading.Thread(target=lambda: answer.append(applier.flush(second)))
    worker.start()
    try:
        assert committing.wait(10)  # the second batch's flush is under way
        outcomes = applier.commit(first, flushed=first_flushed)
    finally:
        committed.set()
        worker.join(10)

    assert [o.status for o in outcomes] == ["applied"] * 5
    visible = {k: v for k, v in tree(root).items() if not k.startswith(STAGING_PREFIX)}
    assert visible == {f"new/a{i}.lab": b"a%d" % i for i in range(5)}  # not the second yet
    assert answer == [[None] * 8]  # every file of the second was where it was written
    assert [o.status for o in applier.commit(second, flushed=answer[0])] == ["applied"] * 8
    assert tree(root) == (
        {f"new/a{i}.lab": b"a%d" % i for i in range(5)}
        | {f"new/b{i}.lab": b"b%d" % i for i in range(5)}
        | {f"other/c{i}.lab": b"c%d" % i for i in range(3)}
    )
    assert hidden_folders(root) == []


def test_a_durable_commit_flushes_every_folder_the_new_one_brings(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[Path] = []

    def flush_folder(folder: Path, *, drive: bool = True) -> None:
        flushed.append(folder)  # (Windows has nothing to flush: sbs_core.durable)

    monkeypatch.setattr(durable, "flush_folder", flush_folder)
    applier = make_applier(root, durable=True)
    batch = [write(applier, "new/deep/a.lab", b"a")]

    applier.commit(batch)

    # The new folder's name in the root, and every name below it.
    assert set(flushed) == {root, root / "new", root / "new" / "deep"}


def test_abort_all_leaves_neither_files_nor_hidden_folders(root: Path) -> None:
    applier = make_applier(root)
    whole = write(applier, "new/a.lab", b"a")
    half = applier.begin(ROOT, "new/sub/b.lab", size=10, mtime_ns=MTIME_NS, digest="")
    half.write(b"half")

    assert applier.abort_all() == 2

    assert list(root.iterdir()) == []
    assert not whole.pending


def test_the_applier_writes_into_an_aborted_new_folder_again(root: Path) -> None:
    applier = make_applier(root)
    write(applier, "new/a.lab", b"a")
    applier.abort_all()

    again = write(applier, "new/b.lab", b"b")

    assert [o.status for o in applier.commit([again])] == ["applied"]
    assert tree(root) == {"new/b.lab": b"b"}


def test_cleanup_removes_a_crashed_hidden_folder_but_not_one_in_use(root: Path) -> None:
    crashed = root / "old" / f"{STAGING_PREFIX}0123-gone"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "a.lab").write_bytes(b"a")
    (crashed / "sub" / "b.lab").write_bytes(b"b")
    (root / "old" / "keep.lab").write_bytes(b"keep")
    applier = make_applier(root)
    busy = [write(applier, "new/c.lab", b"c")]

    assert applier.cleanup_temp_files() == 2

    assert not crashed.exists()
    assert (root / "old" / "keep.lab").read_bytes() == b"keep"
    assert [o.status for o in applier.commit(busy)] == ["applied"]
    assert tree(root) == {"old/keep.lab": b"keep", "new/c.lab": b"c"}


def test_a_hidden_folder_is_not_scanned_nor_named_by_the_peer(root: Path) -> None:
    (root / f"{STAGING_PREFIX}0123-new").mkdir()
    (root / f"{STAGING_PREFIX}0123-new" / "a.lab").write_bytes(b"half")
    (root / "b.lab").write_bytes(b"b")

    assert sorted(scan_root(root, "*").files) == ["b.lab"]
    with pytest.raises(UnsafePathError, match="still filling"):
        check_wire_path(f"d/{STAGING_PREFIX}x/a.lab")
    with pytest.raises(UnsafePathError, match="still filling"):
        check_wire_path(f"{STAGING_PREFIX}x")
    assert check_wire_path(f"d/x{STAGING_PREFIX}y/a.lab").name == "a.lab"
