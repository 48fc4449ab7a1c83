"""``sbs email test``, run as a real process against the test SMTP server."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from alertkit import (
    HOST,
    PASSWORD,
    RECIPIENT,
    closed_port,
    port_of,
    smtp_server,
    text_of,
    write_ca_file,
    write_config,
)

pytestmark = pytest.mark.anyio


async def sbs(*args: str) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        result = await anyio.run_process([sys.executable, "-m", "sbs_core", *args], check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_success(tmp_path: Path) -> None:
    async with smtp_server(security="starttls", users={"sbs": PASSWORD}) as server:
        config = write_config(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        code, out, err = await sbs("email", "test", "--config", str(config))
        (mail,) = await server.wait_for(1)
    assert (code, err) == (0, "")
    assert out == f"test mail sent to {RECIPIENT} via {HOST}:{server.port}\n"
    assert mail.message["Subject"] == f"[sbs] print-1 ({HOST}): test mail"
    assert "sent by 'sbs email test'" in text_of(mail)
    assert PASSWORD not in text_of(mail)


async def test_connection_refused(tmp_path: Path) -> None:
    with closed_port() as sock:
        port = port_of(sock)
        config = write_config(tmp_path, port=port)
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert err.startswith(f"sbs: test mail not sent: cannot connect to {HOST}:{port}: ")


async def test_authentication_refused(tmp_path: Path) -> None:
    async with smtp_server(security="starttls", users={"sbs": "another"}) as server:
        config = write_config(
            tmp_path,
            port=server.port,
            security="starttls",
            ca_file=write_ca_file(tmp_path),
            username="sbs",
        )
        code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert err.startswith(f"sbs: test mail not sent: authentication refused by {HOST}: 535")
    assert PASSWORD not in err


async def test_tls_failure(tmp_path: Path) -> None:
    async with smtp_server(security="ssl") as server:
        config = write_config(tmp_path, port=server.port, security="ssl")
        code, _, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert err.startswith("sbs: test mail not sent: TLS failed: ")
    assert "certificate verify failed" in err


async def test_email_disabled(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=25, enabled=False)
    code, out, err = await sbs("email", "test", "--config", str(config))
    assert code == 1
    assert out == ""
    assert "email is disabled" in err
    assert "enabled = true" in err
