"""``python -m sbs_winsvc``: the Windows shell's one entry point.

* ``-cfg [--config FILE] [--name NAME]``: the configuration dialog (any OS);
* ``licence keygen|issue|show|verify ...``: the licence tool (any OS);
* ``status [--name NAME]``: the service's state and the node's status (Windows);
* ``install|update|remove|start|stop|restart|debug [options]``: the service
  itself, through pywin32's command-line handling (Windows).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sbs_core.errors import ConfigError, SbsError

__all__ = ("main",)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_SERVICE_COMMANDS = ("install", "update", "remove", "start", "stop", "restart", "debug")

USAGE = """\
usage: python -m sbs_winsvc -cfg [--config FILE] [--name NAME]
       python -m sbs_winsvc licence {keygen,issue,show,verify} ...
       python -m sbs_winsvc status [--name NAME]
       python -m sbs_winsvc install --config FILE [--name NAME] [--display-name TEXT]
                                    [--startup manual|auto|delayed|disabled]
                                    [--username DOMAIN\\USER --password PASSWORD]
       python -m sbs_winsvc {update,remove,start,stop,restart,debug} [--name NAME] [...]
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return EXIT_OK if args else EXIT_USAGE
    command = args[0]
    try:
        if command in ("-cfg", "/cfg", "cfg"):
            return _cfg(args[1:])
        if command in ("licence", "license"):
            from sbs_winsvc.licence_tool import main as licence_main  # noqa: PLC0415

            return licence_main(args[1:])
        if command == "status":
            return _status(args[1:])
        if any(a in _SERVICE_COMMANDS for a in args if not a.startswith("-")):
            return _service(args)
    except ConfigError as exc:
        print(f"sbs: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except SbsError as exc:
        print(f"sbs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sbs: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return EXIT_USAGE


def _need_pywin32(what: str) -> None:
    try:
        import win32serviceutil  # noqa: F401, PLC0415
    except ImportError:
        raise SbsError(
            f"'{what}' manages the Windows service: it needs Windows with pywin32"
            " (pip install pywin32). On Linux and macOS run the node with 'sbs run'."
        ) from None


def _service(args: list[str]) -> int:
    _need_pywin32(next(a for a in args if a in _SERVICE_COMMANDS))
    from sbs_winsvc.service import handle_command_line  # noqa: PLC0415 - Windows only

    return handle_command_line(args)


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sbs_winsvc status")
    parser.add_argument("--name", default=None, help="the service's name (default: sbs)")
    args = parser.parse_args(argv)
    _need_pywin32("status")
    from sbs_core.cli import format_status, node_status  # noqa: PLC0415
    from sbs_core.config import load_config  # noqa: PLC0415
    from sbs_winsvc.cfg.backend import WindowsServiceBackend  # noqa: PLC0415

    backend = WindowsServiceBackend(args.name)
    print(f"{backend.name}: {backend.state()}")
    config_file = backend.config_file()
    if config_file is None:
        print("config     - (the service is not installed, or has no --config)")
        return EXIT_FAILED
    print(f"config     {config_file}")
    print(format_status(node_status(load_config(config_file))))
    return EXIT_OK


def _cfg(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sbs_winsvc -cfg")
    parser.add_argument("--config", "-c", type=Path, help="the node's TOML file")
    parser.add_argument("--name", default=None, help="the Windows service's name (default: sbs)")
    args = parser.parse_args(argv)
    try:
        from sbs_winsvc.cfg.dialog import run_dialog  # noqa: PLC0415 - Tk only here
    except ImportError as exc:
        raise SbsError(f"the -cfg dialog needs Python with Tk (tkinter): {exc}") from None

    return run_dialog(config_file=args.config, service_name=args.name)
