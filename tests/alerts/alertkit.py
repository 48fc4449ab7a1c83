"""Test kit for the alerts: a real SMTP server, real certificates, configs and events.

The server is aiosmtpd's protocol served by ``loop.create_server`` on 127.0.0.1,
port 0, in the test's own event loop, so faults are injected at the server
(refused recipients, refused logins, no STARTTLS, silence) and everything is
closed when the ``async with`` block ends.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import anyio
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from anyio.abc import SocketStream
from anyio.from_thread import start_blocking_portal

from sbs_core.alerts import AlertEvent, Notifier
from sbs_core.config import Config, load_config
from sbs_core.lab import write_node_config

HOST = "127.0.0.1"
SENDER = "sbs@example.com"
RECIPIENT = "ops@example.com"
PASSWORD = "pa55-wörd-never-shown"

Security = Literal["none", "starttls", "ssl"]


# --- certificates -----------------------------------------------------------------------


@functools.cache
def _ca() -> trustme.CA:
    return trustme.CA()


@functools.cache
def _server_cert() -> trustme.LeafCert:
    return _ca().issue_cert(HOST, "localhost")


def server_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _server_cert().configure_cert(context)
    return context


def write_ca_file(folder: Path) -> Path:
    """The PEM file of the CA that signed the test server's certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test-ca.pem"
    _ca().cert_pem.write_to_path(str(path))
    return path


# --- the server -------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    mechanism: str | None


@dataclass
class MailServer:
    port: int
    received: list[Received] = field(default_factory=list)
    logins: list[tuple[str, str, bool]] = field(default_factory=list)
    """(mechanism, user, accepted) for every login attempt."""
    _arrived: anyio.Event = field(default_factory=anyio.Event)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The first ``count`` mails, once they have arrived."""
        with anyio.fail_after(timeout):
            while len(self.received) < count:
                await self._arrived.wait()
        return self.received[:count]

    def _add(self, mail: Received) -> None:
        self.received.append(mail)
        self._arrived.set()
        self._arrived = anyio.Event()


class _Handler:
    def __init__(self, server: MailServer, refuse: frozenset[str]) -> None:
        self.server = server
        self.refuse = refuse

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        mechanism = session.auth_data if isinstance(session.auth_data, str) else None
        self.server._add(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                message=message,
                tls=tls,
                mechanism=mechanism,
            )
        )
        return "250 OK: queued"


def _authenticator(server: MailServer, users: Mapping[str, str]) -> Any:
    def check(
        smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = False
        user = ""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode()
            ok = users.get(user) == auth_data.password.decode()
        server.logins.append((mechanism, user, ok))
        # auth_data becomes session.auth_data: the handler reports the mechanism used.
        return AuthResult(success=ok, handled=False, auth_data=mechanism if ok else None)

    return check


@asynccontextmanager
async def smtp_server(
    *,
    security: Security = "none",
    users: Mapping[str, str] | None = None,
    mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN"),
    refuse: frozenset[str] = frozenset(),
    sock: socket.socket | None = None,
) -> AsyncIterator[MailServer]:
    """A real SMTP server on 127.0.0.1 (port 0, or the given bound socket)."""
    loop = asyncio.get_running_loop()
    state = MailServer(port=0)
    handler = _Handler(state, refuse)
    context = server_tls_context() if security != "none" else None
    excluded = [m for m in ("LOGIN", "PLAIN") if m not in mechanisms]
    protocols: list[SMTP] = []

    def factory() -> SMTP:
        protocol = SMTP(
            handler,
            hostname="localhost",
            loop=loop,
            tls_context=context if security == "starttls" else None,
            authenticator=_authenticator(state, users) if users is not None else None,
            auth_exclude_mechanism=excluded,
            # Implicit TLS is invisible to aiosmtpd; the STARTTLS server requires it.
            auth_require_tls=security == "starttls",
            timeout=30,
        )
        protocols.append(protocol)
        return protocol

    ssl_context = context if security == "ssl" else None
    if sock is not None:
        server = await loop.create_server(factory, sock=sock, ssl=ssl_context)
    else:
        server = await loop.create_server(factory, HOST, 0, ssl=ssl_context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await server.wait_closed()
        # Let the closed connections run their connection_lost callbacks.
        for _ in range(5):
            await asyncio.sleep(0)


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word; yields the port."""
    listener = await anyio.create_tcp_listener(local_host=HOST)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def hold(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


@contextmanager
def closed_port() -> Iterator[socket.socket]:
    """A socket bound to a loopback port that does not listen: connections are refused.

    Pass it to :func:`smtp_server` to bring a server up on that very port later.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        yield sock
    finally:
        sock.close()


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@contextmanager
def smtp_server_in_thread(**options: Any) -> Iterator[MailServer]:
    """:func:`smtp_server` (same options) on an event loop of its own, in a thread.

    For tests that block, e.g. on real nodes: read what arrived with
    :func:`wait_mails`. Leaving the block stops the server, then its thread.
    """
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(smtp_server(**options)) as server,
    ):
        yield server


def wait_mails(
    server: MailServer,
    what: str,
    test: Callable[[list[Received]], bool],
    *,
    timeout: float = 10.0,
) -> list[Received]:
    """Poll a server of :func:`smtp_server_in_thread` until ``test`` holds for its mails."""
    deadline = time.monotonic() + timeout
    while True:
        mails = list(server.received)  # appended to by the server's thread
        if test(mails):
            return mails
        if time.monotonic() > deadline:
            subjects = [str(m.message["Subject"]) for m in mails]
            raise TimeoutError(f"no {what} within {timeout} s; mails received: {subjects}")
        time.sleep(0.02)


# --- configuration and events ----------------------------------------------------------


def write_config(
    folder: Path,
    *,
    port: int,
    security: Security = "none",
    name: str = "print-1",
    enabled: bool = True,
    username: str | None = None,
    password: str = PASSWORD,
    ca_file: Path | None = None,
    recipients: tuple[str, ...] = (RECIPIENT,),
    email: Mapping[str, object] | None = None,
    notify: Mapping[str, object] | None = None,
    node_port: int = 4445,
) -> Path:
    """A node config whose ``[email]`` points at the test server; returns its path.

    The node is on 127.0.0.1, its peer 127.0.0.2 (not running) on ``node_port``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret"
    secret.write_text("s" * 32, encoding="utf-8")
    table: dict[str, object] = {
        "enabled": enabled,
        "host": HOST,
        "port": port,
        "security": security,
        "sender": f"sbs on {name} <{SENDER}>",
        "recipients": list(recipients),
        "timeout": 5.0,
    }
    if username is not None:
        password_file = folder / "smtp.pass"
        password_file.write_text(password + "\n", encoding="utf-8")
        password_file.chmod(0o600)
        table |= {"username": username, "password_file": str(password_file)}
    if ca_file is not None:
        table["ca_file"] = str(ca_file)
    table |= dict(email or {})
    extra = toml_table("email", table)
    if notify is not None:
        extra += toml_table("notify", notify)
    return write_node_config(
        folder,
        name=name,
        local=HOST,
        remote="127.0.0.2",
        port=node_port,
        secret_file=secret,
        sentinels={},
        extra=extra,
    )


def load(folder: Path, **options: Any) -> Config:
    return load_config(write_config(folder, **options))


def toml_table(name: str, values: Mapping[str, object]) -> str:
    """``[name]`` with ``values``, to append to a node's TOML file."""
    # JSON's scalars and arrays are valid TOML values.
    lines = [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in values.items()]
    return f"\n[{name}]\n" + "\n".join(lines) + "\n"


def make_event(kind: str = "promoted", **changes: Any) -> AlertEvent:
    """A plausible event of ``kind``; keyword arguments override its fields."""
    fields: dict[str, Any] = {
        "kind": kind,
        "level": "warning",
        "message": "took over from print-2: no heartbeat for 3.0 s",
        "node_name": "print-1",
        "node_address": HOST,
        "role": "primary",
        "epoch": 4,
        "at": time.time(),
        "sentinels_started": ("labels", "spooler"),
        "last_sync_at": time.time() - 12,
        "details": {"how": "takeover", "reason": "took over from print-2: no heartbeat"},
    }
    fields.update(changes)
    return AlertEvent(**fields)


def text_of(mail: Received) -> str:
    body = mail.message.get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # SMTP carries CRLF line ends


# --- the notify command -------------------------------------------------------------------

# Records each call; hangs (after saying its pid) when the message asks it to.
HOOK_SCRIPT = """\
import json, os, sys, time
event = json.load(sys.stdin)
out = sys.argv[1]
if event["message"] == "hang":
    with open(out + ".pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
if event["message"] == "fail":
    print("the pager service said no", file=sys.stderr)
    sys.exit(3)
env = {k: v for k, v in os.environ.items() if k.startswith("SBS_")}
with open(out, "a", encoding="utf-8") as f:
    f.write(json.dumps({"event": event, "env": env}, ensure_ascii=False) + "\\n")
"""


def hook_command(folder: Path) -> tuple[list[str], Path]:
    """A notify command that appends each call (event and ``SBS_*`` variables) to a file.

    Returns the command and the file, which :func:`hook_calls` reads back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "hook.py"
    script.write_text(HOOK_SCRIPT, encoding="utf-8")
    out = folder / "calls.jsonl"
    return [sys.executable, str(script), str(out)], out


def hook_calls(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


# --- running a notifier -------------------------------------------------------------------


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[Notifier]:
    """Run ``notifier`` for the duration of the block, then cancel it."""
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        try:
            yield notifier
        finally:
            tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


# --- sbs status, for a person


def primary_status(**changes: Any) -> dict[str, Any]:
    """What a running primary without a peer reports (``sbs status --json``), for screen tests."""
    status: dict[str, Any] = {
        "role": "primary",
        "mode": "auto",
        "epoch": 3,
        "name": "print-1",
        "local_address": HOST,
        "remote_address": "127.0.0.2",
        "port": 4445,
        "peer": None,
        "peer_connected": False,
        "handing_over": False,
        "active_sentinels": ["labels"],
        "sentinels": ["labels"],
        "last_error": None,
        "last_sync_at": None,
        "outbox_size": 0,
        "last_mail_at": None,
        "last_mail_error": None,
        "last_hook_error": None,
    }
    status.update(changes)
    return status
