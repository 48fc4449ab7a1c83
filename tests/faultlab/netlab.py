"""Two test hosts as Linux network namespaces, a real ``sbs run`` in each, and faults to inject.

:class:`NetLab` creates two namespaces joined by a veth pair (10.231.0.1 and
10.231.0.2, which exist only inside them), writes one configuration, folder and
state directory per node, and runs each node with ``ip netns exec NS`` as the
command prefix of :class:`sbs_core.lab.NodeProcess`. The control socket is a
file in the node's state directory, so ``status()`` works from the host's own
namespace. Leaving the lab (also after a failed test) stops the nodes by their
own handles, removes the packet filters, unmounts what it mounted and deletes
the namespaces, which deletes the veth pair with them.

The faults are plain functions (:func:`sigkill`, :func:`link_down`,
:func:`drop_from_peer`, :func:`disk_full`, …): the scenario tests, the soak and
the figures script share them. Every command runs with a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sbs_core.lab import NodeProcess, marker_sentinel, read_markers, write_node_config

__all__ = (
    "ADDRESSES",
    "FOLDER",
    "NetLab",
    "NetLabUnavailable",
    "Timings",
    "alerts_of",
    "clear_faults",
    "disk_space",
    "disk_used_kib",
    "drop_from_peer",
    "fill_disk",
    "flaky_link",
    "hang",
    "link_down",
    "link_up",
    "netlab_unavailable",
    "restart",
    "resume",
    "sigkill",
    "simultaneous_start",
    "slow_link",
)

ADDRESSES = ("10.231.0.1", "10.231.0.2")
FOLDER = "data"
SENTINELS = ("labels", "spooler")
COMMAND_TIMEOUT = 15.0
_PREFIX = "sbslab"
_counter = itertools.count(1)


class NetLabUnavailable(RuntimeError):
    """This machine cannot host the lab (not root, no namespaces, no nft); says why."""


@dataclass(frozen=True, kw_only=True)
class Timings:
    """The pair's timers, in seconds: bounds in the tests and the soak are built from them."""

    heartbeat_interval: float = 0.2
    dead_time: float = 1.0
    probe_interval: float = 0.5

    @property
    def settle_time(self) -> float:
        """How long a healed pair may take to have one primary: ``dead_time`` + one probe."""
        return self.dead_time + self.probe_interval


def _run(args: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, stdin: str | None = None) -> str:
    """Run a system command; its output. RuntimeError naming the command when it fails."""
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NetLabUnavailable(f"{args[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(args)} did not finish within {timeout} s") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with exit code {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


@functools.cache
def netlab_unavailable() -> str | None:
    """Why the lab cannot run here (a reason to skip with), or None when it can.

    Asked once per process: the answer needs a probe namespace.
    """
    if sys.platform != "linux":
        return "the fault lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the fault lab needs root (network namespaces, nftables, tmpfs mounts)"
    for tool in ("ip", "nft", "mount", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"the fault lab needs {tool!r} (apt-get install iproute2 nftables)"
    name = f"{_PREFIX}-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", name])
    except (RuntimeError, NetLabUnavailable) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", name, "nft", "list", "ruleset"])
    except (RuntimeError, NetLabUnavailable) as exc:
        return f"nftables does not work in a network namespace: {exc}"
    finally:
        with contextlib.suppress(RuntimeError, NetLabUnavailable):
            _run(["ip", "netns", "del", name])
    return None


def sweep_stale_namespaces() -> list[str]:
    """Delete the namespaces of labs whose process is gone (a test run killed by SIGKILL)."""
    removed: list[str] = []
    with contextlib.suppress(RuntimeError, NetLabUnavailable):
        for line in _run(["ip", "netns", "list"]).splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != _PREFIX or not parts[1].isdigit():
                continue
            if Path(f"/proc/{parts[1]}").exists():
                continue
            with contextlib.suppress(RuntimeError):
                _run(["ip", "netns", "del", name])
                removed.append(name)
    return removed


@dataclass
class Host:
    """One test host: its namespace, its end of the veth pair, its address and its node."""

    name: str
    namespace: str
    interface: str
    address: str
    node: NodeProcess
    folder_path: str = FOLDER
    volume_kib: int | None = None
    mounts: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The replicated folder on this host."""
        return self.node.config.parent / self.folder_path

    @property
    def volume(self) -> Path:
        """Where this host's own file system for the folder is mounted (when it has one)."""
        return self.node.config.parent / "vol"

    @property
    def scratch(self) -> Path:
        """A folder beside the replicated one, on the same file system, never replicated."""
        return self.folder.parent / "scratch"

    @property
    def alert_file(self) -> Path:
        return self.node.config.parent / "alerts.jsonl"


# The notify hook: one JSON object per alert, appended with one write (lines stay whole).
_HOOK = (
    "import os, sys\n"
    "data = sys.stdin.buffer.read().strip() + b'\\n'\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
    "os.write(fd, data)\n"
    "os.close(fd)\n"
)


class NetLab:
    """Two hosts ``a`` (10.231.0.1) and ``b`` (10.231.0.2) in their own namespaces, one node each.

    Both nodes replicate the folder ``data`` of their configuration folder, run
    the two marker sentinels (runs recorded in ``root/markers``) and log every
    alert to ``alerts.jsonl`` through the notify hook. Use it as a context
    manager; it raises :class:`NetLabUnavailable` when the machine cannot host it.

    ``volumes`` (node name -> KiB) gives those nodes a tmpfs of their own at
    ``vol/``; the replicated folder is then ``vol/data`` on both nodes (a folder
    keeps its path relative to the configuration folder across the pair), and
    :func:`disk_space` can fill it up or give the space back.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        timings: Timings | None = None,
        modes: tuple[str, str] = ("auto", "auto"),
        node_extra: Mapping[str, object] | None = None,
        volumes: Mapping[str, int] | None = None,
        keep: bool = False,
    ) -> None:
        self.timings = timings or Timings()
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="sbs-netlab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.modes = modes
        self.node_extra = dict(node_extra or {})
        self.volumes = dict(volumes or {})
        self.folder_path = "vol/" + FOLDER if self.volumes else FOLDER
        n = next(_counter)
        self.tag = f"{os.getpid()}-{n}"
        self.port = 4445
        self.secret_file = self.root / "secret"
        self.markers = self.root / "markers"
        self.time_namespaces: list[Path] = []
        self.hosts: dict[str, Host] = {}
        for name, address, mode in zip(("a", "b"), ADDRESSES, modes, strict=True):
            namespace = f"{_PREFIX}-{self.tag}-{name}"
            # Interface names are at most 15 bytes: s<pid>x<n><a|b>.
            interface = f"s{os.getpid() % 10_000_000}x{n % 1000}{name}"
            self.hosts[name] = Host(
                name,
                namespace,
                interface,
                address,
                self._node(name, mode),
                folder_path=self.folder_path,
                volume_kib=self.volumes.get(name),
            )
        self._created: list[str] = []

    # -- building

    def _node(self, name: str, mode: str) -> NodeProcess:
        other = ADDRESSES[1] if name == "a" else ADDRESSES[0]
        local = ADDRESSES[0] if name == "a" else ADDRESSES[1]
        folder = self.root / name
        alerts = folder / "alerts.jsonl"
        extra = (
            f'\n[[folders]]\npath = "{self.folder_path}"\nfilter = "*"\n'
            f"\n[notify]\ncommand = {json.dumps([sys.executable, '-c', _HOOK, str(alerts)])}\n"
            "timeout = 10\n"
        )
        config = write_node_config(
            folder,
            name=name,
            local=local,
            remote=other,
            port=self.port,
            secret_file=self.secret_file,
            mode=mode,
            heartbeat_interval=self.timings.heartbeat_interval,
            dead_time=self.timings.dead_time,
            probe_interval=self.timings.probe_interval,
            sentinels={n: [sys.executable, "-c", marker_sentinel(self.markers)] for n in SENTINELS},
            node_extra=self.node_extra,
            extra=extra,
        )
        namespace = f"{_PREFIX}-{self.tag}-{name}"
        return NodeProcess(
            name,
            config,
            env={"SBS_TEST_NODE": name},
            prefix=["ip", "netns", "exec", namespace],
        )

    def setup(self) -> None:
        reason = netlab_unavailable()
        if reason is not None:
            raise NetLabUnavailable(reason)
        sweep_stale_namespaces()
        self.secret_file.write_text(os.urandom(24).hex() + "\n")
        self.secret_file.chmod(0o600)
        self.markers.mkdir(exist_ok=True)
        a, b = self.hosts["a"], self.hosts["b"]
        for host in (a, b):
            _run(["ip", "netns", "add", host.namespace])
            self._created.append(host.namespace)
            _run(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
        _run(
            [
                "ip", "-n", a.namespace, "link", "add", a.interface, "type", "veth",
                "peer", "name", b.interface, "netns", b.namespace,
            ]
        )  # fmt: skip
        for host in (a, b):
            _run(
                [
                    "ip",
                    "-n",
                    host.namespace,
                    "addr",
                    "add",
                    f"{host.address}/24",
                    "dev",
                    host.interface,
                ]
            )
            _run(["ip", "-n", host.namespace, "link", "set", host.interface, "up"])
        for host in (a, b):
            if host.volume_kib is not None:
                host.volume.mkdir(parents=True, exist_ok=True)
                _run(
                    [
                        "mount", "-t", "tmpfs", "-o", f"size={host.volume_kib}k,mode=0755",
                        "sbs-lab", str(host.volume),
                    ]
                )  # fmt: skip
                host.mounts.append(host.volume)
            host.folder.mkdir(parents=True, exist_ok=True)
            host.scratch.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Stop both nodes, then remove filters, mounts and namespaces; errors do not stop it."""
        problems: list[str] = []
        for host in self.hosts.values():
            try:
                host.node.stop(timeout=15)
            except Exception as exc:  # the cleanup goes on; the problem is reported below
                problems.append(f"stopping node {host.name}: {exc}")
        for host in self.hosts.values():
            if self.keep and host.volume_kib is not None:
                # The volume's files vanish with it: keep a copy for the post-mortem.
                with contextlib.suppress(OSError):
                    shutil.copytree(host.volume, host.volume.with_name("vol-kept"), symlinks=True)
            for mount in reversed(host.mounts):
                try:
                    _run(["umount", "-l", str(mount)])
                except (RuntimeError, NetLabUnavailable) as exc:
                    problems.append(str(exc))
            host.mounts.clear()
        for path in self.time_namespaces:
            with contextlib.suppress(RuntimeError, NetLabUnavailable):
                _run(["umount", str(path)])
        for namespace in reversed(self._created):
            try:
                _run(["ip", "netns", "del", namespace])
            except (RuntimeError, NetLabUnavailable) as exc:
                problems.append(str(exc))
        self._created.clear()
        if self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise RuntimeError("fault lab cleanup: " + "; ".join(problems))

    def __enter__(self) -> NetLab:
        try:
            self.setup()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- looking

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def peer_of(self, host: Host) -> Host:
        return self.b if host is self.a else self.a

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {h.name: h.node.status(timeout=1.0) for h in self}

    def primaries(self) -> list[str]:
        """The nodes that say they are primary (and are not handing over) right now."""
        return [
            name
            for name, st in self.statuses().items()
            if st is not None and st.get("role") == "primary" and not st.get("handing_over")
        ]

    def runs(self) -> list[dict[str, Any]]:
        return read_markers(self.markers)

    def exec(self, host: Host, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a command inside ``host``'s namespace."""
        return _run(["ip", "netns", "exec", host.namespace, *args], timeout=timeout)

    def start_with_clock_offset(self, host: Host, seconds: int) -> None:
        """Start ``host``'s node with its monotonic and boot clocks ``seconds`` ahead.

        A time namespace fixes its offsets before its first process: a running
        node's clock cannot jump, but a node can come back (restart) on a clock
        far from its peer's and from its own previous run.
        """
        holder = self.root / f"time-{host.name}-{len(self.time_namespaces)}"
        holder.touch()
        _run(
            [
                "unshare",
                f"--time={holder}",
                f"--monotonic={seconds}",
                f"--boottime={seconds}",
                "true",
            ]
        )
        self.time_namespaces.append(holder)
        prefix = host.node.prefix
        host.node.prefix = ["nsenter", f"--time={holder}", *prefix]
        try:
            host.node.start()
        finally:
            host.node.prefix = prefix


def alerts_of(host: Host) -> list[dict[str, Any]]:
    """The alerts ``host``'s node handed to its notify hook, in order."""
    try:
        lines = host.alert_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    found: list[dict[str, Any]] = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            found.append(json.loads(line))
    return found


# -- faults on processes


def sigkill(host: Host) -> None:
    """The node dies at once (its sentinels follow by the parent-death signal)."""
    host.node.kill()


def hang(host: Host) -> None:
    """SIGSTOP: frozen, sockets open, sentinels running."""
    host.node.hang()


def resume(host: Host) -> None:
    host.node.resume()


def restart(host: Host, *, planned: bool = True) -> None:
    """Stop (SIGTERM: a planned switchover; else SIGKILL) and start the node again."""
    if planned:
        host.node.stop(timeout=20)
    else:
        host.node.kill()
    host.node.start()


def simultaneous_start(lab: NetLab) -> None:
    """Start both nodes within a millisecond of each other (the base product's split brain)."""
    for host in lab:
        host.node.start()


# -- faults on the network


def link_down(lab: NetLab) -> None:
    """Cut the cable: both directions go silent; no connection is closed."""
    _run(["ip", "-n", lab.a.namespace, "link", "set", lab.a.interface, "down"])


def link_up(lab: NetLab) -> None:
    _run(["ip", "-n", lab.a.namespace, "link", "set", lab.a.interface, "up"])


def _filter(lab: NetLab, host: Host, rule: str) -> None:
    peer = lab.peer_of(host).address
    table = (
        "table inet sbsfault {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    ip saddr {peer} {rule}\n"
        "  }\n"
        "}\n"
    )
    _run(["ip", "netns", "exec", host.namespace, "nft", "-f", "-"], stdin=table)


def drop_from_peer(lab: NetLab, host: Host) -> None:
    """One-way loss: ``host`` receives nothing from its peer; the peer still hears ``host``."""
    _filter(lab, host, "drop")


def flaky_link(lab: NetLab, loss_percent: int) -> None:
    """Drop ``loss_percent`` % of the packets, at random, in both directions."""
    if not 0 < loss_percent < 100:
        raise ValueError(f"loss_percent must be between 1 and 99, not {loss_percent}")
    for host in lab:
        _filter(lab, host, f"numgen random mod 100 < {loss_percent} drop")


def slow_link(lab: NetLab, kbytes_per_second: int) -> None:
    """Throttle both directions to about ``kbytes_per_second`` (packets above it are dropped).

    The kernel here has no ``sch_netem`` (tc cannot add delay), so the link is
    slowed by nftables' rate limit: TCP backs off as on a thin line.
    """
    for host in lab:
        _filter(lab, host, f"limit rate over {kbytes_per_second} kbytes/second drop")


def clear_faults(lab: NetLab) -> None:
    """Remove every packet filter and bring the link up."""
    for host in lab:
        with contextlib.suppress(RuntimeError):
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.namespace,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    "sbsfault",
                ]
            )
    link_up(lab)


# -- faults on the disk


def disk_used_kib(host: Host) -> int:
    """KiB in use on ``host``'s volume."""
    st = os.statvfs(host.volume)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def fill_disk(host: Host, *, spare_kib: int = 16) -> int:
    """Shrink ``host``'s volume to what it holds plus ``spare_kib`` (full); its new size.

    The node may write between the measure and the remount, and tmpfs refuses
    a size below what it holds ("Too small a size for current use"): measured
    again, with twice the spare, a few times.
    """
    for attempt in range(5):
        size = disk_used_kib(host) + (spare_kib << attempt)
        try:
            disk_space(host, size)
        except RuntimeError:
            if attempt == 4:
                raise
            continue
        return size
    raise AssertionError("unreachable")


def disk_space(host: Host, size_kib: int) -> None:
    """Give ``host``'s volume a new size: space returns, or the disk fills up."""
    if host.volume_kib is None:
        raise ValueError(f"host {host.name} has no volume of its own (NetLab(volumes=...))")
    _run(["mount", "-o", f"remount,size={size_kib}k", str(host.volume)])
