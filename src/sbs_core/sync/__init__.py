"""File replication: which files the primary sends and where the secondary writes them.

:mod:`.paths` checks paths that come from the peer, :mod:`.scan` lists and
hashes the files of a replicated folder, and :mod:`.index` caches their hashes
between cycles. Everything here blocks; callers run it in worker threads.
"""

from __future__ import annotations

from .apply import (
    DEFAULT_MAX_DELETE_COUNT,
    DEFAULT_MAX_DELETE_SHARE,
    Applier,
    Incoming,
    IntegrityError,
    Outcome,
    OutcomeStatus,
    deletion_allowed,
)
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
    "DEFAULT_MAX_DELETE_COUNT",
    "DEFAULT_MAX_DELETE_SHARE",
    "HASH_NAME",
    "TEMP_PREFIX",
    "Applier",
    "FileDigest",
    "FileStat",
    "HashIndex",
    "Incoming",
    "IndexRow",
    "IntegrityError",
    "Outcome",
    "OutcomeStatus",
    "ScanResult",
    "UnsafePathError",
    "check_wire_path",
    "deletion_allowed",
    "hash_file",
    "matches",
    "new_hasher",
    "resolve_inside",
    "scan_root",
)
