"""Mails not sent yet, kept on disk in ``state_dir/outbox/`` until the server takes them.

One JSON file per mail, written atomically, named by the time it was added so that
sorting the names gives the order of the alerts: a node that restarts, or an SMTP
server that comes back, delivers what is waiting in order. A mail older than
``email.max_age`` is dropped with a log line rather than sent late.

Every method blocks on the disk: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sbs_core.alerts.compose import Repeats
from sbs_core.alerts.events import AlertEvent
from sbs_core.state import write_atomically

__all__ = ("Outbox", "OutboxMail")

logger = logging.getLogger("sbs.alerts")

_FORMAT: Final = 1
_SUFFIX: Final = ".json"
_BAD_SUFFIX: Final = ".bad"


@dataclass(frozen=True, kw_only=True, slots=True)
class OutboxMail:
    """One waiting mail: its file, when it was queued, the alert it tells of."""

    path: Path
    created_at: float
    event: AlertEvent
    repeats: Repeats | None = None


class Outbox:
    """The folder of waiting mails of one node."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "outbox"
        self._lock = threading.Lock()
        self._last_ns = 0

    def add(
        self, event: AlertEvent, *, repeats: Repeats | None = None, now: float | None = None
    ) -> Path:
        """Keep a mail about ``event`` (queued ``now``, default: the current time)."""
        created_ns = time.time_ns() if now is None else int(now * 1e9)
        with self._lock:
            # Names must stay unique and in order even when two mails share a clock tick.
            created_ns = max(created_ns, self._last_ns + 1)
            self._last_ns = created_ns
        record: dict[str, Any] = {
            "format": _FORMAT,
            "created_at": created_ns / 1e9,
            "event": event.to_dict(),
        }
        if repeats is not None:
            record["repeats"] = {"count": repeats.count, "since": repeats.since}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{created_ns:020d}-{event.kind}{_SUFFIX}"
        write_atomically(path, json.dumps(record, ensure_ascii=False, indent=1).encode())
        return path

    def pending(self) -> list[OutboxMail]:
        """The waiting mails, oldest first. An unreadable file is set aside as ``*.bad``."""
        mails = []
        for path in self._files():
            try:
                mails.append(_read(path))
            except (OSError, ValueError) as exc:
                if isinstance(exc, FileNotFoundError):
                    continue  # removed since the listing
                logger.error(
                    "outbox: %s is unreadable (%s); set aside as %s", path, exc, _BAD_SUFFIX
                )
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + _BAD_SUFFIX))
        return mails

    def count(self) -> int:
        return len(self._files())

    def remove(self, mail: OutboxMail | Path) -> None:
        """Forget a mail (sent, or dropped); already gone is fine."""
        path = mail.path if isinstance(mail, OutboxMail) else mail
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def drop_older_than(self, max_age: float, *, now: float | None = None) -> list[OutboxMail]:
        """Remove the mails queued more than ``max_age`` seconds ago; return them."""
        current = time.time() if now is None else now
        dropped = []
        for mail in self.pending():
            age = current - mail.created_at
            if age > max_age:
                logger.warning(
                    "outbox: dropped an unsent mail about %s from %s (%s), queued %.0f s ago,"
                    " older than email.max_age (%g s)",
                    mail.event.kind,
                    mail.event.node_name,
                    mail.event.message,
                    age,
                    max_age,
                )
                self.remove(mail)
                dropped.append(mail)
        return dropped

    def _files(self) -> list[Path]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        # write_atomically's temporary files start with a dot.
        return [self.folder / n for n in sorted(names) if n.endswith(_SUFFIX) and n[0] != "."]


def _read(path: Path) -> OutboxMail:
    record = json.loads(path.read_bytes())
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError("not an outbox file of this version")
    created_at = record.get("created_at")
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        raise ValueError("created_at must be a number")
    event = record.get("event")
    if not isinstance(event, dict):
        raise ValueError("event must be an object")
    repeats = None
    raw = record.get("repeats")
    if raw is not None:
        if not isinstance(raw, dict):
            raise ValueError("repeats must be an object")
        count, since = raw.get("count"), raw.get("since")
        if not isinstance(count, int) or not isinstance(since, int | float):
            raise ValueError("repeats must hold a count and a time")
        repeats = Repeats(count=count, since=float(since))
    return OutboxMail(
        path=path,
        created_at=float(created_at),
        event=AlertEvent.from_dict(event),
        repeats=repeats,
    )
