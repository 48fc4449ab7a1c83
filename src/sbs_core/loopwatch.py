"""A watch on the node's event loop: a stall that could cost a false takeover is logged.

The event loop sends the heartbeats. If something holds it up (a blocking call
that belongs in a worker thread, or one that a busy disk stalls), the peer hears
nothing and, after ``node.dead_time``, takes over from a healthy node. The cause
is then hard to find after the fact. :class:`LoopWatch` makes it plain:

- a task on the loop notes the time every ``tick`` seconds (half of
  ``warn_after``), and the longest delay beyond that; ``sbs status --json``
  shows it (``loop_longest_stall``, ``loop_stalls``);
- a thread of its own looks every ``tick`` seconds; when the loop has not run
  for ``warn_after`` seconds it logs a warning with the code the loop is stuck
  in, while it is stuck, once per stall. A stall over before the thread looked
  is logged by the task afterwards, without the place.

Each wake-up costs about 0.1 ms of CPU here: at a tick of 0.1 s the two took
0.4 % of a core on an idle node, so the tick is as long as the warning allows
(0.25 s for a ``dead_time`` of 1 s, 0.75 s for the default 3 s).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = ("LoopWatch",)

logger = logging.getLogger("sbs")

_FRAMES_SHOWN = 8  # innermost frames of the loop's stack in the warning


class LoopWatch:
    """Measures how late the event loop runs; says where it is held up past ``warn_after``."""

    def __init__(self, *, warn_after: float, tick: float | None = None) -> None:
        tick = warn_after / 2 if tick is None else tick
        if not 0 < tick < warn_after:
            raise ValueError(f"the tick ({tick} s) must be above 0 and below warn_after")
        self.warn_after = warn_after
        self.tick = tick
        self.longest = 0.0  # seconds the loop was later than its tick, at most
        self.stalls = 0  # times it was late by warn_after or more
        self._last = time.monotonic()  # when the loop last ran the tick
        self._loop_thread: int | None = None
        self._reported = -1.0  # the _last of the stall already logged

    def snapshot(self) -> dict[str, Any]:
        """For the node's status."""
        return {"loop_longest_stall": round(self.longest, 3), "loop_stalls": self.stalls}

    @staticmethod
    def offline_snapshot() -> dict[str, Any]:
        """The same keys for a node that is not running."""
        return {"loop_longest_stall": None, "loop_stalls": None}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Tick on this loop until cancelled, with the watching thread beside it."""
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        over = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(over,), name="sbs loop watch", daemon=True
        )
        watcher.start()
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.tick)
                now = time.monotonic()
                self._note(now - self._last - self.tick)
                self._last = now
        finally:
            over.set()  # the thread ends within a tick; a daemon, so never waited for

    def _note(self, late: float) -> None:
        self.longest = max(self.longest, late)
        if late >= self.warn_after:
            self.stalls += 1
            if self._reported != self._last:  # over before the thread looked
                logger.warning(
                    "the event loop did not run for %.2f s, so no heartbeat went out"
                    " meanwhile (the peer takes over after node.dead_time); it was over"
                    " too soon to see where",
                    late + self.tick,
                )

    def _watch(self, over: threading.Event) -> None:
        while not over.wait(self.tick):
            last = self._last
            held = time.monotonic() - last
            if held >= self.warn_after and last != self._reported:
                self._reported = last
                logger.warning(
                    "the event loop has not run for %.2f s, so no heartbeat went out"
                    " meanwhile (the peer takes over after node.dead_time); it is in:\n%s",
                    held,
                    self._where(),
                )

    def _where(self) -> str:
        frame = sys._current_frames().get(self._loop_thread or 0)
        if frame is None:
            return "  (unknown)"
        stack = traceback.extract_stack(frame)[-_FRAMES_SHOWN:]
        return "".join(traceback.format_list(stack)).rstrip()
