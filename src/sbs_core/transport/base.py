"""The interface every transport implements.

A transport opens byte streams to the peer and listens for the peer's streams.
The node's driver only ever sees :class:`anyio.abc.ByteStream` and
:class:`anyio.abc.Listener`, so the real TCP transport and the in-memory one used
by simulations are interchangeable, and one test suite runs against both.

The contract, identical for every implementation:

- :meth:`Transport.connect` raises :exc:`ConnectionRefusedError` when nobody
  listens on that address, and another :exc:`OSError` when the address cannot
  be reached (a partition). A connect that hangs is bounded by the caller's own
  timeout (:exc:`TimeoutError` from :func:`anyio.fail_after`).
- :meth:`Transport.listen` raises :exc:`OSError` with ``errno.EADDRINUSE`` when
  the address is already taken. A node that restarts may listen again on its
  port at once.
- On a stream whose peer closed or vanished, ``receive()`` raises
  :exc:`anyio.EndOfStream` (orderly close) or :exc:`anyio.BrokenResourceError`
  (reset), and ``send()`` eventually raises :exc:`anyio.BrokenResourceError`.
  Using a stream after closing it raises :exc:`anyio.ClosedResourceError`.
  ``send()`` takes any bytes-like object, not only ``bytes`` (anyio's
  signature): the channel seals frames into fresh bytearrays. Only
  one task may send and one task may receive at a time
  (:exc:`anyio.BusyResourceError` otherwise).
- Streams provide ``SocketAttribute.local_address`` and
  ``SocketAttribute.remote_address`` as ``(host, port)`` tuples; read them right
  after connecting or accepting, since a socket that has been reset may no
  longer know its peer. Listeners provide ``SocketAttribute.local_port``, so
  listening on port 0 picks a free port.
- ``Listener.serve()`` returns, rather than raising, once the listener has been
  closed with ``aclose()``; streams it already accepted stay open.
"""

from __future__ import annotations

from typing import Protocol

from anyio.abc import ByteStream, Listener

__all__ = ("Transport",)


class Transport(Protocol):
    """Opens streams to a peer and listens for streams from it."""

    async def connect(self, host: str, port: int, *, local_host: str | None = None) -> ByteStream:
        """Open a stream to ``host:port``, from ``local_host`` when given."""
        ...

    async def listen(self, host: str, port: int) -> Listener[ByteStream]:
        """Listen on ``host:port``; port 0 picks a free port."""
        ...
