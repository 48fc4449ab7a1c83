"""At most one mail per repeating kind per ``email.repeat_interval``.

A replication that fails every cycle must not send a mail every cycle. The first
failure is mailed at once and opens a window; failures inside the window are
counted, and when it ends the latest of them is mailed with "N more since ...",
which opens the next window. A window that ends with nothing held back closes, so
the next failure is mailed at once again.

Pure: the caller passes the monotonic time in and sleeps until :meth:`next_due`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sbs_core.alerts.compose import Repeats
from sbs_core.alerts.events import REPEATING_KINDS, AlertEvent

__all__ = ("Outgoing", "RepeatLimiter")


@dataclass(frozen=True, kw_only=True, slots=True)
class Outgoing:
    """A mail to queue now."""

    event: AlertEvent
    repeats: Repeats | None = None


@dataclass(kw_only=True, slots=True)
class _Window:
    opened_at: float
    mailed_at: float
    """Wall time of the alert of the mail that opened the window."""
    held: int = 0
    latest: AlertEvent | None = None


class RepeatLimiter:
    def __init__(self, interval: float, kinds: frozenset[str] = REPEATING_KINDS) -> None:
        self.interval = interval
        self.kinds = kinds
        self._windows: dict[str, _Window] = {}

    def offer(self, event: AlertEvent, now: float) -> Outgoing | None:
        """The mail to queue for ``event`` now, or None if it is held back."""
        if event.kind not in self.kinds:
            return Outgoing(event=event)
        window = self._windows.get(event.kind)
        if window is not None and now - window.opened_at < self.interval:
            window.held += 1
            window.latest = event
            return None
        repeats = None
        if window is not None and window.held:
            # The caller was late to collect the window: report what it held here.
            repeats = Repeats(count=window.held, since=window.mailed_at)
        self._windows[event.kind] = _Window(opened_at=now, mailed_at=event.at)
        return Outgoing(event=event, repeats=repeats)

    def next_due(self) -> float | None:
        """When :meth:`take_due` next has a mail to give, if ever without new alerts."""
        due = [w.opened_at + self.interval for w in self._windows.values() if w.held]
        return min(due, default=None)

    def take_due(self, now: float) -> list[Outgoing]:
        """The summary mails of the windows that have ended by ``now``."""
        out = []
        for kind, window in list(self._windows.items()):
            if now - window.opened_at < self.interval:
                continue
            if window.latest is None or not window.held:
                del self._windows[kind]
                continue
            out.append(
                Outgoing(
                    event=window.latest,
                    repeats=Repeats(count=window.held, since=window.mailed_at),
                )
            )
            self._windows[kind] = _Window(opened_at=now, mailed_at=window.latest.at)
        return out
