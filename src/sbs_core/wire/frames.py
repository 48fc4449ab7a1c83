"""The frame format of peer protocol v1: a header, then a payload in the clear or sealed.

A frame is an 8-byte header (magic ``b"SB"``, version, kind, length) and a body
of ``length`` bytes. During the handshake the body is the payload itself. Once
the channel is authenticated the body is the payload sealed with AES-256-GCM
(the ciphertext, then the 16-byte tag) under the direction's session key, with
the direction's sequence number as the nonce and the header as associated data.
The length counts the whole body, tag included, so a frame's extent always
follows from its header alone. This module knows nothing about the handshake:
:mod:`sbs_core.wire.channel` decides when sealing starts and how large a payload
may be.

Nothing here does I/O; everything the peer can get wrong raises
:class:`~sbs_core.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal, overload

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sbs_core.errors import ForgedFrameError, LocalProtocolError, RemoteProtocolError

__all__ = (
    "DEFAULT_MAX_FRAME",
    "FRAME_VERSION",
    "HANDSHAKE_MAX_PAYLOAD",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_FRAME_LIMIT",
    "MAX_PAYLOAD_LIMIT",
    "TAG_SIZE",
    "DataPayload",
    "Frame",
    "FrameCipher",
    "FrameKind",
    "FrameReader",
    "SealedFrame",
    "decode_header",
    "encode_frame",
    "encode_header",
)

MAGIC: Final = b"SB"
FRAME_VERSION: Final = 1
_HEADER: Final = struct.Struct(">2sBBI")
HEADER_SIZE: Final = _HEADER.size
#: Size in bytes of a session key: AES-256.
KEY_SIZE: Final = 32
#: Size in bytes of the GCM tag that ends every sealed body.
TAG_SIZE: Final = 16
# Before authentication the peer is a stranger: it may only make us buffer a little.
HANDSHAKE_MAX_PAYLOAD: Final = 4096
DEFAULT_MAX_FRAME: Final = 8 * 1024 * 1024
# What the 32-bit length field can express.
MAX_PAYLOAD_LIMIT: Final = 2**32 - 1
#: The largest payload a sealed frame may carry. The AEAD library takes at most
#: 2**31 - 1 bytes per call, and older releases count the tag on the receiving side.
MAX_FRAME_LIMIT: Final = 2**31 - 1 - TAG_SIZE

# The nonce is the sequence number, so the last number usable is 2**64 - 1.
_SEQUENCE_LIMIT: Final = 2**64
_AEAD_NONCE_SIZE: Final = 12


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
    """One complete frame taken off the wire (opened and verified, if it was sealed)."""

    kind: FrameKind
    payload: bytes


def encode_header(kind: FrameKind, length: int) -> bytes:
    """The 8-byte header of a frame of ``kind`` whose body is ``length`` bytes."""
    if not 0 <= length <= MAX_PAYLOAD_LIMIT:
        raise LocalProtocolError(f"payload of {length} bytes does not fit in a frame")
    return _HEADER.pack(MAGIC, FRAME_VERSION, kind, length)


def decode_header(header: bytes) -> tuple[FrameKind, int]:
    """Check an 8-byte header and return its kind and body length."""
    magic, version, kind, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic {magic!r}")
    if version != FRAME_VERSION:
        raise RemoteProtocolError(f"unsupported frame version {version}")
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    return frame_kind, length


class FrameCipher:
    """Seals or opens the frames of one direction of a channel, in order.

    Each frame consumes the next sequence number, which is its nonce: a frame
    that is replayed, dropped or moved is opened with a nonce it was not sealed
    with and fails like a forgery. Each key must serve one direction of one
    session only (the channel derives fresh ones for every connection): that is
    what keeps a nonce from ever being used twice with the same key.
    """

    __slots__ = ("_aead", "_key", "_later", "_sequence")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise LocalProtocolError(f"a frame key must be {KEY_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)
        self._aead = AESGCM(key)
        # The frames opened later (see defer), in another thread: an AEAD of their own.
        self._later: AESGCM | None = None
        self._sequence = 0

    @property
    def sequence(self) -> int:
        """The sequence number of the next frame in this direction."""
        return self._sequence

    def seal(self, kind: FrameKind, payload: bytes) -> bytearray:
        """The next frame in this direction, whole: its header, then its sealed body.

        One fresh buffer, sealed into in place: a frame of header and body
        joined later costs a copy of the payload (45 us a MiB, a quarter of
        the sealing); and a buffer the caller changes later cannot change
        what is sent.
        """
        if len(payload) > MAX_FRAME_LIMIT:
            raise LocalProtocolError(f"payload of {len(payload)} bytes does not fit in a frame")
        if self._sequence >= _SEQUENCE_LIMIT:
            raise LocalProtocolError("sequence numbers exhausted; open a new channel")
        header = encode_header(kind, len(payload) + TAG_SIZE)
        frame = bytearray(HEADER_SIZE + len(payload) + TAG_SIZE)
        frame[:HEADER_SIZE] = header
        with memoryview(frame) as view:
            self._aead.encrypt_into(self._nonce(), payload, header, view[HEADER_SIZE:])
        self._sequence += 1
        return frame

    def open(self, header: bytes, body: bytes | memoryview) -> bytes:
        """The payload of the next frame in this direction, if ``body`` is genuine."""
        if self._sequence >= _SEQUENCE_LIMIT:
            # The sender refuses to seal past this point, so nothing here can be genuine.
            raise RemoteProtocolError("frame after the last sequence number")
        try:
            payload = self._aead.decrypt(self._nonce(), body, header)
        except InvalidTag:
            raise ForgedFrameError("frame failed its integrity check") from None
        self._sequence += 1
        return payload

    def defer(self, header: bytes, body: bytes | memoryview) -> SealedFrame:
        """Take the next frame in this direction as it is, to be opened where it is used.

        The frame consumes its sequence number now, so the frames after it open
        as usual; :meth:`SealedFrame.open` checks it later, in any one thread
        at a time.
        """
        if self._sequence >= _SEQUENCE_LIMIT:
            raise RemoteProtocolError("frame after the last sequence number")
        if self._later is None:
            self._later = AESGCM(self._key)
        frame = SealedFrame(self._later, self._nonce(), header, body)
        self._sequence += 1
        return frame

    def _nonce(self) -> bytes:
        # One conversion gives the documented 4 zero bytes + 8-byte sequence number,
        # since the sequence number never reaches 2**64.
        return self._sequence.to_bytes(_AEAD_NONCE_SIZE, "big")


class SealedFrame:
    """A data frame taken off the wire in order, still sealed: open it where its payload goes.

    Opening a large frame is the receiver's costliest step; done by the thread
    that writes the payload, it leaves the event loop free, and
    :meth:`open_into` puts the payload straight where it is wanted, with no
    copy. Its nonce was fixed when it was taken, so frames can be opened in
    any order, but each must be opened before anything of it is used: a
    forged, replayed or moved frame fails there with
    :class:`~sbs_core.errors.ForgedFrameError`, not when it was taken.
    """

    __slots__ = ("_aead", "_body", "_header", "_nonce", "size")

    def __init__(self, aead: AESGCM, nonce: bytes, header: bytes, body: bytes | memoryview) -> None:
        self._aead = aead
        self._nonce = nonce
        self._header = header
        self._body = body
        #: The size of the payload inside.
        self.size = len(body) - TAG_SIZE

    def __len__(self) -> int:
        return self.size

    def open(self) -> bytes:
        """The payload, if the frame is genuine."""
        try:
            return self._aead.decrypt(self._nonce, self._body, self._header)
        except InvalidTag:
            raise ForgedFrameError("frame failed its integrity check") from None

    def open_into(self, buffer: memoryview) -> None:
        """Write the payload into ``buffer`` (exactly :attr:`size` bytes), if the frame is genuine.

        On a failure the buffer holds no byte of the frame worth keeping.
        """
        if len(buffer) != self.size:
            raise LocalProtocolError(f"the buffer has {len(buffer)} bytes, the frame {self.size}")
        try:
            self._aead.decrypt_into(self._nonce, self._body, self._header, buffer)
        except InvalidTag:
            raise ForgedFrameError("frame failed its integrity check") from None


#: What a receiver gets of a data frame: its payload, or the frame still sealed.
DataPayload = bytes | SealedFrame


def encode_frame(kind: FrameKind, payload: bytes, cipher: FrameCipher | None = None) -> bytes:
    """A whole frame as bytes; sealed (consuming a sequence number) if ``cipher`` is given."""
    if cipher is None:
        return encode_header(kind, len(payload)) + payload
    return bytes(cipher.seal(kind, payload))


class FrameReader:
    """Reassembles frames from the byte stream, however it is split.

    Reads are kept as they came, in a queue. A frame body that lies within one
    read is handed on as a view of it; one that spans several reads is joined
    from them exactly once: a large frame that arrives in many reads costs one
    copy, never one per read, and no buffer is ever grown or shifted.
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

    def feed(self, data: bytes | bytearray) -> None:
        """Append bytes received from the peer."""
        if data:
            # bytes() copies a mutable buffer the caller may reuse, and is free for bytes.
            self._chunks.append(bytes(data))
            self._size += len(data)

    @overload
    def next_frame(
        self, *, max_payload: int, cipher: FrameCipher | None, defer_data: Literal[False] = False
    ) -> Frame | None: ...

    @overload
    def next_frame(
        self, *, max_payload: int, cipher: FrameCipher | None, defer_data: bool
    ) -> Frame | SealedFrame | None: ...

    def next_frame(
        self, *, max_payload: int, cipher: FrameCipher | None, defer_data: bool = False
    ) -> Frame | SealedFrame | None:
        """The next complete frame, or None until more bytes arrive.

        The header is checked as soon as it is complete, so an oversized or
        foreign frame is refused before its body is buffered. With a ``cipher``
        the frame must be sealed under the next sequence number, and
        ``max_payload`` bounds the payload inside, not the sealed body. With
        ``defer_data`` as well, a data frame comes back unopened, as a
        :class:`SealedFrame` (a control frame is always opened here).
        """
        if self._size < HEADER_SIZE:
            return None
        header = self._peek(HEADER_SIZE)
        kind, length = decode_header(header)
        payload_size = length if cipher is None else length - TAG_SIZE
        if payload_size < 0:
            raise RemoteProtocolError(f"sealed frame of {length} bytes is too short for its tag")
        if payload_size > max_payload:
            raise RemoteProtocolError(
                f"frame of {payload_size} bytes exceeds the limit of {max_payload}"
            )
        if self._size < HEADER_SIZE + length:
            return None
        self._take(HEADER_SIZE)
        body = self._take(length)
        if defer_data and cipher is not None and kind is FrameKind.DATA:
            return cipher.defer(header, body)
        # A handshake body is small: copying it out of its read keeps Frame.payload plain bytes.
        payload = bytes(body) if cipher is None else cipher.open(header, body)
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

    def _take(self, size: int) -> bytes | memoryview:
        self._size -= size
        chunks = self._chunks
        offset = self._offset
        first = chunks[0] if chunks else b""
        if len(first) - offset > size:
            self._offset = offset + size
            # A view, not a slice: opening a sealed body needs no copy of it.
            return memoryview(first)[offset : offset + size]
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
        if len(parts) == 1:
            # What lay within one read is handed on without a copy.
            return parts[0]
        return b"".join(parts)
