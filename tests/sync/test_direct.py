"""Large durable copies go to the disk past the page cache, and fall back where they cannot."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sbs_core.sync import direct
from sbs_core.sync.apply import Applier, Incoming, Outcome
from sbs_core.sync.paths import TEMP_PREFIX
from sbs_core.sync.scan import new_hasher

pytestmark = pytest.mark.skipif(direct.O_DIRECT == 0, reason="O_DIRECT is Linux only")

ROOT_ID = "settings"
LARGE = 3 * direct.BUFFER + 12_345  # three whole buffers and an unaligned tail


def digest_of(data: bytes) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


def takes_direct(folder: Path) -> bool:
    """Whether this filesystem accepts O_DIRECT at all (tmpfs before Linux 6.6 does not)."""
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | direct.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def direct_root(tmp_path: Path) -> Path:
    """An empty folder on a filesystem that takes O_DIRECT (else the test is skipped)."""
    root = tmp_path / "root"
    root.mkdir()
    if not takes_direct(root):
        pytest.skip(f"{root}'s filesystem refuses O_DIRECT")
    return root


@dataclass
class Writes:
    """Every os.write made while receiving: (went through O_DIRECT, length)."""

    calls: list[tuple[bool, int]] = field(default_factory=list)

    @property
    def direct_bytes(self) -> int:
        return sum(n for straight, n in self.calls if straight)

    @property
    def cached_bytes(self) -> int:
        return sum(n for straight, n in self.calls if not straight)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    seen = Writes()
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        straight = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT)
        took = real(fd, data)
        seen.calls.append((straight, took))
        return took

    monkeypatch.setattr(os, "write", write)
    return seen


def applier(root: Path, *, durable: bool = True) -> Applier:
    return Applier(
        {ROOT_ID: root},
        conflicts_dir=root.parent / "conflicts",
        preserve_timestamps=True,
        durable=durable,
    )


def receive(site: Applier, path: str, data: bytes, chunks: list[int]) -> Incoming:
    incoming = site.begin(ROOT_ID, path, size=len(data), mtime_ns=0, digest=digest_of(data))
    view, at = memoryview(data), 0
    for n in chunks:
        incoming.write(view[at : at + n])
        at += n
    incoming.write(view[at:])
    incoming.finish()
    return incoming


def odd_chunks(total: int, seed: int) -> list[int]:
    """Frame sizes that do not line up with buffers or blocks."""
    rng = random.Random(seed)
    chunks, left = [], total
    while left > 1:
        n = min(left - 1, rng.choice([1, 511, 4095, 4097, 65_537, direct.BUFFER + 3]))
        chunks.append(n)
        left -= n
    return chunks


@pytest.mark.parametrize("size", [direct.MIN_SIZE, 2 * direct.BUFFER, LARGE])
def test_a_large_durable_file_arrives_whole_its_bulk_past_the_page_cache(
    direct_root: Path, writes: Writes, size: int
) -> None:
    root = direct_root
    data = random.Random(size).randbytes(size)
    site = applier(root)
    incoming = receive(site, "big.bin", data, odd_chunks(size, seed=size))
    [outcome] = site.commit([incoming])

    assert outcome.status == "applied"
    assert (root / "big.bin").read_bytes() == data
    assert writes.direct_bytes + writes.cached_bytes == size
    assert writes.cached_bytes == size % direct.ALIGN  # only the unaligned tail is cached
    assert [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def test_small_files_use_the_page_cache_large_ones_do_not_even_when_not_durable(
    direct_root: Path, writes: Writes
) -> None:
    root = direct_root
    site = applier(root, durable=False)
    small = os.urandom(direct.MIN_SIZE - 1)
    [small_outcome] = site.commit([receive(site, "small.bin", small, [])])
    assert writes.calls == [(False, len(small))]  # through the page cache

    data = os.urandom(LARGE)
    [outcome] = site.commit([receive(site, "big.bin", data, [])])
    assert (outcome.status, small_outcome.status) == ("applied", "applied")
    assert (root / "big.bin").read_bytes() == data
    assert (root / "small.bin").read_bytes() == small
    assert writes.cached_bytes == len(small) + LARGE % direct.ALIGN


def test_a_filesystem_refusing_o_direct_at_the_open_gets_ordinary_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    refused: list[str] = []

    def open_(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if flags & direct.O_DIRECT:
            # Like the kernel: the file is made, then the open fails.
            os.close(real_open(path, flags & ~direct.O_DIRECT, mode))
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_)
    root = tmp_path / "root"
    site = applier(root)
    first, second = os.urandom(LARGE), os.urandom(LARGE)
    outcomes = site.commit(
        [receive(site, "one.bin", first, []), receive(site, "two.bin", second, [])]
    )

    assert [o.status for o in outcomes] == ["applied", "applied"]
    assert (root / "one.bin").read_bytes() == first
    assert (root / "two.bin").read_bytes() == second
    assert len(refused) == 1  # asked once; the Applier remembers the answer
    assert sorted(p.name for p in root.iterdir()) == ["one.bin", "two.bin"]


@pytest.mark.parametrize(
    "failure",
    ["EINVAL on the first direct write", "a short direct write"],
)
def test_a_direct_write_that_fails_or_falls_short_goes_on_through_the_page_cache(
    direct_root: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    root = direct_root
    real = os.write
    tricks = {"done": False}

    def write(fd: int, data: bytes | memoryview) -> int:
        straight = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT)
        if straight and not tricks["done"]:
            tricks["done"] = True
            if failure.startswith("EINVAL"):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, memoryview(data)[: direct.ALIGN])  # the kernel may write less
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = random.Random(7).randbytes(LARGE)
    site = applier(root)
    [outcome] = site.commit([receive(site, "big.bin", data, odd_chunks(LARGE, seed=7))])

    assert tricks["done"]
    assert outcome.status == "applied"
    assert (root / "big.bin").read_bytes() == data


def test_an_aborted_direct_file_leaves_nothing_and_its_buffer_serves_the_next(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    site = applier(root)
    data = os.urandom(LARGE)
    doomed = site.begin(ROOT_ID, "big.bin", size=LARGE, mtime_ns=0, digest=digest_of(data))
    doomed.write(memoryview(data)[: direct.BUFFER + 5])
    doomed.abort()
    assert list(root.iterdir()) == []

    [outcome] = site.commit([receive(site, "big.bin", data, [direct.BUFFER - 1])])
    assert outcome.status == "applied"
    assert (root / "big.bin").read_bytes() == data


class HeldDisk:
    """os.write held back for files opened with O_DIRECT until ``free`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.free = threading.Event()
        self.writing = threading.Event()  # a direct write is waiting
        self.threads: list[str] = []  # the threads that wrote past the page cache
        self.stuck = False  # a write waited for the test in vain (the test is wrong)
        real = os.write

        def write(fd: int, data: bytes | memoryview) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT:
                self.threads.append(threading.current_thread().name)
                self.writing.set()
                if not self.free.wait(10):
                    self.stuck = True
                    raise AssertionError("the test never let the disk go on")
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


def in_thread(work: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_a_file_is_written_and_closed_in_the_writing_thread_while_the_next_one_is_received(
    direct_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = direct_root
    disk = HeldDisk(monkeypatch)
    first, second = random.Random(3).randbytes(LARGE), random.Random(4).randbytes(LARGE)
    site = applier(root)
    incomings: list[Incoming] = []

    def receive_both() -> None:
        for name, data in (("one.bin", first), ("two.bin", second)):
            incoming = site.begin(ROOT_ID, name, size=LARGE, mtime_ns=0, digest=digest_of(data))
            incoming.write(data)
            incoming.finish()
            incomings.append(incoming)

    # The disk holds on to the first buffer: both files are received all the same,
    # their writes and closes waiting in the writing thread.
    receiving = in_thread(receive_both)
    receiving.join(10)
    if receiving.is_alive():
        disk.free.set()
        pytest.fail("receiving waited for the disk")
    assert disk.writing.wait(10)
    assert not (root / "one.bin").exists()

    outcomes: list[Outcome] = []
    committing = in_thread(lambda: outcomes.extend(site.commit(incomings)))
    try:
        committing.join(0.2)
        assert committing.is_alive()  # a file commits only once its writes and close are done
    finally:
        disk.free.set()
    committing.join(10)
    assert not committing.is_alive()
    assert [o.status for o in outcomes] == ["applied", "applied"]
    assert (root / "one.bin").read_bytes() == first
    assert (root / "two.bin").read_bytes() == second
    assert not disk.stuck
    # Every byte past the page cache went from one thread, not the receiving one.
    assert len(set(disk.threads)) == 1
    assert disk.threads[0] != receiving.name


def test_a_session_aborted_while_closes_wait_for_the_disk_leaves_nothing(
    direct_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = direct_root
    disk = HeldDisk(monkeypatch)
    site = applier(root)
    for n in range(2):  # 8 jobs: 3 full buffers and the close of each file (QUEUED)
        data = random.Random(n).randbytes(LARGE)
        receive(site, f"f{n}.bin", data, [])  # finished: its writes and close wait
    assert disk.writing.wait(10)

    aborting = in_thread(site.abort_all)
    try:
        aborting.join(0.2)
        assert aborting.is_alive()  # a file is removed only once its close is done
    finally:
        disk.free.set()
    aborting.join(10)
    assert not aborting.is_alive()
    assert not disk.stuck
    assert sorted(root.iterdir()) == []  # no temporary file left, nothing renamed


def test_at_most_queued_buffers_wait_for_the_disk(
    direct_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = direct_root
    disk = HeldDisk(monkeypatch)
    size = (direct.QUEUED + 4) * direct.BUFFER
    data = random.Random(5).randbytes(size)
    site = applier(root)
    incoming = site.begin(ROOT_ID, "big.bin", size=size, mtime_ns=0, digest=digest_of(data))
    written = [0]

    def receive() -> None:
        for start in range(0, size, direct.BUFFER):
            incoming.write(memoryview(data)[start : start + direct.BUFFER])
            written[0] += direct.BUFFER
        incoming.finish()

    receiving = in_thread(receive)
    try:
        receiving.join(0.3)
        assert receiving.is_alive()  # memory is bounded: the writer waits for the disk...
        # ...once QUEUED full buffers wait there: the one being written and those behind it.
        assert written[0] == (direct.QUEUED - 1) * direct.BUFFER
    finally:
        disk.free.set()
    receiving.join(10)
    assert not receiving.is_alive()
    [outcome] = site.commit([incoming])
    assert outcome.status == "applied"
    assert (root / "big.bin").read_bytes() == data
    assert not disk.stuck


def test_a_background_write_that_fails_fails_its_file_and_leaves_nothing(
    direct_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = direct_root
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = os.urandom(LARGE)
    site = applier(root)
    incoming = site.begin(ROOT_ID, "big.bin", size=LARGE, mtime_ns=0, digest=digest_of(data))

    def receive_all() -> str:
        """Why the file failed: found while it was written, or by its commit at the latest."""
        try:
            incoming.write(data)
            incoming.finish()
        except OSError as exc:
            return str(exc)
        [failed] = site.commit([incoming])
        assert failed.status == "retry"
        return failed.reason

    assert "No space left" in receive_all()
    assert not incoming.pending
    assert list(root.iterdir()) == []

    monkeypatch.setattr(os, "write", real)  # the disk has room again: the next file goes
    [outcome] = site.commit([receive(site, "big.bin", data, [])])
    assert outcome.status == "applied"
    assert (root / "big.bin").read_bytes() == data
