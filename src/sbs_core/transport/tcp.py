"""The real transport: TCP sockets on asyncio, with a stream of sbs's own.

anyio's socket stream pauses the socket after every read and resumes it before
the next, two system calls per read of at most 256 KiB, and ``receive`` hands
out one read at a time. On a replication of a gigabyte that is thousands of
calls which do nothing: :class:`_TcpStream` keeps reading while what waits
unread stays under :data:`READ_AHEAD`, and pauses only beyond it. Its peer's own
flow control (the replication's credit window) bounds what is ever sent ahead.
anyio still sets up the listening sockets; everything else is asyncio's
transport under anyio's stream interface, so the driver cannot tell the
difference.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack, suppress
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, Listener, SocketListener, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener

__all__ = ("READ_AHEAD", "TcpTransport")

# The keepalive timing options are named differently across systems and older
# Windows lacks some of them; keepalive with the system's default timings is
# still worth having.
_KEEPALIVE_IDLE: int | None = getattr(socket, "TCP_KEEPIDLE", None) or getattr(
    socket, "TCP_KEEPALIVE", None
)
_KEEPALIVE_INTERVAL: int | None = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPALIVE_COUNT: int | None = getattr(socket, "TCP_KEEPCNT", None)

READ_AHEAD = 4 << 20
"""Bytes a stream reads ahead of its reader before it stops reading the socket."""

# Happy eyeballs as anyio's connect_tcp does it: a second address is tried when
# the first has not answered within this many seconds.
_HAPPY_EYEBALLS_DELAY = 0.25


class TcpTransport:
    """A :class:`~sbs_core.transport.base.Transport` over TCP.

    Every connected socket, dialled or accepted, has Nagle's algorithm off, so a
    heartbeat leaves at once, and TCP keepalive on: it is a second line of defence
    against half-open connections, behind the protocol's own heartbeats. The
    keepalive timings are rounded up to whole seconds.
    """

    def __init__(
        self,
        *,
        keepalive_idle_time: float = 10.0,
        keepalive_interval: float = 5.0,
        keepalive_count: int = 3,
    ) -> None:
        if keepalive_idle_time <= 0 or keepalive_interval <= 0 or keepalive_count < 1:
            raise ValueError("keepalive timings must be positive")
        self.keepalive_idle_time = keepalive_idle_time
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count

    async def connect(self, host: str, port: int, *, local_host: str | None = None) -> ByteStream:
        loop = asyncio.get_running_loop()
        family = 0
        if local_host is not None:
            # Only the peer's addresses of the local address's family, as anyio
            # dials: the others cannot be reached from it and would only add
            # their own failures to a refusal.
            local = await loop.getaddrinfo(local_host, 0, type=socket.SOCK_STREAM)
            family = local[0][0]
        # asyncio raises the one error every address gave (ConnectionRefusedError
        # when nobody listens), or a plain OSError when they differ.
        transport, protocol = await loop.create_connection(
            _StreamProtocol,
            host,
            port,
            family=family,
            local_addr=None if local_host is None else (local_host, 0),
            happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
        )
        stream = _TcpStream(transport, protocol)
        self._tune(stream)
        return stream

    async def listen(self, host: str, port: int) -> Listener[ByteStream]:
        # anyio sets the listening sockets up (SO_REUSEADDR, so a restarted node can
        # bind its port again while the previous run's connections linger in
        # TIME_WAIT; one port for every address when port 0 picks it); sbs accepts.
        made = await anyio.create_tcp_listener(local_host=host, local_port=port)
        listeners = [
            _SocketListener(listener.extra(anyio.abc.SocketAttribute.raw_socket), self._tune)
            for listener in made.listeners
        ]
        return _TcpListener(MultiListener(listeners))

    def _tune(self, stream: SocketStream) -> None:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        options = (
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, _KEEPALIVE_IDLE, math.ceil(self.keepalive_idle_time)),
            (socket.IPPROTO_TCP, _KEEPALIVE_INTERVAL, math.ceil(self.keepalive_interval)),
            (socket.IPPROTO_TCP, _KEEPALIVE_COUNT, self.keepalive_count),
        )
        for level, option, value in options:
            # A socket the peer has already reset may refuse options (EINVAL on the
            # BSDs); its stream reports the reset on first use, which is enough.
            if option is not None:
                with suppress(OSError):
                    sock.setsockopt(level, option, value)


class _StreamProtocol(asyncio.Protocol):
    """Keeps what the socket delivers until the stream's reader takes it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.at_eof = False
        self.lost = False
        self.error: Exception | None = None
        self._reader = _Wakeup()
        self._writer = _Wakeup()
        self._writing_paused = False

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # send() returns once the kernel has everything, as anyio's stream does.
        transport.set_write_buffer_limits(0)

    def data_received(self, data: bytes) -> None:
        # The proactor loop on Windows hands over a bytearray it reuses.
        self.chunks.append(data if type(data) is bytes else bytes(data))
        self.buffered += len(data)
        if self.buffered >= READ_AHEAD and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._reader.wake()

    def eof_received(self) -> bool:
        self.at_eof = True
        self._reader.wake()
        return True  # keep the socket open for sending: the peer only half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._reader.wake()
        self._writer.wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writer.wake()

    # -- the stream's side

    def take(self, max_bytes: int) -> bytes | None:
        """The next chunk of at most ``max_bytes``, or None when nothing waits."""
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        if self.paused and self.buffered < READ_AHEAD // 4 and not self.lost:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return chunk

    async def readable(self) -> None:
        """Wait until data, the end of the stream or the loss of the connection."""
        if not (self.chunks or self.at_eof or self.lost):
            await self._reader.wait()

    async def writable(self) -> None:
        """Wait until the kernel took what was written, or the connection is lost."""
        if self._writing_paused and not self.lost:
            await self._writer.wait()


class _Wakeup:
    """Where the one task waiting on a stream's side waits for the protocol's callbacks."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        self._future = asyncio.get_running_loop().create_future()
        try:
            await self._future
        finally:
            self._future = None

    def wake(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class _TcpStream(SocketStream):
    """anyio's socket stream interface over asyncio's transport and our protocol."""

    def __init__(self, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(transport, asyncio.Transport)
        assert isinstance(protocol, _StreamProtocol)
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def _raw_socket(self) -> socket.socket:
        sock: socket.socket = self._transport.get_extra_info("socket")
        return sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        if self._closed:
            raise anyio.ClosedResourceError
        if self._receiving:
            raise anyio.BusyResourceError("reading from")
        self._receiving = True
        try:
            protocol = self._protocol
            if protocol.chunks:
                # Data is waiting: still let the other tasks run, as any receive does.
                await anyio.lowlevel.checkpoint()
            else:
                await protocol.readable()
            chunk = protocol.take(max_bytes)
        finally:
            self._receiving = False
        if chunk is not None:
            return chunk
        if self._closed:
            raise anyio.ClosedResourceError
        if protocol.error is not None:
            raise anyio.BrokenResourceError from protocol.error
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        if self._sending:
            raise anyio.BusyResourceError("writing to")
        self._sending = True
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            await self._protocol.writable()
            self._check_sendable()
            self._transport.write(item)
            if self._protocol.lost or self._transport.get_write_buffer_size():
                await self._protocol.writable()
                self._check_sendable()
            else:
                await anyio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _check_sendable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._protocol.lost or self._transport.is_closing():
            # asyncio drops what is written on a lost connection without a word.
            raise anyio.BrokenResourceError from self._protocol.error

    async def send_eof(self) -> None:
        with suppress(OSError, RuntimeError):
            self._transport.write_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._transport.abort()
        await anyio.lowlevel.checkpoint()


class _SocketListener(SocketListener):
    """Accepts on one listening socket, handing out :class:`_TcpStream`s."""

    def __init__(self, sock: socket.socket, tune: Callable[[SocketStream], None]) -> None:
        self._sock = sock
        self._tune = tune
        self._loop = asyncio.get_running_loop()
        self._accepting: anyio.CancelScope | None = None
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def accept(self) -> SocketStream:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._accepting is not None:
            raise anyio.BusyResourceError("accepting connections from")
        await anyio.lowlevel.checkpoint()
        self._accepting = scope = anyio.CancelScope()
        with scope:
            try:
                client, _ = await self._loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                # A cancelled sock_accept may leave its reader behind (CPython bpo-41317).
                with suppress(ValueError, NotImplementedError):
                    self._loop.remove_reader(self._sock)
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise
            finally:
                self._accepting = None
        transport, protocol = await self._loop.connect_accepted_socket(_StreamProtocol, client)
        stream = _TcpStream(transport, protocol)
        self._tune(stream)
        return stream

    async def aclose(self) -> None:
        self._closed = True
        if self._accepting is not None:
            with suppress(ValueError, NotImplementedError):
                self._loop.remove_reader(self._sock)
            self._accepting.cancel()
        try:
            # Lets a cancelled accept() unwind before its socket closes.
            await anyio.lowlevel.checkpoint()
        finally:
            self._sock.close()


class _TcpListener(Listener[ByteStream]):
    def __init__(self, inner: MultiListener[SocketStream]) -> None:
        self._inner = inner
        self._closed = False

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        async with AsyncExitStack() as stack:
            # Owning the handlers' task group here lets them run on after the
            # listener closes, as accepted sockets outlive their listener.
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            try:
                await self._inner.serve(handler, task_group)
            except* anyio.ClosedResourceError:
                if not self._closed:
                    raise

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes
