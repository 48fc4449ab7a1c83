"""Flushes that reach the disk itself: macOS's F_FULLFSYNC, once per batch, and its fallbacks.

This machine is not a Mac: the macOS tests give :mod:`sbs_core.durable` a
recording ``fcntl`` and the command number, and check what is asked of the
system and how often. The files and folders themselves are real.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sbs_core import durable
from sbs_core.state import write_atomically
from sbs_core.sync import apply
from sbs_core.sync.apply import Applier
from sbs_core.sync.scan import digest_of

F_FULLFSYNC = 51  # its number on macOS
ROOT = "settings"
MTIME_NS = 1_600_000_000_000_000_000


@dataclass
class Flushes:
    """What was flushed: ``fsync`` and F_FULLFSYNC calls, as (file or folder, inode) pairs."""

    fsync: list[tuple[str, int]] = field(default_factory=list)
    full: list[tuple[str, int]] = field(default_factory=list)
    fail_full: int | None = None  # the errno F_FULLFSYNC fails with, if any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, calls: list[tuple[str, int]], kind: str) -> int:
        return sum(1 for k, _ in calls if k == kind)


def _what(fd: int) -> tuple[str, int]:
    info = os.fstat(fd)
    return ("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino)


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> Flushes:
    """Every fsync, recorded (and done)."""
    found = Flushes()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        with found.lock:
            found.fsync.append(_what(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return found


@pytest.fixture
def mac(flushes: Flushes, monkeypatch: pytest.MonkeyPatch) -> Flushes:
    """:mod:`sbs_core.durable` as on macOS: F_FULLFSYNC recorded, or failing as told."""

    def fcntl(fd: int, command: int) -> object:
        assert command == F_FULLFSYNC
        if flushes.fail_full is not None:
            raise OSError(flushes.fail_full, os.strerror(flushes.fail_full))
        with flushes.lock:
            flushes.full.append(_what(fd))
        return 0

    monkeypatch.setattr(durable, "_FULLFSYNC", F_FULLFSYNC)
    monkeypatch.setattr(durable, "_fcntl", fcntl)
    monkeypatch.setattr(durable, "DRIVE_APART", True)
    return flushes


def _flush_a_file(folder: Path) -> tuple[str, int]:
    """Write a file in ``folder`` and :func:`durable.flush` it; how :class:`Flushes` names it."""
    path = folder / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        durable.flush(fd)
    finally:
        os.close(fd)
    return ("file", path.stat().st_ino)


def test_here_a_flush_is_fsync_and_the_drive_needs_nothing_more(
    tmp_path: Path, flushes: Flushes
) -> None:
    flushed = _flush_a_file(tmp_path)
    assert flushes.fsync == [flushed]
    assert durable.DRIVE_APART is (sys.platform == "darwin")


def test_on_macos_a_flush_asks_the_drive_to_write_its_cache(tmp_path: Path, mac: Flushes) -> None:
    flushed = _flush_a_file(tmp_path)
    assert mac.full == [flushed]
    assert mac.fsync == []  # F_FULLFSYNC does what fsync does, and more


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.EINVAL, errno.ENOTTY])
def test_a_filesystem_without_full_flush_gets_fsync(
    tmp_path: Path, mac: Flushes, code: int
) -> None:
    mac.fail_full = code  # SMB, WebDAV, ZFS
    durable.flush_folder(tmp_path)
    assert mac.fsync == [("folder", tmp_path.stat().st_ino)]


def test_a_failing_full_flush_is_raised_not_traded_for_fsync(tmp_path: Path, mac: Flushes) -> None:
    mac.fail_full = errno.EIO
    with pytest.raises(OSError, match="Input/output error") as caught:
        durable.flush_folder(tmp_path)
    assert caught.value.errno == errno.EIO
    assert mac.fsync == []


def test_a_folder_handed_over_is_not_flushed_past_the_drive(tmp_path: Path, mac: Flushes) -> None:
    durable.flush_folder(tmp_path, drive=False)
    assert (mac.fsync, mac.full) == ([("folder", tmp_path.stat().st_ino)], [])


def test_windows_has_no_folder_to_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    durable.flush_folder(tmp_path / "not there")  # not even opened


def test_the_state_file_and_its_folder_are_flushed_past_the_drive(
    tmp_path: Path, mac: Flushes
) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"{}")
    assert mac.full == [("file", path.stat().st_ino), ("folder", tmp_path.stat().st_ino)]


def _applier(tmp_path: Path) -> Applier:
    root = tmp_path / "root"
    root.mkdir()
    return Applier(
        {ROOT: root}, conflicts_dir=tmp_path / "kept", preserve_timestamps=True, durable=True
    )


def _batch(applier: Applier, count: int, folder: str) -> list[apply.Incoming]:
    batch = []
    for i in range(count):
        data = f"label {i}".encode()
        incoming = applier.write_whole(
            ROOT, f"{folder}/{i}.lab", memoryview(data), mtime_ns=MTIME_NS, digest=digest_of(data)
        )
        incoming.guard(None)
        batch.append(incoming)
    return batch


@pytest.mark.parametrize("folder", ["old", "new"])
def test_on_macos_a_batch_writes_the_drive_cache_once_for_its_files_and_once_for_its_folders(
    tmp_path: Path, mac: Flushes, folder: str
) -> None:
    applier = _applier(tmp_path)
    if folder == "old":
        (applier.roots[ROOT] / folder).mkdir()  # each file renamed in
    batch = _batch(applier, 10, folder)

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied"] * 10
    assert mac.count(mac.fsync, "file") == 10
    assert mac.count(mac.full, "file") == 1
    assert mac.count(mac.full, "folder") == 1
    assert mac.count(mac.fsync, "folder") >= 1  # the folders, each, before their drive flush


def test_on_macos_a_failed_drive_flush_retries_the_whole_batch(
    tmp_path: Path, mac: Flushes
) -> None:
    applier = _applier(tmp_path)
    batch = _batch(applier, 3, "new")
    mac.fail_full = errno.EIO

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["retry"] * 3
    assert all("Input/output error" in (o.reason or "") for o in outcomes)
    assert not (applier.roots[ROOT] / "new").exists()


def test_on_macos_a_failed_drive_flush_of_the_folders_retries_their_files(
    tmp_path: Path, mac: Flushes, monkeypatch: pytest.MonkeyPatch
) -> None:
    applier = _applier(tmp_path)
    batch = _batch(applier, 3, "new")
    real_flush = durable.flush

    def files_only(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_flush(fd)

    monkeypatch.setattr(durable, "flush", files_only)
    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["retry"] * 3
    assert all("its folder could not be flushed" in (o.reason or "") for o in outcomes)


@pytest.fixture
def failing_folder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Inodes of folders whose fsync fails with EIO (files and other folders flush)."""
    bad: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino in bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return bad


def test_a_folder_that_cannot_be_flushed_retries_only_the_files_written_in_it(
    tmp_path: Path, failing_folder: list[int]
) -> None:
    applier = _applier(tmp_path)
    root = applier.roots[ROOT]
    (root / "good").mkdir()
    (root / "bad").mkdir()
    failing_folder.append((root / "bad").stat().st_ino)
    batch = _batch(applier, 2, "good") + _batch(applier, 2, "bad")

    outcomes = applier.commit(batch)

    assert [o.status for o in outcomes] == ["applied", "applied", "retry", "retry"]
    assert all(
        "written, but its folder could not be flushed" in (o.reason or "") for o in outcomes[2:]
    )


def test_a_folder_that_cannot_be_flushed_after_deletions_retries_only_its_deletions(
    tmp_path: Path, failing_folder: list[int]
) -> None:
    applier = _applier(tmp_path)
    root = applier.roots[ROOT]
    for folder in ("good", "bad"):
        (root / folder).mkdir()
        (root / folder / "old.lab").write_bytes(b"old")
    failing_folder.append((root / "bad").stat().st_ino)

    outcomes = applier.delete_many(ROOT, ["good/old.lab", "bad/old.lab"])

    assert [o.status for o in outcomes] == ["applied", "retry"]
    assert "deleted, but its folder could not be flushed" in (outcomes[1].reason or "")
    assert not (root / "bad" / "old.lab").exists()  # gone: only its flush is retried
