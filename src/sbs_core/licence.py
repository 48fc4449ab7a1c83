"""Licences: who may run sentinels, and the signed file that says so.

Two kinds, as in the product sbs re-creates:

``standard``
    allows everything.
``backup``
    for the standby machine of a pair. It refuses to start sentinels while its
    node is primary because it became primary at startup (alone, or elected
    next to a secondary), and allows them while the node is primary because it
    took the role over from the other node (a failover, or a handover from a
    primary that stopped). The permission lasts for that relay only: the next
    time the node becomes primary at startup, sentinels are refused again.

:func:`sentinel_permission` is that policy, pure: the driver asks it before
every start of sentinels, with how the node became primary
(:data:`~sbs_core.machine.actions.PromotionKind`).

A licence file is a short TOML text signed with Ed25519: who it is for, its
kind, optionally the host it is bound to and the last day it is valid. The
signature covers every byte above the ``signature`` line, so any change makes
the file invalid. :func:`issue_licence` writes one with the vendor's private
key; :func:`verify_licence` reads one with the vendor's public key and refuses
a tampered, foreign, expired or misplaced one with a :class:`LicenceError` that
says which. The ``cryptography`` package does the signing; it is imported only
when a key is used, so loading a configuration stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
import secrets
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from sbs_core.errors import SbsError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from sbs_core.config import Config
    from sbs_core.machine.actions import PromotionKind

__all__ = (
    "BUILTIN_PUBLIC_KEY",
    "Licence",
    "LicenceError",
    "LicenceGate",
    "LicenceKind",
    "SentinelPermission",
    "gate_for",
    "generate_key_pair",
    "issue_licence",
    "key_id",
    "load_private_key",
    "new_serial",
    "parse_licence",
    "parse_public_key",
    "read_licence_file",
    "sentinel_permission",
    "verify_licence",
)

LicenceKind = Literal["standard", "backup"]

BUILTIN_PUBLIC_KEY: Final[str | None] = None
"""A vendor who ships sbs sets this to its public key (the text ``keygen`` prints).

While it is None a licence is checked only when ``[licence]`` names a public key;
once set, ``licence.public_key`` may be left out and the shell requires a licence.
"""

_FORMAT: Final = 1
_DOMAIN: Final = b"sbs-licence-1\n"
_KEY_PREFIX: Final = "ed25519:"
_SIGNATURE_LINE: Final = re.compile(rb'signature = "([A-Za-z0-9+/=]*)"\n?')
_T = TypeVar("_T")
_HEADER: Final = "# sbs licence. Any change to this file makes it invalid.\n"


class LicenceError(SbsError, ValueError):
    """A licence file or key that cannot be used; ``str()`` says why, for an operator."""


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True, kw_only=True, slots=True)
class SentinelPermission:
    """Whether sentinels may start now, and if not, why (one sentence)."""

    allowed: bool
    reason: str = ""


def sentinel_permission(kind: LicenceKind, how: PromotionKind) -> SentinelPermission:
    """The licence policy: may a node with a ``kind`` licence start sentinels as primary?

    ``how`` is how the node became primary for the current relay: ``startup``
    (nobody answered, or elected next to a secondary), ``takeover`` (the
    primary was lost) or ``handover`` (the primary stopped and handed over, or
    gave the role back).
    """
    if kind == "standard" or how in ("takeover", "handover"):
        return SentinelPermission(allowed=True)
    return SentinelPermission(
        allowed=False,
        reason=(
            "a backup licence allows sentinels only on a node that took over from the"
            " other node; this node became primary at startup"
        ),
    )


# --------------------------------------------------------------------------- keys


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise LicenceError(f"{what} is not valid base64") from None
    # Spare bits in the last character decode to the same bytes: only the one
    # canonical spelling is accepted, so no two texts carry one value.
    if base64.b64encode(raw).decode("ascii") != text:
        raise LicenceError(f"{what} is not in canonical base64")
    return raw


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a public key written as ``ed25519:BASE64``.

    Raises :class:`LicenceError` for anything else. Needs no ``cryptography``.
    """
    value = text.strip()
    if not value.startswith(_KEY_PREFIX):
        raise LicenceError(
            f"a public key is written 'ed25519:' followed by base64, not {value[:24]!r}"
        )
    raw = _b64decode(value[len(_KEY_PREFIX) :], "the public key")
    if len(raw) != 32:
        raise LicenceError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return raw


def key_id(public_key: str) -> str:
    """A short fingerprint of a public key, written in every licence it signs."""
    return hashlib.sha256(parse_public_key(public_key)).hexdigest()[:16]


def _public_key_text(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see top

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def generate_key_pair() -> tuple[bytes, str]:
    """A new vendor key pair: the private key as PEM, the public key as ``ed25519:...``."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see top
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, _public_key_text(private.public_key())


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """The vendor's private key from its PEM text; :class:`LicenceError` if it is not one."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see top
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise LicenceError(f"not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LicenceError("the private key is not an Ed25519 key")
    return key


# --------------------------------------------------------------------------- files


@dataclass(frozen=True, kw_only=True, slots=True)
class Licence:
    """What a licence file says (once verified, what it allows)."""

    licensee: str
    kind: LicenceKind
    host: str | None = None
    expires: dt.date | None = None
    issued: dt.date
    serial: str
    key_id: str = ""

    def describe(self) -> str:
        """One line for logs and status: kind, licensee, binding, expiry."""
        parts = [f"{self.kind} licence for {self.licensee}"]
        parts.append(f"host {self.host}" if self.host else "any host")
        parts.append(f"valid until {self.expires.isoformat()}" if self.expires else "no expiry")
        return ", ".join(parts) + f" (serial {self.serial})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "licensee": self.licensee,
            "kind": self.kind,
            "host": self.host,
            "expires": self.expires.isoformat() if self.expires else None,
            "issued": self.issued.isoformat(),
            "serial": self.serial,
        }


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or c == "\x7f" for c in escaped):
        raise LicenceError("licence fields must not hold control characters")
    return f'"{escaped}"'


def issue_licence(private_key: Ed25519PrivateKey, licence: Licence) -> str:
    """The text of a licence file for ``licence``, signed with ``private_key``.

    ``licence.key_id`` is ignored: the id of ``private_key``'s public key is written.
    """
    if licence.kind not in ("standard", "backup"):
        raise LicenceError(f"kind must be 'standard' or 'backup', not {licence.kind!r}")
    if not licence.licensee.strip():
        raise LicenceError("the licensee must not be empty")
    lines = [
        _HEADER.rstrip("\n"),
        f"format = {_FORMAT}",
        f"serial = {_toml_string(licence.serial)}",
        f"licensee = {_toml_string(licence.licensee.strip())}",
        f"kind = {_toml_string(licence.kind)}",
    ]
    if licence.host:
        lines.append(f"host = {_toml_string(licence.host.strip())}")
    lines.append(f"issued = {licence.issued.isoformat()}")
    if licence.expires:
        lines.append(f"expires = {licence.expires.isoformat()}")
    lines.append(f"key_id = {_toml_string(key_id(_public_key_text(private_key.public_key())))}")
    body = ("\n".join(lines) + "\n").encode("utf-8")
    signature = private_key.sign(_DOMAIN + body)
    return body.decode("utf-8") + f'signature = "{base64.b64encode(signature).decode()}"\n'


def new_serial() -> str:
    """A random serial number for a new licence."""
    return secrets.token_hex(8)


def parse_licence(data: bytes) -> tuple[Licence, bytes, bytes]:
    """Read a licence file without checking its signature: (licence, signed bytes, signature).

    Raises :class:`LicenceError` if the text is not a licence file at all.
    """
    # Editors and git on Windows may turn line ends into CRLF; that is no change
    # of content. Any other byte counts.
    text = data.replace(b"\r\n", b"\n")
    start = text.rfind(b"\nsignature = ") + 1
    match = _SIGNATURE_LINE.fullmatch(text, start) if start else None
    if match is None:
        raise LicenceError("is not an sbs licence: its last line must be the signature")
    signed = text[:start]
    signature = _b64decode(match.group(1).decode("ascii"), "the signature")
    try:
        fields = tomllib.loads(signed.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LicenceError(f"is not an sbs licence: it cannot be read ({exc})") from None
    if fields.get("format") != _FORMAT:
        raise LicenceError(f"is not an sbs licence of format {_FORMAT}")
    known = {"format", "serial", "licensee", "kind", "host", "issued", "expires", "key_id"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LicenceError(f"is not an sbs licence: unknown field(s) {', '.join(unknown)}")
    try:
        licence = Licence(
            licensee=_field(fields, "licensee", str),
            kind=_kind(fields.get("kind")),
            host=_optional(fields, "host", str),
            expires=_optional(fields, "expires", dt.date),
            issued=_field(fields, "issued", dt.date),
            serial=_field(fields, "serial", str),
            key_id=_field(fields, "key_id", str),
        )
    except KeyError as exc:
        raise LicenceError(f"is not an sbs licence: {exc.args[0]}") from None
    return licence, signed, signature


def _field(fields: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, dt.datetime):
        raise KeyError(f"field {name!r} is missing or of the wrong type")
    return value


def _optional(fields: dict[str, Any], name: str, kind: type[_T]) -> _T | None:
    return _field(fields, name, kind) if name in fields else None


def _kind(value: object) -> LicenceKind:
    if value == "standard":
        return "standard"
    if value == "backup":
        return "backup"
    raise KeyError(f"kind must be 'standard' or 'backup', not {value!r}")


def verify_licence(data: bytes, public_key: str, *, host: str | None, today: dt.date) -> Licence:
    """Check a licence file's bytes and return what it allows.

    Refused with a :class:`LicenceError` that says why: not a licence file,
    signed with another vendor's key (foreign), changed after it was signed
    (tampered), bound to another host, or expired. ``host`` None skips the
    host check (a vendor's tool looking at a file).
    """
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - see top
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )

    licence, signed, signature = parse_licence(data)
    expected_id = key_id(public_key)
    verifier = Ed25519PublicKey.from_public_bytes(parse_public_key(public_key))
    try:
        verifier.verify(signature, _DOMAIN + signed)
    except InvalidSignature:
        if licence.key_id != expected_id:
            raise LicenceError(
                f"is foreign: it was signed with another vendor key (key id {licence.key_id},"
                f" this installation trusts {expected_id})"
            ) from None
        raise LicenceError(
            "has been tampered with: its signature does not match its contents"
        ) from None
    if host is not None and licence.host and licence.host.casefold() != host.casefold():
        raise LicenceError(f"is bound to host {licence.host!r}, and this host is {host!r}")
    if licence.expires is not None and today > licence.expires:
        raise LicenceError(f"expired on {licence.expires.isoformat()}")
    return licence


def read_licence_file(path: Path, public_key: str, *, host: str | None, today: dt.date) -> Licence:
    """:func:`verify_licence` on a file; a missing or unreadable file is refused too.

    Every :class:`LicenceError` raised here starts with the file's path.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LicenceError(f"licence file {path} is missing") from None
    except OSError as exc:
        raise LicenceError(f"licence file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return verify_licence(data, public_key, host=host, today=today)
    except LicenceError as exc:
        raise LicenceError(f"licence file {path} {exc}") from None


# --------------------------------------------------------------------------- the gate


class LicenceGate:
    """The policy applied to one node's verified licence, as the driver asks it.

    ``today`` gives the current date: a licence that expires while the node
    runs refuses every later start of sentinels (those already running go on).
    """

    def __init__(self, licence: Licence, *, today: Callable[[], dt.date] = dt.date.today) -> None:
        self.licence = licence
        self._today = today

    def permit(self, how: PromotionKind) -> SentinelPermission:
        expires = self.licence.expires
        if expires is not None and self._today() > expires:
            return SentinelPermission(
                allowed=False, reason=f"the licence expired on {expires.isoformat()}"
            )
        return sentinel_permission(self.licence.kind, how)

    def snapshot(self) -> dict[str, Any]:
        return {**self.licence.as_dict(), "summary": self.licence.describe()}


def gate_for(
    config: Config,
    *,
    host: str | None = None,
    today: Callable[[], dt.date] = dt.date.today,
) -> LicenceGate | None:
    """The licence gate a node with ``config`` runs under; None when no licence is checked.

    A licence is checked when a public key is configured or built in. Raises
    :class:`LicenceError` (which names the file) for a missing, unreadable,
    tampered, foreign, expired or misplaced licence: the node must not start.
    ``host`` defaults to this computer's name.
    """
    key = config.licence.trusted_key()
    if key is None:
        return None
    path = config.licence.file
    if path is None:
        raise LicenceError(
            f"{config.config_file}: licence.file is required: this build of sbs checks"
            " licences signed with its vendor's key"
        )
    licence = read_licence_file(
        path, key, host=host if host is not None else socket.gethostname(), today=today()
    )
    return LicenceGate(licence, today=today)
