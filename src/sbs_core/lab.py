"""Real ``sbs run`` nodes as child processes on this machine.

The demo, the integration tests and the benchmarks all drive real nodes the way
an operator would: a TOML file each, ``sbs run`` in a child process, status
through the control channel, and faults by signal. :class:`NodeProcess` is one
such node, :class:`Pair` two of them on 127.0.0.1 and 127.0.0.2 with the same
port (as on two machines), in a temporary folder that it removes.

Every process started here is stopped by its own handle with a bounded wait:
a planned stop (SIGTERM), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sbs_core.control import NodeNotRunning, control_request
from sbs_core.errors import ControlError

__all__ = (
    "HOSTS",
    "SLEEPER",
    "NodeProcess",
    "Pair",
    "free_port",
    "marker_sentinel",
    "read_markers",
    "write_node_config",
)

HOSTS = ("127.0.0.1", "127.0.0.2")

#: A sentinel command that just stays alive.
SLEEPER = "import time\nwhile True:\n    time.sleep(1)\n"


def marker_sentinel(folder: Path) -> str:
    """A sentinel that records when it ran, where, and with which epoch.

    At start it writes ``<folder>/<name>.<pid>.start`` (JSON: ``at``, ``pid``,
    ``epoch``, ``role``, ``node``); on SIGTERM it writes ``<name>.<pid>.stop``
    (``at``) and exits. A SIGKILLed sentinel writes no stop file. The start file
    appears the moment the process runs, so a test or a benchmark can see from
    outside when a sentinel started and prove two never ran at the same time.
    """
    return (
        "import json, os, signal, sys, time\n"
        f"folder = {str(folder)!r}\n"
        "name = os.environ['SBS_SENTINEL']\n"
        "def mark(kind, body):\n"
        "    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{kind}')\n"
        "    with open(tmp, 'w') as f:\n"
        "        json.dump(body, f)\n"
        "    os.replace(tmp, os.path.join(folder, f'{name}.{os.getpid()}.{kind}'))\n"
        "def on_term(signum, frame):\n"
        "    mark('stop', {'at': time.time()})\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "mark('start', {'at': time.time(), 'pid': os.getpid(), 'epoch': os.environ['SBS_EPOCH'],"
        " 'role': os.environ['SBS_ROLE'], 'node': os.environ.get('SBS_TEST_NODE', '')})\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )


def read_markers(folder: Path) -> list[dict[str, Any]]:
    """The runs recorded by :func:`marker_sentinel`: name, node, epoch, pid, ``start``, ``stop``.

    ``stop`` is None for a run that is still going or was killed.
    """
    runs: list[dict[str, Any]] = []
    for start in sorted(folder.glob("*.start")):
        if start.name.startswith("."):
            continue  # a marker being written (pathlib's glob does not skip dot files)
        name, pid, _ = start.name.rsplit(".", 2)
        body = json.loads(start.read_text())
        stop_file = start.with_suffix(".stop")
        stop = json.loads(stop_file.read_text())["at"] if stop_file.exists() else None
        runs.append(
            {
                "name": name,
                "pid": int(pid),
                "node": body["node"],
                "epoch": int(body["epoch"]),
                "start": float(body["at"]),
                "stop": stop,
            }
        )
    return runs


def free_port(*hosts: str) -> int:
    """A TCP port that is free on every one of ``hosts`` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError("no port is free on all of " + ", ".join(hosts))


def _toml(value: object) -> str:
    # JSON's scalars and arrays are valid TOML values.
    return json.dumps(value)


def write_node_config(
    folder: Path,
    *,
    name: str,
    local: str,
    remote: str,
    port: int,
    secret_file: Path,
    mode: str = "auto",
    heartbeat_interval: float = 0.2,
    dead_time: float = 1.0,
    probe_interval: float = 0.5,
    sentinels: Mapping[str, list[str]] | None = None,
    node_extra: Mapping[str, object] | None = None,
    extra: str = "",
) -> Path:
    """Write a node's ``sbs.toml`` in ``folder``; its state directory is ``folder/state``."""
    folder.mkdir(parents=True, exist_ok=True)
    if sentinels is None:
        sentinels = {n: [sys.executable, "-c", SLEEPER] for n in ("labels", "spooler")}
    node: dict[str, object] = {
        "name": name,
        "local_address": local,
        "remote_address": remote,
        "port": port,
        "mode": mode,
        "heartbeat_interval": heartbeat_interval,
        "dead_time": dead_time,
        "probe_interval": probe_interval,
        "secret_file": str(secret_file),
        "state_dir": "state",
        **(node_extra or {}),
    }
    lines = ["[node]", *(f"{k} = {_toml(v)}" for k, v in node.items())]
    lines += ["", "[controller]", 'kind = "process"', "stop_timeout = 2.0"]
    for sentinel, command in sentinels.items():
        lines += [
            "",
            "[[controller.sentinels]]",
            f"name = {_toml(sentinel)}",
            f"command = {_toml(command)}",
        ]
    path = folder / "sbs.toml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


class NodeProcess:
    """One ``sbs run`` child process and the ways to look at it and to hurt it."""

    def __init__(
        self,
        name: str,
        config: Path,
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` goes before ``python -m sbs_core run``, e.g. ``ip netns exec NS``.

        The prefix must exec the node in place (as ``ip netns exec`` does), so that
        the pid signalled by :meth:`kill` and :meth:`hang` is the node's own.
        """
        self.name = name
        self.config = config
        self.state_dir = config.parent / "state"
        self.log = config.parent / "node.log"
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"node {self.name} is already running")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "sbs_core",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"node {self.name} was never started"
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the node dies at once, without a word to its peer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def hang(self) -> None:
        """SIGSTOP: the node is frozen; its sockets stay open, its sentinels keep running."""
        if sys.platform == "win32":
            raise NotImplementedError("freezing a node needs SIGSTOP (POSIX)")
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if sys.platform == "win32":
            raise NotImplementedError("a node is frozen and resumed with signals (POSIX)")
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Planned stop (SIGTERM), then SIGKILL if it does not end in time; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sys.platform != "win32":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)  # a hung node cannot stop otherwise
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    # -- looking

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The running node's status, or None when its control channel does not answer."""
        try:
            answer = control_request(self.state_dir, {"cmd": "status"}, timeout=timeout)
        except (NodeNotRunning, ControlError):
            return None
        status = answer.get("status") if isinstance(answer, dict) else None
        return status if isinstance(status, dict) else None

    def wait_for(
        self,
        what: str,
        test: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 15.0,
        poll: float = 0.005,
    ) -> float:
        """Poll the status until ``test`` holds; the seconds it took. TimeoutError otherwise."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            st = self.status()
            if st is not None and test(st):
                return time.monotonic() - began
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(poll)
        raise TimeoutError(
            f"node {self.name} did not become {what} within {timeout} s; "
            f"last status {self.status()}; log:\n{self.log_tail()}"
        )

    def sbs(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``sbs ARGS --config <this node's file>`` and capture what it prints."""
        return subprocess.run(
            [sys.executable, "-m", "sbs_core", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def is_primary(st: dict[str, Any]) -> bool:
    return st.get("role") == "primary" and not st.get("handing_over")


class Pair:
    """Two nodes, ``a`` on 127.0.0.1 and ``b`` on 127.0.0.2, sharing a port and a secret.

    Use it as a context manager; leaving stops both nodes and removes the folder
    (unless ``keep``). Keyword arguments are passed to :func:`write_node_config`
    for both nodes; ``modes`` gives each node's ``node.mode``.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        modes: tuple[str, str] = ("auto", "auto"),
        keep: bool = False,
        port: int = 0,
        **config: Any,
    ) -> None:
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="sbs-pair-"))
        # A caller's folder (pytest's tmp_path / "pair") need not exist yet.
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.port = port or free_port(*HOSTS)
        self.secret_file = self.root / "secret"
        self.secret_file.write_text(os.urandom(24).hex() + "\n")
        self.secret_file.chmod(0o600)
        self.markers = self.root / "markers"
        self.markers.mkdir(exist_ok=True)
        self.nodes: dict[str, NodeProcess] = {}
        for (name, local, remote), mode in zip(
            (("a", *HOSTS), ("b", *reversed(HOSTS))), modes, strict=True
        ):
            path = write_node_config(
                self.root / name,
                name=name,
                local=local,
                remote=remote,
                port=self.port,
                secret_file=self.secret_file,
                mode=mode,
                **config,
            )
            self.nodes[name] = NodeProcess(name, path, env={"SBS_TEST_NODE": name})

    @property
    def a(self) -> NodeProcess:
        return self.nodes["a"]

    @property
    def b(self) -> NodeProcess:
        return self.nodes["b"]

    def __iter__(self) -> Iterator[NodeProcess]:
        return iter(self.nodes.values())

    def __enter__(self) -> Pair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def primaries(self) -> list[str]:
        return [n.name for n in self if (st := n.status()) is not None and is_primary(st)]
