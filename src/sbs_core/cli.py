"""The ``sbs`` command line.

Commands import the heavy parts (driver, replication, mail) only when they need
them, so that ``sbs status``, which tools poll, answers quickly.

This is a contract other tools drive: commands, options and the keys of
``sbs status --json`` are only ever added to, never renamed or removed.

Exit codes: 0 success; 1 the operation failed (node not running, refused,
runtime error); 2 bad usage or an invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from sbs_core import __version__
from sbs_core.config import Config, load_config
from sbs_core.control import NodeNotRunning, control_request
from sbs_core.errors import ConfigError, ControlError, SbsError
from sbs_core.licence import LicenceError, gate_for
from sbs_core.logs import logging_off_the_loop
from sbs_core.loopwatch import LoopWatch
from sbs_core.memory import freeze_startup_objects, keep_freed_memory
from sbs_core.state import StateStore, write_atomically

__all__ = ("main",)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"sbs: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except LicenceError as exc:
        print(f"sbs: licence refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SbsError as exc:
        print(f"sbs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbs", description="Warm-standby failover for a pair of nodes."
    )
    parser.add_argument("--version", action="version", version=f"sbs {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", required=True, type=Path, help="the node's TOML file")

    p = sub.add_parser("run", help="run a node in the foreground (SIGTERM/Ctrl+C: planned stop)")
    config_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", type=Path, help="also log to this file (rotated at 10 MB)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="show the node's role, peer, epoch and sentinels")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object, for tools")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sentinels", help="list, activate or deactivate sentinels on the primary")
    config_arg(p)
    p.add_argument("action", choices=["start", "stop", "list"])
    p.add_argument("name", nargs="?", help="the sentinel's name (for start and stop)")
    p.set_defaults(func=_cmd_sentinels)

    p = sub.add_parser("sync", help="replication: confirm held-back strict-sync deletions")
    config_arg(p)
    p.add_argument("action", choices=["confirm-deletes"])
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("email", help="email: send a test mail now with the [email] settings")
    config_arg(p)
    p.add_argument("action", choices=["test"])
    p.set_defaults(func=_cmd_email)

    p = sub.add_parser("check", help="validate a configuration file")
    config_arg(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("secret", help="write a new random shared secret file (mode 0600)")
    p.add_argument("path", type=Path)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_secret)

    p = sub.add_parser("demo", help="start a pair on 127.0.0.1/127.0.0.2 and show a failover")
    p.add_argument("--port", type=int, default=0, help="peer port (default: a free one)")
    p.add_argument("--keep", action="store_true", help="keep the demo's temporary folder")
    p.set_defaults(func=_cmd_demo)
    return parser


# ---------------------------------------------------------------------- run


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    gate_for(config)  # an unusable licence refuses the start before anything runs
    logging.getLogger().setLevel(args.log_level.upper())
    with logging_off_the_loop(log_handlers(args.log_file)):
        _start_node(config)
    return EXIT_OK


def _start_node(config: Config) -> None:
    log = logging.getLogger("sbs")
    for warning in config.warnings():
        log.warning("%s: %s", config.config_file, warning)
    log.info(
        "sbs %s starting: node %s on %s:%d, peer %s, mode %s, state in %s",
        __version__,
        config.node.name,
        config.node.local_address,
        config.node.port,
        config.node.remote_address,
        config.node.mode,
        config.node.state_dir,
    )
    if keep_freed_memory():  # replication's buffers reuse freed memory (sbs_core.memory)
        log.debug("the C allocator keeps freed memory for reuse")
    anyio.run(_run_node, config)


async def _run_node(config: Config) -> None:
    from sbs_core.driver import Node, install_signal_handlers  # noqa: PLC0415 - see top

    node = Node(config, gate=gate_for(config))
    frozen = freeze_startup_objects()  # the node's lifetime objects (sbs_core.memory)
    logging.getLogger("sbs").debug("%d start-up objects left out of garbage collection", frozen)
    async with anyio.create_task_group() as tg:
        install_signal_handlers(node, tg)
        await node.run()
        tg.cancel_scope.cancel()


def log_handlers(log_file: Path | None) -> list[logging.Handler]:
    """Where ``sbs run`` logs: standard error, and ``--log-file`` (rotated) if given."""
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.setFormatter(fmt)
    return handlers


# ---------------------------------------------------------------------- status


def node_status(config: Config) -> dict[str, Any]:
    """The running node's status, or a ``stopped`` status built from its saved state."""
    try:
        answer = control_request(config.node.state_dir, {"cmd": "status"})
    except NodeNotRunning:
        from sbs_core.alerts import Notifier  # noqa: PLC0415 - see top
        from sbs_core.sync.engine import SyncStatus  # noqa: PLC0415 - see top

        store = StateStore(config.node.state_dir)
        saved = store.load()
        # Read, never created here: a status must not write to the state directory.
        try:
            node_id: str | None = store.node_id_file.read_text(encoding="ascii").strip() or None
        except OSError:
            node_id = None
        # The same keys as a running node's status, so tools need no special case.
        return {
            "role": "stopped",
            "mode": config.node.mode,
            "epoch": saved.epoch if saved else 0,
            "peer_connected": False,
            "active_sentinels": [],
            "sentinels": list(saved.sentinels) if saved else [],
            "handing_over": False,
            "name": config.node.name,
            "local_address": config.node.local_address,
            "remote_address": config.node.remote_address,
            "port": config.node.port,
            "peer": None,
            "last_error": None,
            "state_save_error": None,
            "node_id": node_id,
            "pid": None,
            "started_at": None,
            "version": __version__,
            "licence": None,
            "sentinels_held": [],
            "sentinels_held_reason": None,
            **SyncStatus().as_dict(),
            **Notifier.offline_snapshot(config.node.state_dir),
            **LoopWatch.offline_snapshot(),
        }
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise ControlError(f"the node answered: {answer}")
    status: dict[str, Any] = answer["status"]
    return status


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    status = node_status(config)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


def format_status(st: dict[str, Any]) -> str:
    """One readable screen about a node."""
    role = str(st["role"]).upper()
    if st.get("handing_over"):
        role += " (handing over)"
    lines = [
        f"node       {st.get('name')} ({st.get('local_address')}:{st.get('port')}), "
        f"mode {st['mode']}",
        f"role       {role}, epoch {st['epoch']}",
    ]
    peer = st.get("peer")
    if peer:
        heard = peer.get("last_heard_ago")
        heard_text = f", heard {heard:.1f} s ago" if isinstance(heard, int | float) else ""
        lines.append(
            f"peer       {peer['name']} at {peer.get('address')}: connected, {peer['role']}, "
            f"epoch {peer['epoch']}{heard_text}"
        )
    else:
        lines.append(f"peer       {st.get('remote_address')}: not connected")
    running = st.get("active_sentinels") or []
    lines.append(f"running    {', '.join(running) if running else '-'}")
    pair = st.get("sentinels") or []
    lines.append(f"sentinels  {', '.join(pair) if pair else '-'} (active on the pair)")
    if st.get("last_sync_at") or st.get("bytes_received") or st.get("bytes_sent"):
        when = st.get("last_sync_at")
        ago = f"{time.time() - when:.1f} s ago" if isinstance(when, int | float) else "never"
        lines.append(
            f"sync       last {ago}, {st.get('files_pending', 0)} pending, "
            f"{_megabytes(st.get('bytes_sent'))} sent, "
            f"{_megabytes(st.get('bytes_received'))} received"
        )
    watch = _watch_line(st)
    if watch:
        lines.append(f"watch      {watch}")
    if st.get("held_deletes"):
        lines.append(
            f"held       {st['held_deletes']} deletions wait for 'sbs sync confirm-deletes'"
        )
    left_out = st.get("not_replicated")
    if left_out:
        first = (st.get("not_replicated_files") or ["?"])[0]
        more = f" (and {left_out - 1} more: sbs status --json)" if left_out > 1 else ""
        lines.append(f"left out   {first}{more}")
    if st.get("last_sync_error"):
        lines.append(f"sync error {st['last_sync_error']}")
    if st.get("last_error"):
        lines.append(f"last error {st['last_error']}")
    if st.get("state_save_error"):
        lines.append(f"state      not saved: {st['state_save_error']}")
    stalls = st.get("loop_stalls")
    if stalls:
        lines.append(
            f"stalls     the event loop stalled {stalls} time{'s' if stalls != 1 else ''},"
            f" longest {st['loop_longest_stall']:.2f} s (the log says where)"
        )
    if st.get("sentinels_held"):
        lines.append(
            f"held       {', '.join(st['sentinels_held'])} not started:"
            f" {st.get('sentinels_held_reason')}"
        )
    lines += _alert_lines(st)
    return "\n".join(lines)


def _watch_line(st: dict[str, Any]) -> str:
    """The primary's file watcher, when it has one to speak of."""
    state = st.get("watch_state")
    if state == "watching":
        count = st.get("watched_folders", 0)
        return f"file events from {count} folder{'' if count == 1 else 's'}"
    if state == "paused":
        return "paused while a large cycle reads the files"
    if state == "failed":
        return f"FAILED ({st.get('watch_error')}): a full scan every period until it recovers"
    return ""


def _alert_lines(st: dict[str, Any]) -> list[str]:
    """The outbox and the notify command, only when there is something to say."""
    lines = []
    waiting = st.get("outbox_size") or 0
    sent_at = st.get("last_mail_at")
    if waiting or isinstance(sent_at, int | float):
        outbox = f"{waiting} waiting in the outbox" if waiting else "outbox empty"
        if isinstance(sent_at, int | float):
            clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sent_at))
            outbox += f", last sent {clock} ({time.time() - sent_at:.0f} s ago)"
        lines.append(f"mail       {outbox}")
    if st.get("last_mail_error"):
        lines.append(f"mail error {st['last_mail_error']}")
    if st.get("last_hook_error"):
        lines.append(f"hook error {st['last_hook_error']}")
    return lines


def _megabytes(value: object) -> str:
    return f"{value / 1e6:.1f} MB" if isinstance(value, int | float) else "0 MB"


# ---------------------------------------------------------------------- sentinels


def _cmd_sentinels(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.action == "list":
        status = node_status(config)
        active = set(status.get("sentinels") or [])
        running = set(status.get("active_sentinels") or [])
        for s in config.controller.sentinels:
            state = "running" if s.name in running else "active" if s.name in active else "off"
            print(f"{s.name:24} {state}")
        return EXIT_OK
    if not args.name:
        print(f"sbs: sentinels {args.action} needs a NAME", file=sys.stderr)
        return EXIT_USAGE
    try:
        answer = control_request(
            config.node.state_dir,
            {"cmd": "sentinel", "name": args.name, "active": args.action == "start"},
        )
    except NodeNotRunning as exc:
        print(f"sbs: {exc}: start it with 'sbs run --config {args.config}'", file=sys.stderr)
        return EXIT_FAILED
    if not answer.get("ok"):
        print(f"sbs: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    verb = "activated" if args.action == "start" else "deactivated"
    print(f"sentinel {args.name} {verb} on {answer['status'].get('name')}")
    return EXIT_OK


def _cmd_sync(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        answer = control_request(config.node.state_dir, {"cmd": "confirm_deletes"})
    except NodeNotRunning as exc:
        print(f"sbs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not answer.get("ok"):
        print(f"sbs: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    held = answer.get("held", 0)
    if held:
        print(f"{held} held-back deletion(s) will be applied at the next cycle")
    else:
        print("no deletions were held back")
    return EXIT_OK


# ---------------------------------------------------------------------- email


def _cmd_email(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    email = config.email
    if not email.enabled:
        print(
            f"sbs: email is disabled in {config.config_file}: set enabled = true in [email]"
            " (with host, sender and recipients) to send mail",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from sbs_core.alerts import (  # noqa: PLC0415 - see top
        MailError,
        compose_mail,
        email_test_event,
        send_mail,
    )

    # Sent now, not through the node's outbox: the operator wants the verdict here.
    mail = compose_mail(email_test_event(config))
    try:
        anyio.run(send_mail, email, mail.subject, mail.body)
    except MailError as exc:
        print(f"sbs: test mail not sent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"test mail sent to {', '.join(email.recipients)} via {email.host}:{email.port}")
    return EXIT_OK


# ---------------------------------------------------------------------- check, secret


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for warning in config.warnings():
        print(f"{config.config_file}: warning: {warning}")
    gate = gate_for(config)
    if gate is not None:
        print(f"{config.config_file}: licence: {gate.licence.describe()}")
    print(f"{config.config_file}: OK")
    return EXIT_OK


def _cmd_secret(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.exists() and not args.force:
        print(f"sbs: {path} exists; use --force to replace it", file=sys.stderr)
        return EXIT_FAILED
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (secrets.token_urlsafe(32) + "\n").encode())
    path.chmod(0o600)
    print(f"wrote a new shared secret to {path}: copy it to the other node, keep it private")
    return EXIT_OK


# ---------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from sbs_core.demo import run_demo  # noqa: PLC0415 - see top

    return run_demo(port=args.port, keep=args.keep, out=sys.stdout, clock=time.monotonic)
