"""The Windows controller: the managed application and sentinels as Windows services.

:class:`ServiceManager` is the handful of Service Control Manager calls sbs
needs, each blocking, over pywin32's ``win32service``.
:class:`WindowsController` is the :class:`~sbs_core.controller.ServiceController`
built on it:

* When it starts (the sbs service starts), every Windows service it manages is
  set to manual start, as the base product does, so that only sbs starts it;
  one that runs already (left by an sbs that died, or started by hand) is
  stopped, since this node may well become secondary.
* ``start_application`` and ``start_sentinels`` start services and wait until
  the SCM says they run (``controller.start_timeout``); a service that stops by
  itself while wanted is started again, waiting 1 s, then 2, 4... up to 60 s.
* Stops ask the SCM to stop the service and wait ``controller.stop_timeout``;
  a service that is still there then is killed, if it runs in a process of its
  own (a shared ``svchost`` process is never killed: that is logged instead).
* Sentinels configured with a ``command`` run as child processes through the
  :class:`~sbs_core.controller.ProcessController`, exactly as with ``sbs run``.

A sentinel service counts as running from the moment the SCM has it in any
state but stopped, so that no check ever sees "not running" on a node where it
might still be starting or stopping.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import pywintypes
import win32api
import win32con
import win32service
import winerror

from sbs_core.config import Config
from sbs_core.controller import ProcessController
from sbs_core.errors import SbsError, UnknownSentinelError

__all__ = ("ScmError", "ServiceManager", "ServiceState", "WindowsController")

logger = logging.getLogger("sbs.controller")

_POLL_INTERVAL = 0.5
_RESTART_BACKOFF = (1.0, 60.0)
_KILL_WAIT_TIME = 5.0


class ScmError(SbsError, OSError):
    """The Service Control Manager refused or failed a request; ``str()`` says which."""


class ServiceState(enum.Enum):
    STOPPED = "stopped"
    START_PENDING = "start pending"
    STOP_PENDING = "stop pending"
    RUNNING = "running"
    PAUSED = "paused"  # and continue/pause pending: up, but not serving


_STATES = {
    win32service.SERVICE_STOPPED: ServiceState.STOPPED,
    win32service.SERVICE_START_PENDING: ServiceState.START_PENDING,
    win32service.SERVICE_STOP_PENDING: ServiceState.STOP_PENDING,
    win32service.SERVICE_RUNNING: ServiceState.RUNNING,
}

_START_TYPES = {
    win32service.SERVICE_AUTO_START: "automatic",
    win32service.SERVICE_DEMAND_START: "manual",
    win32service.SERVICE_DISABLED: "disabled",
    win32service.SERVICE_BOOT_START: "boot",
    win32service.SERVICE_SYSTEM_START: "system",
}


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    state: ServiceState
    pid: int
    own_process: bool


class ServiceManager:
    """Blocking calls to the local Service Control Manager, errors as :class:`ScmError`."""

    def __init__(self, machine: str | None = None) -> None:
        self._machine = machine

    @contextlib.contextmanager
    def _service(self, name: str, access: int) -> Iterator[Any]:
        try:
            scm = win32service.OpenSCManager(self._machine, None, win32service.SC_MANAGER_CONNECT)
        except pywintypes.error as exc:
            raise _scm_error(exc, "the Service Control Manager") from None
        try:
            try:
                handle = win32service.OpenService(scm, name, access)
            except pywintypes.error as exc:
                raise _scm_error(exc, name) from None
            try:
                yield handle
            except pywintypes.error as exc:
                raise _scm_error(exc, name) from None
            finally:
                win32service.CloseServiceHandle(handle)
        finally:
            win32service.CloseServiceHandle(scm)

    def info(self, name: str) -> ServiceInfo:
        with self._service(name, win32service.SERVICE_QUERY_STATUS) as handle:
            # pywin32 answers QueryServiceStatusEx with a dict (its stubs say otherwise).
            status: Any = win32service.QueryServiceStatusEx(handle)
        state = _STATES.get(int(status["CurrentState"]), ServiceState.PAUSED)
        own = bool(int(status["ServiceType"]) & win32service.SERVICE_WIN32_OWN_PROCESS)
        return ServiceInfo(state=state, pid=int(status["ProcessId"]), own_process=own)

    def state(self, name: str) -> ServiceState:
        return self.info(name).state

    def start_type(self, name: str) -> int:
        with self._service(name, win32service.SERVICE_QUERY_CONFIG) as handle:
            config = win32service.QueryServiceConfig(handle)
        return int(config[1])

    def set_manual_start(self, name: str) -> str | None:
        """Make ``name`` start only on demand; the start type it had, if it changed."""
        access = win32service.SERVICE_QUERY_CONFIG | win32service.SERVICE_CHANGE_CONFIG
        with self._service(name, access) as handle:
            before = int(win32service.QueryServiceConfig(handle)[1])
            if before == win32service.SERVICE_DEMAND_START:
                return None
            no_change = win32service.SERVICE_NO_CHANGE
            win32service.ChangeServiceConfig(
                handle,
                no_change,
                win32service.SERVICE_DEMAND_START,
                no_change,
                None,
                None,
                False,
                None,
                None,
                None,
                None,
            )
        return _START_TYPES.get(before, str(before))

    def start(self, name: str) -> None:
        with self._service(name, win32service.SERVICE_START) as handle:
            try:
                win32service.StartService(handle, None)
            except pywintypes.error as exc:
                if exc.winerror != winerror.ERROR_SERVICE_ALREADY_RUNNING:
                    raise

    def stop(self, name: str) -> bool:
        """Ask ``name`` to stop; False if it cannot take the request now (it is starting)."""
        with self._service(name, win32service.SERVICE_STOP) as handle:
            try:
                win32service.ControlService(handle, win32service.SERVICE_CONTROL_STOP)
            except pywintypes.error as exc:
                if exc.winerror == winerror.ERROR_SERVICE_NOT_ACTIVE:
                    return True
                if exc.winerror == winerror.ERROR_SERVICE_CANNOT_ACCEPT_CTRL:
                    return False
                raise
        return True

    def kill(self, name: str, pid: int) -> None:
        try:
            process = win32api.OpenProcess(win32con.PROCESS_TERMINATE, False, pid)
            try:
                win32api.TerminateProcess(process, 1)
            finally:
                win32api.CloseHandle(process)
        except pywintypes.error as exc:
            raise _scm_error(exc, f"{name} (pid {pid})") from None


def _scm_error(exc: pywintypes.error, what: str) -> ScmError:
    if exc.winerror == winerror.ERROR_SERVICE_DOES_NOT_EXIST:
        return ScmError(f"Windows service {what!r} does not exist (check its short name)")
    if exc.winerror == winerror.ERROR_ACCESS_DENIED:
        return ScmError(f"{what}: access denied (sbs must run as an administrator or SYSTEM)")
    message = (exc.strerror or "").strip()
    return ScmError(f"{what}: {exc.funcname} failed: {message} (error {exc.winerror})")


# --------------------------------------------------------------------------- controller


@dataclass(eq=False)
class _Unit:
    description: str
    service: str
    wanted: bool = False
    state: ServiceState = ServiceState.STOPPED
    backoff: float = _RESTART_BACKOFF[0]
    retry_at: float | None = None


class WindowsController:
    """A :class:`~sbs_core.controller.ServiceController` over the SCM (and child processes).

    ``application_service``: the service that is the managed application, if any.
    ``service_sentinels``: sentinel name -> service name. ``command_sentinels``: the
    process controller for the sentinels that are commands (and for
    ``controller.application`` if that is a command), with ``command_names`` the
    sentinels it runs. ``manager`` does the SCM calls, each in a worker thread.
    """

    def __init__(
        self,
        manager: ServiceManager,
        *,
        application_service: str | None = None,
        service_sentinels: Mapping[str, str] | None = None,
        command_sentinels: ProcessController | None = None,
        command_names: Collection[str] = (),
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        poll_interval: float = _POLL_INTERVAL,
        restart_backoff: tuple[float, float] = _RESTART_BACKOFF,
    ) -> None:
        self._scm = manager
        self._application = (
            _Unit(f"application service {application_service!r}", application_service)
            if application_service
            else None
        )
        self._services = {
            name: _Unit(f"sentinel {name!r} (service {service!r})", service)
            for name, service in (service_sentinels or {}).items()
        }
        self._processes = command_sentinels
        self._commands = frozenset(command_names) if command_sentinels is not None else frozenset()
        self._restart_scope: anyio.CancelScope | None = None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._poll_interval = poll_interval
        self._backoff = restart_backoff
        self._task_group: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, config: Config, manager: ServiceManager) -> WindowsController:
        ctl = config.controller
        commands = {s.name: s.command for s in ctl.sentinels if s.command is not None}
        processes = None
        if commands or ctl.application is not None:
            processes = ProcessController(
                commands,
                application=ctl.application,
                log_dir=config.node.state_dir / "logs",
                stop_timeout=ctl.stop_timeout,
            )
        return cls(
            manager,
            application_service=ctl.application_service,
            service_sentinels={s.name: s.service for s in ctl.sentinels if s.service},
            command_sentinels=processes,
            command_names=commands,
            start_timeout=ctl.start_timeout,
            stop_timeout=ctl.stop_timeout,
        )

    def _units(self) -> list[_Unit]:
        units = list(self._services.values())
        return [self._application, *units] if self._application else units

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> WindowsController:
        for unit in self._units():
            changed = await self._call(self._scm.set_manual_start, unit.service)
            if changed is not None:
                logger.warning(
                    "%s: start type changed from %s to manual: only sbs starts it",
                    unit.description,
                    changed,
                )
            unit.state = await self._call(self._scm.state, unit.service)
        leftovers = [u for u in self._units() if u.state is not ServiceState.STOPPED]
        for unit in leftovers:
            logger.warning(
                "%s is %s before this node has a role: stopping it",
                unit.description,
                unit.state.value,
            )
        await self._stop_units(leftovers)
        if self._processes is not None:
            await self._processes.__aenter__()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._watch)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        try:
            with anyio.CancelScope(shield=True):
                await self._stop_units(self._units())
        finally:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
            if self._processes is not None:
                await self._processes.__aexit__(exc_type, exc, traceback)

    # ------------------------------------------------------------------ the protocol

    async def start_application(self, *, epoch: int) -> None:
        if self._processes is not None:
            await self._processes.start_application(epoch=epoch)
        if self._application is not None:
            await self._start_units([self._application])

    async def stop_application(self) -> None:
        if self._application is not None:
            await self._stop_units([self._application])
        if self._processes is not None:
            await self._processes.stop_application()

    async def start_sentinels(self, names: Sequence[str], *, epoch: int) -> None:
        services, commands = self._split(names)
        await self._start_units(services)
        if commands and self._processes is not None:
            await self._processes.start_sentinels(commands, epoch=epoch)

    async def stop_sentinels(self, names: Sequence[str] | None = None) -> None:
        if names is None:
            services = list(self._services.values())
            if self._processes is not None:
                await self._processes.stop_sentinels(None)
        else:
            services, commands = self._split(names)
            if commands and self._processes is not None:
                await self._processes.stop_sentinels(commands)
        await self._stop_units(services)

    def running_sentinels(self) -> frozenset[str]:
        running = {
            name for name, unit in self._services.items() if unit.state is not ServiceState.STOPPED
        }
        if self._processes is not None:
            running |= self._processes.running_sentinels()
        return frozenset(running)

    def application_running(self) -> bool:
        if self._application is not None and self._application.state is not ServiceState.STOPPED:
            return True
        return self._processes is not None and self._processes.application_running()

    # ------------------------------------------------------------------ work

    def _split(self, names: Sequence[str]) -> tuple[list[_Unit], list[str]]:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names, not a single string")
        known_commands = self._commands
        unknown = [n for n in names if n not in self._services and n not in known_commands]
        if unknown:
            known = ", ".join(sorted({*self._services, *known_commands})) or "none"
            raise UnknownSentinelError(
                f"unknown sentinel {', '.join(map(repr, unknown))}; known sentinels: {known}"
            )
        ordered = list(dict.fromkeys(names))
        return (
            [self._services[n] for n in ordered if n in self._services],
            [n for n in ordered if n in known_commands],
        )

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(func, *args)

    async def _start_units(self, units: Sequence[_Unit]) -> None:
        async with self._lock:
            for unit in units:
                unit.wanted = True
                unit.backoff = self._backoff[0]
                unit.retry_at = None
                await self._start_one(unit)

    async def _start_one(self, unit: _Unit) -> bool:
        try:
            state = await self._call(self._scm.state, unit.service)
            if state is ServiceState.STOP_PENDING:
                state = await self._wait_for(unit, ServiceState.STOPPED, self._stop_timeout)
            if state is not ServiceState.RUNNING:
                await self._call(self._scm.start, unit.service)
                state = await self._wait_for(unit, ServiceState.RUNNING, self._start_timeout)
        except ScmError as exc:
            logger.error(
                "cannot start %s: %s; next attempt in %.0f s", unit.description, exc, unit.backoff
            )
            self._schedule_retry(unit)
            return False
        if state is not ServiceState.RUNNING:
            logger.error(
                "%s did not report running within %.0f s (it is %s); next attempt in %.0f s",
                unit.description,
                self._start_timeout,
                state.value,
                unit.backoff,
            )
            self._schedule_retry(unit)
            return False
        logger.info("started %s", unit.description)
        return True

    def _schedule_retry(self, unit: _Unit) -> None:
        unit.retry_at = anyio.current_time() + unit.backoff
        unit.backoff = min(unit.backoff * 2, self._backoff[1])

    async def _stop_units(self, units: Sequence[_Unit]) -> None:
        for unit in units:
            unit.wanted = False
            unit.retry_at = None
        if self._restart_scope is not None:
            # A restart of a crashed unit may wait start_timeout: a stop goes first.
            self._restart_scope.cancel()
        async with self._lock, anyio.create_task_group() as tg:
            for unit in units:
                tg.start_soon(self._stop_one, unit)

    async def _stop_one(self, unit: _Unit) -> None:
        try:
            info = await self._call(self._scm.info, unit.service)
            unit.state = info.state
            if info.state is ServiceState.STOPPED:
                return
            with anyio.move_on_after(self._stop_timeout):
                while not await self._call(self._scm.stop, unit.service):
                    await anyio.sleep(self._poll_interval)  # starting: cannot stop yet
            state = await self._wait_for(unit, ServiceState.STOPPED, self._stop_timeout)
            if state is ServiceState.STOPPED:
                logger.info("stopped %s", unit.description)
                return
            info = await self._call(self._scm.info, unit.service)
            if not info.own_process or info.pid == 0:
                logger.error(
                    "%s is still %s %.0f s after the stop request, and shares its process:"
                    " not killed",
                    unit.description,
                    info.state.value,
                    self._stop_timeout,
                )
                return
            logger.warning(
                "%s still %s %.0f s after the stop request: killing pid %d",
                unit.description,
                info.state.value,
                self._stop_timeout,
                info.pid,
            )
            await self._call(self._scm.kill, unit.service, info.pid)
            state = await self._wait_for(unit, ServiceState.STOPPED, _KILL_WAIT_TIME)
            if state is not ServiceState.STOPPED:
                logger.error("%s is still %s after the kill", unit.description, state.value)
        except ScmError as exc:
            logger.error("cannot stop %s: %s", unit.description, exc)

    async def _wait_for(self, unit: _Unit, target: ServiceState, timeout: float) -> ServiceState:
        with anyio.move_on_after(timeout):
            while True:
                unit.state = await self._call(self._scm.state, unit.service)
                if unit.state is target:
                    break
                await anyio.sleep(self._poll_interval)
        return unit.state

    async def _watch(self) -> None:
        """Keep each unit's cached state fresh; start again a wanted one that stopped."""
        while True:
            await anyio.sleep(self._poll_interval)
            for unit in self._units():
                try:
                    unit.state = await self._call(self._scm.state, unit.service)
                except ScmError as exc:
                    logger.error("cannot query %s: %s", unit.description, exc)
                    continue
                if unit.wanted and unit.state is ServiceState.STOPPED:
                    await self._restart(unit)

    async def _restart(self, unit: _Unit) -> None:
        now = anyio.current_time()
        if unit.retry_at is None:
            logger.warning(
                "%s stopped by itself; starting it again in %.0f s", unit.description, unit.backoff
            )
            self._schedule_retry(unit)
            return
        if now < unit.retry_at or self._lock.locked():
            return
        with anyio.CancelScope() as scope:
            self._restart_scope = scope
            async with self._lock:
                if unit.wanted:
                    unit.retry_at = None
                    await self._start_one(unit)
        self._restart_scope = None
