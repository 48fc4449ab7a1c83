"""The real transport: TCP sockets through anyio."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack, suppress
from typing import Any

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener

__all__ = ("TcpTransport",)

# The keepalive timing options are named differently across systems and older
# Windows lacks some of them; keepalive with the system's default timings is
# still worth having.
_KEEPALIVE_IDLE: int | None = getattr(socket, "TCP_KEEPIDLE", None) or getattr(
    socket, "TCP_KEEPALIVE", None
)
_KEEPALIVE_INTERVAL: int | None = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPALIVE_COUNT: int | None = getattr(socket, "TCP_KEEPCNT", None)


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
        try:
            stream = await anyio.connect_tcp(host, port, local_host=local_host)
        except OSError as exc:
            specific = _specific_error(exc)
            if specific is exc:
                raise
            raise specific from exc
        self._tune(stream)
        return stream

    async def listen(self, host: str, port: int) -> Listener[ByteStream]:
        # anyio sets SO_REUSEADDR, so a restarted node can bind its port again while
        # the previous run's connections linger in TIME_WAIT.
        inner = await anyio.create_tcp_listener(local_host=host, local_port=port)
        return _TcpListener(inner, self._tune)

    def _tune(self, stream: SocketStream) -> None:
        sock = stream.extra(SocketAttribute.raw_socket)
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


class _TcpListener(Listener[ByteStream]):
    def __init__(
        self, inner: MultiListener[SocketStream], tune: Callable[[SocketStream], None]
    ) -> None:
        self._inner = inner
        self._tune = tune
        self._closed = False

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        async def tuned(stream: SocketStream) -> None:
            self._tune(stream)
            await handler(stream)

        async with AsyncExitStack() as stack:
            # Owning the handlers' task group here lets them run on after the
            # listener closes, as accepted sockets outlive their listener.
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            try:
                await self._inner.serve(tuned, task_group)
            except* anyio.ClosedResourceError:
                if not self._closed:
                    raise

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


def _specific_error(exc: OSError) -> OSError:
    """Turn anyio's "all connection attempts failed" back into the error that caused it.

    Callers tell "nobody listens" from "unreachable" by the exception type, so a
    refusal must surface as :exc:`ConnectionRefusedError`.
    """
    cause = exc.__cause__
    causes = list(cause.exceptions) if isinstance(cause, BaseExceptionGroup) else [cause]
    failures = [c for c in causes if isinstance(c, OSError)]
    if not failures or len(failures) != len(causes):
        return exc
    errnos = {failure.errno for failure in failures}
    if len(errnos) != 1 or failures[0].errno is None:
        return exc
    # OSError(errno, ...) builds the matching subclass, e.g. ConnectionRefusedError.
    return OSError(failures[0].errno, failures[0].strerror)
