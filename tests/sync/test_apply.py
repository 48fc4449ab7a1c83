"""The receiving side of replication, on real files: atomic, checked, durable, contained."""

from __future__ import annotations

import errno
import gc
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbs_core.errors import LocalProtocolError, RemoteProtocolError, SbsError
from sbs_core.sync import apply
from sbs_core.sync.apply import (
    DEFAULT_MAX_DELETE_COUNT,
    DEFAULT_MAX_DELETE_SHARE,
    Applier,
    Incoming,
    IntegrityError,
    Outcome,
    deletion_allowed,
)
from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX, UnsafePathError
from sbs_core.sync.scan import new_hasher

MTIME_NS = 1_600_000_000_123_456_789
ROOT_ID = "folder:labels|*.lab"


def digest_of(data: bytes) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


@dataclass
class Site:
    """A sandbox folder holding one root (not created yet) and the conflicts folder."""

    sandbox: Path
    root: Path
    conflicts: Path

    def applier(self, *, preserve_timestamps: bool = True, durable: bool = False) -> Applier:
        return Applier(
            {ROOT_ID: self.root, "settings": self.sandbox / "settings"},
            conflicts_dir=self.conflicts,
            preserve_timestamps=preserve_timestamps,
            durable=durable,
        )

    def listing(self) -> set[str]:
        return {p.relative_to(self.sandbox).as_posix() for p in self.sandbox.rglob("*")}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    return Site(sandbox=sandbox, root=sandbox / "root", conflicts=tmp_path / "conflicts")


def receive(
    applier: Applier,
    path: str,
    data: bytes,
    *,
    root_id: str = ROOT_ID,
    mtime_ns: int = MTIME_NS,
    digest: str | None = None,
    chunk: int = 4096,
) -> Incoming:
    incoming = applier.begin(
        root_id,
        path,
        size=len(data),
        mtime_ns=mtime_ns,
        digest=digest_of(data) if digest is None else digest,
    )
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        incoming.write(view[start : start + chunk])
    incoming.finish()
    return incoming


def temp_files(folder: Path) -> list[Path]:
    """sbs's files in progress: temporary ones, and any file in a new folder's hidden one."""
    return [
        p
        for p in folder.rglob("*")
        if p.name.startswith(TEMP_PREFIX)
        or (p.is_file() and any(part.startswith(STAGING_PREFIX) for part in p.parts))
    ]


def symlink_or_skip(link: Path, target: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError as exc:  # Windows without the privilege
        pytest.skip(f"cannot create a symbolic link here: {exc}")


@dataclass
class SyncCounts:
    syncfs: int = 0
    file_fsyncs: int = 0
    folder_fsyncs: int = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> SyncCounts:
    """Counts the flushes apply makes, still doing them for real."""
    found = SyncCounts()
    real_fsync = os.fsync
    real_syncfs = apply._SYNCFS
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        with lock:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                found.folder_fsyncs += 1
            else:
                found.file_fsyncs += 1
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        found.syncfs += 1
        assert real_syncfs is not None
        return real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if real_syncfs is not None:
        monkeypatch.setattr(apply, "_SYNCFS", syncfs)
    return found


# --- receiving and committing ------------------------------------------------------------


def test_round_trip_keeps_content_and_exact_mtime(site: Site) -> None:
    applier = site.applier(durable=True)
    data = os.urandom(300_000)
    incoming = receive(applier, "sub/dir/file.lab", data, chunk=65_536)
    assert incoming.written == len(data)

    outcomes = applier.commit([incoming])

    assert outcomes == [Outcome(ROOT_ID, "sub/dir/file.lab", "applied")]
    target = site.root / "sub" / "dir" / "file.lab"
    assert target.read_bytes() == data
    assert target.stat().st_mtime_ns == MTIME_NS
    assert incoming.target == target.resolve()
    assert temp_files(site.sandbox) == []


def test_without_preserve_timestamps_the_file_has_its_copy_time(site: Site) -> None:
    applier = site.applier(preserve_timestamps=False)
    before = time.time_ns()
    applier.commit([receive(applier, "a.lab", b"hello")])
    mtime = (site.root / "a.lab").stat().st_mtime_ns
    assert mtime != MTIME_NS
    assert mtime >= before - 2_000_000_000  # coarse filesystem clocks


def test_an_empty_file_round_trips(site: Site) -> None:
    applier = site.applier()
    assert applier.commit([receive(applier, "empty.lab", b"")])[0].status == "applied"
    assert (site.root / "empty.lab").read_bytes() == b""


def test_the_digest_may_arrive_after_the_data(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(ROOT_ID, "late.lab", size=3, mtime_ns=MTIME_NS, digest="")
    incoming.write(b"abc")
    incoming.expect(digest_of(b"abc").upper())
    incoming.finish()
    assert applier.commit([incoming])[0].status == "applied"
    assert (site.root / "late.lab").read_bytes() == b"abc"


def test_finish_without_any_digest_is_a_local_error(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(ROOT_ID, "x.lab", size=1, mtime_ns=MTIME_NS, digest="")
    incoming.write(b"x")
    with pytest.raises(LocalProtocolError):
        incoming.finish()
    assert temp_files(site.sandbox) == []


def test_a_wrong_digest_changes_nothing(site: Site) -> None:
    site.root.mkdir()
    target = site.root / "doc.lab"
    target.write_bytes(b"old content")
    applier = site.applier()

    with pytest.raises(IntegrityError, match="content hash") as caught:
        receive(applier, "doc.lab", b"new content", digest=digest_of(b"something else"))

    assert isinstance(caught.value, SbsError)
    assert isinstance(caught.value, ValueError)
    assert target.read_bytes() == b"old content"
    assert temp_files(site.sandbox) == []


def test_fewer_bytes_than_announced_are_refused(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(
        ROOT_ID, "short.lab", size=10, mtime_ns=MTIME_NS, digest=digest_of(b"12345")
    )
    incoming.write(b"12345")
    with pytest.raises(IntegrityError, match="announced 10"):
        incoming.finish()
    assert not (site.root / "short.lab").exists()
    assert temp_files(site.sandbox) == []


def test_more_bytes_than_announced_are_refused(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(ROOT_ID, "big.lab", size=4, mtime_ns=MTIME_NS, digest=digest_of(b"1"))
    incoming.write(b"123")
    with pytest.raises(IntegrityError, match="more than the announced 4 bytes"):
        incoming.write(b"45")
    assert temp_files(site.sandbox) == []
    with pytest.raises(LocalProtocolError):
        incoming.write(b"4")
    incoming.abort()  # idempotent
    incoming.abort()


def test_abort_removes_the_temporary_file_and_is_idempotent(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(ROOT_ID, "a.lab", size=3, mtime_ns=MTIME_NS, digest="")
    incoming.write(b"ab")
    assert incoming.temp_path.exists()
    assert incoming.temp_path.parent == incoming.target.parent
    assert incoming.temp_path.name.startswith(TEMP_PREFIX)
    assert incoming.temp_path.name.endswith("a.lab")
    incoming.abort()
    incoming.abort()
    assert temp_files(site.sandbox) == []
    assert not (site.root / "a.lab").exists()


def test_a_dropped_incoming_removes_its_temporary_file(site: Site) -> None:
    applier = site.applier()
    incoming = applier.begin(ROOT_ID, "a.lab", size=3, mtime_ns=MTIME_NS, digest="")
    incoming.write(b"ab")
    temp = incoming.temp_path
    del incoming
    gc.collect()
    assert not temp.exists()


def test_abort_all_ends_every_pending_transfer_and_keeps_what_was_applied(site: Site) -> None:
    # A session cut short: one file applied, one half received, one received
    # but not committed. Only the applied one stays; no temporary file does.
    applier = site.applier()
    assert applier.commit([receive(applier, "done.lab", b"done")])[0].status == "applied"
    open_one = applier.begin(ROOT_ID, "half.lab", size=4, mtime_ns=MTIME_NS, digest="")
    open_one.write(b"ha")
    finished = receive(applier, "sub/finished.lab", b"whole")
    assert len(temp_files(site.sandbox)) == 2
    assert applier.abort_all() == 2
    assert temp_files(site.sandbox) == []
    assert (site.root / "done.lab").read_bytes() == b"done"
    assert not (site.root / "half.lab").exists()
    assert not (site.root / "sub" / "finished.lab").exists()
    assert not finished.pending
    assert applier.abort_all() == 0


def test_a_long_name_still_gets_a_temporary_file(site: Site) -> None:
    applier = site.applier()
    name = "\u00e9" * 125 + ".lab"  # 254 bytes in UTF-8, near the limit of one name
    assert applier.commit([receive(applier, name, b"x")])[0].status == "applied"
    assert (site.root / name).read_bytes() == b"x"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_replaced_file_keeps_its_permissions(site: Site) -> None:
    site.root.mkdir()
    target = site.root / "secret.lab"
    target.write_bytes(b"old")
    target.chmod(0o600)
    applier = site.applier()
    applier.commit([receive(applier, "secret.lab", b"new")])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == b"new"


@pytest.fixture
def as_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening an existing file that has no write permission for writing fails.

    As it does for every user but root, who may write anything (and may run these
    tests). Creating a new file is still allowed, whatever its mode.
    """
    real_open = os.open

    def open_as_a_user(
        path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_EXCL:
            try:
                info = os.stat(path, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            else:
                if not info.st_mode & stat.S_IWUSR:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_as_a_user)


def read_only_file(site: Site, data: bytes) -> Path:
    site.root.mkdir()
    path = site.root / "fixed.lab"
    path.write_bytes(data)
    path.chmod(0o444)
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_read_only_file_is_replaced_and_flushed_without_being_opened_to_write(
    site: Site, as_a_user: None
) -> None:
    # The new copy has the old one's permissions before its flush: a flush that
    # opened it to write failed, and the file was retried at every cycle.
    target = read_only_file(site, b"old")
    applier = site.applier(durable=True)

    [outcome] = applier.commit([receive(applier, "fixed.lab", b"new")])

    assert (outcome.status, outcome.reason) == ("applied", "")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_read_only_file_kept_as_a_conflict_is_flushed_without_being_opened_to_write(
    site: Site, as_a_user: None
) -> None:
    read_only_file(site, b"edited on this node")
    applier = site.applier(durable=True)

    kept = applier.keep_conflict(ROOT_ID, "fixed.lab", reason="changed on both nodes")

    assert kept is not None
    assert kept.read_bytes() == b"edited on this node"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o444


# --- small files held whole in memory ----------------------------------------------------


def test_a_file_written_whole_round_trips_and_replaces_keeping_permissions(site: Site) -> None:
    site.root.mkdir()
    kept = site.root / "secret.lab"
    kept.write_bytes(b"old")
    kept.chmod(0o600)
    applier = site.applier(durable=True)
    files = {"secret.lab": b"new", "sub/dir/a.lab": os.urandom(5000), "empty.lab": b""}
    batch = [
        applier.write_whole(
            ROOT_ID, path, memoryview(data), mtime_ns=MTIME_NS, digest=digest_of(data)
        )
        for path, data in files.items()
    ]
    assert [i.written for i in batch] == [len(d) for d in files.values()]

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied"] * 3
    for path, data in files.items():
        assert (site.root / path).read_bytes() == data
        assert (site.root / path).stat().st_mtime_ns == MTIME_NS
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert temp_files(site.sandbox) == []


def test_a_file_written_whole_without_preserve_timestamps_has_its_copy_time(site: Site) -> None:
    applier = site.applier(preserve_timestamps=False)
    before = time.time_ns()
    data = memoryview(b"hello")
    applier.commit(
        [applier.write_whole(ROOT_ID, "a.lab", data, mtime_ns=MTIME_NS, digest=digest_of(b"hello"))]
    )
    assert (site.root / "a.lab").stat().st_mtime_ns >= before - 2_000_000_000


def test_a_whole_file_with_a_wrong_digest_creates_nothing(site: Site) -> None:
    applier = site.applier()
    before = site.listing()
    with pytest.raises(IntegrityError, match="content hash"):
        applier.write_whole(
            ROOT_ID, "sub/a.lab", memoryview(b"torn"), mtime_ns=MTIME_NS, digest=digest_of(b"whole")
        )
    assert site.listing() == before  # not even its folder


def test_abort_all_removes_whole_files_not_yet_committed(site: Site) -> None:
    applier = site.applier()
    done = applier.write_whole(
        ROOT_ID, "done.lab", memoryview(b"1"), mtime_ns=0, digest=digest_of(b"1")
    )
    applier.commit([done])
    waiting = applier.write_whole(
        ROOT_ID, "waiting.lab", memoryview(b"2"), mtime_ns=0, digest=digest_of(b"2")
    )
    assert waiting.pending
    assert len(temp_files(site.root)) == 1

    assert applier.abort_all() == 1

    assert temp_files(site.root) == []
    assert (site.root / "done.lab").read_bytes() == b"1"
    assert not (site.root / "waiting.lab").exists()


def test_commit_refuses_a_file_that_is_not_finished(site: Site) -> None:
    applier = site.applier()
    done = receive(applier, "done.lab", b"1")
    still_open = applier.begin(ROOT_ID, "open.lab", size=1, mtime_ns=MTIME_NS, digest="")
    with pytest.raises(LocalProtocolError):
        applier.commit([done, still_open])
    with pytest.raises(LocalProtocolError):
        applier.commit([done, done])
    with pytest.raises(LocalProtocolError):
        site.applier().commit([done])
    assert not (site.root / "done.lab").exists()  # nothing half-applied
    still_open.abort()
    done.abort()
    assert temp_files(site.sandbox) == []


# --- paths from the peer -----------------------------------------------------------------

HOSTILE_PATHS = [
    "../x",
    "/etc/x",
    "a/../../x",
    "C:/x",
    "C:x",
    "CON",
    "con.txt",
    "a\\b",
    "..\\x",
    "",
    ".",
    "a//b",
    TEMP_PREFIX + "planted",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_paths_are_refused_before_anything_is_created(site: Site, path: str) -> None:
    applier = site.applier()
    before = site.listing()

    with pytest.raises(UnsafePathError) as caught:
        applier.begin(ROOT_ID, path, size=1, mtime_ns=MTIME_NS, digest=digest_of(b"x"))
    with pytest.raises(UnsafePathError):
        applier.write_whole(
            ROOT_ID, path, memoryview(b"x"), mtime_ns=MTIME_NS, digest=digest_of(b"x")
        )
    with pytest.raises(UnsafePathError):
        applier.delete(ROOT_ID, path)
    with pytest.raises(UnsafePathError):
        applier.keep_conflict(ROOT_ID, path, reason="test")

    assert isinstance(caught.value, RemoteProtocolError)
    assert isinstance(caught.value, ValueError)
    assert site.listing() == before
    assert not site.root.exists()
    assert not site.conflicts.exists()


def test_an_unknown_root_is_refused(site: Site) -> None:
    applier = site.applier()
    with pytest.raises(UnsafePathError, match="unknown folder"):
        applier.begin("folder:elsewhere", "a.lab", size=1, mtime_ns=0, digest="")
    with pytest.raises(UnsafePathError):
        applier.delete("folder:elsewhere", "a.lab")
    assert site.listing() == set()


def test_a_symlinked_folder_pointing_outside_is_never_written_through(site: Site) -> None:
    outside = site.sandbox / "outside"
    outside.mkdir()
    (outside / "victim.lab").write_bytes(b"precious")
    site.root.mkdir()
    symlink_or_skip(site.root / "link", outside)
    applier = site.applier()
    before = site.listing()

    for path in ("link/x.lab", "link/sub/x.lab", "link/victim.lab"):
        with pytest.raises(UnsafePathError, match="symbolic link"):
            applier.begin(ROOT_ID, path, size=1, mtime_ns=MTIME_NS, digest=digest_of(b"x"))
    with pytest.raises(UnsafePathError):
        applier.delete(ROOT_ID, "link/victim.lab")
    with pytest.raises(UnsafePathError):
        applier.keep_conflict(ROOT_ID, "link/victim.lab", reason="test")

    assert site.listing() == before
    assert sorted(p.name for p in outside.iterdir()) == ["victim.lab"]
    assert (outside / "victim.lab").read_bytes() == b"precious"


def test_a_folder_swapped_for_a_link_after_begin_is_refused_at_commit(site: Site) -> None:
    outside = site.sandbox / "outside"
    outside.mkdir()
    for folder in ("sub", "other"):  # there before: the files are written in them
        (site.root / folder).mkdir(parents=True)
    applier = site.applier()
    inside = receive(applier, "sub/x.lab", b"x")
    away = receive(applier, "other/y.lab", b"y")
    # Each temporary file moves with its folder; the links lead back to it, or outside.
    (site.root / "sub").rename(site.root / "moved")
    symlink_or_skip(site.root / "sub", site.root / "moved")
    (site.root / "other").rename(site.root / "gone")
    symlink_or_skip(site.root / "other", outside)

    outcomes = applier.commit([inside, away])

    for refused in outcomes:
        assert refused.status == "refused"
        assert "symbolic link" in refused.reason
    assert list(outside.iterdir()) == []
    assert not (site.root / "moved" / "x.lab").exists()
    assert temp_files(site.root / "moved") == []
    # The other temporary file was out of reach behind the link: cleanup finds it later.
    assert applier.cleanup_temp_files() == 1


def test_a_file_in_the_way_of_a_folder_fails_begin(site: Site) -> None:
    site.root.mkdir()
    (site.root / "a").write_bytes(b"a file")
    applier = site.applier()
    with pytest.raises(OSError, match=r"not a folder|in the way") as caught:
        applier.begin(ROOT_ID, "a/b.lab", size=1, mtime_ns=MTIME_NS, digest="")
    # The path is refused as unsafe when the file is seen first, as an OSError otherwise.
    assert isinstance(caught.value, OSError | UnsafePathError)
    assert (site.root / "a").read_bytes() == b"a file"


# --- atomicity and batching --------------------------------------------------------------


def test_readers_only_ever_see_a_whole_old_or_new_file(site: Site) -> None:
    versions = (b"A" * 200_000, b"B" * 350_000)
    applier = site.applier()
    applier.commit([receive(applier, "hot.lab", versions[0], chunk=65_536)])
    target = site.root / "hot.lab"
    stop = threading.Event()
    seen: dict[bytes, int] = {}
    torn: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data in versions:
                seen[data[:1]] = seen.get(data[:1], 0) + 1
            else:
                torn.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            incoming = receive(applier, "hot.lab", versions[i % 2], chunk=65_536)
            assert applier.commit([incoming])[0].status == "applied"
    finally:
        stop.set()
        thread.join()

    assert torn == []
    assert sum(seen.values()) > 0
    assert temp_files(site.sandbox) == []


@pytest.mark.skipif(apply._SYNCFS is None, reason="syncfs is Linux only")
def test_a_batch_of_1000_files_costs_one_syncfs(site: Site, counts: SyncCounts) -> None:
    applier = site.applier(durable=True)
    contents = {f"d{i % 10}/f{i}.lab": f"file {i}\n".encode() for i in range(1000)}
    batch = [receive(applier, path, data) for path, data in contents.items()]
    assert counts == SyncCounts()  # nothing is flushed before the commit

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied"] * 1000
    for path, data in contents.items():
        assert (site.root / path).read_bytes() == data
    assert counts.syncfs == 1
    assert counts.file_fsyncs == 0
    # The 10 folders of the files, plus the root and the sandbox that gained a new folder.
    assert counts.folder_fsyncs == 12


@pytest.mark.skipif(apply._SYNCFS is None, reason="syncfs is Linux only")
def test_a_small_batch_is_flushed_file_by_file_not_with_syncfs(
    site: Site, counts: SyncCounts
) -> None:
    # syncfs would also wait for every other program's unwritten data there.
    site.root.mkdir()
    applier = site.applier(durable=True)
    small = [receive(applier, f"f{i}.lab", b"%d" % i) for i in range(10)]

    assert [o.status for o in applier.commit(small)] == ["applied"] * 10
    assert (counts.syncfs, counts.file_fsyncs, counts.folder_fsyncs) == (0, 10, 1)

    larger = [receive(applier, f"g{i}.lab", b"x") for i in range(apply.FLUSH_EACH_MAX + 1)]
    assert {o.status for o in applier.commit(larger)} == {"applied"}
    assert (counts.syncfs, counts.file_fsyncs) == (1, 10)
    assert {p.name for p in site.root.iterdir()} == {f"f{i}.lab" for i in range(10)} | {
        f"g{i}.lab" for i in range(apply.FLUSH_EACH_MAX + 1)
    }


def test_without_syncfs_every_file_is_fsynced(
    site: Site, counts: SyncCounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply, "_SYNCFS", None)
    site.root.mkdir()
    applier = site.applier(durable=True)
    batch = [receive(applier, f"f{i}.lab", b"%d" % i) for i in range(40)]

    assert [o.status for o in applier.commit(batch)] == ["applied"] * 40
    assert counts.file_fsyncs == 40
    assert counts.folder_fsyncs == 1


def test_not_durable_never_flushes(site: Site, counts: SyncCounts) -> None:
    applier = site.applier(durable=False)
    applier.commit([receive(applier, f"f{i}.lab", b"x") for i in range(10)])
    applier.delete(ROOT_ID, "f0.lab")
    assert counts == SyncCounts()


def test_a_failed_syncfs_applies_nothing_and_asks_for_a_retry(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply, "_SYNCFS", lambda fd: -1)
    monkeypatch.setattr(apply, "FLUSH_EACH_MAX", 0)  # syncfs even for three files
    applier = site.applier(durable=True)
    batch = [receive(applier, f"f{i}.lab", b"x") for i in range(3)]

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["retry"] * 3
    assert all("syncfs failed" in o.reason for o in outcomes)
    assert sorted(p.name for p in site.root.iterdir()) == []


def test_a_batch_flushed_in_another_thread_commits_while_the_next_is_written(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver flushes one batch while it writes the next: the flush must
    # not hold up the writing, and its answer is what commit then uses.
    real_flush = apply._flush_files
    flushing, release = threading.Event(), threading.Event()
    flushed_paths: list[str] = []

    def slow_flush(paths: list[str]) -> list[str | None]:
        flushed_paths.extend(paths)
        flushing.set()
        assert release.wait(10)
        return real_flush(paths)

    monkeypatch.setattr(apply, "_flush_files", slow_flush)
    applier = site.applier(durable=True)
    first = [receive(applier, f"one/f{i}.lab", b"1%d" % i) for i in range(20)]
    answer: list[list[str | None]] = []
    worker = threading.Thread(target=lambda: answer.append(applier.flush(first)))
    worker.start()
    try:
        assert flushing.wait(10)
        second = [receive(applier, f"two/f{i}.lab", b"2%d" % i) for i in range(20)]
        assert worker.is_alive()  # written while the flush was still going on
    finally:
        release.set()
        worker.join(10)

    assert answer == [[None] * 20]
    assert sorted(flushed_paths) == sorted(i.temp_path.as_posix() for i in first)
    assert [o.status for o in applier.commit(first, flushed=answer[0])] == ["applied"] * 20
    assert [o.status for o in applier.commit(second)] == ["applied"] * 20
    assert len(flushed_paths) == 40  # the first batch was not flushed twice
    assert (site.root / "one" / "f3.lab").read_bytes() == b"13"
    assert (site.root / "two" / "f3.lab").read_bytes() == b"23"
    assert temp_files(site.sandbox) == []


def test_a_file_whose_flush_failed_is_retried_and_the_rest_applies(site: Site) -> None:
    applier = site.applier(durable=True)
    batch = [receive(applier, f"f{i}.lab", b"x") for i in range(3)]

    outcomes = applier.commit(batch, flushed=[None, "cannot flush the file: EIO", None])

    assert [o.status for o in outcomes] == ["applied", "retry", "applied"]
    assert outcomes[1].reason == "cannot flush the file: EIO"
    assert sorted(p.name for p in site.root.iterdir()) == ["f0.lab", "f2.lab"]
    assert temp_files(site.sandbox) == []
    with pytest.raises(LocalProtocolError):  # answers for another batch
        applier.commit([receive(applier, "g.lab", b"y")], flushed=[None, None])
    assert not (site.root / "g.lab").exists()


def test_a_folder_in_the_way_is_retried_and_the_rest_applies(site: Site) -> None:
    (site.root / "b.lab").mkdir(parents=True)
    (site.root / "b.lab" / "inside").write_bytes(b"keep me")
    applier = site.applier()
    batch = [receive(applier, name, name.encode()) for name in ("a.lab", "b.lab", "c.lab")]

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied", "retry", "applied"]
    assert outcomes[1] == Outcome(ROOT_ID, "b.lab", "retry", "a folder is in the way")
    assert (site.root / "a.lab").read_bytes() == b"a.lab"
    assert (site.root / "c.lab").read_bytes() == b"c.lab"
    assert (site.root / "b.lab" / "inside").read_bytes() == b"keep me"
    assert temp_files(site.sandbox) == []


def test_a_locked_file_is_retried_and_the_rest_applies(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == "locked.lab":  # what Windows does while another program has it open
            raise PermissionError(13, "The process cannot access the file", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    applier = site.applier()
    batch = [receive(applier, name, b"new") for name in ("locked.lab", "free.lab")]

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["retry", "applied"]
    assert "cannot access" in outcomes[0].reason
    assert not (site.root / "locked.lab").exists()
    assert temp_files(site.sandbox) == []


def test_the_last_of_two_files_for_one_target_wins(site: Site) -> None:
    applier = site.applier()
    batch = [receive(applier, "same.lab", b"first"), receive(applier, "same.lab", b"second")]
    assert [o.status for o in applier.commit(batch)] == ["applied", "applied"]
    assert (site.root / "same.lab").read_bytes() == b"second"


# --- deleting ----------------------------------------------------------------------------


def test_delete_removes_a_regular_file_and_keeps_its_folder(site: Site) -> None:
    (site.root / "sub").mkdir(parents=True)
    (site.root / "sub" / "a.lab").write_bytes(b"x")
    applier = site.applier()
    assert applier.delete(ROOT_ID, "sub/a.lab") == Outcome(ROOT_ID, "sub/a.lab", "applied")
    assert not (site.root / "sub" / "a.lab").exists()
    assert (site.root / "sub").is_dir()


def test_deleting_a_missing_file_counts_as_applied(site: Site) -> None:
    applier = site.applier()
    assert applier.delete(ROOT_ID, "never/was.lab").status == "applied"
    assert site.listing() == set()


def test_a_folder_is_never_deleted(site: Site) -> None:
    (site.root / "folder.lab").mkdir(parents=True)
    (site.root / "folder.lab" / "inside").write_bytes(b"x")
    outcome = site.applier().delete(ROOT_ID, "folder.lab")
    assert outcome.status == "refused"
    assert "folder" in outcome.reason
    assert (site.root / "folder.lab" / "inside").exists()


def test_a_symlink_is_never_deleted_nor_followed(site: Site) -> None:
    outside = site.sandbox / "outside.lab"
    outside.write_bytes(b"precious")
    site.root.mkdir()
    symlink_or_skip(site.root / "link.lab", outside)
    outcome = site.applier().delete(ROOT_ID, "link.lab")
    assert outcome.status == "refused"
    assert "symbolic link" in outcome.reason
    assert (site.root / "link.lab").is_symlink()
    assert outside.read_bytes() == b"precious"


def test_delete_many_flushes_each_folder_once(site: Site, counts: SyncCounts) -> None:
    for i in range(20):
        (site.root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (site.root / f"d{i % 2}" / f"f{i}.lab").write_bytes(b"x")
    applier = site.applier(durable=True)
    paths = [f"d{i % 2}/f{i}.lab" for i in range(20)] + ["missing.lab"]

    outcomes = applier.delete_many(ROOT_ID, paths)

    assert [o.status for o in outcomes] == ["applied"] * 21
    assert counts.folder_fsyncs == 2
    assert counts.file_fsyncs == 0


def test_delete_many_checks_every_path_before_deleting(site: Site) -> None:
    site.root.mkdir()
    (site.root / "a.lab").write_bytes(b"x")
    with pytest.raises(UnsafePathError):
        site.applier().delete_many(ROOT_ID, ["a.lab", "../b.lab"])
    assert (site.root / "a.lab").exists()


# --- conflicts ---------------------------------------------------------------------------


def test_keep_conflict_copies_the_local_file_outside_the_roots(site: Site) -> None:
    (site.root / "sub").mkdir(parents=True)
    local = site.root / "sub" / "mine.lab"
    local.write_bytes(b"edited on this node")
    os.utime(local, ns=(MTIME_NS, MTIME_NS))
    applier = site.applier(durable=True)

    kept = applier.keep_conflict(ROOT_ID, "sub/mine.lab", reason="changed on both nodes")

    assert kept is not None
    assert kept.read_bytes() == b"edited on this node"
    assert kept.stat().st_mtime_ns == MTIME_NS
    assert site.conflicts in kept.parents
    assert site.root not in kept.resolve().parents
    stamp_folder = kept.parents[2]
    assert stamp_folder.parent == site.conflicts
    assert kept.relative_to(stamp_folder).parts[1:] == ("sub", "mine.lab")
    details = json.loads((stamp_folder / "conflict.json").read_text(encoding="utf-8"))
    assert details["reason"] == "changed on both nodes"
    assert details["root"] == ROOT_ID
    assert details["path"] == "sub/mine.lab"
    assert details["mtime_ns"] == MTIME_NS
    assert stamp_folder / details["kept"] == kept
    assert "changed on both nodes" in (stamp_folder / "README.txt").read_text(encoding="utf-8")
    assert local.read_bytes() == b"edited on this node"  # a copy, not a move


def test_keep_conflict_twice_keeps_two_copies(site: Site) -> None:
    site.root.mkdir()
    (site.root / "a.lab").write_bytes(b"one")
    applier = site.applier()
    first = applier.keep_conflict(ROOT_ID, "a.lab", reason="r")
    (site.root / "a.lab").write_bytes(b"two")
    second = applier.keep_conflict(ROOT_ID, "a.lab", reason="r")
    assert first is not None
    assert second is not None
    assert first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")


def test_keep_conflict_without_a_local_file_keeps_nothing(site: Site) -> None:
    (site.root / "folder.lab").mkdir(parents=True)
    applier = site.applier()
    assert applier.keep_conflict(ROOT_ID, "missing.lab", reason="r") is None
    assert applier.keep_conflict(ROOT_ID, "folder.lab", reason="r") is None
    assert not site.conflicts.exists()


def test_the_conflicts_folder_must_be_outside_every_root(site: Site) -> None:
    with pytest.raises(ValueError, match="overlaps"):
        Applier({"settings": site.root}, conflicts_dir=site.root / "c", preserve_timestamps=True)
    with pytest.raises(ValueError, match="overlaps"):
        Applier({"settings": site.root}, conflicts_dir=site.sandbox, preserve_timestamps=True)


# --- leftovers of a crash ----------------------------------------------------------------


def test_cleanup_removes_leftover_temporary_files_only(site: Site) -> None:
    (site.root / "sub").mkdir(parents=True)
    planted = [site.root / f"{TEMP_PREFIX}0123-a.lab", site.root / "sub" / f"{TEMP_PREFIX}x-b"]
    for path in planted:
        path.write_bytes(b"half a file")
    (site.root / "keep.lab").write_bytes(b"keep")
    (site.root / f"{TEMP_PREFIX}folder").mkdir()
    applier = site.applier()
    in_progress = applier.begin(ROOT_ID, "busy.lab", size=1, mtime_ns=MTIME_NS, digest="")

    assert applier.cleanup_temp_files() == 2

    assert not any(path.exists() for path in planted)
    assert (site.root / "keep.lab").read_bytes() == b"keep"
    assert (site.root / f"{TEMP_PREFIX}folder").is_dir()
    assert in_progress.temp_path.exists()
    in_progress.abort()
    assert applier.cleanup_temp_files() == 0


def test_cleanup_with_no_root_on_disk_finds_nothing(site: Site) -> None:
    assert site.applier().cleanup_temp_files() == 0


# --- strict-sync deletion safety ---------------------------------------------------------


@pytest.mark.parametrize(
    ("complete", "source", "target", "delete", "max_count", "max_share", "allowed"),
    [
        (True, 10, 10, 0, None, 0.5, True),
        (True, 9, 10, 1, None, 0.5, True),
        (True, 5, 10, 5, None, 0.5, True),  # exactly half
        (True, 4, 10, 6, None, 0.5, False),  # more than half
        (True, 4, 10, 6, None, None, True),
        (True, 4, 10, 6, 6, None, True),
        (True, 4, 10, 6, 5, None, False),
        (True, 4, 10, 6, 5, 1.0, False),
        (False, 10, 10, 1, None, None, False),  # incomplete scan, whatever the limits
        (False, 10, 10, 0, None, None, False),
        (True, 0, 10, 10, None, None, False),  # source suddenly empty
        (True, 0, 0, 0, None, 0.5, True),  # both empty
        (True, 3, 1, 1, None, 1.0, True),
    ],
)
def test_deletion_allowed_truth_table(  # noqa: PLR0917 - one row of the table
    complete: bool,
    source: int,
    target: int,
    delete: int,
    max_count: int | None,
    max_share: float | None,
    allowed: bool,
) -> None:
    verdict, reason = deletion_allowed(
        source_complete=complete,
        source_count=source,
        target_count=target,
        to_delete=delete,
        max_delete_count=max_count,
        max_delete_share=max_share,
    )
    assert verdict is allowed
    assert (reason == "") is allowed


def test_deletion_allowed_refuses_nonsense() -> None:
    def call(**changes: object) -> tuple[bool, str]:
        args: dict[str, object] = {
            "source_complete": True,
            "source_count": 1,
            "target_count": 2,
            "to_delete": 1,
            "max_delete_count": None,
            "max_delete_share": None,
        }
        args.update(changes)
        return deletion_allowed(**args)  # type: ignore[arg-type]

    assert call() == (True, "")
    for bad in (
        {"to_delete": 3},
        {"source_count": -1},
        {"max_delete_count": -1},
        {"max_delete_share": float("nan")},
    ):
        with pytest.raises(ValueError, match=r"\w"):
            call(**bad)


def test_recommended_defaults() -> None:
    assert DEFAULT_MAX_DELETE_COUNT is None
    assert DEFAULT_MAX_DELETE_SHARE == 0.5


@st.composite
def deletion_cases(draw: Callable[..., object]) -> dict[str, object]:
    target = draw(st.integers(0, 10_000))
    assert isinstance(target, int)
    return {
        "source_complete": draw(st.booleans()),
        "source_count": draw(st.integers(0, 10_000)),
        "target_count": target,
        "to_delete": draw(st.integers(0, target)),
        "max_delete_count": draw(st.none() | st.integers(0, 10_000)),
        "max_delete_share": draw(st.none() | st.floats(0, 2, allow_nan=False)),
    }


@given(deletion_cases())
def test_deletion_is_never_allowed_from_an_incomplete_or_emptied_source(
    case: dict[str, object],
) -> None:
    allowed, reason = deletion_allowed(**case)  # type: ignore[arg-type]
    source_complete = case["source_complete"]
    source_count, target_count = case["source_count"], case["target_count"]
    to_delete = case["to_delete"]
    max_count, max_share = case["max_delete_count"], case["max_delete_share"]
    assert isinstance(target_count, int)
    assert isinstance(to_delete, int)
    if not source_complete or (source_count == 0 and target_count > 0):
        assert not allowed
    if allowed:
        assert reason == ""
        assert max_count is None or (isinstance(max_count, int) and to_delete <= max_count)
        assert max_share is None or (
            isinstance(max_share, float) and to_delete <= max_share * target_count
        )
    else:
        assert reason


# --- guarded replacement: a change made here meanwhile is kept ------------------------------


@pytest.fixture(params=["atomic exchange", "look again"])
def swap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a guarded rename works: renameat2 (Linux), and the portable re-check."""
    if request.param == "atomic exchange" and apply._RENAMEAT2 is None:
        pytest.skip("renameat2 is Linux's")
    if request.param == "look again":
        monkeypatch.setattr(apply, "_RENAMEAT2", None)
    return str(request.param)


def save_like_an_application(path: Path, data: bytes) -> None:
    """Write a new version the way editors do: a new file renamed over the old one."""
    scratch = path.with_name(path.name + ".saving")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def kept_files(site: Site) -> dict[str, bytes]:
    if not site.conflicts.exists():
        return {}
    return {
        p.name: p.read_bytes()
        for p in site.conflicts.rglob("*")
        if p.is_file() and p.name not in ("README.txt", "conflict.json")
    }


def identity(path: Path) -> apply.FileIdentity:
    return apply.identity_of(os.lstat(path))


def test_a_change_saved_here_during_the_flush_is_kept_not_overwritten(
    site: Site, swap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.root.mkdir()
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    applier = site.applier(durable=True)
    incoming = receive(applier, "label.lab", b"the peer's version")
    incoming.guard(identity(target))  # the receiver looked: unchanged here
    real_flush = apply._flush_files

    def flush_while_a_user_saves(paths: list[str]) -> list[str | None]:
        save_like_an_application(target, b"saved here meanwhile")
        return real_flush(paths)

    monkeypatch.setattr(apply, "_flush_files", flush_while_a_user_saves)

    [outcome] = applier.commit([incoming])

    assert outcome.status == "applied"
    assert target.read_bytes() == b"the peer's version"
    assert outcome.kept is not None
    assert outcome.kept.read_bytes() == b"saved here meanwhile"
    details = json.loads((outcome.kept.parents[1] / "conflict.json").read_text("utf-8"))
    assert details["reason"] == "changed on this node while the peer's version was applied"
    assert details["original"] == str(target)
    assert temp_files(site.sandbox) == []


def test_the_file_looked_at_is_replaced_and_nothing_is_kept(site: Site, swap: str) -> None:
    site.root.mkdir()
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    applier = site.applier(durable=True)
    incoming = receive(applier, "label.lab", b"new")
    incoming.guard(identity(target))

    [outcome] = applier.commit([incoming])

    assert (outcome.status, outcome.kept) == ("applied", None)
    assert target.read_bytes() == b"new"
    assert kept_files(site) == {}
    assert temp_files(site.sandbox) == []


def test_a_file_created_here_after_the_look_is_kept(site: Site, swap: str) -> None:
    site.root.mkdir()
    applier = site.applier()
    incoming = receive(applier, "label.lab", b"the peer's version")
    incoming.guard(None)  # nothing was there when the receiver looked
    (site.root / "label.lab").write_bytes(b"created here meanwhile")

    [outcome] = applier.commit([incoming])

    assert outcome.status == "applied"
    assert (site.root / "label.lab").read_bytes() == b"the peer's version"
    assert kept_files(site) == {"label.lab": b"created here meanwhile"}


def test_a_file_removed_here_after_the_look_is_simply_replaced(site: Site, swap: str) -> None:
    site.root.mkdir()
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    applier = site.applier()
    incoming = receive(applier, "label.lab", b"the peer's version")
    incoming.guard(identity(target))
    target.unlink()

    [outcome] = applier.commit([incoming])

    assert (outcome.status, outcome.kept) == ("applied", None)
    assert target.read_bytes() == b"the peer's version"
    assert kept_files(site) == {}


def test_a_folder_in_the_way_of_a_guarded_file_stays_and_is_retried(site: Site, swap: str) -> None:
    site.root.mkdir()
    applier = site.applier()
    incoming = receive(applier, "label.lab", b"the peer's version")
    incoming.guard(None)
    (site.root / "label.lab").mkdir()
    (site.root / "label.lab" / "inside").write_bytes(b"keep me")

    [outcome] = applier.commit([incoming])

    assert outcome.status == "retry"
    assert (site.root / "label.lab" / "inside").read_bytes() == b"keep me"
    assert temp_files(site.sandbox) == []


def test_when_the_change_cannot_be_kept_nothing_is_replaced(site: Site, swap: str) -> None:
    site.root.mkdir()
    site.conflicts.write_bytes(b"a file where the conflicts folder should be")
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    applier = site.applier()
    incoming = receive(applier, "label.lab", b"the peer's version")
    incoming.guard(identity(target))
    save_like_an_application(target, b"saved here meanwhile")

    [outcome] = applier.commit([incoming])

    assert outcome.status == "retry"
    assert target.read_bytes() == b"saved here meanwhile"
    assert temp_files(site.sandbox) == []


def test_two_guarded_files_for_one_target_keep_nothing_of_the_batch(site: Site, swap: str) -> None:
    site.root.mkdir()
    target = site.root / "same.lab"
    target.write_bytes(b"agreed")
    applier = site.applier()
    batch = [receive(applier, "same.lab", b"first"), receive(applier, "same.lab", b"second")]
    for incoming in batch:
        incoming.guard(identity(target))

    outcomes = applier.commit(batch)

    assert [(o.status, o.kept) for o in outcomes] == [("applied", None), ("applied", None)]
    assert target.read_bytes() == b"second"
    assert kept_files(site) == {}


def test_a_guarded_delete_keeps_a_file_saved_here_since_the_look(site: Site) -> None:
    site.root.mkdir()
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    looked_at = identity(target)
    save_like_an_application(target, b"saved here meanwhile")
    applier = site.applier(durable=True)

    [outcome] = applier.delete_many(ROOT_ID, ["label.lab"], replaces={"label.lab": looked_at})

    assert outcome.status == "applied"
    assert not target.exists()
    assert outcome.kept is not None
    assert outcome.kept.read_bytes() == b"saved here meanwhile"
    assert temp_files(site.sandbox) == []


def test_a_guarded_delete_of_the_file_looked_at_keeps_nothing(site: Site) -> None:
    site.root.mkdir()
    target = site.root / "label.lab"
    target.write_bytes(b"agreed version")
    applier = site.applier()

    [outcome] = applier.delete_many(
        ROOT_ID, ["label.lab"], replaces={"label.lab": identity(target)}
    )

    assert (outcome.status, outcome.kept) == ("applied", None)
    assert not target.exists()
    assert kept_files(site) == {}
    assert temp_files(site.sandbox) == []
