"""The secure channel of peer protocol v1: handshake, then sealed frames.

:class:`SecureChannel` is sans-IO, in the manner of wsproto: it never touches
a socket, a clock or a random source. The caller moves bytes:

- ``data_to_send()`` returns what must be written to the peer (right after
  construction: our challenge);
- ``receive_data(data)`` takes what was read (``None`` when the peer closed);
  the peer's protocol errors are raised from here, and only from here;
- ``events()`` then yields what happened, in order.

Both sides first prove knowledge of the shared secret by HMAC challenge and
response, without ever sending it; the initiator proves first, so a peer with
the wrong secret receives nothing but the responder's random challenge. Every
frame after that is encrypted and authenticated with AES-256-GCM under a
per-direction session key. The wire format is described in ``docs/protocol.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from sbs_core.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from sbs_core.wire.frames import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_PAYLOAD,
    MAX_FRAME_LIMIT,
    Frame,
    FrameCipher,
    FrameKind,
    FrameReader,
    SealedFrame,
    encode_frame,
)

__all__ = (
    "NONCE_SIZE",
    "SUPPORTED_VERSIONS",
    "Authenticated",
    "ChannelEvent",
    "Closed",
    "ControlReceived",
    "DataReceived",
    "SealedDataReceived",
    "SecureChannel",
)

#: Protocol versions this implementation speaks, in the handshake's ``versions``.
SUPPORTED_VERSIONS: Final = (1,)
#: Size in bytes of each side's handshake nonce.
NONCE_SIZE: Final = 32

_PROOF_INITIATOR: Final = b"sbs/1 proof initiator"
_PROOF_RESPONDER: Final = b"sbs/1 proof responder"
# The derived keys are the directions' AES-256-GCM keys. The labels are kept from when
# they keyed HMAC tags, so the handshake and its derivation stay exactly as they were.
_KEY_I2R: Final = b"sbs/1 key i2r"
_KEY_R2I: Final = b"sbs/1 key r2i"
_HEX_DIGITS: Final = frozenset("0123456789abcdef")
# A refusal's reason is the peer's text; keep log lines short.
_MAX_REASON_SHOWN: Final = 80


@dataclass(frozen=True, kw_only=True, slots=True)
class Authenticated:
    """Both sides proved they hold the shared secret; sending is now allowed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlReceived:
    """The peer sent a control frame (a JSON message, not parsed here)."""

    payload: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    """The peer sent a data frame (opaque bytes)."""

    payload: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class SealedDataReceived:
    """The peer sent a data frame, handed on unopened (a channel made with ``defer_data``).

    Its payload is known genuine only once :meth:`SealedFrame.open` (or
    ``open_into``) returned: a frame that fails there is the peer's fault,
    as if the channel had failed.
    """

    frame: SealedFrame


@dataclass(frozen=True, kw_only=True, slots=True)
class Closed:
    """The peer closed the connection cleanly, at a frame boundary after the handshake."""


ChannelEvent = Authenticated | ControlReceived | DataReceived | SealedDataReceived | Closed


class _State(Enum):
    AWAIT_CHALLENGE = auto()
    AWAIT_PROOF = auto()
    OPEN = auto()
    CLOSED = auto()


def _mac(secret: bytes, label: bytes, initiator_nonce: bytes, responder_nonce: bytes) -> bytes:
    return hmac.digest(secret, label + initiator_nonce + responder_nonce, hashlib.sha256)


def _strict_hex(value: object, size: int) -> bytes | None:
    # bytes.fromhex alone would also accept spaces and upper case: one spelling only.
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX_DIGITS.issuperset(value):
        return None
    return bytes.fromhex(value)


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_REASON_SHOWN else text[:_MAX_REASON_SHOWN] + "..."


class SecureChannel:
    """One end of an authenticated, encrypted and integrity-protected peer connection.

    ``secret`` is the shared secret of the pair. ``initiator`` is True on the
    side that opened the connection. ``nonce`` must be 32 fresh random bytes
    (``os.urandom(32)``); the channel itself draws no randomness. ``max_frame``
    bounds the payload of every frame after the handshake, in both directions;
    it may be at most :data:`~sbs_core.wire.frames.MAX_FRAME_LIMIT` (2 GiB less 17 bytes).
    With ``defer_data`` the data frames after the handshake come out unopened,
    as :class:`SealedDataReceived`, for the receiver to open where their
    payload goes (see :class:`~sbs_core.wire.frames.SealedFrame`); control
    frames are opened here either way.

    Errors: :meth:`receive_data` raises
    :class:`~sbs_core.errors.RemoteProtocolError` (or its subclass
    :class:`~sbs_core.errors.AuthenticationError` for a wrong proof) when the peer
    breaks the protocol. The channel then stays failed: ``receive_data`` raises
    again, ``send_control``/``send_data`` raise
    :class:`~sbs_core.errors.LocalProtocolError`, while ``events()`` still yields
    what was verified before the fault and ``data_to_send()`` may hold a last
    refusal worth sending before the connection is closed. Misuse of the API
    raises :class:`~sbs_core.errors.LocalProtocolError`.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        initiator: bool,
        nonce: bytes,
        max_frame: int = DEFAULT_MAX_FRAME,
        defer_data: bool = False,
    ) -> None:
        if not secret:
            raise LocalProtocolError("the shared secret must not be empty")
        if len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"the nonce must be {NONCE_SIZE} bytes, not {len(nonce)}")
        if not 1 <= max_frame <= MAX_FRAME_LIMIT:
            raise LocalProtocolError(f"max_frame must be from 1 to {MAX_FRAME_LIMIT}")
        self._secret = bytes(secret)
        self._initiator = initiator
        self._nonce = bytes(nonce)
        self._max_frame = max_frame
        self._defer_data = defer_data
        self._state = _State.AWAIT_CHALLENGE
        self._reader = FrameReader()
        self._outgoing: list[bytes | bytearray] = []
        self._events: deque[ChannelEvent] = deque()
        self._send_cipher: FrameCipher | None = None
        self._receive_cipher: FrameCipher | None = None
        self._peer_nonce = b""
        self._failure: str | None = None
        self._eof = False
        self._send_handshake(
            {"type": "challenge", "versions": list(SUPPORTED_VERSIONS), "nonce": self._nonce.hex()}
        )

    @property
    def initiator(self) -> bool:
        """True on the side that opened the connection."""
        return self._initiator

    @property
    def authenticated(self) -> bool:
        """True once the peer proved it holds the secret (and stays True afterwards)."""
        return self._send_cipher is not None

    @property
    def max_frame(self) -> int:
        """The largest payload allowed in a frame after the handshake."""
        return self._max_frame

    # --- the verbs -----------------------------------------------------------

    def data_to_send(self) -> bytes | bytearray:
        """Take the bytes waiting to be written to the peer (possibly none).

        A lone sealed frame comes as the fresh bytearray it was sealed into.
        """
        # A lone part goes out as is: no copy of a large payload.
        out = self._outgoing[0] if len(self._outgoing) == 1 else b"".join(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes | bytearray | None) -> None:
        """Process bytes read from the peer; ``None`` means the peer closed the connection.

        An empty ``bytes`` is a no-op (not an end of stream). Raises
        :class:`~sbs_core.errors.RemoteProtocolError` when the peer broke the
        protocol, including a close in the middle of a frame or of the handshake.
        """
        if self._failure is not None:
            raise RemoteProtocolError(f"channel already failed: {self._failure}")
        if self._eof:
            raise LocalProtocolError("receive_data() called after the end of the stream")
        try:
            if data is None:
                self._eof = True
                self._on_end_of_stream()
            elif data:
                self._reader.feed(data)
                self._process_frames()
        except RemoteProtocolError as exc:
            self._failure = str(exc)
            raise

    def events(self) -> Iterator[ChannelEvent]:
        """Yield the events produced by ``receive_data`` so far, oldest first. Never raises."""
        while self._events:
            yield self._events.popleft()

    def send_control(self, payload: bytes) -> None:
        """Queue a control frame (a UTF-8 JSON message) for the peer."""
        self._send(FrameKind.CONTROL, payload)

    def send_data(self, payload: bytes) -> None:
        """Queue a data frame (opaque bytes) for the peer."""
        self._send(FrameKind.DATA, payload)

    # --- sending ---------------------------------------------------------------

    def _send(self, kind: FrameKind, payload: bytes) -> None:
        if self._failure is not None:
            raise LocalProtocolError(f"cannot send on a failed channel ({self._failure})")
        if self._send_cipher is None:
            raise LocalProtocolError("cannot send before the handshake has completed")
        if len(payload) > self._max_frame:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes exceeds max_frame={self._max_frame}"
            )
        # The sealed frame is a fresh object, so it doubles as the snapshot of a buffer
        # the caller may change later. Frames are joined once, in data_to_send().
        self._outgoing.append(self._send_cipher.seal(kind, payload))

    def _send_handshake(self, message: dict[str, object]) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        self._outgoing.append(encode_frame(FrameKind.CONTROL, payload))

    # --- receiving -----------------------------------------------------------

    def _process_frames(self) -> None:
        # Limits and ciphers are looked up afresh for every frame, so bytes that follow
        # the last handshake frame in the same read are already opened as sealed frames.
        while True:
            open_ = self._state is _State.OPEN
            frame = self._reader.next_frame(
                max_payload=self._max_frame if open_ else HANDSHAKE_MAX_PAYLOAD,
                cipher=self._receive_cipher,
                defer_data=open_ and self._defer_data,
            )
            if frame is None:
                return
            if isinstance(frame, SealedFrame):
                self._events.append(SealedDataReceived(frame=frame))
            elif not open_:
                self._on_handshake_frame(frame)
            elif frame.kind is FrameKind.CONTROL:
                self._events.append(ControlReceived(payload=frame.payload))
            else:
                self._events.append(DataReceived(payload=frame.payload))

    def _on_end_of_stream(self) -> None:
        if len(self._reader):
            raise RemoteProtocolError("peer closed the connection in the middle of a frame")
        if self._state is not _State.OPEN:
            raise RemoteProtocolError("peer closed the connection during the handshake")
        self._state = _State.CLOSED
        self._events.append(Closed())

    # --- the handshake ---------------------------------------------------------

    def _on_handshake_frame(self, frame: Frame) -> None:
        if frame.kind is not FrameKind.CONTROL:
            raise RemoteProtocolError("data frame during the handshake")
        try:
            # Decoded first: json.loads would also guess UTF-16 and UTF-32 from bytes.
            message = json.loads(frame.payload.decode("utf-8"))
        except (ValueError, RecursionError):
            # ValueError covers bad UTF-8 and bad JSON; deep nesting exhausts recursion.
            raise RemoteProtocolError("handshake message is not valid JSON") from None
        if not isinstance(message, dict):
            raise RemoteProtocolError("handshake message is not a JSON object")
        kind = message.get("type")
        if kind == "refuse":
            raise RemoteProtocolError(
                f"peer refused the handshake: {_shown(message.get('reason'))}"
                f" (it speaks versions {_shown(message.get('versions'))})"
            )
        if self._state is _State.AWAIT_CHALLENGE and kind == "challenge":
            self._on_challenge(message)
        elif self._state is _State.AWAIT_PROOF and kind == "proof":
            self._on_proof(message)
        else:
            raise RemoteProtocolError(f"unexpected handshake message {_shown(kind)}")

    def _on_challenge(self, message: dict[str, object]) -> None:
        versions = message.get("versions")
        if not isinstance(versions, list) or not all(type(version) is int for version in versions):
            raise RemoteProtocolError("challenge has no valid version list")
        # Versions first: a later version may well change what its nonce looks like.
        if not set(versions) & set(SUPPORTED_VERSIONS):
            self._send_handshake(
                {"type": "refuse", "reason": "version", "versions": list(SUPPORTED_VERSIONS)}
            )
            raise RemoteProtocolError(f"no common protocol version; peer speaks {_shown(versions)}")
        peer_nonce = _strict_hex(message.get("nonce"), NONCE_SIZE)
        if peer_nonce is None:
            raise RemoteProtocolError(f"nonce is not {NONCE_SIZE} bytes as lower-case hex")
        if hmac.compare_digest(peer_nonce, self._nonce):
            raise RemoteProtocolError("peer sent our own nonce back")
        self._peer_nonce = peer_nonce
        self._state = _State.AWAIT_PROOF
        if self._initiator:
            self._send_proof()

    def _on_proof(self, message: dict[str, object]) -> None:
        received = _strict_hex(message.get("mac"), hashlib.sha256().digest_size)
        if received is None:
            raise RemoteProtocolError("proof is not a lower-case hex HMAC-SHA256")
        label = _PROOF_RESPONDER if self._initiator else _PROOF_INITIATOR
        if not hmac.compare_digest(received, _mac(self._secret, label, *self._nonces())):
            raise AuthenticationError("peer failed to prove it holds the shared secret")
        if not self._initiator:
            # Only now, with the initiator proven, does the responder reveal anything.
            self._send_proof()
        k_i2r = _mac(self._secret, _KEY_I2R, *self._nonces())
        k_r2i = _mac(self._secret, _KEY_R2I, *self._nonces())
        send_key, receive_key = (k_i2r, k_r2i) if self._initiator else (k_r2i, k_i2r)
        self._send_cipher = FrameCipher(send_key)
        self._receive_cipher = FrameCipher(receive_key)
        self._state = _State.OPEN
        self._events.append(Authenticated())

    def _send_proof(self) -> None:
        label = _PROOF_INITIATOR if self._initiator else _PROOF_RESPONDER
        mac = _mac(self._secret, label, *self._nonces())
        self._send_handshake({"type": "proof", "mac": mac.hex()})

    def _nonces(self) -> tuple[bytes, bytes]:
        """(initiator nonce, responder nonce): the order every MAC input uses."""
        if self._initiator:
            return self._nonce, self._peer_nonce
        return self._peer_nonce, self._nonce
