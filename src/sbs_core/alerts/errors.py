"""Why a mail or a notify command failed.

One root per kind of failure, under :class:`~sbs_core.errors.SbsError`; each leaf
also inherits the built-in that fits, so a caller can catch what it already knows
(``ConnectionError``, ``TimeoutError``, ``PermissionError``...). Messages name the
server and the reason; they never contain the password.
"""

from __future__ import annotations

from collections.abc import Mapping

from sbs_core.errors import SbsError

__all__ = (
    "HookError",
    "HookTimeoutError",
    "MailAuthError",
    "MailConnectError",
    "MailError",
    "MailRecipientError",
    "MailTLSError",
    "MailTimeoutError",
)


class MailError(SbsError):
    """A mail could not be sent.

    ``permanent`` is true when the server refused this very message for good (a 5xx
    answer to its sender, recipients or content): sending it again cannot help.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class MailConnectError(MailError, ConnectionError):
    """The SMTP server could not be reached, or dropped the connection."""


class MailTLSError(MailError, ConnectionError):
    """TLS could not be set up: no STARTTLS, a handshake failure, an untrusted certificate."""


class MailAuthError(MailError, PermissionError):
    """The SMTP server refused the login, or offers none on this connection."""


class MailRecipientError(MailError, ValueError):
    """The server refused one or more recipients.

    ``refused`` maps each refused address to the server's answer; ``delivered_to``
    lists the recipients the server accepted the mail for (then the mail was sent,
    just not to everyone).
    """

    def __init__(
        self,
        message: str,
        *,
        refused: Mapping[str, str],
        delivered_to: tuple[str, ...] = (),
        permanent: bool = False,
    ) -> None:
        super().__init__(message, permanent=permanent)
        self.refused = dict(refused)
        self.delivered_to = delivered_to


class MailTimeoutError(MailError, TimeoutError):
    """The SMTP server did not answer in time (``email.timeout``)."""


class HookError(SbsError, RuntimeError):
    """The notify command could not be started or did not succeed."""


class HookTimeoutError(HookError, TimeoutError):
    """The notify command ran longer than ``notify.timeout`` and was killed."""
