"""Pluggable transports: how a node reaches its peer.

:class:`Transport` is the interface; :class:`TcpTransport` is the real one and
:class:`MemoryNetwork` an in-memory network with fault controls for
simulations. Both pass the same test suite.
"""

from __future__ import annotations

from .base import Transport
from .memory import MemoryNetwork, MemoryTransport
from .tcp import TcpTransport

__all__ = ("MemoryNetwork", "MemoryTransport", "TcpTransport", "Transport")
