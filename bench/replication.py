"""Replication benchmark: a real pair of ``sbs run`` processes against rsync, on loopback.

For each data set (generated from a fixed seed), it times, alternating the tools:

1. initial sync: a (primary) holds the data, b starts empty; from b's connection
   (and from b's process start) until b's folder matches, with
   ``durable_writes`` on and off; the reference is ``rsync -a --delete`` into an
   rsync daemon on 127.0.0.1, run from its process start to its exit, and once a
   round a plain Python copier (one process; no network, hash or fsync), and
   the same copier followed by one ``sync`` (the set made durable with one
   flush for all of it, none per file), shown for information;
2. incremental ("small" only): 10 files changed on the primary -> all 10
   byte-identical on the secondary; then the same while another program has
   512 MiB written to the same filesystem and not yet on the disk;
3. idle CPU ("small" only): both nodes over 310 s with nothing changing, beside
   processes that only sleep, measured over the same window;
4. peak memory (VmHWM) of both nodes while replicating "small" and "large";
5. heartbeats during the transfers: ``peer.longest_silence`` on both nodes, and
   no takeover (roles and epochs unchanged); each run's line also shows each
   node's longest event-loop stall (``loop_longest_stall``).

Usage: ``python bench/replication.py [--sets small,mixed,large] [--runs N]
[--output docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import math
import mmap
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchdoc import interpreter, load_line, machine_line, replace_section, revision
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sbs_core.lab import NodeProcess, Pair, free_port, is_primary
from sbs_core.sync.engine import CHUNK, WINDOW
from sbs_core.sync.paths import TEMP_PREFIX

SEED = 20251125
KIB = 1024
MIB = 1024 * KIB
MB = 1_000_000
HEARTBEAT_INTERVAL = 0.2
DEAD_TIME = 1.0
# The steady state runs on the configuration's defaults, as deployed.
DEFAULT_HEARTBEAT = (1.0, 3.0)
FOLDERS = '\n[[folders]]\npath = "data"\n'
# Status requests go through the node's own event loop: poll often enough for
# a fine figure, not so often that the polling itself slows the node down.
CONNECT_POLL = 0.01
DONE_POLL = 0.02
MAX_DONE_POLL = 0.25
INCREMENTAL_POLL = 0.005
INCREMENTAL_FILES = 10
INCREMENTAL_RUNS = 5
# Another program's data still waiting for the disk, on the secondary's filesystem.
FOREIGN_MIB = 512
# Long enough to hold one safety-net full scan (node.rescan_interval, 300 s by
# default) and ten cycles (node.period, 30 s): the average includes them.
IDLE_SECONDS = 310.0
# The disk probe (Context.probe_disk): as many files as in the "small" set's
# half, one block each.
PROBE_FILES = 10_000
PROBE_SIZE = 4096
# A set's runs start once the probe takes at most PROBE_USUAL s (0.3-0.7 s is
# usual on the machine measured, 3.9 s a minute after 1.8 million deletions),
# probed again every PROBE_RETRY s, for at most --disk-wait s.
PROBE_USUAL = 1.0
PROBE_RETRY = 30.0
# The write probe (Context.probe_persist): how fast this disk makes data
# durable right now. A durable copy waits for every byte to reach the disk,
# whatever the tool; rsync (no fsync) leaves its copy in the caches. The set's
# size at that speed gives the durable figures their scale (not a bound: the
# disk's speed moves between runs by more than the probe can tell).
PERSIST_BYTES = 256 * MIB
# Context.free_memory before the extra rsync run frees the set's size and this much more.
FREED_EXTRA = 256 * MIB
# Lets a's start-up work (sentinel processes, file watches) finish before b's
# start is timed: the figure is a secondary joining a running primary.
PRIMARY_SETTLE = 1.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# The receiver may hold up to two windows plus one frame queued before it
# writes them; the sender one window in flight. Beyond that, a large file must
# cost no more memory than many small ones.
CHUNK_BUFFERS = 2 * WINDOW + CHUNK
TARGET_RATIO = {"small": 1.3, "mixed": 1.0, "large": 1.1}
TARGET_INCREMENTAL = 0.5
TARGET_IDLE_CPU = 1.0
TARGET_MEMORY_SMALL = 150 * MB
TARGET_SILENCE = HEARTBEAT_INTERVAL + 0.2
VARIANTS = {"durable": True, "fast": False}
VARIANT_TEXT = {"durable": "durable_writes = true", "fast": "durable_writes = false"}


class RunFailed(Exception):
    """A run that did not reach the state it measures."""


# ---------------------------------------------------------------------- data sets


class Noise:
    """Incompressible bytes from a seed: an AES-256-CTR key stream, fast and repeatable."""

    def __init__(self, seed: int, label: str) -> None:
        key = hashlib.sha256(f"{seed}:{label}".encode()).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(MIB)

    def take(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            step = min(MIB, size - len(out))
            out += self._stream.update(self._zeros[:step])
        return bytes(out)


@dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    files: tuple[tuple[str, int], ...]  # (relative path, size)

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)


def plan_small(rng: random.Random) -> list[tuple[str, int]]:
    return [
        (f"d{rng.randrange(200):03d}/f{i:05d}.bin", rng.randint(1 * KIB, 8 * KIB))
        for i in range(20_000)
    ]


def plan_mixed(rng: random.Random) -> list[tuple[str, int]]:
    low, high = math.log(1 * KIB), math.log(4 * MIB)
    return [
        (f"m{rng.randrange(20):02d}/f{i:04d}.bin", round(math.exp(rng.uniform(low, high))))
        for i in range(2_000)
    ]


def plan_large(_: random.Random) -> list[tuple[str, int]]:
    return [(f"big{i}.bin", 256 * MIB) for i in range(4)]


PLANS: dict[str, tuple[str, Callable[[random.Random], list[tuple[str, int]]]]] = {
    "small": ("20,000 files of 1-8 KiB in 200 folders", plan_small),
    "mixed": ("2,000 files of 1 KiB-4 MiB (log-uniform) in 20 folders", plan_mixed),
    "large": ("4 files of 256 MiB", plan_large),
}


def data_set(name: str) -> DataSet:
    description, plan = PLANS[name]
    files = tuple(plan(random.Random(f"{SEED}:{name}")))
    return DataSet(name, description, files)


def generate(ds: DataSet, folder: Path) -> None:
    noise = Noise(SEED, ds.name)
    for rel, size in ds.files:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                step = min(MIB, left)
                f.write(noise.take(step))
                left -= step


def scan(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder``; the receiver's temporary files do not count."""
    count = total = 0
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and not entry.name.startswith(TEMP_PREFIX):
                count += 1
                total += entry.stat(follow_symlinks=False).st_size
    return count, total


def walk_files(folder: Path) -> Iterator[str]:
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            yield (Path(dirpath) / name).relative_to(folder).as_posix()


def verify_equal(src: Path, dst: Path) -> None:
    """RunFailed unless ``dst`` holds exactly ``src``'s files, byte for byte."""
    theirs = set(walk_files(dst))
    for rel in walk_files(src):
        if rel not in theirs:
            raise RunFailed(f"verification: {rel} is missing in {dst}")
        theirs.discard(rel)
        with open(src / rel, "rb") as a, open(dst / rel, "rb") as b:
            while True:
                x, y = a.read(MIB), b.read(MIB)
                if x != y:
                    raise RunFailed(f"verification: {rel} differs in {dst}")
                if not x:
                    break
    if theirs:
        raise RunFailed(f"verification: {len(theirs)} extra files in {dst}, e.g. {min(theirs)}")


def empty_folder(folder: Path, discard: Callable[[Path], None]) -> None:
    for child in list(folder.iterdir()):
        discard(child)


# ---------------------------------------------------------------------- processes


def _stat_times(pid: int) -> list[float]:
    """utime, stime, cutime, cstime of ``pid`` in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The fields after the command name (which may hold spaces and parentheses):
    # the four times are the 12th to the 15th.
    fields = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return [int(f) / tick for f in fields[11:15]]


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` itself."""
    user, system, _, _ = _stat_times(pid)
    return user, system


def proc_cpu_seconds(pid: int, *, children: bool = False) -> float:
    """CPU seconds of ``pid``; with ``children``, those of the children it has reaped."""
    user, system, child_user, child_system = _stat_times(pid)
    return child_user + child_system if children else user + system


def has_children(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def peak_memory(pid: int) -> int:
    """VmHWM in bytes: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB
    raise RunFailed(f"no VmHWM for pid {pid}")


def wait_until(
    what: str, test: Callable[[], bool], timeout: float, poll: float, alive: Callable[[], bool]
) -> float:
    """Poll ``test`` until it holds; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return time.monotonic()
        if not alive():
            raise RunFailed(f"{what}: a process exited")
        time.sleep(poll)
    raise RunFailed(f"{what}: not within {timeout:g} s")


class RsyncDaemon:
    """``rsync --daemon`` on 127.0.0.1 with one writable module ``dst``."""

    def __init__(self, work: Path) -> None:
        self.dst = work / "rsync-dst"
        self.dst.mkdir()
        self.log = work / "rsyncd.log"
        self.port = free_port("127.0.0.1")
        conf = work / "rsyncd.conf"
        ids = "    uid = root\n    gid = root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"log file = {self.log}\n"
            "[dst]\n"
            f"    path = {self.dst}\n"
            "    read only = no\n"
            "    use chroot = no\n" + ids
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "rsync",
                    "--daemon",
                    "--no-detach",
                    f"--config={conf}",
                    f"--port={self.port}",
                    "--address=127.0.0.1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until("rsync daemon listening", self._listening, 10.0, 0.02, self._alive)
        except RunFailed:
            self.stop()
            raise

    def _alive(self) -> bool:
        return self.proc.poll() is None

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def push(self, src: Path, timeout: float) -> tuple[float, float]:
        """``rsync -a --delete src/ rsync://.../dst/``: seconds from its start to its exit,
        and the CPU seconds of both sides (the client, and the daemon's child serving it)."""
        command = ["rsync", "-a", "--delete", f"{src}/", f"rsync://127.0.0.1:{self.port}/dst/"]
        served = proc_cpu_seconds(self.proc.pid, children=True)
        client = _children_cpu()
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        took = time.monotonic() - began
        client = _children_cpu() - client
        if done.returncode != 0:
            raise RunFailed(f"rsync exited with {done.returncode}: {done.stderr.decode()[-300:]}")
        # The daemon's child counts once the daemon has reaped it.
        deadline = time.monotonic() + 2.0
        while has_children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        return took, client + proc_cpu_seconds(self.proc.pid, children=True) - served

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------- figures


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def text(self, fmt: str = "{:.3f}", unit: str = " s") -> str:
        if not self.values:
            return "—"
        lo, mid, hi = min(self.values), statistics.median(self.values), max(self.values)
        return f"{fmt.format(mid)}{unit} ({fmt.format(lo)}-{fmt.format(hi)})"


@dataclass
class SyncRun:
    from_start: float
    from_connected: float
    connect: float
    hwm_a: int
    hwm_b: int
    silence_a: float
    silence_b: float
    # The longest delay of each node's event loop (status ``loop_longest_stall``)
    stall_a: float
    stall_b: float
    takeover: str | None
    first_cycle: float | None
    # CPU seconds of each node from b's connection until it was done
    cpu_a_user: float
    cpu_a_sys: float
    cpu_b_user: float
    cpu_b_sys: float
    # The longest pause a process that only sleeps saw meanwhile (PauseProbe)
    pause: float | None = None

    @property
    def cpu(self) -> float:
        return self.cpu_a_user + self.cpu_a_sys + self.cpu_b_user + self.cpu_b_sys


@dataclass
class SetResult:
    ds: DataSet
    sbs: dict[str, list[SyncRun]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    rsync: Series = field(default_factory=Series)
    rsync_cpu: Series = field(default_factory=Series)
    # rsync once a round into memory freed just before (Context.free_memory).
    rsync_freed: Series = field(default_factory=Series)
    copier: Series = field(default_factory=Series)  # run_copier, once a round
    copier_synced: Series = field(default_factory=Series)  # run_copier(synced=True), the same
    ratios: dict[str, Series] = field(default_factory=lambda: {v: Series() for v in VARIANTS})
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)  # probe_disk before and after the runs
    persist: list[float] = field(default_factory=list)  # probe_persist (bytes/s), the same
    disk_waited: float = 0.0  # seconds waited for a slow disk before the runs
    caches_dropped: bool = False  # the page cache was emptied before the set (drop_caches)

    def series(self, variant: str, key: str) -> Series:
        values = [getattr(r, key) for r in self.sbs[variant]]
        return Series([float(v) for v in values if v is not None])


@dataclass
class Steady:
    incremental: Series = field(default_factory=Series)
    incremental_busy: Series = field(default_factory=Series)
    cpu_a: float | None = None
    cpu_b: float | None = None
    # The same window's CPU of processes that do nothing but sleep (IDLE_REFERENCES).
    references: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass
class Row:
    figure: str
    sbs: str
    reference: str
    target: str
    met: bool | None

    @property
    def met_text(self) -> str:
        return "—" if self.met is None else "yes" if self.met else "**no**"


# ---------------------------------------------------------------------- measuring


def status_of(node: NodeProcess) -> dict[str, Any]:
    st = node.status(timeout=2.0)
    if st is None:
        raise RunFailed(f"node {node.name} does not answer its status; log:\n{node.log_tail(10)}")
    return st


def logged_cycle(node: NodeProcess) -> float | None:
    """How long the first cycle that sent files took, from the sender's log."""
    try:
        text = node.log.read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"sbs\.sync: cycle \d+: sent [1-9]\d* files .* in ([\d.]+) s$", text, re.M)
    return float(found.group(1)) if found else None


def node_roles(pair: Pair) -> tuple[tuple[str, int], tuple[str, int]]:
    a, b = status_of(pair.a), status_of(pair.b)
    return (str(a["role"]), int(a["epoch"])), (str(b["role"]), int(b["epoch"]))


class PairRun:
    """A pair whose a holds ``data`` in its replicated folder, for the time of a ``with``."""

    def __init__(
        self,
        root: Path,
        data: Path,
        *,
        durable: bool,
        heartbeat: tuple[float, float] = (HEARTBEAT_INTERVAL, DEAD_TIME),
    ) -> None:
        self.data = data
        self.pair = Pair(
            root,
            heartbeat_interval=heartbeat[0],
            dead_time=heartbeat[1],
            extra=FOLDERS,
            node_extra={"durable_writes": durable},
        )
        self.src = root / "a" / "data"
        self.dst = root / "b" / "data"

    def __enter__(self) -> PairRun:
        # A rename: the very same files (and page cache) serve every tool.
        self.data.rename(self.src)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # b first: stopping the primary first would hand the role over.
            self.pair.b.stop(STOP_TIMEOUT)
            self.pair.a.stop(STOP_TIMEOUT)
        finally:
            self.pair.close()
            if self.src.exists():
                self.src.rename(self.data)

    def start_primary(self) -> None:
        self.pair.a.start()
        self.pair.a.wait_for("primary", is_primary, timeout=START_TIMEOUT, poll=CONNECT_POLL)
        time.sleep(PRIMARY_SETTLE)

    def join_and_sync(self, ds: DataSet, timeout: float) -> SyncRun:
        """Start b and wait until its folder holds the data set; the timings and readings."""
        a, b = self.pair.a, self.pair.b
        before_a = status_of(a)
        began = time.monotonic()
        b.start()
        seen: dict[str, Any] = {}

        def connected() -> bool:
            st = b.status()
            if st is not None and st.get("peer_connected") and st.get("role") == "secondary":
                seen.update(st)
                return True
            return False

        def alive() -> bool:
            return a.alive and b.alive

        joined = wait_until("b connected", connected, START_TIMEOUT, CONNECT_POLL, alive)
        cpu_joined = {n.name: proc_cpu_split(n.pid) for n in (a, b)}
        done = self._wait_received(ds, timeout, alive)
        # files_received grows after the renames: at ``done`` the files were in
        # place. The scan confirms it was the whole set, not a file twice.
        found = scan(self.dst)
        if found != (ds.count, ds.total):

            def complete() -> bool:
                return scan(self.dst) == (ds.count, ds.total)

            done = wait_until("b's folder matches", complete, timeout, DONE_POLL, alive)
        split = {
            n.name: tuple(
                x - y for x, y in zip(proc_cpu_split(n.pid), cpu_joined[n.name], strict=True)
            )
            for n in (a, b)
        }
        hwm_a, hwm_b = peak_memory(a.pid), peak_memory(b.pid)
        after_a, after_b = status_of(a), status_of(b)
        takeover = self._takeover(before_a, seen, after_a, after_b)
        # a logs its cycle once b's acknowledgement is in, a moment after b is done.
        cycle = logged_cycle(a)
        deadline = time.monotonic() + 10.0
        while cycle is None and time.monotonic() < deadline and a.alive:
            time.sleep(DONE_POLL)
            cycle = logged_cycle(a)
        return SyncRun(
            from_start=done - began,
            from_connected=done - joined,
            connect=joined - began,
            hwm_a=hwm_a,
            hwm_b=hwm_b,
            silence_a=float((after_a.get("peer") or {}).get("longest_silence") or 0.0),
            silence_b=float((after_b.get("peer") or {}).get("longest_silence") or 0.0),
            stall_a=float(after_a.get("loop_longest_stall") or 0.0),
            stall_b=float(after_b.get("loop_longest_stall") or 0.0),
            takeover=takeover,
            first_cycle=cycle,
            cpu_a_user=split["a"][0],
            cpu_a_sys=split["a"][1],
            cpu_b_user=split["b"][0],
            cpu_b_sys=split["b"][1],
        )

    def _wait_received(self, ds: DataSet, timeout: float, alive: Callable[[], bool]) -> float:
        """The monotonic time b's status first counted the whole set as received."""
        b = self.pair.b
        began = time.monotonic()
        while True:
            st = b.status()
            now = time.monotonic()
            got = 0.0
            if st is not None:
                files = int(st.get("files_received") or 0)
                if files >= ds.count:
                    return now
                got = max(files / ds.count, int(st.get("bytes_received") or 0) / ds.total)
            if not alive():
                raise RunFailed("b holds the data: a process exited")
            if now - began > timeout:
                raise RunFailed(f"b holds the data: not within {timeout:g} s")
            # Each status request costs the node about half a millisecond of CPU:
            # far from the end, ask rarely; near it, every DONE_POLL.
            left = (now - began) * (1 - got) / got if got > 0 else 0.0
            time.sleep(min(MAX_DONE_POLL, max(DONE_POLL, left / 8)))

    def _takeover(
        self,
        before_a: dict[str, Any],
        joined_b: dict[str, Any],
        after_a: dict[str, Any],
        after_b: dict[str, Any],
    ) -> str | None:
        problems = []
        if after_a.get("role") != "primary" or after_a.get("epoch") != before_a.get("epoch"):
            problems.append(
                f"a went from {before_a.get('role')}/{before_a.get('epoch')} "
                f"to {after_a.get('role')}/{after_a.get('epoch')}"
            )
        if after_b.get("role") != "secondary" or after_b.get("epoch") != joined_b.get("epoch"):
            problems.append(
                f"b went from {joined_b.get('role')}/{joined_b.get('epoch')} "
                f"to {after_b.get('role')}/{after_b.get('epoch')}"
            )
        if not (after_a.get("peer_connected") and after_b.get("peer_connected")):
            problems.append("the pair is no longer connected")
        with contextlib.suppress(OSError):
            if "] promoted: " in self.pair.b.log.read_text(errors="replace"):
                problems.append("b's log shows a promotion")
        return "; ".join(problems) or None


# ---------------------------------------------------------------------- runs


@dataclass
class Context:
    work: Path
    runs: int
    pause: float
    deadline: float
    logs: Path | None
    say: Callable[[str], None]
    disk_wait: float = 0.0

    def settle(self) -> None:
        """Flush what the last run left in the page cache, then let the disk calm down.

        A previous run's write-back must not land in the next one.
        """
        os.sync()
        time.sleep(self.pause)

    def drop_caches(self) -> bool:
        """Write everything out and empty the page cache (Linux, as root); False if not allowed.

        Every run's copy is kept until the end, so a few sets fill the memory
        with cached copies, and every later run's page allocations wait for
        reclaim (on the machine measured: 1 GB free of 24, memory pressure
        stalls during the runs, and the same code measured slower than in an
        earlier run). Each set starts with the cache empty instead, before its
        data is generated.
        """
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as knob:
                knob.write("3\n")
        except OSError:
            return False
        return True

    def discard(self, path: Path) -> None:
        """Put a finished run's copy aside, deleted only when every run is done.

        Deleting 20,000 files makes the next 20,000 creations slow on ext4
        (without a journal, its inode allocator steps over every inode freed
        in the last minutes: `recently_deleted` in kernel profiles): whichever
        tool ran after a deletion was measured against the file system's
        bookkeeping, by up to 4 times, and the figures depended on the order.
        """
        graveyard = self.work / "discarded"
        graveyard.mkdir(exist_ok=True)
        if path.exists():
            os.rename(path, graveyard / f"{len(list(graveyard.iterdir()))}-{path.name}")

    def probe_disk(self) -> float:
        """Seconds to create PROBE_FILES small files: how fast the disk is right now.

        This machine's disk varies by several times from one hour to the next
        (and after mass deletions); the figure printed with each set tells a
        slow run from a slow disk. The files are put aside like a run's copy.
        """
        folder = self.work / f"probe-{time.monotonic_ns()}"
        data = b"p" * PROBE_SIZE
        began = time.perf_counter()
        for n in range(PROBE_FILES):
            sub = folder / f"d{n // 100:03}"
            if n % 100 == 0:
                sub.mkdir(parents=True)
            fd = os.open(sub / f"f{n:05}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        took = time.perf_counter() - began
        self.discard(folder)
        self.settle()
        return took

    def probe_persist(self) -> float:
        """Bytes per second this disk makes durable: PERSIST_BYTES written, then fsync.

        Written in 1 MiB blocks with O_DIRECT where the filesystem takes it (as
        sbs writes large files), so the page cache neither helps nor costs; the
        fsync waits for whatever the disk (or the host under a virtual disk)
        still holds. Put aside like a run's copy.
        """
        path = self.work / f"persist-{time.monotonic_ns()}"
        block = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
        block.write(random.Random(PERSIST_BYTES).randbytes(MIB))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        began = time.perf_counter()
        try:
            fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
        except OSError:  # a filesystem without O_DIRECT
            fd = os.open(path, flags, 0o644)
        try:
            for _ in range(PERSIST_BYTES // MIB):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
            block.close()
        took = time.perf_counter() - began
        self.discard(path)
        self.settle()
        return PERSIST_BYTES / took

    def free_memory(self, size: int) -> None:
        """Write ``size`` bytes through the page cache, flush them and delete them.

        On the virtual machine measured, page-cache pages that were not in use
        for a few seconds cost about 1-2.8 s a GiB more to write into than
        pages freed a moment ago (the host takes back free memory and gives
        it again on first use). Called right before a run, this makes that
        run write into just-freed memory, whatever the runs before it left.
        """
        path = self.work / f"ballast-{time.monotonic_ns()}"
        block = random.Random(size).randbytes(MIB)
        with path.open("wb") as f:
            for _ in range(size // MIB + 1):
                f.write(block)
        os.sync()
        path.unlink()

    def keep_logs(self, pair: Pair, tag: str) -> None:
        if self.logs is None:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        for node in pair:
            with contextlib.suppress(OSError):
                shutil.copyfile(node.log, self.logs / f"{tag}-{node.name}.log")


def sync_timeout(ds: DataSet) -> float:
    # Far above any expected figure (2 MB/s), so only a stuck run ends by it.
    return max(120.0, ds.total / (2 * MB))


# A process that does nothing but sleep 10 ms at a time and notes its longest
# pause: when both nodes' event loops stall at once, it tells whether the whole
# machine did (seen here during durable "large": both loops held up 1.5-1.7 s
# at the same moments, each in a trivial line of code, and a takeover).
_PAUSE_PROBE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
longest, last = 0.0, time.monotonic()
try:
    while True:
        time.sleep(0.01)
        now = time.monotonic()
        longest, last = max(longest, now - last - 0.01), now
finally:
    print(f"{longest:.6f}", flush=True)
"""


class PauseProbe:
    """:data:`_PAUSE_PROBE` for the time of a ``with``; ``longest`` once it is over."""

    def __init__(self) -> None:
        self.longest: float | None = None
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> PauseProbe:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PAUSE_PROBE], stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        out, _ = self._process.communicate(timeout=STOP_TIMEOUT)
        with contextlib.suppress(ValueError):
            self.longest = float(out.strip())


def run_sbs(
    ctx: Context, ds: DataSet, data: Path, tag: str, *, durable: bool, verify: bool
) -> SyncRun:
    root = ctx.work / f"pair-{tag}"
    try:
        with PairRun(root, data, durable=durable) as run:
            try:
                run.start_primary()
                with PauseProbe() as probe:
                    result = run.join_and_sync(ds, sync_timeout(ds))
                result.pause = probe.longest
                if verify:
                    verify_equal(run.src, run.dst)
            finally:
                ctx.keep_logs(run.pair, tag)
        return result
    finally:
        ctx.discard(root)
        if not data.is_dir():
            raise RunFailed(f"the data set did not come back to {data}")


# The second reference: a plain Python copier in one process, no
# hashing, no fsync, no network: walk, read, write, set the mtime (as rsync -a).
# With a third argument it ends with one sync: the set made durable with one
# flush for all of it, none per file, a reference for the durable rows.
_COPIER = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
for folder, _, names in os.walk(src):
    into = os.path.join(dst, os.path.relpath(folder, src))
    os.makedirs(into, exist_ok=True)
    for name in names:
        source, target = os.path.join(folder, name), os.path.join(into, name)
        with open(source, "rb") as f, open(target, "wb") as g:
            while block := f.read(1 << 20):
                g.write(block)
        info = os.stat(source)
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
if len(sys.argv) > 3:
    os.sync()
"""


def run_copier(
    ctx: Context, ds: DataSet, data: Path, into: Path, *, synced: bool = False
) -> tuple[float, float]:
    """The plain copier from ``data`` into the empty ``into``: seconds from start to exit, CPU.

    ``synced``: it ends with one ``sync``, which it waits for.
    """
    before = _children_cpu()
    began = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _COPIER, str(data), str(into), *(["sync"] if synced else [])],
            capture_output=True,
            timeout=sync_timeout(ds),
            check=False,
        )
        took = time.monotonic() - began
        if done.returncode != 0:
            raise RunFailed(f"copier exited with {done.returncode}: {done.stderr.decode()[-300:]}")
        found = scan(into)
        if found != (ds.count, ds.total):
            raise RunFailed(f"copier left {found} (files, bytes), not {(ds.count, ds.total)}")
        return took, _children_cpu() - before
    finally:
        ctx.discard(into)


def run_rsync(
    ctx: Context, ds: DataSet, data: Path, daemon: RsyncDaemon, *, verify: bool
) -> tuple[float, float]:
    try:
        took = daemon.push(data, sync_timeout(ds))
        found = scan(daemon.dst)
        if found != (ds.count, ds.total):
            raise RunFailed(f"rsync left {found} (files, bytes), not {(ds.count, ds.total)}")
        if verify:
            verify_equal(data, daemon.dst)
        return took
    finally:
        empty_folder(daemon.dst, ctx.discard)


def run_set(ctx: Context, ds: DataSet) -> tuple[SetResult, Steady | None]:
    res = SetResult(ds)
    say = ctx.say
    # Every run's copy stays until the end (Context.discard).
    need = ((2 * len(VARIANTS) + 2) * ctx.runs + 2) * ds.total + 512 * MIB
    free = shutil.disk_usage(ctx.work).free
    if free < need:
        res.failures.append(
            f"not run: {free / MB:.0f} MB free in {ctx.work}, {need / MB:.0f} needed"
        )
        say(f"  {res.failures[-1]}")
        return res, None
    folder = ctx.work / ds.name
    folder.mkdir()
    data = folder / "data"
    steady: Steady | None = None
    say(f"\n{ds.name}: {ds.description}, {ds.count} files, {ds.total / MB:.1f} MB")
    res.caches_dropped = ctx.drop_caches()
    say("  page cache emptied" if res.caches_dropped else "  page cache not emptied (not allowed)")
    began = time.monotonic()
    generate(ds, data)
    say(f"  generated in {time.monotonic() - began:.1f} s")
    daemon = RsyncDaemon(folder)
    try:
        ctx.settle()
        res.probes.append(wait_for_disk(ctx, res))
        probe_writes(ctx, res)
        for index in range(ctx.runs):
            if time.monotonic() > ctx.deadline:
                res.failures.append(f"runs {index + 1}-{ctx.runs} not run: time budget spent")
                say(f"  {res.failures[-1]}")
                break
            for variant in VARIANTS:
                one_pair_of_runs(ctx, res, data, daemon, variant=variant, index=index)
            one_rsync_into_freed_memory(ctx, res, data, daemon)
            one_copier_run(ctx, res, data, folder / f"copier-{index + 1}")
            one_copier_run(ctx, res, data, folder / f"copier-synced-{index + 1}", synced=True)
        res.probes.append(ctx.probe_disk())
        say(f"  disk probe: {PROBE_FILES:,} files created in {res.probes[-1]:.2f} s")
        probe_writes(ctx, res)
        if ds.name == "small" and time.monotonic() <= ctx.deadline:
            steady = measure_steady(ctx, ds, data)
    finally:
        daemon.stop()
        ctx.discard(folder)
    add_set_notes(res)
    return res, steady


def one_pair_of_runs(
    ctx: Context, res: SetResult, data: Path, daemon: RsyncDaemon, *, variant: str, index: int
) -> None:
    """One sbs run of ``variant``, then one rsync run, each followed by the rest."""
    ds, say = res.ds, ctx.say
    tag = f"{ds.name}-{variant}-{index + 1}"
    label = f"sbs {VARIANT_TEXT[variant]:22} run {index + 1}"
    sbs: SyncRun | None = None
    try:
        sbs = run_sbs(ctx, ds, data, tag, durable=VARIANTS[variant], verify=index == 0)
    except (RunFailed, OSError, TimeoutError) as exc:
        res.failures.append(f"sbs {tag}: {exc}".splitlines()[0])
        say(f"  {label}: FAILED {exc}")
    if sbs is not None:
        res.sbs[variant].append(sbs)
        cycle = "?" if sbs.first_cycle is None else f"{sbs.first_cycle:.3f}"
        say(
            f"  {label}: {sbs.from_connected:7.3f} s from connection, "
            f"{sbs.from_start:7.3f} s from b's start, CPU {sbs.cpu:.2f} s; a's cycle {cycle} s;"
            f" peak a {sbs.hwm_a / MB:.0f} MB, b {sbs.hwm_b / MB:.0f} MB; longest silence "
            f"a {sbs.silence_a:.3f} s, b {sbs.silence_b:.3f} s; longest loop stall "
            f"a {sbs.stall_a:.3f} s, b {sbs.stall_b:.3f} s; longest pause of a process "
            f"that only sleeps {_shown(sbs.pause)}; {load_line()}"
            + (f"; TAKEOVER: {sbs.takeover}" if sbs.takeover else "")
        )
    ctx.settle()
    ref: tuple[float, float] | None = None
    try:
        ref = run_rsync(ctx, ds, data, daemon, verify=index == 0 and variant == "durable")
    except (RunFailed, OSError, subprocess.TimeoutExpired) as exc:
        res.failures.append(f"rsync after {tag}: {exc}".splitlines()[0])
        say(f"  rsync run: FAILED {exc}")
    if ref is not None:
        took, cpu = ref
        res.rsync.add(took)
        res.rsync_cpu.add(cpu)
        shown = ""
        if sbs is not None:
            res.ratios[variant].add(sbs.from_connected / took)
            shown = f", ratio {sbs.from_connected / took:.2f}x"
        say(
            f"  rsync {'':26} run {len(res.rsync.values)}: {took:7.3f} s, CPU {cpu:.2f} s"
            f"{shown}; {load_line()}"
        )
    ctx.settle()


def one_rsync_into_freed_memory(
    ctx: Context, res: SetResult, data: Path, daemon: RsyncDaemon
) -> None:
    """rsync once more, right after memory the size of the set was freed (Context.free_memory)."""
    try:
        ctx.free_memory(res.ds.total + FREED_EXTRA)
        took, _ = run_rsync(ctx, res.ds, data, daemon, verify=False)
    except (RunFailed, OSError, subprocess.TimeoutExpired) as exc:
        res.failures.append(f"rsync into freed memory: {exc}".splitlines()[0])
        ctx.say(f"  rsync into freed memory: FAILED {exc}")
    else:
        res.rsync_freed.add(took)
        ctx.say(
            f"  {'rsync, memory freed just before':33} run {len(res.rsync_freed.values)}:"
            f" {took:7.3f} s; {load_line()}"
        )
    ctx.settle()


def one_copier_run(
    ctx: Context, res: SetResult, data: Path, into: Path, *, synced: bool = False
) -> None:
    name = "plain Python copier" + (", then sync" if synced else "")
    try:
        took, cpu = run_copier(ctx, res.ds, data, into, synced=synced)
    except (RunFailed, OSError, subprocess.TimeoutExpired) as exc:
        res.failures.append(f"{name} {into.name}: {exc}".splitlines()[0])
        ctx.say(f"  {name}: FAILED {exc}")
    else:
        series = res.copier_synced if synced else res.copier
        series.add(took)
        ctx.say(
            f"  {name:33} run {len(series.values)}: {took:7.3f} s, CPU {cpu:.2f} s; {load_line()}"
        )
    ctx.settle()


def measure_steady(ctx: Context, ds: DataSet, data: Path) -> Steady:
    """Incremental latency and idle CPU on one connected pair holding the data set."""
    out = Steady()
    say = ctx.say
    root = ctx.work / "pair-steady"
    try:
        with PairRun(root, data, durable=True, heartbeat=DEFAULT_HEARTBEAT) as run:
            try:
                run.start_primary()
                run.join_and_sync(ds, sync_timeout(ds))
                # The first cycle's acknowledgement and the index writes end first.
                time.sleep(2.0)
                incremental(run, ds, out.incremental, say)
                # b's folder and this file share a filesystem: a flush of all of it waits.
                incremental(run, ds, out.incremental_busy, say, busy=root / "foreign.bin")
                idle_cpu(run, out, say)
            except (RunFailed, OSError, TimeoutError) as exc:
                out.failures.append(f"{exc}".splitlines()[0])
                say(f"  steady state: FAILED {exc}")
            finally:
                ctx.keep_logs(run.pair, "small-steady")
    finally:
        ctx.discard(root)
    return out


def incremental(
    run: PairRun,
    ds: DataSet,
    out: Series,
    say: Callable[[str], None],
    *,
    busy: Path | None = None,
) -> None:
    """10 files rewritten on a, until all are on b; with ``busy``, while that file
    (:data:`FOREIGN_MIB`, written just before and not flushed) waits for the disk."""
    rng = random.Random(f"{SEED}:incremental" + (":busy" if busy else ""))
    noise = Noise(SEED, "incremental")
    filler = noise.take(MIB)
    for trial in range(INCREMENTAL_RUNS):
        picked = rng.sample([rel for rel, _ in ds.files], INCREMENTAL_FILES)
        bodies = {rel: noise.take(rng.randint(1 * KIB, 8 * KIB)) for rel in picked}
        if busy is not None:
            with busy.open("wb") as f:
                for _ in range(FOREIGN_MIB):
                    f.write(filler)
        for rel, body in bodies.items():
            (run.src / rel).write_bytes(body)
        last_write = time.monotonic()
        pending = dict(bodies)
        deadline = last_write + 30.0
        while pending:
            for rel in list(pending):
                with contextlib.suppress(OSError):
                    if (run.dst / rel).read_bytes() == pending[rel]:
                        del pending[rel]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise RunFailed(f"incremental: {len(pending)} of 10 files not on b after 30 s")
            time.sleep(INCREMENTAL_POLL)
        took = time.monotonic() - last_write
        out.add(took)
        during = f", {FOREIGN_MIB} MiB of another program unwritten" if busy else ""
        say(
            f"  incremental run {trial + 1}{during}: "
            f"10 files on b {took:.3f} s after the last write"
        )
        if busy is not None:
            busy.unlink()  # gone before it was written: nothing left for the disk
        time.sleep(1.0)


# For scale beside the idle figure: processes that do nothing but sleep, measured
# over the same window. On the virtual machine measured, such a process is
# charged CPU time it did not use, and how much varies by the hour: a bare
# asyncio loop waking 4-5 times a second, 0.2 % of a core in one window and 1.7 %
# in another; one thread blocked 5 s in a single epoll_wait, 11 ms.
IDLE_REFERENCES = {
    "a process sleeping 1 s at a time": "import time\nwhile True:\n    time.sleep(1.0)\n",
    "an asyncio loop waking 4 times a second (about an idle secondary's count)": (
        "import asyncio\n"
        "async def main():\n"
        "    while True:\n"
        "        await asyncio.sleep(0.25)\n"
        "asyncio.run(main())\n"
    ),
}


def idle_cpu(run: PairRun, out: Steady, say: Callable[[str], None]) -> None:
    a, b = run.pair.a, run.pair.b
    references = {
        name: subprocess.Popen([sys.executable, "-c", code])
        for name, code in IDLE_REFERENCES.items()
    }
    try:
        time.sleep(3.0)
        roles_before = node_roles(run.pair)
        began = time.monotonic()
        cpu_a, cpu_b = proc_cpu_seconds(a.pid), proc_cpu_seconds(b.pid)
        cpu_ref = {name: proc_cpu_seconds(p.pid) for name, p in references.items()}
        say(f"  idle: measuring both nodes' CPU for {IDLE_SECONDS:.0f} s")
        time.sleep(IDLE_SECONDS)
        used_a, used_b = proc_cpu_seconds(a.pid) - cpu_a, proc_cpu_seconds(b.pid) - cpu_b
        used_ref = {name: proc_cpu_seconds(p.pid) - cpu_ref[name] for name, p in references.items()}
        elapsed = time.monotonic() - began
    finally:
        for process in references.values():
            process.kill()
            process.wait(STOP_TIMEOUT)
    out.cpu_a = 100 * used_a / elapsed
    out.cpu_b = 100 * used_b / elapsed
    out.references = {name: 100 * used / elapsed for name, used in used_ref.items()}
    if node_roles(run.pair) != roles_before:
        raise RunFailed(f"idle: roles changed from {roles_before} to {node_roles(run.pair)}")
    say(f"  idle CPU over {elapsed:.1f} s: a {out.cpu_a:.2f} %, b {out.cpu_b:.2f} % of one core")
    for name, share in out.references.items():
        say(f"  for scale, {name}: {share:.2f} %")


def wait_for_disk(ctx: Context, res: SetResult) -> float:
    """Probe the disk; while it is slower than usual, wait and probe again (bounded).

    The probe's last figure, for the set's notes. A set that starts on a slow
    disk (after mass deletions, or another load) measures the disk for both
    tools, not them.
    """
    took = ctx.probe_disk()
    ctx.say(f"  disk probe: {PROBE_FILES:,} files created in {took:.2f} s")
    while (
        took > PROBE_USUAL
        and res.disk_waited + PROBE_RETRY <= ctx.disk_wait
        and time.monotonic() + PROBE_RETRY < ctx.deadline
    ):
        ctx.say(f"  slower than usual (over {PROBE_USUAL:.1f} s): waiting {PROBE_RETRY:.0f} s")
        time.sleep(PROBE_RETRY)
        res.disk_waited += PROBE_RETRY
        took = ctx.probe_disk()
        ctx.say(f"  disk probe: {PROBE_FILES:,} files created in {took:.2f} s")
    return took


def probe_writes(ctx: Context, res: SetResult) -> None:
    res.persist.append(ctx.probe_persist())
    ctx.say(f"  write probe: {res.persist[-1] / MB:.0f} MB/s made durable")


def add_set_notes(res: SetResult) -> None:
    res.notes.append(
        f"{res.ds.name}: the page cache was "
        + ("emptied" if res.caches_dropped else "not emptied (not allowed here)")
        + " before the set's data was generated."
    )
    if res.probes:
        shown = " and ".join(f"{p:.2f} s" for p in res.probes)
        waited = ""
        if res.disk_waited:
            waited = f" (after waiting {res.disk_waited:.0f} s for it to come under {PROBE_USUAL} s"
            waited += ")" if res.probes[0] <= PROBE_USUAL else ", in vain)"
        res.notes.append(
            f"{res.ds.name}: the disk probe ({PROBE_FILES:,} files of {PROBE_SIZE // 1024} KiB "
            f"created in one process, no sync) took {shown} before and after the runs{waited}."
        )
    if res.persist:
        shown = " and ".join(f"{p / MB:.0f} MB/s" for p in res.persist)
        res.notes.append(
            f"{res.ds.name}: the write probe ({PERSIST_BYTES // MIB} MiB written with O_DIRECT "
            f"in 1 MiB blocks, then fsync) made data durable at {shown} before and after the "
            "runs; the durable rows show the set's size at the faster of them, for scale."
        )
    for variant in VARIANTS:
        runs = res.sbs[variant]
        cycles = [r.first_cycle for r in runs if r.first_cycle is not None]
        if not runs or not cycles:
            continue
        res.notes.append(
            f"{res.ds.name}, {VARIANT_TEXT[variant]}: a's first cycle (from a's log: scan, "
            "read and hash, send, and b's last commit and acknowledgement) took "
            f"{statistics.median(cycles):.3f} s of the "
            f"{statistics.median(r.from_connected for r in runs):.3f} s from b's connection "
            "(medians; a starts the cycle as soon as its side of the connection is up, a "
            "moment before b's status says connected). b's process start to its connection "
            f"took {statistics.median(r.connect for r in runs):.3f} s (interpreter start-up "
            "and imports)."
        )


# ---------------------------------------------------------------------- report


def ratio_text(sbs: Series, ref: Series, pairs: Series) -> tuple[str, float | None]:
    if sbs.median is None or not ref.median:
        return "—", None
    ratio = sbs.median / ref.median
    spread = f" (pairs {min(pairs.values):.2f}-{max(pairs.values):.2f})" if pairs.values else ""
    return f"{ratio:.2f}x{spread}", ratio


def against(sbs: Series, what: str, name: str, ref: Series) -> Row:
    """An informational row: ``sbs`` against the reference ``ref`` (``name``, ``what`` it is)."""
    text, _ = ratio_text(sbs, ref, Series())
    return Row(
        f"↳ against {what}", sbs.text(), f"{name} {ref.text()}, {len(ref.values)} runs", text, None
    )


def set_rows(res: SetResult) -> list[Row]:
    name = res.ds.name
    target = TARGET_RATIO[name]
    rows: list[Row] = []
    ref = res.rsync.text()
    for variant, durable in VARIANTS.items():
        runs = res.sbs[variant]
        joined = res.series(variant, "from_connected")
        text, ratio = ratio_text(joined, res.rsync, res.ratios[variant])
        rows.append(
            Row(
                f"1. Initial sync, {name} ({res.ds.description}), {VARIANT_TEXT[variant]}: "
                "b connected → b's folder complete",
                f"{joined.text()}, {len(runs)} runs",
                f"rsync {ref}, {len(res.rsync.values)} runs",
                f"{text} / ≤ {target}x",
                None if ratio is None else ratio <= target,
            )
        )
        if durable and res.persist and res.rsync.median:
            at_speed = res.ds.total / max(res.persist)
            rows.append(
                Row(
                    "↳ for scale: the set's size at the disk's durable write speed (write probe)",
                    f"{at_speed:.3f} s",
                    f"rsync {ref} (no fsync)",
                    f"{at_speed / res.rsync.median:.2f}x",
                    None,
                )
            )
        started = res.series(variant, "from_start")
        text, _ = ratio_text(started, res.rsync, Series())
        rows.append(Row("↳ from b's process start", started.text(), f"rsync {ref}", text, None))
        references = [
            (
                "rsync writing into memory freed just before it (see above)",
                "rsync",
                res.rsync_freed,
            ),
            (
                "a plain Python copier (one process, no network, hash or fsync)",
                "copier",
                res.copier,
            ),
        ]
        if durable:
            references.append(
                (
                    "the same copier followed by one sync (the set made durable)",
                    "copier + sync",
                    res.copier_synced,
                )
            )
        rows += [against(joined, *reference) for reference in references if reference[2].values]
        cpu = res.series(variant, "cpu")
        text, _ = ratio_text(cpu, res.rsync_cpu, Series())
        rows.append(
            Row(
                "↳ CPU time, both sides (sbs: a + b from b's connection; rsync: client + daemon)",
                cpu.text(),
                f"rsync {res.rsync_cpu.text()}",
                text,
                None,
            )
        )
        parts = {
            k: res.series(variant, k).median
            for k in ("cpu_a_user", "cpu_a_sys", "cpu_b_user", "cpu_b_sys")
        }
        if all(v is not None for v in parts.values()):
            rows.append(
                Row(
                    "↳ sbs CPU split, user + system (medians)",
                    f"a {parts['cpu_a_user']:.2f} + {parts['cpu_a_sys']:.2f} s, "
                    f"b {parts['cpu_b_user']:.2f} + {parts['cpu_b_sys']:.2f} s",
                    "—",
                    "—",
                    None,
                )
            )
        rows.append(
            Row(
                "↳ a's first cycle (sender's log)",
                res.series(variant, "first_cycle").text(),
                "—",
                "—",
                None,
            )
        )
    return rows


def mb(value: float) -> str:
    return f"{value / MB:.0f} MB"


def peak(res: SetResult, node: str) -> float | None:
    values = [getattr(r, f"hwm_{node}") for v in VARIANTS for r in res.sbs[v]]
    return max(values) if values else None


def memory_rows(results: dict[str, SetResult]) -> list[Row]:
    rows: list[Row] = []
    small, large = results.get("small"), results.get("large")
    if small is not None:
        a, b = peak(small, "a"), peak(small, "b")
        if a is not None and b is not None:
            rows.append(
                Row(
                    "4. Peak memory (VmHWM, highest of all runs) replicating small",
                    f"a {mb(a)}, b {mb(b)}",
                    "—",
                    f"< {mb(TARGET_MEMORY_SMALL)} each",
                    max(a, b) < TARGET_MEMORY_SMALL,
                )
            )
    if large is not None:
        a, b = peak(large, "a"), peak(large, "b")
        if a is not None and b is not None:
            if small is not None and (sa := peak(small, "a")) and (sb := peak(small, "b")):
                rows.append(
                    Row(
                        "4. Peak memory replicating large; large - small",
                        f"a {mb(a)}, b {mb(b)}; difference a {(a - sa) / MB:+.0f} MB, "
                        f"b {(b - sb) / MB:+.0f} MB",
                        f"small: a {mb(sa)}, b {mb(sb)}",
                        f"≤ small + {mb(CHUNK_BUFFERS)} (chunk buffers)",
                        a - sa <= CHUNK_BUFFERS and b - sb <= CHUNK_BUFFERS,
                    )
                )
            else:
                rows.append(
                    Row("4. Peak memory replicating large", f"a {mb(a)}, b {mb(b)}", "—", "—", None)
                )
    return rows


def silence_rows(results: dict[str, SetResult]) -> list[Row]:
    rows: list[Row] = []
    for name, res in results.items():
        runs = [r for v in VARIANTS for r in res.sbs[v]]
        if not runs:
            continue
        a = Series([r.silence_a for r in runs])
        b = Series([r.silence_b for r in runs])
        worst = max(a.values + b.values)
        takeovers = sum(1 for r in runs if r.takeover)
        figure = (
            f"5. Longest silence between the peer's control messages, {name} transfers "
            f"(heartbeat {HEARTBEAT_INTERVAL} s, dead_time {DEAD_TIME} s)"
        )
        if name != "large":
            figure = f"↳ same, {name} transfers"
        rows.append(
            Row(
                figure,
                f"worst {worst:.3f} s; a {a.text()}, b {b.text()}; "
                f"takeovers {takeovers} of {len(runs)}",
                "—",
                f"< {TARGET_SILENCE:.1f} s, no takeover" if name == "large" else "—",
                (worst < TARGET_SILENCE and takeovers == 0) if name == "large" else None,
            )
        )
        pauses = Series([r.pause for r in runs if r.pause is not None])
        if pauses.values:
            during = [_shown(r.pause) for r in runs if r.takeover]
            rows.append(
                Row(
                    "↳ the longest pause of a process that only sleeps 10 ms at a time, "
                    f"{name} runs{', those with a takeover' if during else ''}",
                    f"{pauses.text()}" + (f"; {', '.join(during)}" if during else ""),
                    "—",
                    "—",
                    None,
                )
            )
    return rows


def _shown(pause: float | None) -> str:
    return "unknown" if pause is None else f"{pause:.3f} s"


def steady_rows(steady: Steady | None) -> list[Row]:
    if steady is None:
        return []

    def incremental_row(figure: str, series: Series, target: str) -> Row:
        met = None if series.median is None else series.median < TARGET_INCREMENTAL
        return Row(figure, f"{series.text()}, {len(series.values)} runs", "—", target, met)

    rows = [
        incremental_row(
            "2. Incremental: 10 files changed on a → all byte-identical on b (small replicated)",
            steady.incremental,
            f"< {TARGET_INCREMENTAL} s",
        )
    ]
    if steady.incremental_busy.values:
        rows.append(
            incremental_row(
                f"↳ the same while another program has {FOREIGN_MIB} MiB written on b's "
                "filesystem and not yet on the disk",
                steady.incremental_busy,
                f"< {TARGET_INCREMENTAL} s (as 2)",
            )
        )
    if steady.cpu_a is not None and steady.cpu_b is not None:
        rows.append(
            Row(
                f"3. No change: CPU over {IDLE_SECONDS:.0f} s, small replicated, defaults "
                f"(period 30 s, rescan 300 s, heartbeat {DEFAULT_HEARTBEAT[0]:g} s)",
                f"a {steady.cpu_a:.2f} %, b {steady.cpu_b:.2f} % of one core",
                "—",
                f"< {TARGET_IDLE_CPU:g} % each",
                max(steady.cpu_a, steady.cpu_b) < TARGET_IDLE_CPU,
            )
        )
        rows.extend(
            Row(
                f"↳ for scale, the same window: {name}, doing nothing else",
                f"{share:.2f} %",
                "—",
                "—",
                None,
            )
            for name, share in steady.references.items()
        )
    return rows


def all_rows(results: dict[str, SetResult], steady: Steady | None) -> list[Row]:
    rows: list[Row] = []
    for res in results.values():
        rows += set_rows(res)
    return rows + steady_rows(steady) + memory_rows(results) + silence_rows(results)


def failures_of(results: dict[str, SetResult], steady: Steady | None) -> list[str]:
    out = [f"{name}: {f}" for name, res in results.items() for f in res.failures]
    if steady is not None:
        out += [f"steady state: {f}" for f in steady.failures]
    return out


def rsync_version() -> str:
    try:
        first = subprocess.run(
            ["rsync", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "rsync not found"
    return " ".join(first.split()[:3])


def table(rows: Sequence[Row]) -> list[str]:
    out = ["| figure | sbs | reference | ratio / target | met? |", "|---|---|---|---|---|"]
    out += [f"| {r.figure} | {r.sbs} | {r.reference} | {r.target} | {r.met_text} |" for r in rows]
    return out


def method(runs: int, pause: float) -> str:
    return (
        "Data sets are generated from a fixed seed (incompressible content). Every sbs "
        f"run uses a fresh pair (`lab.Pair`, heartbeat_interval {HEARTBEAT_INTERVAL:g} s, "
        f"dead_time {DEAD_TIME:g} s, default period 30 s) with one "
        '`[[folders]] path = "data"`: a starts first with the data set in its folder and '
        f"becomes primary; {PRIMARY_SETTLE:g} s later b starts with an empty folder. The "
        "sbs figure runs from the moment b's status first shows `peer_connected` until "
        "b's `files_received` reaches the set's file count (status polled every "
        f"{DONE_POLL * 1000:.0f} ms near the end, less often before it, at most every "
        f"{MAX_DONE_POLL:g} s, since each request costs the node CPU; a scan of b's folder "
        "then confirms the file count and total size); the row below it counts from b's "
        "process start. CPU time is read from /proc for both node processes over the same "
        "span (for rsync: the client and the daemon's child). The reference is "
        "`rsync -a --delete SRC/ rsync://127.0.0.1:PORT/dst/` into an `rsync --daemon` on "
        "loopback, timed from its process start to its exit, on the very same source "
        "files. rsync does not flush to disk; sbs does with `durable_writes = true` (the "
        "default: one `syncfs` per batch). Runs alternate sbs (durable), rsync, sbs (not "
        f"durable), rsync, then the issue's second reference, a plain Python copier "
        "(one process walks the source and copies each file in 1 MiB reads and writes, "
        "setting its mtime: no network, no hash, no fsync) and the same copier followed by "
        "one `sync` (one flush for the whole set, none per file; its row is shown under the "
        f"durable one), {runs} rounds; after every run the written copy is moved aside "
        "(all copies are deleted only once every set is done: on this ext4 file system, "
        "files created within minutes of a mass deletion are several times slower to "
        f"create, for either tool), then `sync` and a {pause:g} s pause. The ratio is "
        "sbs's median over rsync's median (all rsync runs of the set); 'pairs' is the "
        "range of each sbs run over the rsync run right after it. Once a round rsync runs "
        "once more, right after the benchmark wrote the set's size plus "
        f"{FREED_EXTRA // MIB} MiB to a file, flushed and deleted it: on the virtual "
        "machine measured, writing into page-cache pages unused for a few seconds costs "
        "about 1-2.8 s a GiB more than into pages freed a moment ago, so a tool writing "
        "through the page cache (rsync, the copier) is slower when the runs before it "
        "left no memory just freed; sbs writes files of 256 KiB and more past the page "
        "cache (`O_DIRECT`). That row shows rsync without that cost. The first round's "
        "copies are compared byte for byte with the "
        "source, outside the timed part. Figures are medians with (min-max); 'met?' "
        "compares the median, except memory and silence (worst run). Figures 2 and 3 use "
        "one more pair, on the configuration's defaults (heartbeat "
        f"{DEFAULT_HEARTBEAT[0]:g} s, dead_time {DEFAULT_HEARTBEAT[1]:g} s, period 30 s), "
        'once it holds "small": 10 files rewritten with new content, then b\'s copies read '
        f"every {INCREMENTAL_POLL * 1000:.0f} ms until all 10 are identical, "
        f"{INCREMENTAL_RUNS} times, then {INCREMENTAL_RUNS} times more, each right after "
        f"another program (the benchmark) wrote {FOREIGN_MIB} MiB to a file beside b's "
        "folder without flushing it (deleted after the run); then nothing changes for "
        f"{IDLE_SECONDS:g} s, and the "
        "figure is each node process's CPU time (utime + stime from /proc; its sentinels "
        "not included) over wall time."
    )


def section(
    rows: Sequence[Row],
    notes: Sequence[str],
    failures: Sequence[str],
    *,
    command: str,
    machine: str,
    when: str,
    load: str,
    runs: int,
    pause: float,
) -> str:
    lines = [
        "## Replication",
        "",
        f"Measured {when} on {machine}; {load}; {revision()}.",
        "",
        f"Command: `{command}`",
        "",
        *textwrap.wrap(method(runs, pause), 80),
        "",
        *table(rows),
        "",
    ]
    lines += [f"- {n}" for n in notes]
    lines += [f"- FAILED {f}" for f in failures]
    return "\n".join(lines).rstrip() + "\n"


ANALYSIS_HEADING = "### Analysis"


def _on_term(signum: int, frame: FrameType | None) -> None:
    # Turns a polite kill into an exception, so every cleanup below still runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sets", default="small,mixed,large", help="comma-separated: small, mixed, large"
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds per set (at least 3)")
    parser.add_argument("--output", type=Path, help="write the '## Replication' section here")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds of rest after each run")
    parser.add_argument(
        "--budget", type=float, default=2400.0, help="seconds after which no new round starts"
    )
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes")
    parser.add_argument("--logs", type=Path, help="copy every node's log into this folder")
    parser.add_argument(
        "--disk-wait",
        type=float,
        default=300.0,
        help=f"at most this many seconds of waiting, before a set's runs, for the disk probe "
        f"to come under {PROBE_USUAL} s (0: no wait)",
    )
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in PLANS]
    if unknown or not sets:
        parser.error(
            f"unknown set(s): {', '.join(unknown) or '(none)'}; choose from {', '.join(PLANS)}"
        )
    if args.runs < 1:
        parser.error("--runs must be at least 1 (3 or more for figures worth recording)")
    if shutil.which("rsync") is None:
        parser.error("rsync is not installed")

    command = shlex.join([interpreter(), sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    machine = machine_line(rsync_version())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def say(text: str) -> None:
        print(text, flush=True)

    signal.signal(signal.SIGTERM, _on_term)
    load_before = load_line()
    say(f"machine: {machine}; {load_before}")
    say(f"command: {command}")
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sbs-bench-replication-", dir=args.workdir))
    results: dict[str, SetResult] = {}
    steady: Steady | None = None
    try:
        ctx = Context(
            work, args.runs, args.pause, began + args.budget, args.logs, say, args.disk_wait
        )
        for name in sets:
            res, found = run_set(ctx, data_set(name))
            results[name] = res
            steady = found or steady
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = f"before: {load_before}; after: {load_line()}"
    rows = all_rows(results, steady)
    notes = [n for res in results.values() for n in res.notes]
    failures = failures_of(results, steady)
    say(f"\nresults ({time.monotonic() - began:.0f} s in all; {load})")
    for row in rows:
        verdict = "" if row.met is None else f"  -> {'MET' if row.met else 'NOT MET'}"
        say(
            f"{row.figure}\n    sbs: {row.sbs}\n    reference: {row.reference}\n"
            f"    ratio/target: {row.target}{verdict}"
        )
    for note in notes:
        say(f"note: {note}")
    for failure in failures:
        say(f"FAILED {failure}")
    if args.output is not None:
        text = section(
            rows,
            notes,
            failures,
            command=command,
            machine=machine,
            when=when,
            load=load,
            runs=args.runs,
            pause=args.pause,
        )
        replace_section(
            args.output, "## Replication", text, intro="# Benchmarks\n", keep=ANALYSIS_HEADING
        )
        say(f"wrote the '## Replication' section of {args.output}")
    unmet = any(r.met is False for r in rows)
    return 1 if failures or unmet else 0


if __name__ == "__main__":
    sys.exit(main())
