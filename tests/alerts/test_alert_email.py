"""send_mail against a real SMTP server: plain, STARTTLS, implicit TLS, logins, faults."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from alertkit import (
    HOST,
    PASSWORD,
    RECIPIENT,
    SENDER,
    closed_port,
    load,
    make_event,
    port_of,
    silent_server,
    smtp_server,
    text_of,
    write_ca_file,
)

from sbs_core.alerts import (
    MailAuthError,
    MailConnectError,
    MailError,
    MailRecipientError,
    MailTimeoutError,
    MailTLSError,
    compose_mail,
    send_mail,
)
from sbs_core.errors import SbsError

pytestmark = pytest.mark.anyio


async def test_plain_smtp_delivers_a_utf8_text_mail(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port)
        await send_mail(config.email, "[sbs] subject", "first line\nsecond line\n")
        (mail,) = await server.wait_for(1)
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == [RECIPIENT]
    assert not mail.tls
    message = mail.message
    assert message["Subject"] == "[sbs] subject"
    assert message["To"] == RECIPIENT
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@example.com>")
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert text_of(mail) == "first line\nsecond line\n"


async def test_starttls_with_a_private_ca(tmp_path: Path) -> None:
    async with smtp_server(security="starttls") as server:
        config = load(
            tmp_path, port=server.port, security="starttls", ca_file=write_ca_file(tmp_path)
        )
        await send_mail(config.email, "over starttls", "body\n")
        (mail,) = await server.wait_for(1)
    assert mail.tls


async def test_implicit_tls_with_a_private_ca(tmp_path: Path) -> None:
    async with smtp_server(security="ssl") as server:
        config = load(tmp_path, port=server.port, security="ssl", ca_file=write_ca_file(tmp_path))
        await send_mail(config.email, "over ssl", "body\n")
        (mail,) = await server.wait_for(1)
    assert mail.tls


@pytest.mark.parametrize("security", ["starttls", "ssl"])
async def test_an_untrusted_certificate_is_refused(tmp_path: Path, security: str) -> None:
    # No ca_file: the system's store does not know the test CA, and verification is on.
    async with smtp_server(security=security) as server:  # type: ignore[arg-type]
        config = load(tmp_path, port=server.port, security=security)
        with pytest.raises(MailTLSError, match=r"^TLS failed: .*certificate verify failed"):
            await send_mail(config.email, "s", "b")
        assert server.received == []


async def test_starttls_not_offered(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(
            tmp_path, port=server.port, security="starttls", ca_file=write_ca_file(tmp_path)
        )
        with pytest.raises(MailTLSError, match="does not offer STARTTLS"):
            await send_mail(config.email, "s", "b")


async def test_implicit_tls_against_a_plain_server(tmp_path: Path) -> None:
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port, security="ssl", ca_file=write_ca_file(tmp_path))
        with pytest.raises(MailTLSError, match=r"^TLS failed: "):
            await send_mail(config.email, "s", "b")


async def test_auth_login(tmp_path: Path) -> None:
    async with smtp_server(
        security="starttls", users={"sbs": PASSWORD}, mechanisms=("LOGIN",)
    ) as server:
        config = load(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        await send_mail(config.email, "s", "b")
        (mail,) = await server.wait_for(1)
    assert server.logins == [("LOGIN", "sbs", True)]
    assert mail.mechanism == "LOGIN"
    assert mail.tls


async def test_auth_plain(tmp_path: Path) -> None:
    async with smtp_server(
        security="ssl", users={"sbs": PASSWORD}, mechanisms=("PLAIN",)
    ) as server:
        config = load(
            tmp_path,
            port=server.port,
            security="ssl",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        await send_mail(config.email, "s", "b")
        (mail,) = await server.wait_for(1)
    assert server.logins == [("PLAIN", "sbs", True)]
    assert mail.mechanism == "PLAIN"


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_auth_refused_never_shows_the_password(
    tmp_path: Path, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with smtp_server(
        security="starttls", users={"sbs": "the-right-one"}, mechanisms=(mechanism,)
    ) as server:
        config = load(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        with pytest.raises(MailAuthError) as caught:
            await send_mail(config.email, "s", "b")
        assert server.received == []
    error = caught.value
    assert isinstance(error, PermissionError)
    assert str(error).startswith(f"authentication refused by {HOST}: 535")
    assert server.logins == [(mechanism, "sbs", False)]
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error.__cause__)
    assert PASSWORD not in caplog.text


async def test_auth_on_a_server_that_offers_none(tmp_path: Path) -> None:
    # A STARTTLS server only offers AUTH once TLS is up; security none never gets there.
    async with smtp_server(security="starttls", users={"sbs": PASSWORD}) as server:
        config = load(tmp_path, port=server.port, username="sbs")
        with pytest.raises(MailAuthError, match=f"authentication refused by {HOST}: .*'none'"):
            await send_mail(config.email, "s", "b")


async def test_every_recipient_refused(tmp_path: Path) -> None:
    async with smtp_server(refuse=frozenset({"nobody@example.com"})) as server:
        config = load(tmp_path, port=server.port, recipients=("nobody@example.com",))
        with pytest.raises(MailRecipientError) as caught:
            await send_mail(config.email, "s", "b")
        assert server.received == []
    error = caught.value
    assert isinstance(error, ValueError)
    assert str(error).startswith("recipient refused: nobody@example.com: 550")
    assert error.permanent
    assert error.delivered_to == ()
    assert set(error.refused) == {"nobody@example.com"}


async def test_one_recipient_refused_the_others_get_the_mail(tmp_path: Path) -> None:
    async with smtp_server(refuse=frozenset({"nobody@example.com"})) as server:
        config = load(
            tmp_path, port=server.port, recipients=("nobody@example.com", f"Ops <{RECIPIENT}>")
        )
        with pytest.raises(MailRecipientError) as caught:
            await send_mail(config.email, "s", "b")
        (mail,) = await server.wait_for(1)
    assert mail.rcpt_tos == [RECIPIENT]
    assert caught.value.delivered_to == (RECIPIENT,)


async def test_server_down(tmp_path: Path) -> None:
    with closed_port() as sock:
        port = port_of(sock)
        config = load(tmp_path, port=port)
        with pytest.raises(MailConnectError) as caught:
            await send_mail(config.email, "s", "b")
    assert isinstance(caught.value, ConnectionError)
    assert str(caught.value).startswith(f"cannot connect to {HOST}:{port}: ")
    assert "refused" in str(caught.value).lower()


async def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    async with silent_server() as port:
        config = load(tmp_path, port=port, email={"timeout": 0.3})
        started = time.perf_counter()
        with pytest.raises(MailTimeoutError, match=r"^timed out: .* within 0\.3 s") as caught:
            await send_mail(config.email, "s", "b")
        elapsed = time.perf_counter() - started
    assert isinstance(caught.value, TimeoutError)
    assert elapsed < 3


async def test_accented_names_survive_the_round_trip(tmp_path: Path) -> None:
    event = make_event(
        node_name="étiquettes-Zürich",
        conflicts=("/srv/Étiquettes/Größe/façade.lab",),
        message="a repris la main: « print-2 » ne répond plus",
    )
    mail = compose_mail(event)
    async with smtp_server() as server:
        config = load(tmp_path, port=server.port, name="étiquettes-Zürich")
        await send_mail(config.email, mail.subject, mail.body)
        (received,) = await server.wait_for(1)
    subject = received.message["Subject"]
    assert subject == mail.subject
    assert subject.startswith(f"[sbs] étiquettes-Zürich ({HOST}): took over as primary")
    body = text_of(received)
    assert body == mail.body
    assert "/srv/Étiquettes/Größe/façade.lab" in body
    assert "« print-2 » ne répond plus" in body
    assert str(received.message["From"]) == f"sbs on étiquettes-Zürich <{SENDER}>"


def test_every_mail_error_is_an_sbs_error() -> None:
    for leaf in (MailConnectError, MailTLSError, MailAuthError, MailRecipientError):
        assert issubclass(leaf, MailError)
    assert issubclass(MailTimeoutError, MailError)
    assert issubclass(MailError, SbsError)
