"""The Windows controller over a fake SCM: manual start, start/stop order, restarts, kills."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakewin import (
    AUTO,
    DEMAND,
    DISABLED,
    RUNNING,
    SHARE_PROCESS,
    STOPPED,
    FakeWindows,
    fake_windows,
)

from sbs_core.config import load_config
from sbs_core.controller import ProcessController
from sbs_core.errors import UnknownSentinelError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> FakeWindows:
    return fake_windows(monkeypatch)


def scm_module() -> Any:
    return importlib.import_module("sbs_winsvc.scm")


def controller(**options: Any) -> Any:
    scm = scm_module()
    defaults: dict[str, Any] = {
        "application_service": "LabelServer",
        "service_sentinels": {"labels": "LabelJob", "spool": "Spooler"},
        "start_timeout": 2.0,
        "stop_timeout": 0.5,
        "poll_interval": 0.02,
        "restart_backoff": (0.05, 0.2),
    }
    return scm.WindowsController(scm.ServiceManager(), **{**defaults, **options})


def standard(windows: FakeWindows) -> None:
    windows.add_service("LabelServer", start_type=AUTO)
    windows.add_service("LabelJob", start_type=DISABLED)
    windows.add_service("Spooler", start_type=DEMAND)


async def until(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def test_entering_sets_every_managed_service_to_manual_start(
    windows: FakeWindows, caplog: pytest.LogCaptureFixture
) -> None:
    standard(windows)
    with caplog.at_level(logging.WARNING, "sbs.controller"):
        async with controller():
            assert {s.name: s.start_type for s in windows.services.values()} == {
                "LabelServer": DEMAND,
                "LabelJob": DEMAND,
                "Spooler": DEMAND,
            }
    assert "start type changed from automatic to manual" in caplog.text
    assert "start type changed from disabled to manual" in caplog.text
    # Already manual: left alone, not even rewritten.
    assert ("ChangeServiceConfig", "Spooler") not in windows.calls


async def test_services_running_before_the_node_has_a_role_are_stopped(
    windows: FakeWindows,
) -> None:
    standard(windows)
    windows.service("LabelServer").state = RUNNING
    windows.service("LabelJob").state = RUNNING
    async with controller() as ctl:
        assert windows.service("LabelServer").state == STOPPED
        assert windows.service("LabelJob").state == STOPPED
        assert ctl.running_sentinels() == frozenset()


async def test_a_missing_service_refuses_the_start_naming_it(windows: FakeWindows) -> None:
    windows.add_service("LabelServer")
    with pytest.raises(scm_module().ScmError, match="Windows service 'LabelJob' does not exist"):
        async with controller():
            pass


async def test_promotion_starts_the_application_then_the_sentinels_and_waits_for_them(
    windows: FakeWindows,
) -> None:
    standard(windows)
    windows.service("LabelServer").start_time = 0.1
    windows.service("LabelJob").start_time = 0.1
    async with controller() as ctl:
        await ctl.start_application(epoch=3)
        assert windows.service("LabelServer").state == RUNNING
        await ctl.start_sentinels(["labels"], epoch=3)
        assert windows.service("LabelJob").state == RUNNING
        assert ctl.running_sentinels() == {"labels"}
        assert ctl.application_running()
        starts = [name for call, name in windows.calls if call == "StartService"]
        assert starts == ["LabelServer", "LabelJob"]
        # A repeated call changes nothing.
        await ctl.start_sentinels(["labels"], epoch=3)
        assert windows.service("LabelJob").starts == 1


async def test_demotion_stops_the_sentinels_then_the_application(windows: FakeWindows) -> None:
    standard(windows)
    async with controller() as ctl:
        await ctl.start_application(epoch=1)
        await ctl.start_sentinels(["labels", "spool"], epoch=1)
        windows.calls.clear()
        await ctl.stop_sentinels(None)
        await ctl.stop_application()
        assert all(s.state == STOPPED for s in windows.services.values())
        controls = [name for call, name in windows.calls if call == "ControlService"]
        assert controls[-1] == "LabelServer"
        assert set(controls[:-1]) == {"LabelJob", "Spooler"}
        assert ctl.running_sentinels() == frozenset()


async def test_an_unknown_sentinel_is_refused_before_anything_starts(windows: FakeWindows) -> None:
    standard(windows)
    async with controller() as ctl:
        with pytest.raises(UnknownSentinelError, match="unknown sentinel 'nope'"):
            await ctl.start_sentinels(["labels", "nope"], epoch=1)
        assert windows.service("LabelJob").starts == 0


async def test_a_sentinel_service_that_dies_is_started_again(
    windows: FakeWindows, caplog: pytest.LogCaptureFixture
) -> None:
    standard(windows)
    async with controller() as ctl:
        await ctl.start_sentinels(["labels"], epoch=1)
        with caplog.at_level(logging.WARNING, "sbs.controller"):
            windows.crash("LabelJob")
            await until(lambda: windows.service("LabelJob").starts == 2)
            await until(lambda: windows.service("LabelJob").state == RUNNING)
        assert "stopped by itself" in caplog.text
        # Stopped on purpose: stays stopped.
        await ctl.stop_sentinels(["labels"])
        await anyio.sleep(0.3)
        assert windows.service("LabelJob").state == STOPPED
        assert windows.service("LabelJob").starts == 2


async def test_a_service_that_does_not_stop_in_time_is_killed(
    windows: FakeWindows, caplog: pytest.LogCaptureFixture
) -> None:
    standard(windows)
    windows.service("LabelJob").ignores_stop = True
    async with controller() as ctl:
        await ctl.start_sentinels(["labels"], epoch=1)
        with caplog.at_level(logging.WARNING, "sbs.controller"):
            await ctl.stop_sentinels(["labels"])
        assert windows.service("LabelJob").killed == 1
        assert windows.service("LabelJob").state == STOPPED
        assert "killing pid" in caplog.text


async def test_a_hung_service_in_a_shared_process_is_never_killed(
    windows: FakeWindows, caplog: pytest.LogCaptureFixture
) -> None:
    standard(windows)
    job = windows.service("LabelJob")
    job.ignores_stop, job.service_type = True, SHARE_PROCESS
    async with controller() as ctl:
        await ctl.start_sentinels(["labels"], epoch=1)
        with caplog.at_level(logging.ERROR, "sbs.controller"):
            await ctl.stop_sentinels(["labels"])
        assert job.killed == 0
        assert "shares its process: not killed" in caplog.text
        job.ignores_stop = False  # let the block end


async def test_a_stop_waits_for_a_service_still_starting(windows: FakeWindows) -> None:
    standard(windows)
    windows.service("LabelServer").start_time = 0.3
    async with controller(start_timeout=0.05) as ctl:
        await ctl.start_application(epoch=1)  # gives up waiting: still START_PENDING
        await ctl.stop_application()
        assert windows.service("LabelServer").state == STOPPED


async def test_leaving_stops_everything(windows: FakeWindows) -> None:
    standard(windows)
    async with controller() as ctl:
        await ctl.start_application(epoch=1)
        await ctl.start_sentinels(["labels", "spool"], epoch=1)
    assert all(s.state == STOPPED for s in windows.services.values())


async def test_command_sentinels_run_as_processes_beside_service_sentinels(
    windows: FakeWindows, tmp_path: Path
) -> None:
    standard(windows)
    processes = ProcessController(
        {"exporter": [sys.executable, "-c", "import time; time.sleep(30)"]},
        log_dir=tmp_path,
        stop_timeout=2.0,
    )
    async with controller(command_sentinels=processes, command_names=["exporter"]) as ctl:
        await ctl.start_sentinels(["exporter", "labels"], epoch=4)
        assert ctl.running_sentinels() == {"exporter", "labels"}
        await ctl.stop_sentinels(["exporter"])
        assert ctl.running_sentinels() == {"labels"}


async def test_the_controller_is_built_from_the_configuration(
    windows: FakeWindows, tmp_path: Path
) -> None:
    standard(windows)
    (tmp_path / "secret").write_text("s" * 32)
    path = tmp_path / "sbs.toml"
    path.write_text(
        "[node]\nlocal_address = '127.0.0.1'\nremote_address = '127.0.0.2'\n"
        "secret_file = 'secret'\nstate_dir = 'state'\n"
        "[controller]\nkind = 'windows'\napplication_service = 'LabelServer'\n"
        "start_timeout = 3.0\n"
        "[[controller.sentinels]]\nname = 'labels'\nservice = 'LabelJob'\n"
        "[[controller.sentinels]]\nname = 'exporter'\n"
        f"command = ['{sys.executable}', '-c', 'import time; time.sleep(30)']\n"
    )
    scm = scm_module()
    ctl = scm.WindowsController.from_config(load_config(path), scm.ServiceManager())
    async with ctl:
        await ctl.start_application(epoch=1)
        await ctl.start_sentinels(["labels", "exporter"], epoch=1)
        assert ctl.running_sentinels() == {"labels", "exporter"}
        assert windows.service("LabelServer").state == RUNNING
    assert windows.service("LabelServer").start_type == DEMAND
    assert (tmp_path / "state" / "logs" / "exporter.log").exists()
