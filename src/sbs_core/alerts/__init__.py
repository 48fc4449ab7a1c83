"""Telling the operator: alert mails (through a durable outbox) and the notify command.

The driver turns each role-machine :class:`~sbs_core.machine.Alert` into an
:class:`AlertEvent` and hands it to :meth:`Notifier.publish`, which returns at once;
:meth:`Notifier.run`, a task of the node, sends the mails and runs the command.
``sbs email test`` uses :func:`send_mail` directly. See docs/alerts.md.
"""

from sbs_core.alerts.compose import Mail, Repeats, compose_mail, email_test_event
from sbs_core.alerts.email import build_message, send_mail
from sbs_core.alerts.errors import (
    HookError,
    HookTimeoutError,
    MailAuthError,
    MailConnectError,
    MailError,
    MailRecipientError,
    MailTimeoutError,
    MailTLSError,
)
from sbs_core.alerts.events import (
    EVENT_FORMAT,
    MAIL_KINDS,
    REPEATING_KINDS,
    AlertEvent,
    EventKind,
)
from sbs_core.alerts.hooks import hook_environment, run_hook
from sbs_core.alerts.notifier import AlertPublisher, Notifier
from sbs_core.alerts.outbox import Outbox, OutboxMail
from sbs_core.alerts.repeats import Outgoing, RepeatLimiter

__all__ = (
    "EVENT_FORMAT",
    "MAIL_KINDS",
    "REPEATING_KINDS",
    "AlertEvent",
    "AlertPublisher",
    "EventKind",
    "HookError",
    "HookTimeoutError",
    "Mail",
    "MailAuthError",
    "MailConnectError",
    "MailError",
    "MailRecipientError",
    "MailTLSError",
    "MailTimeoutError",
    "Notifier",
    "Outbox",
    "OutboxMail",
    "Outgoing",
    "RepeatLimiter",
    "Repeats",
    "build_message",
    "compose_mail",
    "email_test_event",
    "hook_environment",
    "run_hook",
    "send_mail",
)
