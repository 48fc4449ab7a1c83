"""The interface between a node and whatever runs its managed application and sentinels.

A node that becomes primary starts the managed application and the sentinels
that were active on the other machine; a node that stops being primary stops
them. The driver does that through a :class:`ServiceController`, so the same
driver works with child processes, with the Windows Service Control Manager
and with the fakes of the simulation kit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ("ServiceController",)


class ServiceController(Protocol):
    """Starts and stops the managed application and the named sentinels.

    ``epoch`` is the promotion epoch of the node that asks for the start. It is a
    fencing token: an implementation hands it to what it starts (the process
    controller sets ``SBS_EPOCH``), so a unit of work can tell an order given by
    a stale primary from a current one.

    Every method may be called again with the same arguments; a repeated call
    changes nothing.
    """

    async def start_application(self, *, epoch: int) -> None:
        """Start the managed application unless it is already running."""
        ...

    async def stop_application(self) -> None:
        """Stop the managed application; return once it is gone."""
        ...

    async def start_sentinels(self, names: Sequence[str], *, epoch: int) -> None:
        """Start those of ``names`` that are not running yet.

        Raises :class:`~sbs_core.errors.UnknownSentinelError` for a name the
        controller does not know, before starting anything.
        """
        ...

    async def stop_sentinels(self, names: Sequence[str] | None = None) -> None:
        """Stop the given sentinels (``None``: all of them); return once they are gone."""
        ...

    def running_sentinels(self) -> frozenset[str]:
        """The names of the sentinels that are alive at this moment.

        Cheap and synchronous, so the replication cycle can call it every time it
        builds the list of active sentinels.
        """
        ...
