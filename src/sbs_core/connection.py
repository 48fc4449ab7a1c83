"""One authenticated connection to the peer: handshake, two outbound lanes, reader and writer.

Outbound frames wait in two lanes. The *urgent* lane carries the role machine's
messages (heartbeats, handovers) and always goes first, so a heartbeat never
waits behind megabytes of file data. The *bulk* lane carries replication
messages and data frames in their exact order, and is bounded: a sender that
fills it waits. Frames are sealed by the channel when the writer takes them, so
the channel's sequence numbers follow the order on the wire.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import anyio
from anyio.abc import ByteStream, SocketAttribute

from sbs_core.errors import LocalProtocolError, ProtocolError, SbsError
from sbs_core.messages import Hello, Message, decode_message, encode_message
from sbs_core.wire import (
    Authenticated,
    Closed,
    ControlReceived,
    DataPayload,
    DataReceived,
    SealedDataReceived,
    SecureChannel,
)

__all__ = ("ConnectionGone", "Heard", "PeerConnection", "handshake", "remote_host")

logger = logging.getLogger("sbs")

# asyncio reads at most 256 KiB at a time; asking anyio for less makes it split
# (copy) each read. Measured on "large": the secondary's CPU 2.35 s against 2.73 s.
_READ_SIZE = 256 * 1024
BULK_LIMIT = 4 << 20  # bytes queued in the bulk lane before a sender waits


class ConnectionGone(SbsError, ConnectionError):
    """The connection closed while something still wanted to send on it."""


@dataclass(slots=True)
class Heard:
    """Set once anything arrived from the peer: an answer, as opposed to silence."""

    anything: bool = False


async def handshake(
    stream: ByteStream, channel: SecureChannel, hello: Callable[[], Hello], heard: Heard
) -> Hello:
    """Prove the secret both ways, then exchange Hellos; the peer's Hello."""
    await _send(stream, channel.data_to_send())
    sent_hello = False
    while True:
        try:
            data: bytes | None = await stream.receive(65536)
            heard.anything = True
        except anyio.EndOfStream:
            data = None
        channel.receive_data(data)
        for event in channel.events():
            match event:
                case Authenticated():
                    channel.send_control(encode_message(hello()))
                    sent_hello = True
                case ControlReceived(payload=payload) if sent_hello:
                    message = decode_message(payload)
                    if not isinstance(message, Hello):
                        raise ProtocolError(f"expected hello, got {message.type}")
                    out = channel.data_to_send()
                    if out:
                        await _send(stream, out)
                    return message
                case Closed():
                    raise anyio.EndOfStream
                case _:
                    raise ProtocolError("unexpected frame during the handshake")
        out = channel.data_to_send()
        if out:
            await _send(stream, out)


async def _send(stream: ByteStream, data: bytes | bytearray) -> None:
    """Write what the channel gave: every transport's ``send`` takes a bytearray too."""
    # anyio's signature says bytes; sbs's transports take any bytes-like object
    # (transport.base), and a sealed frame is a bytearray: no copy into bytes.
    await stream.send(cast(bytes, data))


def remote_host(stream: ByteStream) -> str:
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    if isinstance(address, tuple):
        return str(address[0])
    return str(address)


_Frame = tuple[bool, bytes]  # (is data, payload)


class PeerConnection:
    """An authenticated connection; ``run()`` moves bytes until it closes."""

    def __init__(self, conn_id: int, stream: ByteStream, channel: SecureChannel, host: str) -> None:
        self.id = conn_id
        self.stream = stream
        self.channel = channel
        self.peer_host = host
        self.last_heard_wall = time.time()
        # The longest wait between two control messages from the peer: heartbeats
        # come every heartbeat_interval, so this shows whether bulk data starved them.
        self.longest_silence = 0.0
        self._last_control = time.monotonic()
        self.flushed = anyio.Event()
        self._urgent: deque[bytes] = deque()
        self._bulk: deque[_Frame] = deque()
        self._bulk_bytes = 0
        self._ready = anyio.Event()
        self._room = anyio.Event()
        self._closing = False
        self._broken: str | None = None  # why we closed it, when the peer broke the protocol

    # ------------------------------------------------------------------ sending

    def send_urgent(self, message: Message) -> None:
        if not self._closing:
            self._urgent.append(encode_message(message))
            self._ready.set()

    async def send_bulk(self, message: Message) -> None:
        await self._put_bulk((False, encode_message(message)))

    async def send_data(self, payload: bytes) -> None:
        await self._put_bulk((True, payload))

    async def _put_bulk(self, frame: _Frame) -> None:
        while self._bulk_bytes >= BULK_LIMIT and not self._closing:
            await self._room.wait()
        if self._closing:
            raise ConnectionGone(f"connection to {self.peer_host} closed")
        self._bulk.append(frame)
        self._bulk_bytes += len(frame[1])
        self._ready.set()

    def break_off(self, reason: str) -> None:
        """Close the connection because the peer broke the protocol (found out elsewhere)."""
        self._broken = self._broke(reason)
        self.close()

    def _broke(self, reason: object) -> str:
        """Log that the peer broke the protocol; the connection's end reason."""
        logger.warning("peer %s broke the protocol: %s", self.peer_host, reason)
        return f"protocol error: {reason}"

    def close(self, last_words: Message | None = None) -> None:
        """Send ``last_words`` (urgent frames already queued go first), then close."""
        if last_words is not None:
            self.send_urgent(last_words)
        self._closing = True
        self._bulk.clear()
        self._bulk_bytes = 0
        self._ready.set()
        self._room.set()

    # ------------------------------------------------------------------ running

    async def run(
        self, on_message: Callable[[Message], None], on_data: Callable[[DataPayload], None]
    ) -> str:
        """Read and write until the connection ends; why it ended."""
        reason = "closed"
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer)
                reason = await self._reader(on_message, on_data)
                tg.cancel_scope.cancel()
        finally:
            self._closing = True
            self._room.set()
            self.flushed.set()
            await anyio.aclose_forcefully(self.stream)
        return reason

    async def _next_frame(self) -> _Frame | None:
        while True:
            if self._urgent:
                return (False, self._urgent.popleft())
            if self._closing:
                return None
            if self._bulk:
                frame = self._bulk.popleft()
                self._bulk_bytes -= len(frame[1])
                if self._bulk_bytes < BULK_LIMIT:
                    self._room.set()
                    self._room = anyio.Event()
                return frame
            await self._ready.wait()
            self._ready = anyio.Event()

    async def _writer(self) -> None:
        try:
            while (frame := await self._next_frame()) is not None:
                is_data, payload = frame
                try:
                    if is_data:
                        self.channel.send_data(payload)
                    else:
                        self.channel.send_control(payload)
                except LocalProtocolError:
                    return  # the reading side failed the channel; it is closing
                try:
                    await _send(self.stream, self.channel.data_to_send())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
            with anyio.move_on_after(1, shield=True):
                await self.stream.aclose()
        finally:
            self.flushed.set()

    async def _reader(
        self, on_message: Callable[[Message], None], on_data: Callable[[DataPayload], None]
    ) -> str:
        while True:
            try:
                data: bytes | None = await self.stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                return self._broken or describe(exc)
            try:
                self.channel.receive_data(data)
                for event in self.channel.events():
                    match event:
                        case ControlReceived(payload=payload):
                            self.last_heard_wall = time.time()
                            now = time.monotonic()
                            self.longest_silence = max(
                                self.longest_silence, now - self._last_control
                            )
                            self._last_control = now
                            on_message(decode_message(payload))
                        case DataReceived(payload=payload):
                            self.last_heard_wall = time.time()
                            on_data(payload)
                        case SealedDataReceived(frame=frame):
                            self.last_heard_wall = time.time()
                            on_data(frame)
                        case Closed():
                            return "closed by the peer"
                        case _:
                            pass
            except ProtocolError as exc:
                return self._broke(exc)
            if data is None:
                return "closed by the peer"


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, anyio.EndOfStream):
        return "closed by the peer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
