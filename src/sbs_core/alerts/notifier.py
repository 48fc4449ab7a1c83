"""Carries alerts to the operator: mails through a durable outbox, and the notify command.

:meth:`Notifier.publish` is what the failover path calls: it only puts the event
on an in-memory queue and returns, so a dead SMTP server or a hanging notify
command can never delay a takeover. :meth:`Notifier.run` is the task that does the
slow work, in three independent loops:

- *intake*: each mail-worthy event (see :data:`~.events.MAIL_KINDS`), once the
  rate limit of repeating kinds allows, is written to the outbox (a worker thread);
- *delivery*: the outbox is sent oldest first; while the server is unreachable it
  is retried with exponential backoff, and a mail leaves the outbox only once the
  server took it (at least once: a crash between the two sends it again). At
  start it delivers what a previous run left;
- *hooks*: the ``[notify]`` command runs for every alert, one at a time, in order.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from sbs_core.alerts.compose import compose_mail
from sbs_core.alerts.email import send_mail
from sbs_core.alerts.errors import HookError, MailError, MailRecipientError
from sbs_core.alerts.events import AlertEvent
from sbs_core.alerts.hooks import run_hook
from sbs_core.alerts.outbox import Outbox, OutboxMail
from sbs_core.alerts.repeats import Outgoing, RepeatLimiter
from sbs_core.config import Config

__all__ = ("AlertPublisher", "Notifier")

logger = logging.getLogger("sbs.alerts")

_QUEUE_SIZE: Final = 1000


class AlertPublisher(Protocol):
    """What the driver needs of a notifier (fakes implement just this)."""

    def publish(self, event: AlertEvent) -> None: ...


class Notifier:
    """Mails and notify commands for one node.

    ``retry_interval`` is the first wait after a failed delivery; it doubles after
    each failure up to ``max_retry_interval`` and starts over after a success.
    Call :meth:`publish` from the event loop that runs :meth:`run`. One run per
    instance.
    """

    def __init__(
        self,
        config: Config,
        *,
        retry_interval: float = 1.0,
        max_retry_interval: float = 300.0,
    ) -> None:
        self.email = config.email
        self.notify = config.notify
        self.outbox = Outbox(config.node.state_dir)
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self._limiter = RepeatLimiter(self.email.repeat_interval)
        self._mails = _Queue("mail")
        self._hook_events = _Queue("notify command")
        self._unstored = 0
        self._hooks_waiting = 0
        self._outbox_size = 0
        self._backing_off = False
        # Created in run(): an anyio.Event needs the running event loop.
        self._outbox_changed: anyio.Event | None = None
        self._limiter_changed: anyio.Event | None = None
        self._last_mail_error: str | None = None
        self._last_mail_at: float | None = None
        self._last_hook_error: str | None = None

    # ------------------------------------------------------------------ public

    def publish(self, event: AlertEvent) -> None:
        """Queue ``event`` for the notify command and, if it is mail-worthy, for a mail.

        Never blocks and never raises: if a queue is full the event is dropped from
        it with a log line.
        """
        if self.notify.command is not None and self._hook_events.put(event):
            self._hooks_waiting += 1
        if self.email.enabled and event.sends_mail and self._mails.put(event):
            self._unstored += 1

    def snapshot(self) -> dict[str, Any]:
        """For the node's status: mails waiting, and the last delivery problem."""
        return {
            "outbox_size": self._outbox_size + self._unstored,
            "last_mail_error": self._last_mail_error,
            "last_mail_at": self._last_mail_at,
            "last_hook_error": self._last_hook_error,
        }

    @staticmethod
    def offline_snapshot(state_dir: Path) -> dict[str, Any]:
        """The :meth:`snapshot` keys for a node that is not running (reads, never writes)."""
        return {
            "outbox_size": Outbox(state_dir).count(),
            "last_mail_error": None,
            "last_mail_at": None,
            "last_hook_error": None,
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Do the slow work until cancelled; ready as soon as it has started."""
        self._outbox_changed = anyio.Event()
        self._limiter_changed = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hooks)
                if self.email.enabled:
                    tg.start_soon(self._intake)
                    tg.start_soon(self._summaries)
                    tg.start_soon(self._deliver)
                else:
                    tg.start_soon(self._report_stranded)
                task_status.started()
        finally:
            self._mails.close()
            self._hook_events.close()

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the queued alerts to be mailed and hooked.

        For a planned stop: the last alerts ("stopped") get a chance to leave before
        the task is cancelled. Returns early while the SMTP server is unreachable
        (the delivery is waiting out its backoff). What is not sent stays in the
        outbox for the next start. True if nothing is left.
        """
        with anyio.move_on_after(timeout):
            while self._busy():
                await anyio.sleep(0.02)
        left = (
            self._unstored + self._hooks_waiting + (self._outbox_size if self.email.enabled else 0)
        )
        return left == 0

    def _busy(self) -> bool:
        # A delivery waiting out its backoff will not finish soon: not worth waiting for.
        sending = self.email.enabled and self._outbox_size > 0 and not self._backing_off
        return bool(self._unstored or self._hooks_waiting or sending)

    # ------------------------------------------------------------------ mails

    async def _intake(self) -> None:
        while True:
            event = await self._mails.get()
            try:
                outgoing = self._limiter.offer(event, anyio.current_time())
                if outgoing is None:
                    assert self._limiter_changed is not None
                    self._limiter_changed.set()
                else:
                    await self._store(outgoing)
            finally:
                self._unstored -= 1

    async def _summaries(self) -> None:
        while True:
            changed = self._limiter_changed = anyio.Event()
            due = self._limiter.next_due()
            delay = math.inf if due is None else due - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await changed.wait()
                continue
            for outgoing in self._limiter.take_due(anyio.current_time()):
                await self._store(outgoing)

    async def _store(self, outgoing: Outgoing) -> None:
        try:
            await anyio.to_thread.run_sync(
                lambda: self.outbox.add(outgoing.event, repeats=outgoing.repeats)
            )
        except Exception as exc:  # a full or read-only disk must not end the node
            logger.error(
                "cannot keep the mail about %s in %s (%s); it is sent from memory only",
                outgoing.event.kind,
                self.outbox.folder,
                exc,
            )
            await self._send_unstored(outgoing)
            return
        self._outbox_size += 1
        assert self._outbox_changed is not None
        self._outbox_changed.set()

    async def _send_unstored(self, outgoing: Outgoing) -> None:
        mail = compose_mail(outgoing.event, repeats=outgoing.repeats)
        try:
            await send_mail(self.email, mail.subject, mail.body)
        except Exception as exc:  # a mail problem must never end the node
            self._mail_failed(exc, waiting=0)

    async def _deliver(self) -> None:
        wait = self.retry_interval
        while True:
            changed = self._outbox_changed = anyio.Event()
            try:
                sent_all = await self._deliver_waiting()
            except Exception as exc:  # e.g. an unreadable outbox folder: retry later
                logger.error("mail delivery: %s: %s", type(exc).__name__, exc)
                sent_all = False
            if sent_all:
                wait = self.retry_interval
                await changed.wait()
                continue
            self._backing_off = True
            logger.debug("next mail attempt in %g s", wait)
            # A new mail (a takeover, say) is worth a try at once: the server
            # may be back, and the operator should not wait out the backoff.
            with anyio.move_on_after(wait):
                await changed.wait()
            self._backing_off = False
            wait = min(wait * 2, self.max_retry_interval)

    async def _deliver_waiting(self) -> bool:
        """Send the outbox, oldest first; False at the first mail that must wait."""
        mails = await anyio.to_thread.run_sync(self._waiting_mails)
        self._outbox_size = len(mails)
        for index, mail in enumerate(mails):
            if not await self._deliver_one(mail, waiting=len(mails) - index):
                return False
        return True

    def _waiting_mails(self) -> list[OutboxMail]:
        self.outbox.drop_older_than(self.email.max_age)
        return self.outbox.pending()

    async def _deliver_one(self, mail: OutboxMail, *, waiting: int) -> bool:
        """Send one mail from the outbox; False if it must wait for a retry."""
        text = compose_mail(mail.event, repeats=mail.repeats)
        try:
            await send_mail(self.email, text.subject, text.body)
        except MailError as exc:
            delivered = isinstance(exc, MailRecipientError) and exc.delivered_to
            if not (exc.permanent or delivered):
                self._mail_failed(exc, waiting=waiting)
                return False
            # Sending it again cannot help (or would mail some recipients twice).
            self._last_mail_error = str(exc)
            logger.error("mail %r is not sent again: %s", text.subject, exc)
        except Exception as exc:  # a mail problem must never end the node
            self._mail_failed(exc, waiting=waiting)
            return False
        else:
            if self._last_mail_error is not None:
                logger.info("mail delivery works again")
            self._last_mail_error = None
            self._last_mail_at = time.time()
            logger.info("mail sent: %s", text.subject)
        await anyio.to_thread.run_sync(self.outbox.remove, mail)
        self._outbox_size = max(0, self._outbox_size - 1)
        return True

    def _mail_failed(self, exc: Exception, *, waiting: int) -> None:
        reason = str(exc) if isinstance(exc, MailError) else f"{type(exc).__name__}: {exc}"
        # One line per new problem; the retries of the same one would flood the log.
        level = logging.DEBUG if reason == self._last_mail_error else logging.WARNING
        logger.log(level, "mail not sent (%d waiting in the outbox): %s", waiting, reason)
        self._last_mail_error = reason

    async def _report_stranded(self) -> None:
        count = await anyio.to_thread.run_sync(self.outbox.count)
        self._outbox_size = count
        if count:
            logger.warning(
                "%d mail(s) wait in %s but email is disabled: they are not sent",
                count,
                self.outbox.folder,
            )

    # ------------------------------------------------------------------ notify command

    async def _hooks(self) -> None:
        command = self.notify.command
        while True:
            event = await self._hook_events.get()
            try:
                if command is None:
                    continue
                output = await run_hook(command, event, timeout=self.notify.timeout)
                if output:
                    logger.debug("notify command for %s said: %s", event.kind, output)
                self._last_hook_error = None
            except HookError as exc:
                self._last_hook_error = str(exc)
                logger.warning("notify command for %s: %s", event.kind, exc)
            except Exception:  # a notify problem must never end the node
                self._last_hook_error = "unexpected error, see the log"
                logger.exception("notify command for %s failed", event.kind)
            finally:
                self._hooks_waiting -= 1


class _Queue:
    """Events waiting for one worker: put() never blocks, get() waits for one."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: deque[AlertEvent] = deque()
        self._wakeup: anyio.Event | None = None
        self._closed = False

    def put(self, event: AlertEvent) -> bool:
        if self._closed:
            logger.warning(
                "alerts are no longer sent: the %s about %s is dropped", self.what, event.kind
            )
            return False
        if len(self._items) >= _QUEUE_SIZE:
            logger.error(
                "too many alerts waiting: the %s about %s is dropped", self.what, event.kind
            )
            return False
        self._items.append(event)
        if self._wakeup is not None:
            self._wakeup.set()
        return True

    async def get(self) -> AlertEvent:
        # Taken only once it is returned: a cancelled get() loses nothing.
        while not self._items:
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
