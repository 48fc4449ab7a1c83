"""A fake TCP network between simulated hosts: ordered, delayed, partitionable.

What it keeps from TCP, because the role machine's correctness depends on it:

- each direction of a connection delivers in order, each segment after a
  seeded random one-way latency, never before the one sent ahead of it;
- a partition loses nothing: segments in flight or sent meanwhile are held and
  delivered in order after :meth:`FakeNetwork.heal` (retransmission), unless
  the connection was given up meanwhile;
- a connection attempt to a host where no process holds the port is refused
  (a reset, one round trip); to a host where a process holds the port it is
  accepted by the kernel even if that process never answers (a hung node);
- an orderly close sends a FIN after what was queued before it.

Hosts are plain names; the owner of the network says whether a process listens
on a host (``listening``) and receives every segment that arrives
(``deliver``). What a process does with it, and when, is the owner's business.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sbs_core.messages import Hello, Message
from sbs_core.testing.clock import Timeline

__all__ = (
    "DataArrived",
    "Delivery",
    "FakeNetwork",
    "FinArrived",
    "HelloArrived",
    "Incoming",
    "Link",
    "Refused",
)


class Link:
    """One TCP connection, from the first SYN to the last FIN, between two hosts."""

    def __init__(self, link_id: int, initiator: str, responder: str) -> None:
        self.id = link_id
        self.initiator = initiator
        self.responder = responder
        self.accepted = False  # the responder's kernel took the connection
        self.dropped = False  # given up before it was accepted, or refused
        self.fin_sent: set[str] = set()
        self._queues: dict[str, deque[_Segment]] = {initiator: deque(), responder: deque()}
        self._last_at: dict[str, float] = {initiator: 0.0, responder: 0.0}

    def other(self, host: str) -> str:
        return self.responder if host == self.initiator else self.initiator

    def in_flight(self, sender: str) -> int:
        """Segments sent by ``sender`` and not yet delivered (held ones included)."""
        return len(self._queues[sender])

    def __repr__(self) -> str:
        return f"<Link {self.id} {self.initiator}->{self.responder}>"


@dataclass(eq=False, slots=True)
class _Segment:
    kind: Literal["syn", "hello", "data", "fin", "rst"]
    hello: Hello | None = None
    message: Message | None = None
    token: int = 0  # bumped on every (re)scheduling; stale arrivals are ignored


@dataclass(frozen=True, slots=True)
class Incoming:
    """A connection reached the responder's host and its kernel accepted it."""

    link: Link


@dataclass(frozen=True, slots=True)
class HelloArrived:
    """The other end's handshake and Hello arrived."""

    link: Link
    hello: Hello


@dataclass(frozen=True, slots=True)
class DataArrived:
    link: Link
    message: Message


@dataclass(frozen=True, slots=True)
class FinArrived:
    """The other end closed (or its process died and its kernel closed for it)."""

    link: Link


@dataclass(frozen=True, slots=True)
class Refused:
    """Nobody held the port: the connection attempt was reset."""

    link: Link


Delivery = Incoming | HelloArrived | DataArrived | FinArrived | Refused


class FakeNetwork:
    """Carries segments between hosts on a :class:`~sbs_core.testing.clock.Timeline`."""

    def __init__(
        self,
        timeline: Timeline,
        rng: random.Random,
        *,
        latency: tuple[float, float],
        listening: Callable[[str], bool],
        deliver: Callable[[str, Delivery], None],
    ) -> None:
        low, high = latency
        if not 0 < low <= high:
            raise ValueError(f"latency must satisfy 0 < low <= high, got {latency}")
        self._timeline = timeline
        self._rng = rng
        self._latency = (low, high)
        self._listening = listening
        self._deliver = deliver
        self._partitioned = False
        self._links: dict[int, Link] = {}
        self._next_id = 0

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    @property
    def max_latency(self) -> float:
        return self._latency[1]

    def links(self) -> tuple[Link, ...]:
        """Connections that still have something in flight or an end not yet closed."""
        return tuple(self._links.values())

    # ------------------------------------------------------------------ faults

    def partition(self) -> None:
        """Cut both directions; nothing is lost, everything waits for :meth:`heal`."""
        self._partitioned = True

    def heal(self) -> None:
        if not self._partitioned:
            return
        self._partitioned = False
        for link in list(self._links.values()):
            for sender in (link.initiator, link.responder):
                for segment in link._queues[sender]:
                    self._schedule(link, sender, segment)

    # ------------------------------------------------------------------ sending

    def connect(self, initiator: str, responder: str) -> Link:
        """Start a connection attempt."""
        self._next_id += 1
        link = Link(self._next_id, initiator, responder)
        self._links[link.id] = link
        self._push(link, initiator, _Segment("syn"))
        return link

    def send_hello(self, link: Link, sender: str, hello: Hello) -> None:
        self._push(link, sender, _Segment("hello", hello=hello))

    def send(self, link: Link, sender: str, message: Message) -> None:
        self._push(link, sender, _Segment("data", message=message))

    def close(self, link: Link, sender: str) -> None:
        """Close ``sender``'s end: a FIN after its queued segments, or abort a bare attempt."""
        if link.dropped or sender in link.fin_sent:
            return
        if sender == link.initiator and not link.accepted:
            self._drop(link)
            return
        self._push(link, sender, _Segment("fin"))
        link.fin_sent.add(sender)

    # ------------------------------------------------------------------ inside

    def _push(self, link: Link, sender: str, segment: _Segment) -> None:
        if link.dropped or sender in link.fin_sent:
            return
        link._queues[sender].append(segment)
        if not self._partitioned:
            self._schedule(link, sender, segment)

    def _schedule(self, link: Link, sender: str, segment: _Segment) -> None:
        now = self._timeline.clock.now
        at = max(now + self._rng.uniform(*self._latency), link._last_at[sender])
        link._last_at[sender] = at
        segment.token += 1
        token = segment.token
        self._timeline.call_at(at, lambda: self._arrive(link, sender, segment, token))

    def _arrive(self, link: Link, sender: str, segment: _Segment, token: int) -> None:
        if link.dropped or segment.token != token or self._partitioned:
            return  # stale, or held until the partition heals
        queue = link._queues[sender]
        # Arrivals are scheduled in queue order at non-decreasing times, and ties
        # run in scheduling order: the head is always the one arriving.
        assert queue, "a segment arrived from an empty queue"
        assert queue[0] is segment, "segments out of order"
        queue.popleft()
        receiver = link.other(sender)
        match segment.kind:
            case "syn":
                if self._listening(receiver):
                    link.accepted = True
                    self._deliver(receiver, Incoming(link))
                else:
                    self._push(link, receiver, _Segment("rst"))
            case "rst":
                self._drop(link)
                self._deliver(receiver, Refused(link))
            case "hello":
                assert segment.hello is not None
                self._deliver(receiver, HelloArrived(link, segment.hello))
            case "data":
                assert segment.message is not None
                self._deliver(receiver, DataArrived(link, segment.message))
            case "fin":
                if len(link.fin_sent) == 2 and not any(link._queues.values()):
                    del self._links[link.id]
                self._deliver(receiver, FinArrived(link))

    def _drop(self, link: Link) -> None:
        link.dropped = True
        for queue in link._queues.values():
            queue.clear()
        self._links.pop(link.id, None)
