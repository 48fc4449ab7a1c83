"""The pywin32 service over a fake Windows: install, run, stop sequencing, event log, handover."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakewin import (
    ACCEPT_PRESHUTDOWN,
    ACCEPT_SHUTDOWN,
    ACCEPT_STOP,
    AUTO,
    DEMAND,
    RUNNING,
    STOP_PENDING,
    FakeWindows,
    fake_windows,
)

from sbs_core.errors import ConfigError, SbsError
from sbs_core.lab import (
    HOSTS,
    SLEEPER,
    NodeProcess,
    free_port,
    marker_sentinel,
    read_markers,
    write_node_config,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="runs real nodes on Linux")

CONTROL_STOP, CONTROL_INTERROGATE, CONTROL_SHUTDOWN, CONTROL_PRESHUTDOWN = 1, 4, 5, 0xF


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> FakeWindows:
    return fake_windows(monkeypatch)


def service_module() -> Any:
    return importlib.import_module("sbs_winsvc.service")


def node_config(folder: Path, *, port: int | None = None, **options: Any) -> Path:
    secret = folder / "secret"
    folder.mkdir(parents=True, exist_ok=True)
    if not secret.exists():
        secret.write_text("t" * 32)
    markers = folder / "markers"
    markers.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "name": "win-a",
        "local": HOSTS[0],
        "remote": HOSTS[1],
        "port": port or free_port(*HOSTS),
        "secret_file": secret,
        "sentinels": {"labels": [sys.executable, "-c", marker_sentinel(markers)]},
        **options,
    }
    return write_node_config(folder / "a", **settings)


class Running:
    """A service instance whose SvcRun runs in a thread, as the SCM's dispatcher does."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="svc-run")

    def _run(self) -> None:
        try:
            self.service.SvcRun()
        except BaseException as exc:
            self.error = exc

    def control(self, code: int) -> None:
        """A control code, from this thread, as the SCM's handler thread sends it."""
        self.service.ServiceCtrlHandlerEx(code, 0, None)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"SvcRun still running after {timeout} s"


@pytest.fixture
def run_service(windows: FakeWindows) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def run(config: Path, name: str = "sbs") -> Running:
        windows.registry[(name, "config")] = str(config)
        running = Running(service_module().SbsService([name]))
        started.append(running)
        running.thread.start()
        return running

    yield run
    for running in started:
        if running.thread.is_alive():
            running.control(CONTROL_STOP)
            running.service._runner and running.service._runner.request_stop()
            running.thread.join(30)


def wait_until(what: str, test: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.02)


def node_status(running: Running) -> dict[str, Any]:
    runner = running.service._runner
    assert runner is not None
    assert runner.node is not None
    status: dict[str, Any] = runner.node.status()
    return status


# --------------------------------------------------------------------------- install


def test_install_stores_the_configuration_and_starts_manually(
    windows: FakeWindows, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    code = service_module().handle_command_line(
        ["install", "--config", str(config), "--name", "sbs-labels", "--display-name", "Labels"]
    )
    assert code == 0
    assert windows.service("sbs-labels").start_type == DEMAND
    assert windows.installed["sbs-labels"]["display_name"] == "Labels"
    assert windows.installed["sbs-labels"]["class"] == "sbs_winsvc.service.SbsService"
    assert windows.registry[("sbs-labels", "config")] == str(config)
    assert f"configuration: {config}" in capsys.readouterr().out


def test_install_passes_pywin32_options_through(windows: FakeWindows, tmp_path: Path) -> None:
    config = node_config(tmp_path)
    service_module().handle_command_line(["install", f"--config={config}", "--startup", "auto"])
    assert windows.service("sbs").start_type == AUTO


def test_install_refuses_a_missing_or_invalid_configuration(
    windows: FakeWindows, tmp_path: Path
) -> None:
    module = service_module()
    with pytest.raises(SbsError, match="install needs --config FILE"):
        module.handle_command_line(["install"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'x'\n")
    with pytest.raises(ConfigError, match=r"node\.local_address"):
        module.handle_command_line(["install", "--config", str(bad)])
    assert windows.services == {}


def test_the_entry_point_explains_that_service_commands_need_windows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sbs_winsvc.cli import main  # noqa: PLC0415

    assert main(["install", "--config", "x.toml"]) == 1
    assert "needs Windows with pywin32" in capsys.readouterr().err


# --------------------------------------------------------------------------- running


def test_the_service_runs_the_node_and_a_stop_is_a_planned_stop(
    windows: FakeWindows, tmp_path: Path, run_service: Callable[..., Running]
) -> None:
    config = node_config(tmp_path)
    running = run_service(config)
    wait_until("primary", lambda: running.service._runner is not None)
    wait_until(
        "sentinel running",
        lambda: (
            running.service._runner.node is not None
            and node_status(running).get("active_sentinels") == ["labels"]
        ),
    )
    wait_until("sentinel marker", lambda: bool(read_markers(tmp_path / "markers")))
    assert windows.reports()[0][1] == RUNNING
    assert windows.reports()[0][2] == ACCEPT_STOP | ACCEPT_SHUTDOWN | ACCEPT_PRESHUTDOWN

    running.control(CONTROL_STOP)
    running.join(30)
    assert running.error is None
    stops = [r for r in windows.reports() if r[1] == STOP_PENDING]
    assert stops, windows.reports()
    assert all(r[6] > 0 for r in stops), "every STOP_PENDING carries a wait hint"
    # The sentinel got its stop request (it writes a stop marker on SIGTERM).
    runs = read_markers(tmp_path / "markers")
    assert len(runs) == 1
    assert runs[0]["stop"] is not None
    # The state folder (and its control token) is closed to other local users.
    info, aces = windows.acls[str(tmp_path / "a" / "state")]
    assert info == 4 | 0x80000000  # a DACL, not inherited from %PROGRAMDATA%
    assert [(sid, flags) for _, flags, _, sid in aces] == [
        ("S-1-5-32-544", 3),
        ("S-1-5-18", 3),
        ("S-1-5-80-sbs", 3),
    ]
    log = "\n".join(text for _, text in windows.event_log)
    assert "service sbs (sbs 0.1.0) started" in log
    assert "planned stop" in log
    assert "service sbs stopped" in log


def test_stop_pending_is_reported_again_and_again_while_the_stop_runs(
    windows: FakeWindows, tmp_path: Path, run_service: Callable[..., Running]
) -> None:
    # A sentinel that ignores SIGTERM holds the stop for controller.stop_timeout (2 s)
    # plus the kill: the SCM must keep hearing that the service is stopping.
    ready = tmp_path / "ready"
    stubborn = (
        "import pathlib, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n{SLEEPER}"
    )
    config = node_config(tmp_path, sentinels={"labels": [sys.executable, "-c", stubborn]})
    text = config.read_text().replace("stop_timeout = 2.0", "stop_timeout = 5.0")
    config.write_text(text)
    running = run_service(config)
    wait_until(
        "sentinel running",
        lambda: (
            running.service._runner is not None
            and running.service._runner.node is not None
            and node_status(running).get("active_sentinels") == ["labels"]
        ),
    )
    wait_until("sentinel ignoring SIGTERM", ready.exists)
    began = time.monotonic()
    running.control(CONTROL_STOP)
    running.control(CONTROL_INTERROGATE)  # must not claim RUNNING while it stops
    running.join(30)
    took = time.monotonic() - began
    stops = [r for r in windows.reports() if r[1] == STOP_PENDING]
    assert took >= 4.5
    assert len(stops) >= 3, windows.reports()
    checkpoints = [r[5] for r in stops]
    assert checkpoints == sorted(checkpoints)
    assert len(set(checkpoints)) == len(checkpoints), "each report moves the checkpoint on"
    service = service_module()
    # The last one is pywin32's own, once SvcDoRun has returned.
    assert {r[6] for r in stops[:-1]} == {service.STOP_WAIT_HINT_MS}
    after_stop = windows.reports()[windows.reports().index(stops[0]) :]
    assert RUNNING not in [r[1] for r in after_stop]


@pytest.mark.parametrize("control", [CONTROL_SHUTDOWN, CONTROL_PRESHUTDOWN])
def test_shutdown_notices_stop_the_service_as_a_stop_does(
    windows: FakeWindows, tmp_path: Path, run_service: Callable[..., Running], control: int
) -> None:
    running = run_service(node_config(tmp_path))
    wait_until(
        "node running",
        lambda: running.service._runner is not None and running.service._runner.node is not None,
    )
    running.control(control)
    running.join(30)
    assert any(r[1] == STOP_PENDING for r in windows.reports())


def test_a_full_event_log_never_stops_the_service(
    windows: FakeWindows, tmp_path: Path, run_service: Callable[..., Running]
) -> None:
    config = node_config(tmp_path)
    windows.event_log_full = True
    windows.acl_refused = True  # and a refusal to set permissions is no reason to stop
    running = run_service(config)
    wait_until(
        "sentinel running",
        lambda: (
            running.service._runner is not None
            and running.service._runner.node is not None
            and node_status(running).get("active_sentinels") == ["labels"]
        ),
    )
    running.control(CONTROL_STOP)
    running.join(30)
    assert running.error is None
    assert windows.event_log == []
    # The file log got what the event log could not take.
    log = (tmp_path / "a" / "state" / "logs" / "sbs.log").read_text()
    assert "promoted" in log
    assert "cannot restrict the permissions of" in log


def test_a_service_without_configuration_fails_with_a_clear_event(
    windows: FakeWindows, run_service: Callable[..., Running]
) -> None:
    running = Running(service_module().SbsService(["sbs"]))
    running.thread.start()
    running.join(10)
    assert isinstance(running.error, SbsError)
    errors = [text for kind, text in windows.event_log if kind == "error"]
    assert any("has no configuration file" in text for text in errors)


def test_a_stop_before_the_node_runs_still_stops_it(windows: FakeWindows, tmp_path: Path) -> None:
    config = node_config(tmp_path)
    windows.registry[("sbs", "config")] = str(config)
    service = service_module().SbsService(["sbs"])
    service.SvcStop()  # the SCM's stop raced the start
    running = Running(service)
    running.thread.start()
    running.join(20)
    assert running.error is None
    assert read_markers(tmp_path / "markers") == []


@pytest.mark.integration
def test_stopping_the_service_hands_over_to_the_peer(
    windows: FakeWindows, tmp_path: Path, run_service: Callable[..., Running]
) -> None:
    port = free_port(*HOSTS)
    config = node_config(tmp_path, port=port, heartbeat_interval=0.2, dead_time=2.0)
    peer_config = write_node_config(
        tmp_path / "b",
        name="win-b",
        local=HOSTS[1],
        remote=HOSTS[0],
        port=port,
        secret_file=tmp_path / "secret",
        heartbeat_interval=0.2,
        dead_time=2.0,
        sentinels={"labels": [sys.executable, "-c", marker_sentinel(tmp_path / "markers")]},
    )
    peer = NodeProcess("win-b", peer_config, env={"SBS_TEST_NODE": "b"})
    running = run_service(config)
    try:
        wait_until(
            "service primary",
            lambda: (
                running.service._runner is not None
                and running.service._runner.node is not None
                and node_status(running).get("role") == "primary"
            ),
        )
        wait_until("sentinel marker", lambda: bool(read_markers(tmp_path / "markers")))
        peer.start()
        peer.wait_for("secondary", lambda st: st.get("role") == "secondary")
        running.control(CONTROL_STOP)
        running.join(30)
        peer.wait_for(
            "primary by handover",
            lambda st: st.get("role") == "primary" and st.get("active_sentinels") == ["labels"],
        )
        assert "planned handover" in peer.log_tail(200)
        wait_until("the peer's marker", lambda: len(read_markers(tmp_path / "markers")) == 2)
        runs = sorted(read_markers(tmp_path / "markers"), key=lambda r: r["start"])
        assert [r["node"] for r in runs] == ["", "b"]
        assert runs[0]["stop"] is not None
        assert runs[0]["stop"] <= runs[1]["start"], "never on both nodes at once"
    finally:
        peer.stop()


# --------------------------------------------------------------------------- status, -cfg


def test_status_shows_the_service_and_the_node(
    windows: FakeWindows, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sbs_winsvc.cli import main  # noqa: PLC0415

    config = node_config(tmp_path)
    service_module().handle_command_line(["install", "--config", str(config)])
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "service sbs: stopped" in out
    assert f"config     {config}" in out
    assert "role       STOPPED" in out
    assert main(["status", "--name", "other"]) == 1
    assert "service other: not installed" in capsys.readouterr().out


def test_the_dialog_drives_the_windows_service_through_the_scm(
    windows: FakeWindows, tmp_path: Path
) -> None:
    from sbs_winsvc.cfg.backend import WindowsServiceBackend  # noqa: PLC0415

    config = node_config(tmp_path)
    service_module().handle_command_line(["install", "--config", str(config), "--name", "sbs2"])
    backend = WindowsServiceBackend("sbs2")
    assert backend.name == "service sbs2"
    assert backend.config_file() == config
    assert backend.state() == "stopped"
    windows.service("sbs2").start_time = 60.0
    backend.start()
    assert backend.state() == "starting"
    windows.service("sbs2").start_time = 0.0
    assert backend.state() == "running"
    windows.service("sbs2").stop_time = 60.0
    backend.stop()
    assert backend.state() == "stopping"
    assert WindowsServiceBackend("missing").state() == "not installed"
