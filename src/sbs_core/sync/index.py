"""A durable cache of content hashes, so that no unchanged file is hashed twice.

A :class:`HashIndex` remembers, for each file of each root, the digest it had at
a given size, modification time and inode. A lookup hits only if all three
still match, so a file rewritten in place, or replaced by another file, is
hashed again.

It is only a cache: a database that cannot be read is moved aside and the
index starts empty, which costs one full hashing pass and nothing else. Writes
are durable against a crash of sbs; a power cut may lose the last few, which
again only means hashing those files again.

A file rewritten with the same size within the file system's timestamp
granularity keeps its modification time and looks unchanged. Callers that care
should not store digests of files modified in the last couple of seconds.

Paths are stored as given; they must be valid Unicode (as every path accepted
by :func:`~sbs_core.sync.paths.check_wire_path` is).

Beside each file's digest the index keeps its *base*: the content both nodes
last agreed on (:meth:`HashIndex.base`), which tells a file changed on this
node from one that is merely older. Bases are state, not cache: a database of
an older layout is converted, not dropped, and a file's base may outlive its
digest (a file deleted here, whose deletion is not yet agreed on).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

__all__ = ("HashIndex", "IndexRow")

_log = logging.getLogger(__name__)

_SCHEMA_VERSION = 2
# digest is "" in a row that holds only a base (with size, mtime_ns and ino 0);
# base is NULL in a row that holds only a digest.
_SCHEMA = """
CREATE TABLE hashes (
    root_id TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    digest TEXT NOT NULL,
    base TEXT,
    PRIMARY KEY (root_id, path)
) WITHOUT ROWID
"""
_FILE_COLUMNS = "size = excluded.size, mtime_ns = excluded.mtime_ns, ino = excluded.ino"
_UPSERT = (
    "INSERT INTO hashes (root_id, path, size, mtime_ns, ino, digest) VALUES (?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT (root_id, path) DO UPDATE SET {_FILE_COLUMNS}, digest = excluded.digest"
)
# The file's digest is its base as well: one row, one write (a received file).
# Plain "?" placeholders, the digest given twice: early 3.12 releases take
# numbered ones ("?6") for named ones and warn (CPython issue 117995).
_UPSERT_AGREED = (
    "INSERT INTO hashes (root_id, path, size, mtime_ns, ino, digest, base)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (root_id, path) DO UPDATE SET"
    f" {_FILE_COLUMNS}, digest = excluded.digest, base = excluded.base"
)
_SET_BASE = (
    "INSERT INTO hashes (root_id, path, size, mtime_ns, ino, digest, base)"
    " VALUES (?, ?, 0, 0, 0, '', ?) ON CONFLICT (root_id, path) DO UPDATE SET base = excluded.base"
)
_KEY = "root_id = ? AND path = ?"
# Layout 1 kept bases as rows of their own, under the root id "base:" + root.
_V1_BASES = "root_id >= 'base:' AND root_id < 'base;'"
_FROM_V1 = (
    "ALTER TABLE hashes ADD COLUMN base TEXT",
    "INSERT INTO hashes (root_id, path, size, mtime_ns, ino, digest, base)"
    f" SELECT substr(root_id, 6), path, 0, 0, 0, '', digest FROM hashes WHERE {_V1_BASES}"
    " ON CONFLICT (root_id, path) DO UPDATE SET base = excluded.base",
    f"DELETE FROM hashes WHERE {_V1_BASES}",
)
_SIDE_FILES = ("-wal", "-shm", "-journal")


class IndexRow(NamedTuple):
    """One entry for :meth:`HashIndex.put_many`; a plain 6-tuple works too."""

    root_id: str
    path: str
    size: int
    mtime_ns: int
    ino: int
    digest: str


class HashIndex:
    """Content hashes keyed by ``(root_id, path)``, stored in an SQLite file.

    Safe to share between threads: one connection, used under a lock. Use it
    as a context manager or call :meth:`close`; it cannot be used after that.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = self._open()

    def get(self, root_id: str, path: str, *, size: int, mtime_ns: int, ino: int) -> str | None:
        """The stored digest if ``size``, ``mtime_ns`` and ``ino`` all match, else None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT digest FROM hashes WHERE root_id = ? AND path = ?"
                " AND size = ? AND mtime_ns = ? AND ino = ? AND digest != ''",
                (root_id, path, size, _int64(mtime_ns), _int64(ino)),
            ).fetchone()
        if row is None:
            return None
        digest: str = row[0]
        return digest

    def base(self, root_id: str, path: str) -> str | None:
        """The file's base: the digest both nodes last agreed on; None if there is none."""
        with self._lock:
            row = self._conn.execute(f"SELECT base FROM hashes WHERE {_KEY}", (root_id, path))
            found = row.fetchone()
        if found is None:
            return None
        base: str | None = found[0]
        return base

    def set_bases(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Store each ``(root_id, path, digest)`` as the file's base, in one transaction."""
        with self._transaction() as conn:
            conn.executemany(_SET_BASE, rows)

    def forget_bases(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget the bases of ``(root_id, path)`` files; their digests stay."""
        keys = list(keys)
        with self._transaction() as conn:
            conn.executemany(f"UPDATE hashes SET base = NULL WHERE {_KEY}", keys)
            conn.executemany(f"DELETE FROM hashes WHERE {_KEY} AND digest = ''", keys)

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget ``(root_id, path)`` files whole: digest and base (a file deleted by both)."""
        with self._transaction() as conn:
            conn.executemany(f"DELETE FROM hashes WHERE {_KEY}", keys)

    def put(
        self, root_id: str, path: str, *, size: int, mtime_ns: int, ino: int, digest: str
    ) -> None:
        """Store ``digest`` for the file, replacing what was stored for it."""
        self.put_many([(root_id, path, size, mtime_ns, ino, digest)])

    def put_many(
        self, rows: Iterable[tuple[str, str, int, int, int, str]], *, agreed: bool = False
    ) -> None:
        """Store many rows (:class:`IndexRow` or plain tuples) in one transaction.

        A file's base is kept, unless ``agreed``: then each digest is its
        file's base too (a file received and applied). If ``rows`` raises part
        way, nothing of it is stored.
        """
        values: Iterable[tuple[str | int, ...]] = (
            (
                root_id,
                path,
                size,
                mtime_ns if _INT64_MIN <= mtime_ns <= _INT64_MAX else _int64(mtime_ns),
                ino if _INT64_MIN <= ino <= _INT64_MAX else _int64(ino),
                digest,
            )
            for root_id, path, size, mtime_ns, ino, digest in rows
        )
        if agreed:
            values = ((*row, row[5]) for row in values)  # the digest again, as the base
        with self._transaction() as conn:
            conn.executemany(_UPSERT_AGREED if agreed else _UPSERT, values)

    def delete(self, root_id: str, path: str) -> None:
        """Forget one file; nothing happens if it is not stored."""
        self.delete_many([(root_id, path)])

    def delete_many(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget the digests of many ``(root_id, path)`` files in one transaction.

        Unknown ones are ignored; their bases stay (:meth:`forget` drops both).
        """
        keys = list(keys)
        with self._transaction() as conn:
            conn.executemany(f"DELETE FROM hashes WHERE {_KEY} AND base IS NULL", keys)
            conn.executemany(
                f"UPDATE hashes SET size = 0, mtime_ns = 0, ino = 0, digest = '' WHERE {_KEY}", keys
            )

    def forget_root(self, root_id: str) -> None:
        """Forget every file of a root and its bases (a folder removed from the configuration)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM hashes WHERE root_id = ?", (root_id,))

    def digests(self, root_id: str) -> dict[str, tuple[int, int, int, str]]:
        """Every stored file of ``root_id``: path -> (size, mtime_ns, ino, digest).

        One query for a whole folder; the times and inodes are as stored (see
        :func:`_int64`): look files up in it with :meth:`digest_in`.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT path, size, mtime_ns, ino, digest FROM hashes"
                " WHERE root_id = ? AND digest != ''",
                (root_id,),
            )
            return {row[0]: row[1:] for row in rows}

    @staticmethod
    def digest_in(
        stored: dict[str, tuple[int, int, int, str]],
        path: str,
        *,
        size: int,
        mtime_ns: int,
        ino: int,
    ) -> str | None:
        """:meth:`get`, answered from a folder read by :meth:`digests`."""
        row = stored.get(path)
        if row is None or row[:3] != (size, _int64(mtime_ns), _int64(ino)):
            return None
        return row[3]

    def paths(self, root_id: str) -> set[str]:
        """Every path whose digest is stored for ``root_id``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT path FROM hashes WHERE root_id = ? AND digest != ''", (root_id,)
            )
            return {path for (path,) in rows}

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HashIndex:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE takes the write lock up front instead of failing to
            # upgrade a read lock half way if another process holds the file.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return _connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            aside = _move_aside(self.path)
            _log.warning(
                "hash index %s is unreadable (%s); moved it to %s and starting empty",
                self.path,
                exc,
                aside,
            )
            return _connect(self.path)


class _CorruptDatabaseError(sqlite3.DatabaseError):
    """The integrity check found damage that the first reads did not trip over."""


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly, so their extent is
    # visible in the code rather than implied by the sqlite3 module.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is crash-safe in WAL mode; only a power cut can lose the last
        # commits, which a cache can afford.
        conn.execute("PRAGMA synchronous = NORMAL")
        (check,) = conn.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise _CorruptDatabaseError(f"integrity check failed: {check}")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version != _SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if version == 1:
                    for statement in _FROM_V1:  # the bases are kept
                        conn.execute(statement)
                else:
                    # A new file, or a layout of another version: rebuilt, not migrated.
                    conn.execute("DROP TABLE IF EXISTS hashes")
                    conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, _CorruptDatabaseError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended codes (SQLITE_CORRUPT_INDEX...) keep the primary code in the low byte.
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _move_aside(path: Path) -> Path:
    """Rename the database and its side files to ``<name>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    attempt = 1
    while aside.exists():
        attempt += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{attempt}")
    path.replace(aside)
    # A stale write-ahead log left next to a fresh database would be replayed into it.
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(aside.with_name(aside.name + suffix))
    return aside


_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _int64(value: int) -> int:
    """``value`` wrapped into SQLite's signed 64 bits.

    Inodes can use all 64 bits (and more on ReFS) and a far-future timestamp
    overflows; the wrapped value is only ever compared, never shown.
    """
    return ((value + (1 << 63)) % (1 << 64)) - (1 << 63)
