"""File contents that prove themselves whole: a header with the body's digest and length.

The fault lab writes only such files, so that any copy read on either node can
be checked on its own: a torn, truncated or mixed copy fails :func:`is_whole`,
and :func:`version_of` names the write it came from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MAGIC = b"SBSLAB1"


def make_content(version: str, size: int) -> bytes:
    """``size`` bytes or so, unique to ``version``, with a header that proves them whole."""
    if not version.isprintable() or " " in version:
        raise ValueError(f"a version is one printable word, not {version!r}")
    seed = hashlib.sha256(version.encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    digest = hashlib.sha256(body).hexdigest()
    return MAGIC + f" {version} {len(body)} {digest}\n".encode() + body


def version_of(data: bytes) -> str | None:
    """The version that wrote ``data``; None when it is not one whole :func:`make_content`."""
    head, sep, body = data.partition(b"\n")
    if not sep:
        return None
    fields = head.split(b" ")
    if len(fields) != 4 or fields[0] != MAGIC:
        return None
    _, version, length, digest = fields
    if not length.isdigit() or int(length) != len(body):
        return None
    if hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    return version.decode()


def is_whole(data: bytes) -> bool:
    return version_of(data) is not None


def write_atomically(path: Path, data: bytes, *, scratch: Path) -> None:
    """How a well-behaved application saves: write aside, then rename into place.

    ``scratch`` is a folder on the same file system but outside the replicated
    folder, so that the half-written file is never a candidate for replication.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"{path.name}.{os.getpid()}.part"
    tmp.write_bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def write_in_place(path: Path, data: bytes, *, chunk: int = 64 << 10) -> None:
    """How a careless application saves: truncate, then write in pieces (a reader sees it torn)."""
    with open(path, "wb") as f:
        for at in range(0, len(data), chunk):
            f.write(data[at : at + chunk])
            f.flush()


def is_unfinished_write(data: bytes) -> bool:
    """``data`` is how one version looks midway through :func:`write_in_place`: a prefix of it.

    A file saved in place passes through such states on the writer's own disk;
    a copy of one of them is a faithful copy of that moment. A mix of two
    versions, or bytes from nowhere, is not a prefix of any version.
    """
    if not data:
        return True  # just truncated
    head, sep, _ = data.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 4 or fields[0] != MAGIC or not fields[2].isdigit():
        return False
    return make_content(fields[1].decode(errors="replace"), int(fields[2])).startswith(data)
