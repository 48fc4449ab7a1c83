"""The frame format of peer protocol v1: header, payload, optional integrity tag.

A frame is an 8-byte header (magic ``b"SB"``, version, kind, payload length),
the payload, and, once the channel is authenticated, a 32-byte HMAC-SHA256 tag
over the direction's sequence number, the header and the payload. This module
knows nothing about the handshake: :mod:`sbs_core.wire.channel` decides when
tags start and how large a payload may be.

Nothing here does I/O; everything the peer can get wrong raises
:class:`~sbs_core.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from sbs_core.errors import LocalProtocolError, RemoteProtocolError

__all__ = (
    "DEFAULT_MAX_FRAME",
    "FRAME_VERSION",
    "HANDSHAKE_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD_LIMIT",
    "TAG_SIZE",
    "Frame",
    "FrameKind",
    "FrameReader",
    "FrameTagger",
    "decode_header",
    "encode_frame",
    "encode_header",
)

MAGIC: Final = b"SB"
FRAME_VERSION: Final = 1
_HEADER: Final = struct.Struct(">2sBBI")
HEADER_SIZE: Final = _HEADER.size
TAG_SIZE: Final = hashlib.sha256().digest_size
# Before authentication the peer is a stranger: it may only make us buffer a little.
HANDSHAKE_MAX_PAYLOAD: Final = 4096
DEFAULT_MAX_FRAME: Final = 8 * 1024 * 1024
# What the 32-bit length field can express.
MAX_PAYLOAD_LIMIT: Final = 2**32 - 1

_SEQUENCE_LIMIT: Final = 2**64


class FrameKind(IntEnum):
    """What a frame's payload is."""

    #: A UTF-8 JSON message; the caller (or the handshake) encodes it.
    CONTROL = 0
    #: Opaque bytes, such as a chunk of a replicated file.
    DATA = 1


# A dict lookup: calling the enum costs more than the rest of a small frame's parsing.
_KINDS: Final = {kind.value: kind for kind in FrameKind}


@dataclass(frozen=True, kw_only=True, slots=True)
class Frame:
    """One complete frame taken off the wire (its tag, if any, already verified)."""

    kind: FrameKind
    payload: bytes


def encode_header(kind: FrameKind, length: int) -> bytes:
    """The 8-byte header of a frame of ``kind`` carrying ``length`` payload bytes."""
    if not 0 <= length <= MAX_PAYLOAD_LIMIT:
        raise LocalProtocolError(f"payload of {length} bytes does not fit in a frame")
    return _HEADER.pack(MAGIC, FRAME_VERSION, kind, length)


def decode_header(header: bytes) -> tuple[FrameKind, int]:
    """Check an 8-byte header and return its kind and payload length."""
    magic, version, kind, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic {magic!r}")
    if version != FRAME_VERSION:
        raise RemoteProtocolError(f"unsupported frame version {version}")
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    return frame_kind, length


class FrameTagger:
    """Computes the tags of one direction of a channel, in order.

    Each call to :meth:`tag` consumes the next sequence number, so a frame that is
    replayed, dropped or moved gets a tag that no longer matches.
    """

    __slots__ = ("_keyed", "_sequence")

    def __init__(self, key: bytes) -> None:
        # Keying HMAC costs two compressions; copying a keyed object skips them per frame.
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self._sequence = 0

    @property
    def sequence(self) -> int:
        """The sequence number the next frame will be tagged with."""
        return self._sequence

    def tag(self, header: bytes, payload: bytes | memoryview) -> bytes:
        """The tag of the next frame in this direction."""
        if self._sequence >= _SEQUENCE_LIMIT:
            raise LocalProtocolError("sequence numbers exhausted; open a new channel")
        mac = self._keyed.copy()
        mac.update(self._sequence.to_bytes(8, "big"))
        mac.update(header)
        mac.update(payload)
        self._sequence += 1
        return mac.digest()


def encode_frame(kind: FrameKind, payload: bytes, tagger: FrameTagger | None = None) -> bytes:
    """A whole frame as bytes; tagged (consuming a sequence number) if ``tagger`` is given."""
    header = encode_header(kind, len(payload))
    tag = b"" if tagger is None else tagger.tag(header, payload)
    return b"".join((header, payload, tag))


class FrameReader:
    """Reassembles frames from the byte stream, however it is split.

    Reads are kept as they came, in a queue, and each payload is joined from
    them exactly once: a large frame that arrives in many reads costs one copy,
    never one per read, and no buffer is ever grown or shifted.
    """

    __slots__ = ("_chunks", "_offset", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        # Where the unread part of the first chunk starts.
        self._offset = 0
        self._size = 0

    def __len__(self) -> int:
        """How many received bytes are not yet part of a returned frame."""
        return self._size

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        if data:
            # bytes() copies a mutable buffer the caller may reuse, and is free for bytes.
            self._chunks.append(bytes(data))
            self._size += len(data)

    def next_frame(self, *, max_payload: int, tagger: FrameTagger | None) -> Frame | None:
        """The next complete frame, or None until more bytes arrive.

        The header is checked as soon as it is complete, so an oversized or
        foreign frame is refused before its payload is buffered. With a
        ``tagger`` the frame must carry a valid tag for the next sequence number.
        """
        if self._size < HEADER_SIZE:
            return None
        header = self._peek(HEADER_SIZE)
        kind, length = decode_header(header)
        if length > max_payload:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {max_payload}")
        tag_size = 0 if tagger is None else TAG_SIZE
        if self._size < HEADER_SIZE + length + tag_size:
            return None
        self._take(HEADER_SIZE)
        payload = self._take(length)
        if tagger is not None and not hmac.compare_digest(
            tagger.tag(header, payload), self._take(TAG_SIZE)
        ):
            raise RemoteProtocolError("frame failed its integrity check")
        return Frame(kind=kind, payload=payload)

    def _peek(self, size: int) -> bytes:
        first = self._chunks[0]
        offset = self._offset
        if len(first) - offset >= size:
            return first[offset : offset + size]
        parts = []
        for chunk in self._chunks:
            part = chunk[offset : offset + size]
            parts.append(part)
            size -= len(part)
            offset = 0
            if not size:
                break
        return b"".join(parts)

    def _take(self, size: int) -> bytes:
        self._size -= size
        chunks = self._chunks
        offset = self._offset
        first = chunks[0] if chunks else b""
        if len(first) - offset > size:
            self._offset = offset + size
            return first[offset : offset + size]
        parts: list[bytes | memoryview] = []
        while size:
            first = chunks[0]
            available = len(first) - offset
            if available <= size:
                parts.append(memoryview(first)[offset:] if offset else first)
                chunks.popleft()
                offset = 0
                size -= available
            else:
                parts.append(memoryview(first)[offset : offset + size])
                offset += size
                size = 0
        self._offset = offset
        if len(parts) == 1 and isinstance(parts[0], bytes):
            # A read that was exactly this piece is handed on without a copy.
            return parts[0]
        return b"".join(parts)
