"""A Windows in miniature for the service shell's tests: fake pywin32 modules over a fake SCM.

:class:`FakeWindows` holds the state a test looks at (services and their
states and start types, the registry values of ``SetServiceCustomOption``, the
event log, every ``SetServiceStatus`` report). :meth:`FakeWindows.install`
puts modules named ``win32service``, ``win32serviceutil``, ``servicemanager``,
``win32api``, ``win32con``, ``winerror`` and ``pywintypes`` into
``sys.modules``, whose functions act on it, with the constants' real values.

Services move between states in time, as real ones do: a started service is
START_PENDING for ``start_time`` seconds, a stopped one STOP_PENDING for
``stop_time`` seconds, each as measured when the state is next queried.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4
BOOT, SYSTEM, AUTO, DEMAND, DISABLED = 0, 1, 2, 3, 4
OWN_PROCESS, SHARE_PROCESS = 0x10, 0x20

ERROR_ACCESS_DENIED = 5
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_CANNOT_ACCEPT_CTRL = 1061
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_EXISTS = 1073

CONSTANTS: dict[str, int] = {
    "SERVICE_STOPPED": STOPPED,
    "SERVICE_START_PENDING": START_PENDING,
    "SERVICE_STOP_PENDING": STOP_PENDING,
    "SERVICE_RUNNING": RUNNING,
    "SERVICE_CONTINUE_PENDING": 5,
    "SERVICE_PAUSE_PENDING": 6,
    "SERVICE_PAUSED": 7,
    "SERVICE_BOOT_START": BOOT,
    "SERVICE_SYSTEM_START": SYSTEM,
    "SERVICE_AUTO_START": AUTO,
    "SERVICE_DEMAND_START": DEMAND,
    "SERVICE_DISABLED": DISABLED,
    "SERVICE_NO_CHANGE": 0xFFFFFFFF,
    "SERVICE_WIN32_OWN_PROCESS": OWN_PROCESS,
    "SERVICE_WIN32_SHARE_PROCESS": SHARE_PROCESS,
    "SC_MANAGER_CONNECT": 0x1,
    "SC_MANAGER_ALL_ACCESS": 0xF003F,
    "SERVICE_QUERY_CONFIG": 0x1,
    "SERVICE_CHANGE_CONFIG": 0x2,
    "SERVICE_QUERY_STATUS": 0x4,
    "SERVICE_START": 0x10,
    "SERVICE_STOP": 0x20,
    "SERVICE_ALL_ACCESS": 0xF01FF,
    "SERVICE_CONTROL_STOP": 1,
    "SERVICE_CONTROL_INTERROGATE": 4,
    "SERVICE_CONTROL_SHUTDOWN": 5,
    "SERVICE_CONTROL_PRESHUTDOWN": 0xF,
    "SERVICE_ACCEPT_STOP": 0x1,
    "SERVICE_ACCEPT_PAUSE_CONTINUE": 0x2,
    "SERVICE_ACCEPT_SHUTDOWN": 0x4,
    "SERVICE_ACCEPT_PRESHUTDOWN": 0x100,
    "SERVICE_ERROR_NORMAL": 1,
}
ACCEPT_STOP, ACCEPT_SHUTDOWN, ACCEPT_PRESHUTDOWN = 0x1, 0x4, 0x100


class WinError(Exception):
    """``pywintypes.error``: (winerror, funcname, strerror)."""

    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror = winerror
        self.funcname = funcname
        self.strerror = strerror


@dataclass
class FakeService:
    name: str
    start_type: int = AUTO
    service_type: int = OWN_PROCESS
    state: int = STOPPED
    pid: int = 0
    start_time: float = 0.0
    stop_time: float = 0.0
    ignores_stop: bool = False  # a hung service: never leaves STOP_PENDING by itself
    changed_at: float = field(default_factory=time.monotonic)
    starts: int = 0
    stops: int = 0
    killed: int = 0

    def settle(self) -> None:
        now = time.monotonic()
        if self.state == START_PENDING and now - self.changed_at >= self.start_time:
            self.state, self.changed_at = RUNNING, now
        elif (
            self.state == STOP_PENDING
            and not self.ignores_stop
            and now - self.changed_at >= self.stop_time
        ):
            self.state, self.changed_at, self.pid = STOPPED, now, 0


@dataclass
class Handle:
    service: str | None
    access: int


class FakeWindows:
    """The fake machine; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.services: dict[str, FakeService] = {}
        self.registry: dict[tuple[str, str], object] = {}
        self.event_log: list[tuple[str, str]] = []
        self.event_log_full = False
        self.status_reports: list[tuple[float, tuple[int, ...]]] = []
        self.calls: list[tuple[str, str]] = []
        self.installed: dict[str, dict[str, Any]] = {}
        self.acls: dict[str, tuple[int, list[tuple[int, int, int, str]]]] = {}
        self.acl_refused = False
        self._next_pid = 4000

    # ------------------------------------------------------------------ setup

    def add_service(self, name: str, **options: Any) -> FakeService:
        service = FakeService(name=name, **options)
        if service.state != STOPPED and not service.pid:
            service.pid = self._pid()
        self.services[name.casefold()] = service
        return service

    def service(self, name: str) -> FakeService:
        return self.services[name.casefold()]

    def crash(self, name: str) -> None:
        """The service dies by itself."""
        with self.lock:
            service = self.service(name)
            service.state, service.pid, service.changed_at = STOPPED, 0, time.monotonic()

    def _pid(self) -> int:
        self._next_pid += 4
        return self._next_pid

    def reports(self) -> list[tuple[int, ...]]:
        return [status for _, status in self.status_reports]

    # ------------------------------------------------------------------ the modules

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        modules = {
            "pywintypes": self._pywintypes(),
            "winerror": _constants_module(
                "winerror",
                {
                    "ERROR_ACCESS_DENIED": ERROR_ACCESS_DENIED,
                    "ERROR_SERVICE_ALREADY_RUNNING": ERROR_SERVICE_ALREADY_RUNNING,
                    "ERROR_SERVICE_DOES_NOT_EXIST": ERROR_SERVICE_DOES_NOT_EXIST,
                    "ERROR_SERVICE_CANNOT_ACCEPT_CTRL": ERROR_SERVICE_CANNOT_ACCEPT_CTRL,
                    "ERROR_SERVICE_NOT_ACTIVE": ERROR_SERVICE_NOT_ACTIVE,
                    "ERROR_SERVICE_EXISTS": ERROR_SERVICE_EXISTS,
                },
            ),
            "win32con": _constants_module("win32con", {"PROCESS_TERMINATE": 1}),
            "ntsecuritycon": _constants_module(
                "ntsecuritycon",
                {"OBJECT_INHERIT_ACE": 1, "CONTAINER_INHERIT_ACE": 2, "FILE_ALL_ACCESS": 2032127},
            ),
            "win32security": self._win32security(),
            "win32api": self._win32api(),
            "win32service": self._win32service(),
            "servicemanager": self._servicemanager(),
        }
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setitem(sys.modules, "win32serviceutil", self._win32serviceutil())
        # Modules of the shell bound the old ones at import: import them afresh.
        for name in list(sys.modules):
            if name.startswith("sbs_winsvc.") and name not in ("sbs_winsvc.runner",):
                monkeypatch.delitem(sys.modules, name)

    def _pywintypes(self) -> types.ModuleType:
        module = types.ModuleType("pywintypes")
        module.error = WinError  # type: ignore[attr-defined]
        return module

    def _win32security(self) -> types.ModuleType:
        module = _constants_module(
            "win32security",
            {
                "TOKEN_QUERY": 8,
                "TokenUser": 1,
                "WinBuiltinAdministratorsSid": 26,
                "WinLocalSystemSid": 22,
                "ACL_REVISION": 2,
                "SE_FILE_OBJECT": 1,
                "DACL_SECURITY_INFORMATION": 4,
                "PROTECTED_DACL_SECURITY_INFORMATION": 0x80000000,
            },
        )
        windows = self

        class Acl:
            def __init__(self) -> None:
                self.aces: list[tuple[int, int, int, str]] = []

            def AddAccessAllowedAceEx(
                self, revision: int, flags: int, access: int, sid: str
            ) -> None:
                self.aces.append((revision, flags, access, sid))

        def set_named(name: str, kind: int, info: int, *rest: object) -> None:
            if windows.acl_refused:
                raise WinError(ERROR_ACCESS_DENIED, "SetNamedSecurityInfo", "Access is denied.")
            dacl = rest[2]
            assert isinstance(dacl, Acl)
            windows.acls[name] = (info, dacl.aces)

        module.CreateWellKnownSid = lambda kind, domain=None: {26: "S-1-5-32-544", 22: "S-1-5-18"}[  # type: ignore[attr-defined]
            kind
        ]
        module.OpenProcessToken = lambda process, access: 77  # type: ignore[attr-defined]
        module.GetTokenInformation = lambda token, kind: ("S-1-5-80-sbs", 0)  # type: ignore[attr-defined]
        module.ACL = Acl  # type: ignore[attr-defined]
        module.SetNamedSecurityInfo = set_named  # type: ignore[attr-defined]
        return module

    def _win32api(self) -> types.ModuleType:
        module = types.ModuleType("win32api")
        windows = self

        def open_process(access: int, inherit: bool, pid: int) -> int:
            windows.calls.append(("OpenProcess", str(pid)))
            return pid

        def terminate_process(handle: int, code: int) -> None:
            with windows.lock:
                for service in windows.services.values():
                    if service.pid == handle and service.state != STOPPED:
                        service.state, service.pid = STOPPED, 0
                        service.killed += 1
                        return
            raise WinError(87, "TerminateProcess", "The parameter is incorrect.")

        module.OpenProcess = open_process  # type: ignore[attr-defined]
        module.TerminateProcess = terminate_process  # type: ignore[attr-defined]
        module.CloseHandle = lambda handle: None  # type: ignore[attr-defined]
        module.GetCurrentProcess = lambda: -1  # type: ignore[attr-defined]
        module.error = WinError  # type: ignore[attr-defined]
        return module

    def _lookup(self, handle: Handle, func: str) -> FakeService:
        assert handle.service is not None, "not a service handle"
        try:
            service = self.services[handle.service.casefold()]
        except KeyError:
            raise WinError(
                ERROR_SERVICE_DOES_NOT_EXIST, func, "The specified service does not exist."
            ) from None
        service.settle()
        return service

    def _win32service(self) -> types.ModuleType:
        module = _constants_module("win32service", CONSTANTS)
        windows = self
        module.error = WinError  # type: ignore[attr-defined]

        def open_scm(machine: str | None, db: str | None, access: int) -> Handle:
            return Handle(None, access)

        def open_service(scm: Handle, name: str, access: int) -> Handle:
            handle = Handle(name, access)
            with windows.lock:
                windows._lookup(handle, "OpenService")
            return handle

        def query_ex(handle: Handle) -> dict[str, int]:
            with windows.lock:
                service = windows._lookup(handle, "QueryServiceStatusEx")
                return {
                    "ServiceType": service.service_type,
                    "CurrentState": service.state,
                    "ProcessId": service.pid,
                }

        def query(handle: Handle) -> tuple[int, ...]:
            with windows.lock:
                service = windows._lookup(handle, "QueryServiceStatus")
                return (service.service_type, service.state, 0, 0, 0, 0, 0)

        def query_config(handle: Handle) -> tuple[object, ...]:
            with windows.lock:
                service = windows._lookup(handle, "QueryServiceConfig")
                return (service.service_type, service.start_type, 1, "x.exe", None, 0, [], "")

        def change_config(
            handle: Handle, service_type: int, start_type: int, *rest: object
        ) -> None:
            with windows.lock:
                service = windows._lookup(handle, "ChangeServiceConfig")
                windows.calls.append(("ChangeServiceConfig", service.name))
                if start_type != CONSTANTS["SERVICE_NO_CHANGE"]:
                    service.start_type = start_type

        def start(handle: Handle, args: Iterable[str] | None) -> None:
            with windows.lock:
                service = windows._lookup(handle, "StartService")
                windows.calls.append(("StartService", service.name))
                if service.state != STOPPED:
                    raise WinError(
                        ERROR_SERVICE_ALREADY_RUNNING,
                        "StartService",
                        "An instance of the service is already running.",
                    )
                service.state, service.changed_at = START_PENDING, time.monotonic()
                service.pid = windows._pid()
                service.starts += 1
                service.settle()

        def control(handle: Handle, code: int) -> tuple[int, ...]:
            with windows.lock:
                service = windows._lookup(handle, "ControlService")
                windows.calls.append(("ControlService", service.name))
                if service.state == STOPPED:
                    raise WinError(
                        ERROR_SERVICE_NOT_ACTIVE,
                        "ControlService",
                        "The service has not been started.",
                    )
                if service.state == START_PENDING:
                    raise WinError(
                        ERROR_SERVICE_CANNOT_ACCEPT_CTRL,
                        "ControlService",
                        "The service cannot accept control messages at this time.",
                    )
                if service.state != STOP_PENDING:
                    service.state, service.changed_at = STOP_PENDING, time.monotonic()
                    service.stops += 1
                service.settle()
                return (service.service_type, service.state, 0, 0, 0, 0, 0)

        def set_status(handle: object, status: tuple[int, ...]) -> None:
            windows.status_reports.append((time.monotonic(), tuple(status)))

        module.OpenSCManager = open_scm  # type: ignore[attr-defined]
        module.OpenService = open_service  # type: ignore[attr-defined]
        module.CloseServiceHandle = lambda handle: None  # type: ignore[attr-defined]
        module.QueryServiceStatusEx = query_ex  # type: ignore[attr-defined]
        module.QueryServiceStatus = query  # type: ignore[attr-defined]
        module.QueryServiceConfig = query_config  # type: ignore[attr-defined]
        module.ChangeServiceConfig = change_config  # type: ignore[attr-defined]
        module.StartService = start  # type: ignore[attr-defined]
        module.ControlService = control  # type: ignore[attr-defined]
        module.SetServiceStatus = set_status  # type: ignore[attr-defined]
        return module

    def _servicemanager(self) -> types.ModuleType:
        module = _constants_module(
            "servicemanager",
            {
                "EVENTLOG_ERROR_TYPE": 1,
                "EVENTLOG_WARNING_TYPE": 2,
                "EVENTLOG_INFORMATION_TYPE": 4,
                "PYS_SERVICE_STARTED": 0x40000001,
                "PYS_SERVICE_STOPPED": 0x40000003,
            },
        )
        windows = self

        def log(kind: str) -> Callable[[str], None]:
            def write(message: str) -> None:
                if windows.event_log_full:
                    raise WinError(1502, "ReportEvent", "The event log file is full.")
                windows.event_log.append((kind, message))

            return write

        def log_msg(kind: int, event_id: int, inserts: tuple[str, str] | None = None) -> None:
            text = {0x40000001: "started", 0x40000003: "stopped"}.get(event_id, str(event_id))
            log("info")(f"service {''.join(inserts or ())} {text}")

        module.LogInfoMsg = log("info")  # type: ignore[attr-defined]
        module.LogWarningMsg = log("warning")  # type: ignore[attr-defined]
        module.LogErrorMsg = log("error")  # type: ignore[attr-defined]
        module.LogMsg = log_msg  # type: ignore[attr-defined]
        module.RegisterServiceCtrlHandler = (  # type: ignore[attr-defined]
            lambda name, handler, extra=False: ("ssh", name)
        )
        module.SetEventSourceName = lambda name, register=False: None  # type: ignore[attr-defined]
        module.Debugging = lambda value=-1: False  # type: ignore[attr-defined]
        return module

    def _win32serviceutil(self) -> types.ModuleType:
        """pywin32's utilities, as far as the shell uses them, with pywin32's behaviour."""
        module = types.ModuleType("win32serviceutil")
        windows = self
        win32service = sys.modules["win32service"]

        class ServiceFramework:
            _svc_deps_ = None
            _exe_name_ = None
            _exe_args_ = None
            _svc_description_ = None
            _svc_name_: str
            _svc_display_name_: str

            def __init__(self, args: Iterable[str]) -> None:
                self.ssh = ("ssh", next(iter(args)))
                self.checkPoint = 0

            def GetAcceptedControls(self) -> int:
                accepted = 0
                if hasattr(self, "SvcStop"):
                    accepted |= ACCEPT_STOP
                if hasattr(self, "SvcShutdown"):
                    accepted |= ACCEPT_SHUTDOWN
                return accepted

            def ReportServiceStatus(
                self, state: int, waitHint: int = 5000, win32ExitCode: int = 0, svcExitCode: int = 0
            ) -> None:
                accepted = 0 if state == START_PENDING else self.GetAcceptedControls()
                if state in (RUNNING, STOPPED):
                    checkpoint = 0
                else:
                    self.checkPoint += 1
                    checkpoint = self.checkPoint
                win32service.SetServiceStatus(
                    self.ssh,
                    (
                        OWN_PROCESS,
                        state,
                        accepted,
                        win32ExitCode,
                        svcExitCode,
                        checkpoint,
                        waitHint,
                    ),
                )

            def SvcInterrogate(self) -> None:
                self.ReportServiceStatus(RUNNING)

            def SvcOtherEx(self, control: int, event_type: int, data: object) -> None:
                pass

            def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: object) -> Any:
                if control == 1:
                    return self.SvcStop()  # type: ignore[attr-defined]
                if control == 4:
                    return self.SvcInterrogate()
                if control == 5:
                    return self.SvcShutdown()  # type: ignore[attr-defined]
                return self.SvcOtherEx(control, event_type, data)

            def SvcRun(self) -> None:
                self.ReportServiceStatus(RUNNING)
                self.SvcDoRun()  # type: ignore[attr-defined]
                self.ReportServiceStatus(STOP_PENDING)

        def set_option(name: Any, option: str, value: object) -> None:
            name = getattr(name, "_svc_name_", name)
            windows.registry[(str(name), option)] = value

        def get_option(name: Any, option: str, default: object = None) -> object:
            name = getattr(name, "_svc_name_", name)
            return windows.registry.get((str(name), option), default)

        def handle_command_line(
            cls: Any,
            serviceClassString: str | None = None,
            argv: list[str] | None = None,
            customInstallOptions: str = "",
            customOptionHandler: Callable[[object], None] | None = None,
        ) -> int:
            import getopt  # noqa: PLC0415

            assert argv is not None
            opts, args = getopt.getopt(
                argv[1:],
                customInstallOptions,
                [
                    "password=",
                    "username=",
                    "startup=",
                    "perfmonini=",
                    "perfmondll=",
                    "interactive",
                    "wait=",
                ],
            )
            startup = DEMAND
            for opt, value in opts:
                if opt == "--startup":
                    startup = {"manual": DEMAND, "auto": AUTO, "disabled": DISABLED}[value]
            command = args[0]
            name = cls._svc_name_
            windows.calls.append((command, name))
            if command == "install":
                if name.casefold() in windows.services:
                    return ERROR_SERVICE_EXISTS
                windows.add_service(name, start_type=startup)
                windows.installed[name] = {
                    "display_name": cls._svc_display_name_,
                    "class": serviceClassString,
                    "description": cls._svc_description_,
                }
                if customOptionHandler:
                    customOptionHandler(opts)
                return 0
            if command == "remove":
                windows.services.pop(name.casefold(), None)
                windows.installed.pop(name, None)
                return 0
            if command == "update":
                if customOptionHandler:
                    customOptionHandler(opts)
                return 0
            return 0

        module.ServiceFramework = ServiceFramework  # type: ignore[attr-defined]
        module.SetServiceCustomOption = set_option  # type: ignore[attr-defined]
        module.GetServiceCustomOption = get_option  # type: ignore[attr-defined]
        module.HandleCommandLine = handle_command_line  # type: ignore[attr-defined]

        def by_name(func: Callable[[Handle], Any]) -> Callable[..., Any]:
            def call(name: str, *args: object, **options: object) -> Any:
                return func(win32service.OpenService(None, name, 0))

            return call

        module.QueryServiceStatus = by_name(win32service.QueryServiceStatus)  # type: ignore[attr-defined]
        module.StartService = by_name(  # type: ignore[attr-defined]
            lambda handle: win32service.StartService(handle, None)
        )
        module.StopService = by_name(  # type: ignore[attr-defined]
            lambda handle: win32service.ControlService(handle, 1)
        )
        return module


def _constants_module(name: str, values: dict[str, int]) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in values.items():
        setattr(module, key, value)
    return module


def fake_windows(monkeypatch: pytest.MonkeyPatch) -> FakeWindows:
    """pywin32's modules, faked over a fresh fake SCM, until ``monkeypatch`` undoes them."""
    fake = FakeWindows()
    fake.install(monkeypatch)
    return fake
