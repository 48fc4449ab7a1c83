"""The hash index: a durable cache of digests keyed by root and path."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sbs_core.sync.index import HashIndex, IndexRow

DIGEST = "ab" * 32
OTHER_DIGEST = "cd" * 32


@pytest.fixture
def index(tmp_path: Path) -> Iterator[HashIndex]:
    with HashIndex(tmp_path / "hashes.db") as opened:
        yield opened


def test_round_trip(index: HashIndex) -> None:
    assert index.get("settings", "a.ini", size=1, mtime_ns=2, ino=3) is None
    index.put("settings", "a.ini", size=1, mtime_ns=2, ino=3, digest=DIGEST)
    assert index.get("settings", "a.ini", size=1, mtime_ns=2, ino=3) == DIGEST
    index.put("settings", "a.ini", size=1, mtime_ns=2, ino=3, digest=OTHER_DIGEST)
    assert index.get("settings", "a.ini", size=1, mtime_ns=2, ino=3) == OTHER_DIGEST


@pytest.mark.parametrize(
    "changed",
    [
        {"size": 10, "mtime_ns": 2, "ino": 3},
        {"size": 1, "mtime_ns": 20, "ino": 3},
        {"size": 1, "mtime_ns": 2, "ino": 30},
    ],
)
def test_any_mismatch_is_a_miss(index: HashIndex, changed: dict[str, int]) -> None:
    index.put("r", "f", size=1, mtime_ns=2, ino=3, digest=DIGEST)
    assert index.get("r", "f", **changed) is None


def test_roots_are_separate(index: HashIndex) -> None:
    index.put("one", "f", size=1, mtime_ns=2, ino=3, digest=DIGEST)
    assert index.get("two", "f", size=1, mtime_ns=2, ino=3) is None
    assert index.paths("one") == {"f"}
    assert index.paths("two") == set()


def test_huge_inode_and_far_future_mtime(index: HashIndex) -> None:
    ino = 2**64 - 1
    mtime_ns = 30_000 * 365 * 24 * 3600 * 10**9  # beyond SQLite's 64-bit integers
    index.put("r", "f", size=1, mtime_ns=mtime_ns, ino=ino, digest=DIGEST)
    assert index.get("r", "f", size=1, mtime_ns=mtime_ns, ino=ino) == DIGEST
    assert index.get("r", "f", size=1, mtime_ns=mtime_ns, ino=ino - 1) is None
    assert index.get("r", "f", size=1, mtime_ns=mtime_ns + 1, ino=ino) is None


def test_a_folder_read_at_once_answers_as_lookups_file_by_file(index: HashIndex) -> None:
    huge_ino, far_mtime = 2**64 - 1, 30_000 * 365 * 24 * 3600 * 10**9
    stored_files = {"a": (1, 2, 3), "b": (10, 20, 30), "huge": (5, far_mtime, huge_ino)}
    for path, (size, mtime_ns, ino) in stored_files.items():
        index.put("r", path, size=size, mtime_ns=mtime_ns, ino=ino, digest=DIGEST + path)
    index.put("other", "c", size=1, mtime_ns=2, ino=3, digest=OTHER_DIGEST)

    stored = index.digests("r")

    assert sorted(stored) == ["a", "b", "huge"]
    questions = [
        (path, size + ds, mtime_ns + dm, ino + di)
        for path, (size, mtime_ns, ino) in [*stored_files.items(), ("c", (1, 2, 3))]
        for ds, dm, di in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, -1)]
    ]
    for path, size, mtime_ns, ino in questions:
        at_once = HashIndex.digest_in(stored, path, size=size, mtime_ns=mtime_ns, ino=ino)
        assert at_once == index.get("r", path, size=size, mtime_ns=mtime_ns, ino=ino)
    assert index.get("r", "huge", size=5, mtime_ns=far_mtime, ino=huge_ino) == DIGEST + "huge"


def test_put_many_delete_and_forget(index: HashIndex) -> None:
    index.put_many(
        [
            IndexRow("r", "a", 1, 1, 1, DIGEST),
            IndexRow("r", "b", 2, 2, 2, DIGEST),
            ("r", "c/d", 3, 3, 3, DIGEST),
            ("s", "a", 4, 4, 4, OTHER_DIGEST),
        ]
    )
    assert index.paths("r") == {"a", "b", "c/d"}
    index.delete("r", "a")
    index.delete("r", "never-stored")
    assert index.paths("r") == {"b", "c/d"}
    index.delete_many([("r", "b"), ("r", "c/d"), ("r", "unknown")])
    assert index.paths("r") == set()
    assert index.paths("s") == {"a"}
    index.forget_root("s")
    assert index.paths("s") == set()


def test_put_many_of_nothing(index: HashIndex) -> None:
    index.put_many([])
    index.delete_many([])
    assert index.paths("r") == set()


def test_put_many_is_all_or_nothing(index: HashIndex) -> None:
    index.put("r", "kept", size=1, mtime_ns=1, ino=1, digest=DIGEST)

    def rows() -> Iterator[IndexRow]:
        yield IndexRow("r", "first", 1, 1, 1, DIGEST)
        yield IndexRow("r", "kept", 9, 9, 9, OTHER_DIGEST)
        raise RuntimeError("the caller failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        index.put_many(rows())
    assert index.paths("r") == {"kept"}
    assert index.get("r", "kept", size=1, mtime_ns=1, ino=1) == DIGEST
    # The index is still usable after the rollback.
    index.put("r", "after", size=1, mtime_ns=1, ino=1, digest=DIGEST)
    assert index.paths("r") == {"kept", "after"}


def test_put_many_commits_once_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "hashes.db"
    seen_by_reader: list[int] = []
    with HashIndex(path) as index:
        reader = sqlite3.connect(path)
        try:

            def rows() -> Iterator[IndexRow]:
                for number in range(500):
                    if number % 100 == 99:
                        (count,) = reader.execute("SELECT count(*) FROM hashes").fetchone()
                        seen_by_reader.append(count)
                    yield IndexRow("r", f"f{number}", 1, 1, 1, DIGEST)

            index.put_many(rows())
            (final,) = reader.execute("SELECT count(*) FROM hashes").fetchone()
        finally:
            reader.close()
    # Another connection sees none of the rows while they are written, then all.
    assert seen_by_reader == [0, 0, 0, 0, 0]
    assert final == 500


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "hashes.db"
    with HashIndex(path) as index:
        index.put_many(IndexRow("r", f"f{n}", n, n, n, DIGEST) for n in range(100))
        index.delete("r", "f0")
    with HashIndex(path) as index:
        assert index.get("r", "f42", size=42, mtime_ns=42, ino=42) == DIGEST
        assert len(index.paths("r")) == 99


def test_many_rows(index: HashIndex) -> None:
    index.put_many(IndexRow("r", f"d{n % 50}/f{n}.dat", n, n, n, DIGEST) for n in range(20_000))
    assert len(index.paths("r")) == 20_000


def test_closed_index_cannot_be_used(tmp_path: Path) -> None:
    index = HashIndex(tmp_path / "hashes.db")
    index.close()
    index.close()
    with pytest.raises(sqlite3.ProgrammingError):
        index.paths("r")


def test_threads_share_one_index(index: HashIndex) -> None:
    barrier = threading.Barrier(8)

    def work(worker: int) -> int:
        barrier.wait()
        hits = 0
        for n in range(200):
            index.put(f"r{worker}", f"f{n}", size=n, mtime_ns=n, ino=n, digest=DIGEST)
            if index.get(f"r{worker}", f"f{n}", size=n, mtime_ns=n, ino=n) == DIGEST:
                hits += 1
        index.put_many(IndexRow(f"r{worker}", f"g{n}", n, n, n, DIGEST) for n in range(100))
        return hits

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(work, range(8))) == [200] * 8
    assert all(len(index.paths(f"r{worker}")) == 300 for worker in range(8))


def _aside_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("hashes.db.corrupt-*"))


def test_garbage_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "hashes.db"
    garbage = b"this is not an SQLite database\n" * 200
    path.write_bytes(garbage)
    # A log left from the old file must not end up in the new one.
    (tmp_path / "hashes.db-wal").write_bytes(b"stale log")

    with caplog.at_level(logging.WARNING, logger="sbs_core.sync.index"), HashIndex(path) as index:
        assert index.paths("r") == set()
        index.put("r", "f", size=1, mtime_ns=1, ino=1, digest=DIGEST)
        assert index.get("r", "f", size=1, mtime_ns=1, ino=1) == DIGEST

    aside = [p for p in _aside_files(tmp_path) if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1
    assert aside[0].read_bytes() == garbage
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage()
    assert "corrupt-" in record.getMessage()


def test_damaged_pages_are_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "hashes.db"
    with HashIndex(path) as index:
        index.put_many(IndexRow("r", f"f{n:05}" * 4, n, n, n, DIGEST) for n in range(3000))
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page_size
    # Wreck the header of every page after the first (the table's b-tree).
    for start in range(page_size, len(data), page_size):
        data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="sbs_core.sync.index"), HashIndex(path) as index:
        assert index.paths("r") == set()
    assert len(_aside_files(tmp_path)) == 1
    assert "unreadable" in caplog.text


def test_two_corruptions_in_the_same_second(tmp_path: Path) -> None:
    path = tmp_path / "hashes.db"
    for _ in range(2):
        path.write_bytes(b"garbage" * 1000)
        HashIndex(path).close()
    assert len(_aside_files(tmp_path)) == 2


def test_other_layout_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "hashes.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE hashes (something TEXT)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with HashIndex(path) as index:
        index.put("r", "f", size=1, mtime_ns=1, ino=1, digest=DIGEST)
        assert index.paths("r") == {"f"}
    assert _aside_files(tmp_path) == []


def test_unopenable_path_is_not_mistaken_for_corruption(tmp_path: Path) -> None:
    folder = tmp_path / "hashes.db"
    folder.mkdir()
    with pytest.raises(sqlite3.OperationalError):
        HashIndex(folder)
    assert folder.is_dir()
    assert _aside_files(tmp_path) == []


def test_a_base_lives_beside_the_digest_and_outlives_it(index: HashIndex) -> None:
    index.put("r", "f", size=1, mtime_ns=2, ino=3, digest=DIGEST)
    assert index.base("r", "f") is None
    index.set_bases([("r", "f", OTHER_DIGEST), ("r", "only-agreed", DIGEST)])
    assert index.base("r", "f") == OTHER_DIGEST
    # A new digest of the file (a scan) keeps its base.
    index.put("r", "f", size=5, mtime_ns=6, ino=7, digest=DIGEST)
    assert index.base("r", "f") == OTHER_DIGEST
    assert index.get("r", "f", size=5, mtime_ns=6, ino=7) == DIGEST
    # A base alone is no file: nothing to look up, list or match.
    assert index.paths("r") == {"f"}
    assert set(index.digests("r")) == {"f"}
    assert index.get("r", "only-agreed", size=0, mtime_ns=0, ino=0) is None
    # Forgetting the digest keeps the base, and the other way round.
    index.delete_many([("r", "f")])
    assert index.get("r", "f", size=5, mtime_ns=6, ino=7) is None
    assert index.paths("r") == set()
    assert index.base("r", "f") == OTHER_DIGEST
    index.put("r", "f", size=5, mtime_ns=6, ino=7, digest=DIGEST)
    index.forget_bases([("r", "f"), ("r", "only-agreed")])
    assert index.base("r", "f") is None
    assert index.base("r", "only-agreed") is None
    assert index.get("r", "f", size=5, mtime_ns=6, ino=7) == DIGEST


def test_an_agreed_row_sets_the_base_and_forget_drops_both(index: HashIndex) -> None:
    index.set_bases([("r", "f", OTHER_DIGEST)])
    index.put_many([("r", "f", 1, 2, 3, DIGEST), ("r", "g", 1, 2, 4, DIGEST)], agreed=True)
    assert index.base("r", "f") == DIGEST
    assert index.base("r", "g") == DIGEST
    assert index.get("r", "f", size=1, mtime_ns=2, ino=3) == DIGEST
    index.forget([("r", "f")])
    assert index.base("r", "f") is None
    assert index.get("r", "f", size=1, mtime_ns=2, ino=3) is None
    assert index.paths("r") == {"g"}


def test_the_first_layout_is_converted_with_its_bases(tmp_path: Path) -> None:
    # Layout 1 kept each base as a row of its own, under the root id "base:" + root.
    path = tmp_path / "hashes.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE hashes (root_id TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, digest TEXT NOT NULL,"
        " PRIMARY KEY (root_id, path)) WITHOUT ROWID"
    )
    conn.executemany(
        "INSERT INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("folder:data", "both", 1, 2, 3, DIGEST),
            ("base:folder:data", "both", 0, 0, 0, OTHER_DIGEST),
            ("base:folder:data", "deleted here", 0, 0, 0, DIGEST),
            ("settings", "no base", 4, 5, 6, OTHER_DIGEST),
        ],
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with HashIndex(path) as index:
        assert index.get("folder:data", "both", size=1, mtime_ns=2, ino=3) == DIGEST
        assert index.base("folder:data", "both") == OTHER_DIGEST
        assert index.base("folder:data", "deleted here") == DIGEST
        assert index.paths("folder:data") == {"both"}
        assert index.get("settings", "no base", size=4, mtime_ns=5, ino=6) == OTHER_DIGEST
        assert index.base("settings", "no base") is None
        assert index.paths("base:folder:data") == set()
    with HashIndex(path) as index:  # converted once: opened again, the same
        assert index.base("folder:data", "both") == OTHER_DIGEST
    assert _aside_files(tmp_path) == []
