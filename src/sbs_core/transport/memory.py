"""An in-memory network for simulations and tests.

A :class:`MemoryNetwork` joins any number of hosts, each reached through its own
:class:`MemoryTransport`. Streams are real :class:`anyio.abc.ByteStream` objects
built from anyio memory object streams, and they fail the way TCP sockets do
(see :mod:`sbs_core.transport.base`). Hosts are plain names compared as
strings: ``"127.0.0.1"`` and ``"localhost"`` are two different hosts.

Fault controls let a test cut the network under a running node:

- :meth:`MemoryNetwork.partition` makes two hosts unreachable from each other,
  silently: new connects fail with ``EHOSTUNREACH``, and nothing already on the
  way between them, data or close, is delivered until :meth:`MemoryNetwork.heal`.
  Senders are not told; once a stream's buffer is full, ``send()`` blocks.
- :meth:`MemoryNetwork.break_connections` resets every stream of a host at
  once, as a crash or a pulled cable that the peer notices would. It acts
  through partitions too.

Each direction of a stream buffers at most :data:`BUFFER_CHUNKS` chunks of at
most :data:`CHUNK_SIZE` bytes (1 MiB), like a socket buffer: a sender blocks when
its peer stops reading, and two peers that both send a lot do not deadlock as
long as each keeps reading.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.stapled import StapledObjectStream

__all__ = ("BUFFER_CHUNKS", "CHUNK_SIZE", "MemoryNetwork", "MemoryTransport")

CHUNK_SIZE = 64 * 1024
BUFFER_CHUNKS = 16

_EPHEMERAL_PORTS = range(49152, 65536)

_Address = tuple[str, int]


def _error(code: int, address: _Address) -> OSError:
    # OSError(errno, ...) builds the matching subclass, e.g. ConnectionRefusedError.
    return OSError(code, f"{os.strerror(code)}: {address[0]}:{address[1]}")


class MemoryNetwork:
    """Hosts, their listeners and the streams between them."""

    def __init__(self) -> None:
        self._listeners: dict[_Address, _MemoryListener] = {}
        self._links: set[_Link] = set()
        self._partitions: set[frozenset[str]] = set()
        self._next_port = _EPHEMERAL_PORTS.start
        # Created on first use, since an anyio event needs a running event loop.
        self._changed: anyio.Event | None = None

    def transport(self, host: str) -> MemoryTransport:
        """The transport of ``host``: its connections originate there."""
        return MemoryTransport(self, host)

    def partition(self, host_a: str, host_b: str) -> None:
        """Cut ``host_a`` off from ``host_b``, silently, until :meth:`heal`."""
        if host_a == host_b:
            raise ValueError(f"cannot partition {host_a!r} from itself")
        self._partitions.add(frozenset((host_a, host_b)))
        self._notify()

    def heal(self, host_a: str, host_b: str) -> None:
        """Undo :meth:`partition`; held data and closes are delivered."""
        self._partitions.discard(frozenset((host_a, host_b)))
        self._notify()

    def break_connections(self, host: str) -> None:
        """Reset every stream that has ``host`` at either end; listeners stay open."""
        for link in [link for link in self._links if host in link.hosts]:
            link.abort()

    def is_partitioned(self, host_a: str, host_b: str) -> bool:
        """Whether :meth:`partition` currently separates the two hosts."""
        return frozenset((host_a, host_b)) in self._partitions

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _listen(self, address: _Address) -> _MemoryListener:
        host, port = address
        if port == 0:
            address = (host, self._free_port(host))
        elif address in self._listeners:
            raise _error(errno.EADDRINUSE, address)
        listener = _MemoryListener(self, address)
        self._listeners[address] = listener
        return listener

    def _connect(self, source: str, destination: _Address) -> _MemoryByteStream:
        if self.is_partitioned(source, destination[0]):
            raise _error(errno.EHOSTUNREACH, destination)
        listener = self._listeners.get(destination)
        if listener is None:
            raise _error(errno.ECONNREFUSED, destination)
        link = _Link(self, (source, self._free_port(source)), destination)
        self._links.add(link)
        listener.enqueue(link.server)
        return link.client

    def _free_port(self, host: str) -> int:
        for _ in _EPHEMERAL_PORTS:
            port = self._next_port
            self._next_port = port + 1 if port + 1 in _EPHEMERAL_PORTS else _EPHEMERAL_PORTS.start
            if (host, port) not in self._listeners:
                return port
        raise _error(errno.EADDRNOTAVAIL, (host, 0))


class MemoryTransport:
    """A :class:`~sbs_core.transport.base.Transport` for one host of a :class:`MemoryNetwork`.

    Like a machine with a single address, it can only listen on and connect from
    its own host; any other address raises ``OSError(EADDRNOTAVAIL)``.
    """

    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self.network = network
        self.host = host

    async def connect(self, host: str, port: int, *, local_host: str | None = None) -> ByteStream:
        await checkpoint()
        self._check_own(local_host if local_host is not None else self.host)
        return self.network._connect(self.host, (host, port))

    async def listen(self, host: str, port: int) -> Listener[ByteStream]:
        await checkpoint()
        self._check_own(host)
        return self.network._listen((host, port))

    def _check_own(self, host: str) -> None:
        if host != self.host:
            raise _error(errno.EADDRNOTAVAIL, (host, 0))


class _Link:
    """The two ends of one connection and the buffers between them."""

    def __init__(self, network: MemoryNetwork, client: _Address, server: _Address) -> None:
        self.network = network
        self.hosts = (client[0], server[0])
        self.broken = False
        upstream_send, upstream_receive = anyio.create_memory_object_stream[bytes](BUFFER_CHUNKS)
        downstream_send, downstream_receive = anyio.create_memory_object_stream[bytes](
            BUFFER_CHUNKS
        )
        self._buffers = (upstream_send, upstream_receive, downstream_send, downstream_receive)
        self.client = _MemoryByteStream(self, upstream_send, downstream_receive, client, server)
        self.server = _MemoryByteStream(self, downstream_send, upstream_receive, server, client)
        self._open_ends = 2

    @property
    def partitioned(self) -> bool:
        return self.network.is_partitioned(*self.hosts)

    def abort(self) -> None:
        if self.broken:
            return
        self.broken = True
        # Closing every buffer wakes the tasks blocked on them; the ends see the
        # broken flag and report a reset.
        for buffer in self._buffers:
            buffer.close()
        self.network._links.discard(self)
        self.network._notify()

    def end_closed(self) -> None:
        self._open_ends -= 1
        if self._open_ends == 0:
            self.network._links.discard(self)
        # Wakes a receiver of this end that waits for a partition to heal.
        self.network._notify()


class _MemoryByteStream(ByteStream):
    def __init__(
        self,
        link: _Link,
        send_buffer: MemoryObjectSendStream[bytes],
        receive_buffer: MemoryObjectReceiveStream[bytes],
        local: _Address,
        remote: _Address,
    ) -> None:
        self._link = link
        self._buffers = StapledObjectStream(send_buffer, receive_buffer)
        self._local = local
        self._remote = remote
        self._closed = False
        self._pending = b""
        self._offset = 0
        self._send_guard = anyio.ResourceGuard("writing to")
        self._receive_guard = anyio.ResourceGuard("reading from")

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._receive_guard:
            self._raise_if_unusable()
            if self._offset < len(self._pending):
                await checkpoint()
            else:
                try:
                    chunk = await self._buffers.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    self._raise_if_unusable()
                    # The peer's close crosses a partition no more than its data.
                    await self._wait_until_reachable()
                    raise
                # Kept before waiting, so a cancelled wait loses nothing.
                self._pending, self._offset = chunk, 0
            await self._wait_until_reachable()
            data = self._pending[self._offset : self._offset + max_bytes]
            self._offset += len(data)
            return data

    async def send(self, item: bytes) -> None:
        with self._send_guard:
            self._raise_if_unusable()
            if not item:
                await checkpoint()
                return
            view = memoryview(item)
            try:
                for start in range(0, len(view), CHUNK_SIZE):
                    # A copy, since the caller may reuse a bytearray once send returns.
                    await self._buffers.send(bytes(view[start : start + CHUNK_SIZE]))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._raise_if_unusable()
                # The peer's close crosses a partition no more than its data.
                await self._wait_until_reachable()
                raise

    async def send_eof(self) -> None:
        self._raise_if_unusable()
        await self._buffers.send_eof()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending = b""
        await self._buffers.aclose()
        self._link.end_closed()

    def abort_link(self) -> None:
        """Reset the connection and release this end, which nobody accepted."""
        self._link.abort()
        if not self._closed:
            self._closed = True
            self._link.end_closed()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            SocketAttribute.local_address: lambda: self._local,
            SocketAttribute.local_port: lambda: self._local[1],
            SocketAttribute.remote_address: lambda: self._remote,
            SocketAttribute.remote_port: lambda: self._remote[1],
        }

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._link.broken:
            raise anyio.BrokenResourceError

    async def _wait_until_reachable(self) -> None:
        while self._link.partitioned:
            self._raise_if_unusable()
            await self._link.network._wait_for_change()
        self._raise_if_unusable()


class _MemoryListener(Listener[ByteStream]):
    def __init__(self, network: MemoryNetwork, address: _Address) -> None:
        self._network = network
        self._address = address
        self._closed = False
        # Unbounded, like a kernel that completes handshakes before accept().
        self._backlog_send, self._backlog = anyio.create_memory_object_stream[_MemoryByteStream](
            math.inf
        )

    def enqueue(self, stream: _MemoryByteStream) -> None:
        self._backlog_send.send_nowait(stream)

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        async with AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while True:
                try:
                    stream = await self._backlog.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                task_group.start_soon(handler, stream)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._network._listeners.get(self._address) is self:
            del self._network._listeners[self._address]
        self._backlog_send.close()
        # Connections nobody accepted are reset, as the kernel does.
        while True:
            try:
                stream = self._backlog.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            stream.abort_link()
        self._backlog.close()
        await checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            SocketAttribute.local_address: lambda: self._address,
            SocketAttribute.local_port: lambda: self._address[1],
        }
