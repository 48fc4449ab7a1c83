"""Run the managed application and each sentinel as a child process of the node.

:class:`ProcessController` starts one child per sentinel (and optionally one for
the managed application) while this node is primary, restarts a child that exits
on its own, and stops them all when asked or when its ``async with`` block ends.

Every child gets the node's environment plus:

* ``SBS_SENTINEL``: the sentinel's name (not set for the application, which gets
  ``SBS_APPLICATION=1`` instead);
* ``SBS_ROLE=primary``;
* ``SBS_EPOCH``: the promotion epoch given to the start call, a fencing token.

Its stdin is ``/dev/null`` (``NUL`` on Windows); its stdout and stderr are
appended to ``<log_dir>/<name>.log`` (``application.log`` for the application).

A child must never outlive the node, or the two machines of a pair could both
run the same sentinel. What each platform guarantees:

Linux
    Each child starts in a new session, hence its own process group, so a stop
    signal reaches the processes it started too: ``SIGTERM`` to the group, then
    after ``stop_timeout`` ``SIGKILL`` to the group (also sent once the child has
    exited, to sweep up descendants it left behind). If the node dies without
    stopping its children, even by ``SIGKILL``, the kernel sends ``SIGKILL`` to
    each child (``PR_SET_PDEATHSIG``, set between fork and exec). Limits:

    * the parent-death signal reaches the direct child only; its own
      descendants are killed by a stop of the group, not by the node's death;
    * the kernel sends it when the *thread* that forked the child exits, so the
      controller must run in a thread that lives as long as the node (the main
      thread, normally); children are forked in the event-loop thread for that
      reason, never in a worker thread;
    * the kernel clears it when the child executes a set-user-ID or
      set-group-ID program, or one with file capabilities: such a command loses
      the guarantee.

macOS and other POSIX systems
    Same process groups and the same stop sequence, but there is no parent-death
    signal: if the node dies without running its cleanup (``SIGKILL``, a crash
    of the interpreter, ``os._exit``), its children keep running, reparented to
    init or launchd, until someone stops them by hand. launchd's cleanup of a
    job's process group does not reach them either, since each child leads a
    group of its own. An orderly shutdown, an exception or a cancellation does
    stop them.

Windows
    Each child is assigned to a Job object with
    ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``; when the node dies, however, the
    system closes the job's last handle and kills the child and every
    descendant in the job. A process the child starts in the instant between
    its creation and its assignment to the job escapes the job. A graceful stop
    sends ``CTRL_BREAK_EVENT`` to the child's process group, which reaches only
    console programs sharing the node's console; after ``stop_timeout`` the job
    is terminated. This code path is not yet exercised on real Windows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc

from sbs_core.errors import UnknownSentinelError

__all__ = ("ProcessController",)

logger = logging.getLogger("sbs.controller")

# Short enough that a stop or a crash is noticed promptly, long enough that a
# few dozen idle children cost nothing.
_POLL_INTERVAL = 0.05
# A child that ran this long before exiting counts as healthy again: its next
# restart waits the shortest backoff.
_STABLE_RUN_TIME = 60.0
# Time left for SIGKILL and the reap once stop_timeout has passed.
_KILL_GRACE_TIME = 2.0

_APPLICATION_LOG = "application"
_SCRUBBED_VARIABLES = ("SBS_SENTINEL", "SBS_APPLICATION", "SBS_ROLE", "SBS_EPOCH")


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


if sys.platform == "linux":
    import ctypes

    _PR_SET_PDEATHSIG = 1

    def _load_prctl() -> Callable[[int, int, int, int, int], int] | None:
        # Looked up in the parent: the child must do as little as possible
        # between fork and exec.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            prctl = libc.prctl
        except (OSError, AttributeError):
            return None
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
        return prctl

    _prctl = _load_prctl()

    def _die_with_parent(parent_pid: int) -> Callable[[], None]:
        def in_child() -> None:
            if _prctl is None or _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
            # The node may have died before prctl ran; the signal would never come.
            if os.getppid() != parent_pid:
                os._exit(1)

        return in_child


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9
    _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
    _PROCESS_SET_QUOTA = 0x0100
    _PROCESS_TERMINATE = 0x0001

    class _IoCounters(ctypes.Structure):
        _fields_ = [
            ("ReadOperationCount", ctypes.c_ulonglong),
            ("WriteOperationCount", ctypes.c_ulonglong),
            ("OtherOperationCount", ctypes.c_ulonglong),
            ("ReadTransferCount", ctypes.c_ulonglong),
            ("WriteTransferCount", ctypes.c_ulonglong),
            ("OtherTransferCount", ctypes.c_ulonglong),
        ]

    class _BasicLimitInformation(ctypes.Structure):
        _fields_ = [
            ("PerProcessUserTimeLimit", ctypes.c_int64),
            ("PerJobUserTimeLimit", ctypes.c_int64),
            ("LimitFlags", wintypes.DWORD),
            ("MinimumWorkingSetSize", ctypes.c_size_t),
            ("MaximumWorkingSetSize", ctypes.c_size_t),
            ("ActiveProcessLimit", wintypes.DWORD),
            ("Affinity", ctypes.c_size_t),
            ("PriorityClass", wintypes.DWORD),
            ("SchedulingClass", wintypes.DWORD),
        ]

    class _ExtendedLimitInformation(ctypes.Structure):
        _fields_ = [
            ("BasicLimitInformation", _BasicLimitInformation),
            ("IoInfo", _IoCounters),
            ("ProcessMemoryLimit", ctypes.c_size_t),
            ("JobMemoryLimit", ctypes.c_size_t),
            ("PeakProcessMemoryUsed", ctypes.c_size_t),
            ("PeakJobMemoryUsed", ctypes.c_size_t),
        ]

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _kernel32.CreateJobObjectW.argtypes = [wintypes.LPVOID, wintypes.LPCWSTR]
    _kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    _kernel32.SetInformationJobObject.argtypes = [
        wintypes.HANDLE,
        ctypes.c_int,
        wintypes.LPVOID,
        wintypes.DWORD,
    ]
    _kernel32.SetInformationJobObject.restype = wintypes.BOOL
    _kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    _kernel32.OpenProcess.restype = wintypes.HANDLE
    _kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
    _kernel32.AssignProcessToJobObject.restype = wintypes.BOOL
    _kernel32.TerminateJobObject.argtypes = [wintypes.HANDLE, wintypes.UINT]
    _kernel32.TerminateJobObject.restype = wintypes.BOOL
    _kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    _kernel32.CloseHandle.restype = wintypes.BOOL

    def _checked(result: int | None, what: str) -> int:
        if not result:
            raise OSError(0, f"{what} failed", None, ctypes.get_last_error())
        return result

    def _job_for(pid: int) -> int:
        """A job that holds ``pid`` and kills everything in it when its last handle closes."""
        job = _checked(_kernel32.CreateJobObjectW(None, None), "CreateJobObjectW")
        try:
            limits = _ExtendedLimitInformation()
            limits.BasicLimitInformation.LimitFlags = _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
            _checked(
                _kernel32.SetInformationJobObject(
                    job,
                    _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION,
                    ctypes.byref(limits),
                    ctypes.sizeof(limits),
                ),
                "SetInformationJobObject",
            )
            process = _checked(
                _kernel32.OpenProcess(_PROCESS_SET_QUOTA | _PROCESS_TERMINATE, False, pid),
                "OpenProcess",
            )
            try:
                _checked(
                    _kernel32.AssignProcessToJobObject(job, process), "AssignProcessToJobObject"
                )
            finally:
                _kernel32.CloseHandle(process)
        except BaseException:
            _kernel32.CloseHandle(job)
            raise
        return job


class _Child:
    """One started process, with the platform's way of stopping it and what it started."""

    def __init__(self, process: subprocess.Popen[bytes], job: int | None = None) -> None:
        self.process = process
        self._job = job

    @property
    def pid(self) -> int:
        return self.process.pid

    def has_exited(self) -> bool:
        """Whether the child is dead, without reaping it where the platform allows.

        On Linux an exited child stays a zombie until :meth:`reap`; while it does,
        its pid and process group id cannot be reused, so the group can still be
        killed safely.
        """
        if self.process.returncode is not None:
            return True
        if sys.platform == "linux":
            try:
                state = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                # Someone else reaped it; let Popen record that.
                self.process.poll()
                return True
            return state is not None
        return self.process.poll() is not None

    async def wait_exited(self) -> None:
        """Return once the child has exited, without reaping it (see :meth:`has_exited`).

        Linux tells through a pidfd, which costs nothing while the child runs;
        elsewhere the child is polled.
        """
        pidfd = _open_pidfd(self.pid)
        if pidfd is None:
            while not self.has_exited():
                await anyio.sleep(_POLL_INTERVAL)
            return
        try:
            while not self.has_exited():
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    def request_stop(self) -> None:
        if sys.platform == "win32":
            # Fails for a child without a console; the job is terminated later.
            with contextlib.suppress(OSError):
                self.process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            self._signal_group(signal.SIGTERM)

    def kill_all(self) -> None:
        """Kill the child and everything left in its group (or job)."""
        if sys.platform == "win32":
            if self._job is not None:
                _kernel32.TerminateJobObject(self._job, 1)
            else:
                self.process.kill()
        else:
            self._signal_group(signal.SIGKILL)

    def reap(self) -> int | None:
        return self.process.poll()

    def close(self) -> None:
        if sys.platform == "win32" and self._job is not None:
            _kernel32.CloseHandle(self._job)
            self._job = None

    if sys.platform != "win32":

        def _signal_group(self, signum: signal.Signals) -> None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError:
                # A member changed its user id; the rest of the group still got it.
                logger.warning(
                    "not allowed to send %s to every process of group %d", signum.name, self.pid
                )


def _spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> _Child:
    """Start ``argv``; raises OSError or SubprocessError when it cannot be started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child keeps its own copy of the descriptor; ours closes on leaving.
    with log_path.open("ab") as log:
        if sys.platform == "win32":
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
            )
            try:
                job = _job_for(process.pid)
            except OSError:
                # Without a job the child could outlive the node: refuse to run it.
                process.kill()
                process.wait()
                raise
            return _Child(process, job)
        preexec: Callable[[], None] | None = None
        if sys.platform == "linux":
            preexec = _die_with_parent(os.getpid())
        # Called in this thread, which is the event loop's: the parent-death
        # signal is tied to the thread that forks.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            # Only prctl and getppid run there, nothing that takes a lock.
            preexec_fn=preexec,  # noqa: PLW1509
        )
        return _Child(process)


@dataclass(eq=False)
class _Run:
    """One stretch of "should be running" for a unit, ended by cancelling ``scope``."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    child: _Child | None = None


@dataclass(eq=False)
class _Unit:
    """The application or one sentinel: what to run, and its current run if any."""

    description: str
    log_name: str
    argv: tuple[str, ...]
    variables: dict[str, str]
    epoch: int = 0
    run: _Run | None = None
    # Counts stop requests, so that a start waiting for an earlier stop to
    # finish can tell that a later stop overrides it.
    stops: int = 0

    def alive(self) -> bool:
        run = self.run
        return run is not None and run.child is not None and not run.child.has_exited()


class ProcessController:
    """A :class:`~sbs_core.controller.ServiceController` that runs each unit as a child process.

    ``sentinels`` maps each sentinel's name to its command line; ``application``
    is the managed application's command line, if sbs should run one.
    ``log_dir`` receives one log file per unit and is created when missing.
    ``stop_timeout`` is how long a child may take to exit after ``SIGTERM``
    before it and its process group are killed. A child that exits on its own is
    restarted after a delay that starts at ``restart_backoff[0]`` and doubles up
    to ``restart_backoff[1]``; it falls back to the first value once a child has
    run for 60 s. ``env`` holds variables laid over the node's environment for
    every child.

    Use it as an async context manager: it owns the tasks that watch the
    children, and leaving the block stops every child::

        async with ProcessController({"labels": ["label-job", "--watch"]}, log_dir=logs) as ctl:
            await ctl.start_sentinels(["labels"], epoch=7)

    A restarted child gets the epoch of the latest start call. A start call for a
    unit that is already running does not restart it, whatever the epoch.
    """

    def __init__(
        self,
        sentinels: Mapping[str, Sequence[str]],
        *,
        application: Sequence[str] | None = None,
        log_dir: Path,
        stop_timeout: float = 5.0,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        env: Mapping[str, str] | None = None,
    ) -> None:
        shortest, longest = restart_backoff
        if not 0 < shortest <= longest:
            raise ValueError(f"restart_backoff must be 0 < first <= second, not {restart_backoff}")
        if stop_timeout < 0:
            raise ValueError(f"stop_timeout must not be negative, not {stop_timeout}")
        self._sentinels: dict[str, _Unit] = {}
        for name, argv in sentinels.items():
            _check_name(name)
            self._sentinels[name] = _Unit(
                description=f"sentinel {name!r}",
                log_name=name,
                argv=_check_argv(f"sentinel {name!r}", argv),
                variables={"SBS_SENTINEL": name},
            )
        self._application: _Unit | None = None
        if application is not None:
            self._application = _Unit(
                description="application",
                log_name=_APPLICATION_LOG,
                argv=_check_argv("application", application),
                variables={"SBS_APPLICATION": "1"},
            )
        self._log_dir = Path(log_dir)
        self._stop_timeout = stop_timeout
        self._shortest_backoff = shortest
        self._longest_backoff = longest
        self._extra_env = dict(env or {})
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False

    async def __aenter__(self) -> ProcessController:
        if self._entered:
            raise RuntimeError("a ProcessController can be entered only once")
        self._entered = True
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        assert task_group is not None
        self._task_group = None
        # Each run stops its own child in shielded cleanup when cancelled, all
        # at once, so this takes at most one stop_timeout plus the kill grace.
        task_group.cancel_scope.cancel()
        if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
            return await task_group.__aexit__(exc_type, exc, traceback)
        # The block's own exception goes on unchanged instead of inside an
        # exception group: the task group only has to report its tasks' failures.
        await task_group.__aexit__(None, None, None)
        return None

    async def start_application(self, *, epoch: int) -> None:
        """Start the managed application unless it runs; without one, do nothing."""
        task_group = self._running()
        if self._application is None:
            return
        await self._start(task_group, self._application, epoch)

    async def stop_application(self) -> None:
        """Stop the managed application; return once it is gone."""
        self._running()
        if self._application is not None:
            await _stop([self._application])

    async def start_sentinels(self, names: Sequence[str], *, epoch: int) -> None:
        """Start those of ``names`` that are not running yet.

        Returns once each has been started (or has failed to start: that is
        logged and retried like a crash). An unknown name raises
        :class:`~sbs_core.errors.UnknownSentinelError` before anything starts.
        """
        task_group = self._running()
        units = self._lookup(names)
        for unit in units:
            await self._start(task_group, unit, epoch)

    async def stop_sentinels(self, names: Sequence[str] | None = None) -> None:
        """Stop the given sentinels (``None``: all), concurrently; return once they are gone."""
        self._running()
        units = list(self._sentinels.values()) if names is None else self._lookup(names)
        await _stop(units)

    def running_sentinels(self) -> frozenset[str]:
        """The names of the sentinels whose process is alive now."""
        return frozenset(name for name, unit in self._sentinels.items() if unit.alive())

    def application_running(self) -> bool:
        """Whether the managed application's process is alive now."""
        return self._application is not None and self._application.alive()

    def _running(self) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise RuntimeError("use the ProcessController inside its 'async with' block")
        return self._task_group

    def _lookup(self, names: Sequence[str]) -> list[_Unit]:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names, not a single string")
        unknown = [name for name in names if name not in self._sentinels]
        if unknown:
            known = ", ".join(sorted(self._sentinels)) or "none"
            raise UnknownSentinelError(
                f"unknown sentinel {', '.join(map(repr, unknown))}; known sentinels: {known}"
            )
        return [self._sentinels[name] for name in dict.fromkeys(names)]

    async def _start(self, task_group: anyio.abc.TaskGroup, unit: _Unit, epoch: int) -> None:
        unit.epoch = epoch
        stops = unit.stops
        while (run := unit.run) is not None:
            if not run.scope.cancel_called:
                return
            # A stop is under way; the new run starts once the old child is gone,
            # unless another stop was asked for after this start.
            await run.done.wait()
            if unit.stops != stops:
                return
        run = _Run()
        unit.run = run
        try:
            await task_group.start(self._supervise, unit, run)
        except BaseException:
            if unit.run is run:
                unit.run = None
            run.done.set()
            raise

    async def _supervise(
        self,
        unit: _Unit,
        run: _Run,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep ``unit`` running until ``run`` is cancelled, then stop its child."""
        reported = False
        try:
            with run.scope:
                backoff = self._shortest_backoff
                # A stop may come before this task first runs: then start nothing.
                while not run.scope.cancel_called:
                    failure = self._launch(unit, run)
                    if not reported:
                        task_status.started()
                        reported = True
                    if run.child is not None:
                        started_at = anyio.current_time()
                        code = await self._wait_for_exit(run.child)
                        run.child = None
                        if anyio.current_time() - started_at >= _STABLE_RUN_TIME:
                            backoff = self._shortest_backoff
                        logger.warning(
                            "%s exited by itself (%s); restarting in %.1f s",
                            unit.description,
                            _describe_exit(code),
                            backoff,
                        )
                    else:
                        logger.error(
                            "cannot start %s (%s): %s; retrying in %.1f s",
                            unit.description,
                            unit.argv[0],
                            failure,
                            backoff,
                        )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self._longest_backoff)
            if not reported:
                task_status.started()
        finally:
            child = run.child
            if child is not None:
                with anyio.move_on_after(self._stop_timeout + _KILL_GRACE_TIME, shield=True):
                    await self._stop_child(unit, child)
                    run.child = None
                if run.child is not None:
                    logger.error(
                        "%s (pid %d) could not be reaped after SIGKILL", unit.description, child.pid
                    )
            if unit.run is run:
                unit.run = None
            run.done.set()

    def _launch(self, unit: _Unit, run: _Run) -> Exception | None:
        """Start ``unit``'s process as ``run.child``, or say why it could not be started."""
        env = {**os.environ, **self._extra_env}
        for variable in _SCRUBBED_VARIABLES:
            env.pop(variable, None)
        env.update(unit.variables)
        env["SBS_ROLE"] = "primary"
        env["SBS_EPOCH"] = str(unit.epoch)
        try:
            run.child = _spawn(unit.argv, env, self._log_dir / f"{unit.log_name}.log")
        except (OSError, subprocess.SubprocessError) as exc:
            run.child = None
            return exc
        logger.info("started %s (pid %d, epoch %d)", unit.description, run.child.pid, unit.epoch)
        return None

    async def _wait_for_exit(self, child: _Child) -> int:
        await child.wait_exited()
        # While the exited child is unreaped its group id cannot be reused, so
        # this reaches only what it left behind.
        child.kill_all()
        code = await _reap(child)
        child.close()
        return code

    async def _stop_child(self, unit: _Unit, child: _Child) -> None:
        if not child.has_exited():
            child.request_stop()
            with anyio.move_on_after(self._stop_timeout):
                await child.wait_exited()
            if not child.has_exited():
                logger.warning(
                    "%s (pid %d) still running %.1f s after the stop request; killing it",
                    unit.description,
                    child.pid,
                    self._stop_timeout,
                )
        child.kill_all()
        code = await _reap(child)
        child.close()
        logger.info("stopped %s (%s)", unit.description, _describe_exit(code))


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where there is none."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:  # an old kernel, or a sandbox without the call
        return None
    return fd


async def _reap(child: _Child) -> int:
    while (code := child.reap()) is None:
        await anyio.sleep(_POLL_INTERVAL)
    return code


async def _stop(units: Sequence[_Unit]) -> None:
    for unit in units:
        unit.stops += 1
    runs = [unit.run for unit in units if unit.run is not None]
    for run in runs:
        run.scope.cancel()
    for run in runs:
        await run.done.wait()


def _check_name(name: str) -> None:
    # The name becomes a file name in log_dir.
    if not name or name in {".", ".."} or any(sep in name for sep in "/\\\0"):
        raise ValueError(f"sentinel name {name!r} cannot be used as a log file name")


def _check_argv(description: str, argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, str):
        raise TypeError(f"the command of {description} must be a list of arguments, not a string")
    if not argv:
        raise ValueError(f"the command of {description} is empty")
    return tuple(argv)
