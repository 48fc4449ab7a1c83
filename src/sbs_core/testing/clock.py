"""Virtual time: a clock that moves only when told to, and a timeline of things due.

The role machine never reads a clock; whoever drives it passes ``now``. In a
simulation that ``now`` comes from a :class:`VirtualClock`, so a run that covers
minutes of failovers takes milliseconds and gives the same result every time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ("ScheduledCall", "Timeline", "VirtualClock")


class VirtualClock:
    """A monotonic clock in float seconds that only :meth:`advance` moves.

    Calling the clock returns :attr:`now`, so it can stand in for
    ``time.monotonic`` wherever a function returning the time is expected.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (not negative); return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds
        return self._now

    def advance_to(self, instant: float) -> float:
        """Move forward to ``instant``; moving to the current time is allowed."""
        if instant < self._now:
            raise ValueError(f"a clock cannot go back (from {self._now} to {instant})")
        self._now = instant
        return self._now


@dataclass(order=True, slots=True)
class ScheduledCall:
    """A callback on a :class:`Timeline`; :meth:`cancel` keeps it from running."""

    at: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class Timeline:
    """Callbacks due at virtual instants, run in time order, ties in scheduling order.

    Ties keep their scheduling order so that two runs with the same seed
    interleave events identically.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[ScheduledCall] = []
        self._seq = 0

    def call_at(self, at: float, callback: Callable[[], None]) -> ScheduledCall:
        """Run ``callback`` at ``at`` (at the current time if ``at`` is past)."""
        self._seq += 1
        entry = ScheduledCall(max(at, self.clock.now), self._seq, callback)
        heapq.heappush(self._heap, entry)
        return entry

    def call_later(self, delay: float, callback: Callable[[], None]) -> ScheduledCall:
        return self.call_at(self.clock.now + delay, callback)

    def next_at(self) -> float | None:
        """When the next live callback is due, or None when nothing is scheduled."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].at if self._heap else None

    def run_next(self) -> bool:
        """Advance the clock to the next live callback and run it; False if none."""
        if self.next_at() is None:
            return False
        entry = heapq.heappop(self._heap)
        self.clock.advance_to(entry.at)
        entry.callback()
        return True
