"""sbs: warm-standby failover for a pair of nodes.

The library is layered so each part can be read alone: a pure role state
machine (:mod:`sbs_core.machine`), the peer messages (:mod:`sbs_core.messages`)
and the secure framing (:mod:`sbs_core.wire`), pluggable transports, service
controllers and file syncers, and one anyio driver that wires them to real I/O.
"""

__version__ = "0.1.0"
