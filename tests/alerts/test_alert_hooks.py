"""The [notify] command: the event on stdin and in SBS_* variables, bounded by a timeout."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
from alertkit import hook_calls, hook_command, load, make_event, running, until

from sbs_core.alerts import HookError, HookTimeoutError, Notifier, run_hook

pytestmark = pytest.mark.anyio


async def test_the_command_gets_the_event_as_json_and_in_the_environment(tmp_path: Path) -> None:
    command, out = hook_command(tmp_path)
    config = load(tmp_path, port=25, enabled=False, notify={"command": command})
    event = make_event("peer_lost", message="print-2 lost: closed", node_name="Drucker-Süd")
    async with running(Notifier(config)) as notifier:
        notifier.publish(event)
        notifier.publish(make_event("promoted", epoch=5))
        await until(lambda: len(hook_calls(out)) == 2)

    first, second = hook_calls(out)
    assert first["event"] == event.to_dict()
    assert first["env"] == {
        "SBS_EVENT": "peer_lost",
        "SBS_LEVEL": "warning",
        "SBS_ROLE": "primary",
        "SBS_EPOCH": "4",
        "SBS_NODE": "Drucker-Süd",
        "SBS_ADDRESS": "127.0.0.1",
        "SBS_MESSAGE": "print-2 lost: closed",
    }
    assert second["env"]["SBS_EVENT"] == "promoted"
    assert second["env"]["SBS_EPOCH"] == "5"


async def test_a_hanging_command_is_killed_and_the_next_one_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    command, out = hook_command(tmp_path)
    config = load(tmp_path, port=25, enabled=False, notify={"command": command, "timeout": 0.5})
    async with running(Notifier(config)) as notifier:
        started = time.perf_counter()
        notifier.publish(make_event("peer_lost", message="hang"))
        notifier.publish(make_event("promoted", message="after the hang"))
        await until(lambda: len(hook_calls(out)) == 1)
        elapsed = time.perf_counter() - started
        # The next command succeeded, so the problem is over.
        await until(lambda: notifier.snapshot()["last_hook_error"] is None)

    assert hook_calls(out)[0]["event"]["message"] == "after the hang"
    assert 0.5 <= elapsed < 5
    pid = int(Path(str(out) + ".pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "ran longer than 0.5 s (notify.timeout) and was killed" in caplog.text


async def test_a_failing_command_is_logged_with_its_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    command, _ = hook_command(tmp_path)
    config = load(tmp_path, port=25, enabled=False, notify={"command": command})
    async with running(Notifier(config)) as notifier:
        notifier.publish(make_event("stale", message="fail"))
        await until(lambda: notifier.snapshot()["last_hook_error"] is not None)
        error = notifier.snapshot()["last_hook_error"]
    assert error == "notify.command failed (exit code 3); its output: the pager service said no"
    assert "notify command for stale: notify.command failed (exit code 3)" in caplog.text


async def test_run_hook_errors() -> None:
    event = make_event()
    with pytest.raises(HookError, match="cannot be started"):
        await run_hook(["/nonexistent/sbs-hook"], event, timeout=5)
    with pytest.raises(HookTimeoutError) as caught:
        await run_hook([sys.executable, "-c", "import time; time.sleep(30)"], event, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    # A command may ignore its input.
    assert await run_hook([sys.executable, "-c", "print('ok')"], event, timeout=5) == "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
async def test_a_timeout_kills_what_the_command_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """
    )
    with pytest.raises(HookTimeoutError):
        await run_hook([sys.executable, "-c", script], make_event(), timeout=1.0)
    child = int(pid_file.read_text())
    # Killed; reaped by init once its parent is gone.
    with anyio.fail_after(5):
        while _alive(child):
            await anyio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc/self").exists():
        return True
    # A zombie still answers until it is reaped; it no longer runs.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_no_command_no_hook(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load(tmp_path, port=25, enabled=False)
    notifier = Notifier(config)
    with caplog.at_level(logging.DEBUG):
        notifier.publish(make_event())
    assert notifier.snapshot()["last_hook_error"] is None
