"""The Windows service: pywin32's ``ServiceFramework`` around the :class:`.ServiceRunner`.

Kept thin on purpose. ``SvcDoRun`` runs the node (the asyncio loop runs in
that thread, inside the runner) and returns when it has stopped. ``SvcStop``,
``SvcShutdown`` and the pre-shutdown notice come on the SCM's thread: each asks
the runner for a planned stop (last replication cycle, handover to the peer)
and, while that runs, the service keeps telling the SCM ``STOP_PENDING`` with a
wait hint and a rising checkpoint, so Windows neither gives up on it nor
thinks it hung.

Logging goes to the Windows event log (source: the service's name) and to
``<state_dir>/logs/sbs.log``. Writing to the event log never fails the
service: a full or unavailable log loses the line, nothing else.

``python -m sbs_winsvc install|update|remove|start|stop|restart|debug`` is
pywin32's own command-line handling, plus three options of sbs:
``--config FILE`` (stored with the service, required for ``install``),
``--name NAME`` and ``--display-name TEXT`` (to run more than one sbs service
on a machine, or to name it as a vendor wants). The default startup type is
manual, as in the base product; ``--startup auto`` is pywin32's option.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import servicemanager
import win32service
import win32serviceutil

from sbs_core import __version__
from sbs_core.errors import SbsError
from sbs_core.logs import logging_off_the_loop
from sbs_winsvc.acl import restrict_to_administrators
from sbs_winsvc.runner import ServiceRunner

__all__ = (
    "DEFAULT_DISPLAY_NAME",
    "DEFAULT_NAME",
    "EventLogHandler",
    "SbsService",
    "handle_command_line",
)

DEFAULT_NAME = "sbs"
DEFAULT_DISPLAY_NAME = "sbs warm standby"
CONFIG_OPTION = "config"

# The SCM waits this long for the next checkpoint before it deems a stop hung;
# the service reports well within it.
STOP_WAIT_HINT_MS = 10_000
STOP_REPORT_INTERVAL = 2.0

logger = logging.getLogger("sbs.service")


class EventLogHandler(logging.Handler):
    """Log records to the Windows event log; a failure to write loses only the line."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                servicemanager.LogErrorMsg(text)
            elif record.levelno >= logging.WARNING:
                servicemanager.LogWarningMsg(text)
            else:
                servicemanager.LogInfoMsg(text)
        except Exception:
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _event(event_id: int, inserts: tuple[str, str]) -> None:
    """One of pywin32's standard service events; a full event log loses it, nothing else."""
    with contextlib.suppress(Exception):
        servicemanager.LogMsg(servicemanager.EVENTLOG_INFORMATION_TYPE, event_id, inserts)


def _log_handlers(state_dir: Path | None) -> list[logging.Handler]:
    """The event log, and ``logs/sbs.log`` (rotated) under the state directory."""
    handlers: list[logging.Handler] = [EventLogHandler()]
    if state_dir is not None:
        try:
            (state_dir / "logs").mkdir(parents=True, exist_ok=True)
            rotating = logging.handlers.RotatingFileHandler(
                state_dir / "logs" / "sbs.log",
                maxBytes=10 * 1024 * 1024,
                backupCount=5,
                encoding="utf-8",
            )
            rotating.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
            handlers.append(rotating)
        except OSError as exc:
            logger.warning("cannot write the log file in %s: %s", state_dir, exc)
    return handlers


class SbsService(win32serviceutil.ServiceFramework):
    """The sbs node as a Windows service. The SCM creates it with ``[service name, ...]``."""

    _svc_name_: ClassVar[str] = DEFAULT_NAME
    _svc_display_name_: ClassVar[str] = DEFAULT_DISPLAY_NAME
    _svc_description_: ClassVar[str] = (
        "Keeps a warm standby of a server application on two machines: runs it and its"
        " sentinels on the primary, replicates its files to the secondary, and takes"
        " over when the primary fails."
    )

    # Where the runner comes from; tests replace it.
    runner_factory: ClassVar[type[ServiceRunner]] = ServiceRunner

    def __init__(self, args: Sequence[str]) -> None:
        super().__init__(args)
        self.service_name = str(args[0]) if args else self._svc_name_
        # The base class named the event source after the class; use the installed name.
        servicemanager.SetEventSourceName(self.service_name)
        self._status_lock = threading.Lock()
        self._state: int = win32service.SERVICE_START_PENDING
        self._runner: ServiceRunner | None = None
        self._stop_asked = threading.Event()
        self._runner_lock = threading.Lock()

    # ------------------------------------------------------------------ controls

    def GetAcceptedControls(self) -> int:
        # Pre-shutdown gives the planned stop more time than a plain shutdown notice.
        accepted = int(super().GetAcceptedControls())  # type: ignore[no-untyped-call]
        return accepted | win32service.SERVICE_ACCEPT_PRESHUTDOWN

    def SvcStop(self) -> None:
        self._begin_stop("stop requested")

    def SvcShutdown(self) -> None:
        self._begin_stop("Windows is shutting down")

    def SvcOtherEx(self, control: int, event_type: int, data: Any) -> None:
        if control == win32service.SERVICE_CONTROL_PRESHUTDOWN:
            self._begin_stop("Windows is shutting down (pre-shutdown)")

    def SvcInterrogate(self) -> None:
        # pywin32 answers "running" whatever the state; a stopping service must not.
        self._report(self._state)

    def _report(self, state: int, wait_hint: int = STOP_WAIT_HINT_MS) -> None:
        with self._status_lock:
            self._state = state
            try:
                self.ReportServiceStatus(state, waitHint=wait_hint)
            except Exception as exc:
                logger.warning("cannot report the service status to the SCM: %s", exc)

    def _begin_stop(self, why: str) -> None:
        # One lock for the flag and the runner: exactly one of this method and
        # SvcDoRun asks the runner to stop (a second request would skip the handover).
        with self._runner_lock:
            if self._stop_asked.is_set():
                return
            self._stop_asked.set()
            runner = self._runner
        logger.info("%s: planned stop (last replication cycle, handover)", why)
        self._report(win32service.SERVICE_STOP_PENDING)
        if runner is not None:
            self._stop(runner)
        # else SvcDoRun stops the runner as soon as it has one

    def _stop(self, runner: ServiceRunner) -> None:
        reporter = threading.Thread(
            target=self._keep_reporting, args=(runner,), name="sbs-stop-pending", daemon=True
        )
        reporter.start()
        runner.request_stop()

    def _keep_reporting(self, runner: ServiceRunner) -> None:
        while not runner.done.wait(STOP_REPORT_INTERVAL):
            self._report(win32service.SERVICE_STOP_PENDING)

    # ------------------------------------------------------------------ run

    def SvcDoRun(self) -> None:
        _event(servicemanager.PYS_SERVICE_STARTED, (self.service_name, f" (sbs {__version__})"))
        config = win32serviceutil.GetServiceCustomOption(self.service_name, CONFIG_OPTION)
        # Closed last, so that the failure logged below is written too.
        logs = contextlib.ExitStack()
        try:
            if not config:
                raise SbsError(
                    f"service {self.service_name} has no configuration file: install it with"
                    " 'python -m sbs_winsvc install --config FILE'"
                )
            runner = self.runner_factory(Path(str(config)))
            state_dir = runner.prepare().node.state_dir
            logging.getLogger().setLevel(logging.INFO)
            logs.enter_context(logging_off_the_loop(_log_handlers(state_dir)))
            restrict_to_administrators(state_dir)
            with self._runner_lock:
                self._runner = runner
                stop_early = self._stop_asked.is_set()
            if stop_early:
                self._report(win32service.SERVICE_STOP_PENDING)
                self._stop(runner)
            else:
                self._report(win32service.SERVICE_RUNNING)
            runner.run()
        except Exception as exc:
            logger.error("%s", exc)
            with contextlib.suppress(Exception):  # a full event log loses the line
                servicemanager.LogErrorMsg(f"sbs service {self.service_name} failed: {exc}")
            raise
        finally:
            logs.close()
            _event(servicemanager.PYS_SERVICE_STOPPED, (self.service_name, ""))


# --------------------------------------------------------------------------- command line

_OWN_OPTIONS = {"--config": "config", "--name": "name", "--display-name": "display_name"}


def _split_own_options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Take sbs's options out of ``argv``; pywin32's getopt would refuse them."""
    own: dict[str, str] = {}
    rest: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        name, eq, value = item.partition("=")
        if name in _OWN_OPTIONS:
            if not eq:
                index += 1
                if index >= len(items):
                    raise SbsError(f"{name} needs a value")
                value = items[index]
            own[_OWN_OPTIONS[name]] = value
        else:
            rest.append(item)
        index += 1
    return own, rest


# pywin32's long options that take a value (getopt: "name=").
_VALUE_OPTIONS = ("--password", "--username", "--startup", "--perfmonini", "--perfmondll", "--wait")


def _options_first(args: Sequence[str]) -> list[str]:
    """pywin32 reads options with getopt, which stops at the command: put them first."""
    options: list[str] = []
    words: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        if item.startswith("-"):
            options.append(item)
            if item in _VALUE_OPTIONS and index + 1 < len(items):
                index += 1
                options.append(items[index])
        else:
            words.append(item)
        index += 1
    return [*options, *words]


def handle_command_line(argv: Sequence[str]) -> int:
    """``python -m sbs_winsvc COMMAND [options]``: install, remove, start, stop... the service.

    ``argv`` excludes the program name. Returns pywin32's result (0: done).
    """
    own, rest = _split_own_options(argv)
    command = next((a for a in rest if not a.startswith("-")), "")
    config: Path | None = None
    if "config" in own:
        config = Path(os.path.abspath(own["config"]))
        # Refuse to install what could never start.
        from sbs_core.config import load_config  # noqa: PLC0415 - only for install

        load_config(config)
    elif command == "install":
        raise SbsError("install needs --config FILE: the node's configuration")

    # pywin32 reads the names from the class; a subclass keeps the defaults intact.
    service_class: type[SbsService] = type(
        "SbsService",
        (SbsService,),
        {
            "_svc_name_": own.get("name", SbsService._svc_name_),
            "_svc_display_name_": own.get("display_name", SbsService._svc_display_name_),
            "__module__": SbsService.__module__,
        },
    )

    def store_config(_options: object) -> None:
        if config is not None:
            win32serviceutil.SetServiceCustomOption(
                service_class._svc_name_, CONFIG_OPTION, str(config)
            )
            print(f"configuration: {config}")

    # The SCM finds the class by this string; the names live in the registry.
    class_string = f"{SbsService.__module__}.{SbsService.__qualname__}"
    result = win32serviceutil.HandleCommandLine(
        service_class,
        serviceClassString=class_string,
        argv=["sbs_winsvc", *_options_first(rest)],
        customOptionHandler=store_config,
    )
    return int(result or 0)
