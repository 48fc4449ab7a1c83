"""How the ``-cfg`` dialog starts, stops and looks at the node it configures.

On Windows that is the sbs Windows service, through the SCM
(:class:`WindowsServiceBackend`). On Linux and macOS it is an ``sbs run``
process that the dialog starts in the background and stops with SIGTERM, the
same planned stop as the service's (:class:`ProcessBackend`). Either way the
node's role comes from its control channel (:func:`sbs_core.cli.node_status`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Protocol

from sbs_core.config import load_config
from sbs_core.errors import ConfigError, ControlError, SbsError

__all__ = ("ProcessBackend", "ServiceBackend", "ServiceState", "WindowsServiceBackend")

ServiceState = Literal["stopped", "starting", "running", "stopping", "not installed"]


class ServiceBackend(Protocol):
    """The service the dialog's Status tab shows and its Start/Stop button drives."""

    @property
    def name(self) -> str: ...

    def state(self) -> ServiceState: ...

    def start(self) -> None:
        """Ask the service to start; returns at once (``state`` shows the progress)."""
        ...

    def stop(self) -> None:
        """Ask for the planned stop; returns at once."""
        ...


class WindowsServiceBackend:
    """The installed sbs Windows service named ``name``."""

    def __init__(self, name: str | None = None) -> None:
        from sbs_winsvc.service import DEFAULT_NAME  # noqa: PLC0415 - Windows only

        self._name = name or DEFAULT_NAME

    @property
    def name(self) -> str:
        return f"service {self._name}"

    def state(self) -> ServiceState:
        import pywintypes  # noqa: PLC0415 - Windows only
        import win32service  # noqa: PLC0415
        import win32serviceutil  # noqa: PLC0415

        try:
            current = win32serviceutil.QueryServiceStatus(self._name)[1]
        except pywintypes.error:
            return "not installed"
        states: dict[int, ServiceState] = {
            win32service.SERVICE_STOPPED: "stopped",
            win32service.SERVICE_START_PENDING: "starting",
            win32service.SERVICE_STOP_PENDING: "stopping",
        }
        return states.get(current, "running")

    def start(self) -> None:
        import pywintypes  # noqa: PLC0415 - Windows only
        import win32serviceutil  # noqa: PLC0415

        try:
            win32serviceutil.StartService(self._name)
        except pywintypes.error as exc:
            raise SbsError(f"cannot start service {self._name}: {exc.strerror}") from None

    def stop(self) -> None:
        import pywintypes  # noqa: PLC0415 - Windows only
        import win32serviceutil  # noqa: PLC0415

        try:
            win32serviceutil.StopService(self._name)
        except pywintypes.error as exc:
            raise SbsError(f"cannot stop service {self._name}: {exc.strerror}") from None

    def config_file(self) -> Path | None:
        """The configuration file stored with the installed service."""
        import pywintypes  # noqa: PLC0415 - Windows only
        import win32serviceutil  # noqa: PLC0415

        from sbs_winsvc.service import CONFIG_OPTION  # noqa: PLC0415

        try:
            value = win32serviceutil.GetServiceCustomOption(self._name, CONFIG_OPTION)
        except pywintypes.error:
            return None
        return Path(str(value)) if value else None


class ProcessBackend:
    """An ``sbs run --config FILE`` process in the background (Linux, macOS)."""

    def __init__(self, config_file: Path) -> None:
        self.config_file = Path(config_file)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_asked_at: float | None = None

    @property
    def name(self) -> str:
        return f"sbs run --config {self.config_file.name}"

    def _pid(self) -> int | None:
        from sbs_core.cli import node_status  # noqa: PLC0415 - keeps import light

        try:
            status = node_status(load_config(self.config_file))
        except (ConfigError, ControlError):
            return None
        pid = status.get("pid")
        return pid if isinstance(pid, int) and status.get("role") != "stopped" else None

    def state(self) -> ServiceState:
        pid = self._pid()
        child_alive = self._proc is not None and self._proc.poll() is None
        if pid is not None:
            return "stopping" if self._stop_asked_at is not None else "running"
        if child_alive:
            return "stopping" if self._stop_asked_at is not None else "starting"
        self._stop_asked_at = None
        return "stopped"

    def start(self) -> None:
        if self.state() != "stopped":
            return
        config = load_config(self.config_file)
        logs = config.node.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._stop_asked_at = None
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sbs_core",
                "run",
                "--config",
                str(self.config_file),
                "--log-file",
                str(logs / "sbs.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # The node outlives the dialog, as a service outlives its console.
            start_new_session=True,
        )

    def stop(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        self._stop_asked_at = time.monotonic()
        if sys.platform == "win32":  # pragma: no cover - the service backend is used there
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            os.kill(pid, signal.SIGTERM)

    def reap(self) -> None:
        """Wait for the child this backend started, if it has ended (no zombie left)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
