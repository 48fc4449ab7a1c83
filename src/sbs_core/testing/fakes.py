"""In-memory stand-ins for what a node drives: its controller and its durable store.

:class:`FakeController` has the method names of
:class:`~sbs_core.controller.base.ServiceController`, async as the protocol
wants, plus ``…_nowait`` twins that act at once, so a discrete-event simulation
can use it without an event loop. It remembers every call, so a test can ask
not only *what* runs but *in which order* things were started and stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from sbs_core.alerts.events import AlertEvent
from sbs_core.errors import UnknownSentinelError
from sbs_core.machine import PersistedState

__all__ = ("ControllerCall", "FakeController", "FakeNotifier", "FakeStore")


@dataclass(frozen=True, kw_only=True, slots=True)
class ControllerCall:
    """One call that changed what runs; ``names`` is what it actually started or stopped.

    ``at`` is the controller's clock reading, when it was given one.
    """

    op: Literal["start_application", "stop_application", "start", "stop", "kill"]
    names: tuple[str, ...] = ()
    epoch: int | None = None
    at: float | None = None


class FakeController:
    """Runs nothing, remembers everything; repeated calls change nothing, as the protocol says.

    ``known``: the sentinel names the configuration defines; ``None`` accepts any name.
    ``clock``: stamps each recorded call (a :class:`~sbs_core.testing.VirtualClock`
    fits), so a test can tell which of two controllers stopped before the other started.
    """

    def __init__(
        self, known: Collection[str] | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.known = frozenset(known) if known is not None else None
        self.calls: list[ControllerCall] = []
        self._clock = clock
        self._application_epoch: int | None = None
        self._sentinels: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    def running_sentinels(self) -> frozenset[str]:
        return frozenset(self._sentinels)

    @property
    def application_running(self) -> bool:
        return self._application_epoch is not None

    @property
    def application_epoch(self) -> int | None:
        """The epoch the running application was started with; None when it is stopped."""
        return self._application_epoch

    @property
    def sentinel_epochs(self) -> Mapping[str, int]:
        """Each running sentinel and the epoch (fencing token) it was started with."""
        return MappingProxyType(self._sentinels)

    @property
    def active(self) -> bool:
        """Anything runs here: the application or a sentinel."""
        return self.application_running or bool(self._sentinels)

    # ------------------------------------------------------------------ immediate

    def start_application_nowait(self, *, epoch: int) -> None:
        if self._application_epoch is None:
            self._application_epoch = epoch
            self._record(ControllerCall(op="start_application", epoch=epoch))

    def stop_application_nowait(self) -> None:
        if self._application_epoch is not None:
            self._application_epoch = None
            self._record(ControllerCall(op="stop_application"))

    def start_sentinels_nowait(self, names: Sequence[str], *, epoch: int) -> None:
        unknown = sorted(set(names) - self.known) if self.known is not None else []
        if unknown:
            raise UnknownSentinelError(f"unknown sentinel(s): {', '.join(unknown)}")
        started = tuple(name for name in dict.fromkeys(names) if name not in self._sentinels)
        for name in started:
            self._sentinels[name] = epoch
        if started:
            self._record(ControllerCall(op="start", names=started, epoch=epoch))

    def stop_sentinels_nowait(self, names: Iterable[str] | None = None) -> None:
        wanted = self._sentinels.keys() if names is None else set(names)
        stopped = tuple(sorted(name for name in wanted if name in self._sentinels))
        for name in stopped:
            del self._sentinels[name]
        if stopped:
            self._record(ControllerCall(op="stop", names=stopped))

    def kill(self) -> None:
        """Everything dies at once, as when the node's process is killed."""
        if self.active:
            self._record(ControllerCall(op="kill", names=tuple(sorted(self._sentinels))))
        self._sentinels.clear()
        self._application_epoch = None

    def _record(self, call: ControllerCall) -> None:
        if self._clock is not None:
            call = replace(call, at=self._clock())
        self.calls.append(call)

    # ------------------------------------------------------------------ ServiceController

    async def start_application(self, *, epoch: int) -> None:
        self.start_application_nowait(epoch=epoch)

    async def stop_application(self) -> None:
        self.stop_application_nowait()

    async def start_sentinels(self, names: Sequence[str], *, epoch: int) -> None:
        self.start_sentinels_nowait(names, epoch=epoch)

    async def stop_sentinels(self, names: Sequence[str] | None = None) -> None:
        self.stop_sentinels_nowait(names)


class FakeStore:
    """A node's durable state: survives crashes and restarts of the simulated node.

    ``history`` holds every state saved, oldest first, so a test can check that
    what is durable never went backwards.
    """

    def __init__(self, initial: PersistedState | None = None) -> None:
        self._state = initial if initial is not None else PersistedState()
        self.history: list[PersistedState] = []

    @property
    def state(self) -> PersistedState:
        return self._state

    def load(self) -> PersistedState:
        return self._state

    def save(self, state: PersistedState) -> None:
        self._state = state
        self.history.append(state)


class FakeNotifier:
    """Takes the place of the notifier: keeps every alert event published, in order."""

    def __init__(self) -> None:
        self.events: list[AlertEvent] = []

    def publish(self, event: AlertEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]
