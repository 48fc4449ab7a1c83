"""Send one mail over SMTP with the ``[email]`` settings.

The session is run step by step (connect, STARTTLS, login, send) so that a failure
is reported as what it is: :class:`~.errors.MailConnectError`,
:class:`~.errors.MailTLSError`, :class:`~.errors.MailAuthError`,
:class:`~.errors.MailRecipientError` or :class:`~.errors.MailTimeoutError`. The
server's certificate is always checked, against ``email.ca_file`` when set, else
the system's store. The whole exchange is bounded by ``email.timeout``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid, parseaddr

import anyio
import anyio.to_thread
from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPDataError,
    SMTPException,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from sbs_core.alerts.errors import (
    MailAuthError,
    MailConnectError,
    MailError,
    MailRecipientError,
    MailTimeoutError,
    MailTLSError,
)
from sbs_core.config import EmailConfig

__all__ = ("build_message", "send_mail")


def build_message(config: EmailConfig, subject: str, body: str) -> EmailMessage:
    """A plain-text UTF-8 message from ``email.sender`` to ``email.recipients``."""
    if config.sender is None or not config.recipients:
        raise MailError("email.sender and email.recipients must be set to send mail")
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = config.sender
    message["To"] = ", ".join(config.recipients)
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid("sbs", domain=_domain_of(config.sender))
    # RFC 3834: keeps vacation responders from answering an alert.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body, charset="utf-8")
    return message


async def send_mail(config: EmailConfig, subject: str, body: str) -> None:
    """Send one mail now; raise a :class:`~.errors.MailError` leaf saying why it failed.

    Returns once the server accepted the message for every recipient. If it accepted
    some and refused others, :class:`~.errors.MailRecipientError` is raised with
    ``delivered_to`` set (the mail went out, not to everyone).
    """
    if config.host is None:
        raise MailError("email.host is not set: there is no SMTP server to send to")
    message = build_message(config, subject, body)
    session = _Session(config, config.host)
    # Reading the password file and the CA file touches the disk.
    context, password = await anyio.to_thread.run_sync(session.prepare)
    client = SMTP(
        hostname=config.host,
        port=config.port,
        timeout=config.timeout,
        use_tls=config.security == "ssl",
        start_tls=False,
        tls_context=context,
    )
    try:
        with anyio.fail_after(config.timeout):
            await session.run(client, message, password)
    except TimeoutError as exc:
        if isinstance(exc, MailError):
            raise
        raise session.timed_out() from None
    finally:
        client.close()


class _Session:
    """One SMTP exchange, each step with the errors it can end with."""

    def __init__(self, config: EmailConfig, host: str) -> None:
        self.config = config
        self.host = host
        self.where = f"{host}:{config.port}"

    def prepare(self) -> tuple[ssl.SSLContext | None, str | None]:
        secret = self.config.read_password()
        password = None if secret is None else secret.get_secret_value()
        if self.config.security == "none":
            return None, password
        ca_file = self.config.ca_file
        try:
            context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise MailTLSError(f"TLS failed: cannot load email.ca_file {ca_file}: {exc}") from None
        return context, password

    async def run(self, client: SMTP, message: EmailMessage, password: str | None) -> None:
        try:
            await client.connect()
        except SMTPException as exc:
            raise self._connect_failed(exc) from None
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        if self.config.security == "starttls":
            await self._starttls(client)
        if self.config.username is not None:
            await self._login(client, self.config.username, password or "")
        await self._send(client, message)
        # The message is accepted: a rude goodbye changes nothing.
        with contextlib.suppress(SMTPException):
            await client.quit()

    def timed_out(self) -> MailTimeoutError:
        return MailTimeoutError(
            f"timed out: {self.where} did not answer within {self.config.timeout:g} s"
            " (email.timeout)"
        )

    async def _starttls(self, client: SMTP) -> None:
        try:
            await client.starttls()
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        except SMTPTimeoutError:
            raise self.timed_out() from None
        except SMTPResponseException as exc:
            raise MailTLSError(
                f"TLS failed: {self.where} refused STARTTLS: {_answer(exc)}"
            ) from None
        except SMTPServerDisconnected as exc:
            raise MailTLSError(f"TLS failed: {self.where} closed the connection: {exc}") from None
        except SMTPException as exc:
            # aiosmtplib raises the bare class when STARTTLS is not offered.
            raise MailTLSError(
                f"TLS failed: {self.where} does not offer STARTTLS ({exc.message}); use"
                " security 'ssl' or 'none'"
            ) from None

    async def _login(self, client: SMTP, username: str, password: str) -> None:
        try:
            await client.login(username, password)
        except SMTPAuthenticationError as exc:
            raise MailAuthError(
                f"authentication refused by {self.host}: {_answer(exc)} (user {username!r})"
            ) from None
        except (SMTPTimeoutError, SMTPServerDisconnected) as exc:
            raise self._dropped(exc) from None
        except SMTPException as exc:
            # The bare class: the server offers no AUTH, or none aiosmtplib speaks.
            raise MailAuthError(
                f"authentication refused by {self.host}: {exc.message}"
                + (" (security is 'none')" if self.config.security == "none" else "")
            ) from None

    async def _send(self, client: SMTP, message: EmailMessage) -> None:
        sender = parseaddr(self.config.sender or "")[1]
        recipients = [address for _, address in getaddresses(list(self.config.recipients))]
        try:
            refused, _ = await client.send_message(message, sender=sender, recipients=recipients)
        except SMTPRecipientsRefused as exc:
            answers = {r.recipient: f"{r.code} {r.message}" for r in exc.recipients}
            permanent = all(500 <= r.code < 600 for r in exc.recipients)
            raise MailRecipientError(
                _refused_text(answers), refused=answers, permanent=permanent
            ) from None
        except SMTPSenderRefused as exc:
            raise MailError(
                f"sender refused: {exc.sender}: {_answer(exc)}", permanent=exc.code >= 500
            ) from None
        except SMTPDataError as exc:
            raise MailError(
                f"message refused by {self.host}: {_answer(exc)}", permanent=exc.code >= 500
            ) from None
        except (SMTPTimeoutError, SMTPServerDisconnected) as exc:
            raise self._dropped(exc) from None
        except SMTPResponseException as exc:
            raise MailError(f"{self.host} refused the mail: {_answer(exc)}") from None
        if refused:
            answers = {address: f"{r.code} {r.message}" for address, r in refused.items()}
            delivered = tuple(a for a in recipients if a not in refused)
            raise MailRecipientError(
                _refused_text(answers) + f" (sent to {', '.join(delivered)})",
                refused=answers,
                delivered_to=delivered,
            )

    def _connect_failed(self, exc: SMTPException) -> MailError:
        if isinstance(exc, SMTPTimeoutError):
            return self.timed_out()
        tls = _ssl_cause(exc)
        if tls is not None:
            return self._tls_failed(tls)
        if isinstance(exc, SMTPConnectResponseError):
            return MailConnectError(
                f"cannot connect to {self.where}: the server answered {_answer(exc)}"
            )
        if isinstance(exc, SMTPConnectError):
            cause = exc.__cause__
            if isinstance(cause, OSError):
                return MailConnectError(f"cannot connect to {self.where}: {_os_reason(cause)}")
            return MailConnectError(f"cannot connect to {self.where}: {exc.message}")
        return MailConnectError(f"cannot connect to {self.where}: {exc}")

    def _tls_failed(self, exc: ssl.SSLError) -> MailTLSError:
        reason = exc.reason or str(exc)
        hint = ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {exc.verify_message or exc.reason}"
            hint = (
                "; for a private CA set email.ca_file"
                if self.config.ca_file is None
                else f"; is {self.config.ca_file} the CA that signed it?"
            )
        elif self.config.security == "ssl":
            hint = "; does the server speak TLS from the first byte (else use 'starttls')?"
        return MailTLSError(f"TLS failed: {self.where}: {reason}{hint}")

    def _dropped(self, exc: SMTPTimeoutError | SMTPServerDisconnected) -> MailError:
        if isinstance(exc, SMTPTimeoutError):
            return self.timed_out()
        return MailConnectError(f"{self.where} closed the connection: {exc.message}")


def _answer(exc: SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}"


def _refused_text(answers: dict[str, str]) -> str:
    return "recipient refused: " + "; ".join(f"{a}: {why}" for a, why in answers.items())


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    # asyncio replaces strerror by "Connect call failed (...)"; the errno says more.
    if isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _domain_of(address: str) -> str:
    _, bare = parseaddr(address)
    try:
        return Address(addr_spec=bare).domain or "localhost"
    except (ValueError, IndexError):
        return "localhost"
