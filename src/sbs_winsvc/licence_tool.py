"""``python -m sbs_winsvc licence keygen|issue|show|verify``: the vendor's licence tool.

``keygen`` writes a new private key (PEM, readable by its owner only) and
prints the public key to put in ``[licence] public_key`` (or to build in, see
:data:`sbs_core.licence.BUILTIN_PUBLIC_KEY`). ``issue`` signs a licence with the
private key. ``show`` prints what a licence file says without checking it.
``verify`` checks it against a public key (given, or the one a configuration
trusts) for this host, or ``--host``, and today's date: exit 0 valid, 1 refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sbs_core.errors import ConfigError
from sbs_core.licence import (
    Licence,
    LicenceError,
    generate_key_pair,
    issue_licence,
    load_private_key,
    new_serial,
    parse_licence,
    verify_licence,
)
from sbs_core.state import write_atomically

__all__ = ("main",)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sbs_winsvc licence", description="Issue and check sbs licences."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("keygen", help="write a new vendor key pair")
    p.add_argument("--private", required=True, type=Path, help="where to write the private key")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = sub.add_parser("issue", help="sign a new licence with the private key")
    p.add_argument("--private", required=True, type=Path, help="the vendor's private key")
    p.add_argument("--licensee", required=True, help="who the licence is for")
    p.add_argument("--kind", required=True, choices=["standard", "backup"])
    p.add_argument("--host", help="bind the licence to this computer name")
    p.add_argument("--expires", type=_date, help="last valid day, YYYY-MM-DD")
    p.add_argument("--output", "-o", required=True, type=Path, help="the licence file to write")

    p = sub.add_parser("show", help="print what a licence file says (not checked)")
    p.add_argument("file", type=Path)

    p = sub.add_parser("verify", help="check a licence file; exit 1 if it is refused")
    p.add_argument("file", type=Path)
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", help="the vendor's public key, ed25519:...")
    key.add_argument("--config", type=Path, help="use the public key this configuration trusts")
    p.add_argument("--host", help="check for this computer name (default: this computer)")
    p.add_argument("--date", type=_date, help="check as of this day (default: today)")
    return parser


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "issue":
            return _issue(args)
        if args.command == "show":
            return _show(args)
        return _verify(args)
    except ConfigError as exc:
        print(f"sbs: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except LicenceError as exc:
        print(f"sbs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"sbs: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _keygen(args: argparse.Namespace) -> int:
    path: Path = args.private
    if path.exists() and not args.force:
        print(f"sbs: {path} exists; use --force to replace it", file=sys.stderr)
        return EXIT_FAILED
    pem, public = generate_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pem)
    if os.name == "posix":
        path.chmod(0o600)
    print(f"private key written to {path}: keep it secret, it signs licences")
    print(f"public key (for [licence] public_key): {public}")
    return EXIT_OK


def _issue(args: argparse.Namespace) -> int:
    key = load_private_key(Path(args.private).read_bytes())
    licence = Licence(
        licensee=args.licensee,
        kind=args.kind,
        host=args.host,
        expires=args.expires,
        issued=dt.date.today(),
        serial=new_serial(),
    )
    text = issue_licence(key, licence)
    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, text.encode("utf-8"))
    print(f"wrote {out}: {licence.describe()}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    try:
        licence, _, _ = parse_licence(Path(args.file).read_bytes())
    except LicenceError as exc:
        raise LicenceError(f"{args.file} {exc}") from None
    for key, value in licence.as_dict().items():
        print(f"{key:9} {value if value is not None else '-'}")
    print(f"{'key id':9} {licence.key_id}")
    print("(not checked: use 'verify' to check the signature, host and date)")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    if args.config is not None:
        from sbs_core.config import load_config  # noqa: PLC0415 - only here

        key = load_config(args.config).licence.trusted_key()
        if key is None:
            print(f"sbs: {args.config} trusts no licence key ([licence] public_key)")
            return EXIT_USAGE
    else:
        key = args.public_key
    host = args.host or socket.gethostname()
    today = args.date or dt.date.today()
    try:
        licence = verify_licence(Path(args.file).read_bytes(), key, host=host, today=today)
    except LicenceError as exc:
        print(f"{args.file}: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.file}: valid on host {host} on {today.isoformat()}: {licence.describe()}")
    return EXIT_OK
