"""File replication: which files the primary sends and where the secondary writes them.

:mod:`.paths` checks paths that come from the peer, :mod:`.scan` lists and
hashes the files of a replicated folder, and :mod:`.index` caches their hashes
between cycles. Everything here blocks; callers run it in worker threads.
"""

from __future__ import annotations

from .index import HashIndex, IndexRow
from .paths import TEMP_PREFIX, UnsafePathError, check_wire_path, resolve_inside
from .scan import (
    HASH_NAME,
    FileDigest,
    FileStat,
    ScanResult,
    hash_file,
    matches,
    new_hasher,
    scan_root,
)

__all__ = (
    "HASH_NAME",
    "TEMP_PREFIX",
    "FileDigest",
    "FileStat",
    "HashIndex",
    "IndexRow",
    "ScanResult",
    "UnsafePathError",
    "check_wire_path",
    "hash_file",
    "matches",
    "new_hasher",
    "resolve_inside",
    "scan_root",
)
