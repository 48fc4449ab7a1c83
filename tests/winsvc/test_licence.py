"""Licences: the policy, the signed file, the vendor's tool, and what a configuration asks."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest

from sbs_core.config import load_config
from sbs_core.licence import (
    Licence,
    LicenceError,
    LicenceGate,
    gate_for,
    generate_key_pair,
    issue_licence,
    load_private_key,
    parse_licence,
    sentinel_permission,
    verify_licence,
)
from sbs_winsvc.cli import main

TODAY = dt.date(2026, 11, 26)


@pytest.fixture(scope="module")
def vendor() -> tuple[bytes, str]:
    return generate_key_pair()


def make(
    vendor: tuple[bytes, str],
    *,
    kind: str = "backup",
    host: str | None = "LABELSRV2",
    expires: dt.date | None = dt.date(2027, 11, 30),
) -> bytes:
    licence = Licence(
        licensee="ACME Labels Ltd",
        kind=kind,  # type: ignore[arg-type]
        host=host,
        expires=expires,
        issued=TODAY,
        serial="0011223344556677",
    )
    return issue_licence(load_private_key(vendor[0]), licence).encode()


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize("how", ["startup", "takeover", "handover"])
def test_a_standard_licence_allows_sentinels_however_the_node_became_primary(how: str) -> None:
    assert sentinel_permission("standard", how).allowed  # type: ignore[arg-type]


def test_a_backup_licence_refuses_sentinels_to_a_node_primary_since_startup() -> None:
    verdict = sentinel_permission("backup", "startup")
    assert not verdict.allowed
    assert "became primary at startup" in verdict.reason


@pytest.mark.parametrize("how", ["takeover", "handover"])
def test_a_backup_licence_allows_sentinels_to_a_node_that_took_over(how: str) -> None:
    verdict = sentinel_permission("backup", how)  # type: ignore[arg-type]
    assert verdict.allowed
    assert verdict.reason == ""


def test_the_gate_refuses_new_starts_once_the_licence_has_expired(
    vendor: tuple[bytes, str],
) -> None:
    licence = verify_licence(make(vendor, kind="standard"), vendor[1], host=None, today=TODAY)
    day = [TODAY]
    gate = LicenceGate(licence, today=lambda: day[0])
    assert gate.permit("startup").allowed
    day[0] = dt.date(2027, 12, 1)
    verdict = gate.permit("takeover")
    assert not verdict.allowed
    assert verdict.reason == "the licence expired on 2027-11-30"


# --------------------------------------------------------------------------- the file


def test_an_issued_licence_verifies_and_says_what_it_allows(vendor: tuple[bytes, str]) -> None:
    licence = verify_licence(make(vendor), vendor[1], host="labelsrv2", today=TODAY)
    assert licence.kind == "backup"
    assert licence.licensee == "ACME Labels Ltd"
    assert licence.host == "LABELSRV2"
    assert licence.expires == dt.date(2027, 11, 30)
    assert "backup licence for ACME Labels Ltd, host LABELSRV2" in licence.describe()


def test_a_licence_with_windows_line_ends_is_the_same_licence(vendor: tuple[bytes, str]) -> None:
    crlf = make(vendor).replace(b"\n", b"\r\n")
    assert verify_licence(crlf, vendor[1], host="LABELSRV2", today=TODAY).kind == "backup"


def test_every_single_byte_change_is_refused(vendor: tuple[bytes, str]) -> None:
    data = make(vendor)
    rng = random.Random(5)
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] = (data[index] + rng.randrange(1, 256)) % 256
        with pytest.raises(LicenceError):
            verify_licence(bytes(tampered), vendor[1], host="LABELSRV2", today=TODAY)


def test_a_changed_kind_is_called_tampered(vendor: tuple[bytes, str]) -> None:
    data = make(vendor).replace(b'kind = "backup"', b'kind = "standard"')
    with pytest.raises(LicenceError, match="has been tampered with"):
        verify_licence(data, vendor[1], host="LABELSRV2", today=TODAY)


def test_a_licence_of_another_vendor_is_called_foreign(vendor: tuple[bytes, str]) -> None:
    other = generate_key_pair()
    with pytest.raises(LicenceError, match="is foreign: it was signed with another vendor key"):
        verify_licence(make(other), vendor[1], host="LABELSRV2", today=TODAY)


def test_a_licence_bound_to_another_host_is_refused(vendor: tuple[bytes, str]) -> None:
    with pytest.raises(LicenceError, match="bound to host 'LABELSRV2', and this host is 'other'"):
        verify_licence(make(vendor), vendor[1], host="other", today=TODAY)


def test_an_expired_licence_is_refused_the_day_after_its_last_day(
    vendor: tuple[bytes, str],
) -> None:
    data = make(vendor)
    last_day = dt.date(2027, 11, 30)
    assert verify_licence(data, vendor[1], host="LABELSRV2", today=last_day)
    with pytest.raises(LicenceError, match="expired on 2027-11-30"):
        verify_licence(data, vendor[1], host="LABELSRV2", today=last_day + dt.timedelta(days=1))


def test_a_licence_without_host_or_expiry_is_valid_anywhere_for_ever(
    vendor: tuple[bytes, str],
) -> None:
    data = make(vendor, host=None, expires=None)
    assert b"host" not in data
    assert b"expires" not in data
    licence = verify_licence(data, vendor[1], host="any", today=dt.date(2999, 1, 1))
    assert licence.describe().startswith("backup licence for ACME Labels Ltd, any host, no expiry")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"", "its last line must be the signature"),
        (b"hello\n", "its last line must be the signature"),
        (b'format = 2\nsignature = ""\n', "of format 1"),
        (b'format = 1\nextra = 1\nsignature = ""\n', "unknown field(s) extra"),
        (b'format = 1\nsignature = "AAA"\n', "not valid base64"),
        (b'format = 1\nsignature = "AB=="\n', "not in canonical base64"),
    ],
)
def test_a_file_that_is_no_licence_says_so(text: bytes, reason: str) -> None:
    with pytest.raises(LicenceError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_licence(text)


# --------------------------------------------------------------------------- configuration


def _config(folder: Path, licence: str) -> Path:
    secret = folder / "secret"
    secret.write_text("s" * 32)
    path = folder / "sbs.toml"
    path.write_text(
        "[node]\nlocal_address = '127.0.0.1'\nremote_address = '127.0.0.2'\n"
        f"secret_file = 'secret'\nstate_dir = 'state'\n{licence}"
    )
    return path


def test_without_a_licence_table_no_licence_is_checked(tmp_path: Path) -> None:
    assert gate_for(load_config(_config(tmp_path, ""))) is None


def test_a_configured_licence_is_checked_for_this_host(
    tmp_path: Path, vendor: tuple[bytes, str]
) -> None:
    (tmp_path / "node.lic").write_bytes(make(vendor, host="LABELSRV2"))
    config = load_config(
        _config(tmp_path, f"[licence]\nfile = 'node.lic'\npublic_key = '{vendor[1]}'\n")
    )
    gate = gate_for(config, host="labelsrv2", today=lambda: TODAY)
    assert gate is not None
    assert gate.snapshot()["kind"] == "backup"
    with pytest.raises(LicenceError, match=r"node\.lic is bound to host"):
        gate_for(config, host="elsewhere", today=lambda: TODAY)


def test_a_missing_licence_file_is_refused_naming_the_file(
    tmp_path: Path, vendor: tuple[bytes, str]
) -> None:
    config = load_config(
        _config(tmp_path, f"[licence]\nfile = 'gone.lic'\npublic_key = '{vendor[1]}'\n")
    )
    with pytest.raises(LicenceError, match=r"licence file .*gone\.lic is missing"):
        gate_for(config)


# --------------------------------------------------------------------------- the tool


def test_the_licence_tool_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "vendor.pem"
    assert main(["licence", "keygen", "--private", str(key)]) == 0
    public = capsys.readouterr().out.split("public key (for [licence] public_key): ")[1].strip()
    assert public.startswith("ed25519:")
    assert key.stat().st_mode & 0o077 == 0

    lic = tmp_path / "node.lic"
    issued = main(
        [
            "licence", "issue", "--private", str(key), "--licensee", "ACME Labels Ltd",
            "--kind", "backup", "--host", "LABELSRV2", "--expires", "2030-01-31", "-o", str(lic),
        ]
    )  # fmt: skip
    assert issued == 0
    assert "backup licence for ACME Labels Ltd" in capsys.readouterr().out

    assert main(["licence", "show", str(lic)]) == 0
    shown = capsys.readouterr().out
    assert "licensee  ACME Labels Ltd" in shown
    assert "expires   2030-01-31" in shown

    check = ["licence", "verify", str(lic), "--public-key", public, "--host", "LABELSRV2"]
    assert main(check) == 0
    assert "valid on host LABELSRV2" in capsys.readouterr().out

    data = bytearray(lic.read_bytes())
    data[data.index(b"ACME")] ^= 0x01  # one bit of one byte
    lic.write_bytes(bytes(data))
    assert main(check) == 1
    assert "refused: has been tampered with" in capsys.readouterr().err

    assert main(["licence", "verify", str(lic), "--public-key", "nonsense"]) == 1
    assert "'ed25519:'" in capsys.readouterr().err


def test_verify_takes_the_key_a_configuration_trusts(
    tmp_path: Path, vendor: tuple[bytes, str], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "node.lic").write_bytes(make(vendor, host=None))
    config = _config(tmp_path, f"[licence]\nfile = 'node.lic'\npublic_key = '{vendor[1]}'\n")
    args = ["licence", "verify", str(tmp_path / "node.lic"), "--config", str(config)]
    assert main([*args, "--date", "2027-11-30"]) == 0
    assert main([*args, "--date", "2027-12-01"]) == 1
    assert "expired on 2027-11-30" in capsys.readouterr().err
