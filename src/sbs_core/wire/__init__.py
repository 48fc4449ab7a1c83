"""The peer protocol's secure framing: frames, handshake and sealed (AEAD) frames, without I/O."""

from __future__ import annotations

from sbs_core.wire.channel import (
    NONCE_SIZE,
    SUPPORTED_VERSIONS,
    Authenticated,
    ChannelEvent,
    Closed,
    ControlReceived,
    DataReceived,
    SecureChannel,
)
from sbs_core.wire.frames import (
    DEFAULT_MAX_FRAME,
    FRAME_VERSION,
    HANDSHAKE_MAX_PAYLOAD,
    HEADER_SIZE,
    KEY_SIZE,
    MAGIC,
    MAX_FRAME_LIMIT,
    MAX_PAYLOAD_LIMIT,
    TAG_SIZE,
    Frame,
    FrameCipher,
    FrameKind,
    FrameReader,
    decode_header,
    encode_frame,
    encode_header,
)

__all__ = (
    "DEFAULT_MAX_FRAME",
    "FRAME_VERSION",
    "HANDSHAKE_MAX_PAYLOAD",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_FRAME_LIMIT",
    "MAX_PAYLOAD_LIMIT",
    "NONCE_SIZE",
    "SUPPORTED_VERSIONS",
    "TAG_SIZE",
    "Authenticated",
    "ChannelEvent",
    "Closed",
    "ControlReceived",
    "DataReceived",
    "Frame",
    "FrameCipher",
    "FrameKind",
    "FrameReader",
    "SecureChannel",
    "decode_header",
    "encode_frame",
    "encode_header",
)
