"""ProcessController against real child processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from sbs_core.controller import ProcessController, ServiceController
from sbs_core.controller import process as process_module
from sbs_core.errors import UnknownSentinelError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids a test saw; whatever is still alive at the end is killed, even on failure."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as dead, and nothing is reaped."""
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # The command name in parentheses may hold spaces; the state follows it.
        return stat.rpartition(")")[2].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.02)


async def _read_when_ready(path: Path) -> str:
    await _wait_until(path.exists)
    return path.read_text()


async def _lines_when_ready(path: Path, count: int) -> list[str]:
    """The first ``count`` complete lines of ``path``, once it has them."""

    def complete() -> list[str]:
        if not path.exists():
            return []
        return path.read_text().splitlines(keepends=True)[:count]

    await _wait_until(lambda: len([line for line in complete() if line.endswith("\n")]) >= count)
    return [line.rstrip("\n") for line in complete()]


def _python(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


# Writes a file by renaming it into place, so a reader never sees it half-written.
_PUBLISH = """
import os, sys
def publish(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
"""

_DUMP_ENV = (
    _PUBLISH
    + """
import json, time
keys = ["SBS_SENTINEL", "SBS_APPLICATION", "SBS_ROLE", "SBS_EPOCH", "EXTRA"]
publish(sys.argv[1], json.dumps({key: os.environ.get(key) for key in keys}))
with open(sys.argv[2], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(60)
"""
)

_APPEND_PID_AND_SLEEP = """
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(60)
"""

_IGNORE_SIGTERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(60)
"""

_START_GRANDCHILD = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]])
time.sleep(60)
"""

_CRASH = """
import sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{time.monotonic()}\\n")
sys.exit(3)
"""


def test_is_a_service_controller(tmp_path: Path) -> None:
    controller: ServiceController = ProcessController({}, log_dir=tmp_path)
    assert controller.running_sentinels() == frozenset()


async def test_child_gets_role_epoch_and_name(
    tmp_path: Path, pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stale values inherited from the node must not leak into the children.
    monkeypatch.setenv("SBS_APPLICATION", "stale")
    monkeypatch.setenv("SBS_EPOCH", "1")
    out = tmp_path / "env.json"
    with anyio.fail_after(10):
        async with ProcessController(
            {"labels": _python(_DUMP_ENV, out, tmp_path / "pids")},
            log_dir=tmp_path / "logs",
            env={"EXTRA": "x"},
        ) as ctl:
            await ctl.start_sentinels(["labels"], epoch=42)
            seen = json.loads(await _read_when_ready(out))
    assert seen == {
        "SBS_SENTINEL": "labels",
        "SBS_APPLICATION": None,
        "SBS_ROLE": "primary",
        "SBS_EPOCH": "42",
        "EXTRA": "x",
    }


async def test_application_start_is_idempotent_and_stop_ends_it(
    tmp_path: Path, pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBS_SENTINEL", "stale")
    out = tmp_path / "env.json"
    started = tmp_path / "pids"
    application = _python(_DUMP_ENV, out, started)
    with anyio.fail_after(10):
        async with ProcessController({}, application=application, log_dir=tmp_path) as ctl:
            assert not ctl.application_running()
            await ctl.start_application(epoch=9)
            await ctl.start_application(epoch=9)
            [pid] = await _lines_when_ready(started, 1)
            pids.append(int(pid))
            assert ctl.application_running()
            assert ctl.running_sentinels() == frozenset()
            seen = json.loads(await _read_when_ready(out))

            await ctl.stop_application()
            assert not ctl.application_running()
            assert not _alive(int(pid))
            await ctl.stop_application()
    assert started.read_text().splitlines() == [pid]
    assert seen["SBS_SENTINEL"] is None
    assert seen["SBS_APPLICATION"] == "1"
    assert seen["SBS_EPOCH"] == "9"
    assert (tmp_path / "application.log").exists()


async def test_without_application_start_application_does_nothing(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        async with ProcessController({}, log_dir=tmp_path) as ctl:
            await ctl.start_application(epoch=1)
            assert not ctl.application_running()
            await ctl.stop_application()


async def test_start_is_idempotent_and_stop_terminates(tmp_path: Path, pids: list[int]) -> None:
    started = tmp_path / "pids"
    with anyio.fail_after(10):
        async with ProcessController(
            log_dir=tmp_path / "logs", sentinels={"a": _python(_APPEND_PID_AND_SLEEP, started)}
        ) as ctl:
            await ctl.start_sentinels(["a"], epoch=1)
            await ctl.start_sentinels(["a", "a"], epoch=2)
            assert ctl.running_sentinels() == {"a"}
            [first] = await _lines_when_ready(started, 1)
            pids.append(int(first))

            await ctl.stop_sentinels(["a"])
            assert ctl.running_sentinels() == frozenset()
            assert not _alive(int(first))
            await ctl.stop_sentinels(["a"])

            await ctl.start_sentinels(["a"], epoch=3)
            _, second = await _lines_when_ready(started, 2)
            pids.append(int(second))
            assert second != first
            await ctl.stop_sentinels()
            assert not _alive(int(second))
    assert started.read_text().splitlines() == [first, second]


async def test_child_ignoring_sigterm_is_killed_after_stop_timeout(
    tmp_path: Path, pids: list[int]
) -> None:
    ready = tmp_path / "pids"
    with anyio.fail_after(10):
        async with ProcessController(
            log_dir=tmp_path / "logs",
            sentinels={"stubborn": _python(_IGNORE_SIGTERM, ready)},
            stop_timeout=0.5,
        ) as ctl:
            await ctl.start_sentinels(["stubborn"], epoch=1)
            [pid] = await _lines_when_ready(ready, 1)
            pids.append(int(pid))
            began = time.monotonic()
            await ctl.stop_sentinels()
            took = time.monotonic() - began
            assert not _alive(int(pid))
    assert 0.5 <= took < 2.0


async def test_several_sentinels_stop_concurrently(tmp_path: Path, pids: list[int]) -> None:
    names = ["one", "two", "three"]
    sentinels = {name: _python(_IGNORE_SIGTERM, tmp_path / name) for name in names}
    with anyio.fail_after(15):
        async with ProcessController(
            log_dir=tmp_path / "logs", sentinels=sentinels, stop_timeout=1.0
        ) as ctl:
            await ctl.start_sentinels(names, epoch=1)
            for name in names:
                [pid] = await _lines_when_ready(tmp_path / name, 1)
                pids.append(int(pid))
            began = time.monotonic()
            await ctl.stop_sentinels(names)
            took = time.monotonic() - began
    assert 1.0 <= took < 1.9
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
async def test_stop_kills_the_sentinels_own_children(tmp_path: Path, pids: list[int]) -> None:
    # The grandchild ignores SIGTERM and would outlive its parent without the
    # final SIGKILL to the whole group.
    grandchild_pid = tmp_path / "grandchild"
    sentinel = _python(_START_GRANDCHILD, grandchild_pid, textwrap.dedent(_IGNORE_SIGTERM))
    with anyio.fail_after(10):
        async with ProcessController(
            log_dir=tmp_path / "logs", sentinels={"parent": sentinel}, stop_timeout=3.0
        ) as ctl:
            await ctl.start_sentinels(["parent"], epoch=1)
            [pid] = await _lines_when_ready(grandchild_pid, 1)
            pids.append(int(pid))
            assert _alive(int(pid))
            await ctl.stop_sentinels()
        await _wait_until(lambda: not _alive(int(pid)))


class _Boom(Exception):
    pass


@pytest.mark.parametrize("fail", [False, True], ids=["normal exit", "exception"])
async def test_leaving_the_block_stops_every_child(
    tmp_path: Path, pids: list[int], fail: bool
) -> None:
    sentinels = {name: _python(_APPEND_PID_AND_SLEEP, tmp_path / name) for name in ("a", "b")}
    ctl = ProcessController(
        sentinels,
        application=_python(_APPEND_PID_AND_SLEEP, tmp_path / "app"),
        log_dir=tmp_path / "logs",
        stop_timeout=1.0,
    )

    async def use() -> None:
        async with ctl:
            await ctl.start_application(epoch=1)
            await ctl.start_sentinels(["a", "b"], epoch=1)
            for name in ("a", "b", "app"):
                [pid] = await _lines_when_ready(tmp_path / name, 1)
                pids.append(int(pid))
            if fail:
                raise _Boom

    with anyio.fail_after(15):
        if fail:
            # The block's exception comes out as itself, not in an exception group.
            with pytest.raises(_Boom):
                await use()
        else:
            await use()
    assert len(pids) == 3
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="async with"):
        await ctl.start_sentinels(["a"], epoch=2)


async def test_crashing_sentinel_is_restarted_with_growing_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbs.controller")
    starts = tmp_path / "starts"
    with anyio.fail_after(15):
        async with ProcessController(
            log_dir=tmp_path / "logs",
            sentinels={"crash": _python(_CRASH, starts)},
            restart_backoff=(0.2, 0.4),
        ) as ctl:
            await ctl.start_sentinels(["crash"], epoch=1)
            times = [float(line) for line in await _lines_when_ready(starts, 4)]
            await ctl.stop_sentinels()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.4
    # Capped at the second value rather than doubling on to 0.8.
    assert 0.4 <= gaps[2] < 0.8
    assert any("exit code 3" in record.getMessage() for record in caplog.records)


async def test_backoff_starts_over_after_a_long_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "_STABLE_RUN_TIME", 0.0)
    starts = tmp_path / "starts"
    with anyio.fail_after(15):
        async with ProcessController(
            log_dir=tmp_path / "logs",
            sentinels={"crash": _python(_CRASH, starts)},
            restart_backoff=(0.3, 5.0),
        ) as ctl:
            await ctl.start_sentinels(["crash"], epoch=1)
            times = [float(line) for line in await _lines_when_ready(starts, 4)]
            await ctl.stop_sentinels()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(0.3 <= gap < 1.0 for gap in gaps), gaps


async def test_a_dead_child_is_not_listed_and_stop_ends_the_backoff(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with ProcessController(
            log_dir=tmp_path / "logs",
            sentinels={"quick": _python("pass")},
            restart_backoff=(30.0, 30.0),
        ) as ctl:
            await ctl.start_sentinels(["quick"], epoch=1)
            await _wait_until(lambda: ctl.running_sentinels() == frozenset())
            began = time.monotonic()
            await ctl.stop_sentinels(["quick"])
            assert time.monotonic() - began < 1.0


@pytest.mark.parametrize("problem", ["missing", "not executable"])
async def test_a_command_that_cannot_run_is_retried_without_harm(
    tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    command = tmp_path / "command"
    if problem == "not executable":
        command.write_text("#!/bin/sh\n")
        command.chmod(0o644)
    started = tmp_path / "pids"
    sentinels = {"broken": [str(command)], "fine": _python(_APPEND_PID_AND_SLEEP, started)}

    def failures() -> int:
        return sum("cannot start sentinel 'broken'" in r.getMessage() for r in caplog.records)

    with anyio.fail_after(10):
        async with ProcessController(
            log_dir=tmp_path / "logs", sentinels=sentinels, restart_backoff=(0.05, 0.1)
        ) as ctl:
            await ctl.start_sentinels(["broken", "fine"], epoch=1)
            [pid] = await _lines_when_ready(started, 1)
            pids.append(int(pid))
            await _wait_until(lambda: failures() >= 3)
            assert ctl.running_sentinels() == {"fine"}
            await ctl.stop_sentinels()
            assert ctl.running_sentinels() == frozenset()


async def test_unknown_sentinel_raises_and_starts_nothing(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        async with ProcessController(
            log_dir=tmp_path / "logs", sentinels={"a": _python("pass"), "b": _python("pass")}
        ) as ctl:
            with pytest.raises(UnknownSentinelError, match=r"'nope'.*known sentinels: a, b"):
                await ctl.start_sentinels(["a", "nope"], epoch=1)
            assert ctl.running_sentinels() == frozenset()
            with pytest.raises(KeyError):
                await ctl.stop_sentinels(["nope"])


async def test_log_file_receives_output_and_keeps_what_was_there(
    tmp_path: Path, pids: list[int]
) -> None:
    log_dir = tmp_path / "deep" / "logs"
    script = """
    import sys, time
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(60)
    """
    with anyio.fail_after(10):
        async with ProcessController(
            {"talker": _python(script)}, application=_python(script), log_dir=log_dir
        ) as ctl:
            await ctl.start_sentinels(["talker"], epoch=1)
            await ctl.start_application(epoch=1)
            await _wait_until(lambda: "to stderr" in _text(log_dir / "talker.log"))
            await _wait_until(lambda: "to stderr" in _text(log_dir / "application.log"))
            await ctl.stop_sentinels()
            (log_dir / "talker.log").write_text("earlier run\n")
            await ctl.start_sentinels(["talker"], epoch=2)
            await _wait_until(lambda: "to stderr" in _text(log_dir / "talker.log"))
    text = _text(log_dir / "talker.log")
    assert text.startswith("earlier run\n")
    assert "to stdout" in text


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_names_that_are_not_file_names_are_refused(tmp_path: Path) -> None:
    for name in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="log file name"):
            ProcessController({name: ["true"]}, log_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        ProcessController({"a": []}, log_dir=tmp_path)


_NODE = """
import sys
from pathlib import Path

import anyio

from sbs_core.controller import ProcessController

SENTINEL = '''
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
'''


async def main() -> None:
    pid_file = sys.argv[1]
    sentinels = {"s": [sys.executable, "-c", SENTINEL, pid_file]}
    async with ProcessController(sentinels, log_dir=Path(pid_file).parent / "logs") as ctl:
        await ctl.start_sentinels(["s"], epoch=1)
        await anyio.sleep_forever()


anyio.run(main)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux has a parent-death signal")
async def test_sentinel_dies_with_a_node_killed_by_sigkill(tmp_path: Path, pids: list[int]) -> None:
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    pid_file = tmp_path / "sentinel.pid"
    node = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        with anyio.fail_after(15):
            sentinel = int(await _read_when_ready(pid_file))
        pids.append(sentinel)
        assert _alive(sentinel)
        node.kill()
        with anyio.fail_after(5):
            await _wait_until(lambda: node.poll() is not None)
        with anyio.fail_after(2):
            await _wait_until(lambda: not _alive(sentinel))
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
