"""Run the ``[notify]`` command for one alert.

The command gets the alert as one JSON object on its standard input
(:meth:`~.events.AlertEvent.to_dict`) and, for simple scripts, in environment
variables: ``SBS_EVENT`` (the kind), ``SBS_LEVEL``, ``SBS_ROLE``, ``SBS_EPOCH``,
``SBS_NODE``, ``SBS_ADDRESS`` and ``SBS_MESSAGE``. It must finish within
``notify.timeout`` seconds, or it is killed, with everything it started (its
process group on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Final

import anyio
from anyio.abc import ByteReceiveStream, Process

from sbs_core.alerts.errors import HookError, HookTimeoutError
from sbs_core.alerts.events import AlertEvent

__all__ = ("hook_environment", "run_hook")

logger = logging.getLogger("sbs.alerts")

_OUTPUT_KEPT: Final = 2000
# How long output may still arrive after the command exited: a child it left in the
# background can hold the pipe open for ever.
_OUTPUT_GRACE: Final = 0.5
_REAP_TIMEOUT: Final = 5.0


def hook_environment(event: AlertEvent, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the notify command: ``base`` (default: ours) plus ``SBS_*``."""
    values = {
        "SBS_EVENT": event.kind,
        "SBS_LEVEL": event.level,
        "SBS_ROLE": event.role,
        "SBS_EPOCH": str(event.epoch),
        "SBS_NODE": event.node_name,
        "SBS_ADDRESS": event.node_address,
        "SBS_MESSAGE": event.message,
    }
    # An environment value cannot hold a NUL byte.
    cleaned = {key: value.replace("\0", " ") for key, value in values.items()}
    return {**(os.environ if base is None else base), **cleaned}


async def run_hook(command: Sequence[str], event: AlertEvent, *, timeout: float) -> str:
    """Run ``command`` for ``event``; return its output (stdout and stderr, truncated).

    Raises :class:`~.errors.HookError` if it cannot start or exits with a failure,
    :class:`~.errors.HookTimeoutError` if it was killed at ``timeout``.
    """
    payload = json.dumps(event.to_dict(), ensure_ascii=False).encode() + b"\n"
    try:
        process = await anyio.open_process(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=hook_environment(event),
            start_new_session=sys.platform != "win32",
        )
    except OSError as exc:
        raise HookError(
            f"notify.command {command[0]!r} cannot be started: {exc.strerror or exc}"
        ) from None
    output = bytearray()
    try:
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_feed, process, payload)
                reading = anyio.Event()
                tg.start_soon(_collect, process.stdout, output, reading)
                await process.wait()
                with anyio.move_on_after(_OUTPUT_GRACE):
                    await reading.wait()
                tg.cancel_scope.cancel()
        text = output.decode("utf-8", "replace").strip()
        if scope.cancelled_caught and process.returncode is None:
            raise HookTimeoutError(
                f"notify.command ran longer than {timeout:g} s (notify.timeout) and was"
                f" killed{_tail(text)}"
            )
        if process.returncode != 0:
            raise HookError(
                f"notify.command failed ({_exit_reason(process.returncode)}){_tail(text)}"
            )
        return text
    finally:
        with anyio.CancelScope(shield=True):
            await _reap(process)


async def _feed(process: Process, payload: bytes) -> None:
    stdin = process.stdin
    if stdin is None:
        return
    # A command that ignores its input may exit before reading it: not a failure.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stdin.send(payload)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stdin.aclose()


async def _collect(stream: ByteReceiveStream | None, output: bytearray, done: anyio.Event) -> None:
    try:
        if stream is None:
            return
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            while True:
                output += await stream.receive()
                # Keep the end: that is where a failing script says why.
                del output[: max(0, len(output) - _OUTPUT_KEPT)]
    finally:
        done.set()


async def _reap(process: Process) -> None:
    if process.returncode is None:
        _kill(process)
    with anyio.move_on_after(_REAP_TIMEOUT):
        await process.wait()
    with contextlib.suppress(OSError):
        await process.aclose()


def _kill(process: Process) -> None:
    if sys.platform != "win32":
        # The command runs in its own session, whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
            return
    with contextlib.suppress(ProcessLookupError, OSError):
        process.kill()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(text: str) -> str:
    return f"; its output: {text[-500:]}" if text else ""
