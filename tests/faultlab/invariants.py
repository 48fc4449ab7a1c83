"""The soak's invariant checker: what must hold whatever faults the pair goes through.

It reads only what an operator could read: both nodes' ``sbs status``, their
replicated folders, their conflict folders, the alerts handed to the notify hook
and the start/stop markers the sentinels write. What it knows of the faults is
when each began and ended (a *window*), so that it can tell "two primaries
while the nodes could not reach each other" (allowed) from "two primaries
while they could" (a violation).

The checks:

- once healthy for ``dead_time`` + one probe interval: exactly one primary;
- sentinels never run on both nodes while they can reach each other;
- every change the primary reported as replicated is byte-identical on the
  secondary; no torn file is ever visible under a real name, and no temporary
  file is left once replication is done;
- no change made on an acting primary is lost (it is on the winner, was
  knowingly overwritten later, or is kept as a conflict);
- epochs never decrease; every promotion produced exactly one ``promoted`` alert.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from content import is_unfinished_write, version_of
from netlab import Host, NetLab, alerts_of

from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX

Status = dict[str, Any]

#: How long two primaries (or a missing one) must persist outside every fault
#: window before it counts: two status polls are not one atomic look.
PERSIST = 0.5


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Window:
    """A fault from ``began`` until ``ended`` (None: still on), plus the time to recover."""

    kind: str
    began: float
    ended: float | None = None
    grace: float = 0.0

    def covers(self, at: float) -> bool:
        end = math.inf if self.ended is None else self.ended + self.grace
        return self.began <= at <= end


@dataclass
class Op:
    """One change the workload made on an acting primary."""

    at: float
    node: str
    path: str
    kind: str  # "write" or "delete"
    digest: str | None  # of the new content (None for a delete)
    base: str | None  # of the content it replaced (None: there was none)
    stray: bool | None = None  # made while the node ran no sentinels (None: not asked yet)


@dataclass
class Violation:
    at: float
    invariant: str
    detail: str

    def __str__(self) -> str:
        when = time.strftime("%H:%M:%S", time.gmtime(self.at))
        return f"{when} [{self.invariant}] {self.detail}"


def read_tree(folder: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file below ``folder`` but sbs's temporary files."""
    found: dict[str, bytes] = {}
    for current, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(STAGING_PREFIX)]  # a new folder, filling
        for name in names:
            if name.startswith(TEMP_PREFIX):
                continue
            path = Path(current, name)
            try:
                found[path.relative_to(folder).as_posix()] = path.read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue  # replaced while listed
    return found


def temp_files(folder: Path) -> list[str]:
    return sorted(
        str(Path(current, name).relative_to(folder))
        for current, _dirs, names in os.walk(folder)
        for name in names
        if name.startswith(TEMP_PREFIX) or STAGING_PREFIX in current
    )


def conflict_digests(lab: NetLab) -> set[str]:
    """Digests of every copy either node kept aside as a conflict."""
    found: set[str] = set()
    for host in lab:
        for current, _dirs, names in os.walk(host.node.state_dir / "conflicts"):
            for name in names:
                if name == "conflict.json":
                    continue
                try:
                    found.add(digest(Path(current, name).read_bytes()))
                except FileNotFoundError:
                    continue
    return found


def is_primary(st: Status | None) -> bool:
    return st is not None and st.get("role") == "primary" and not st.get("handing_over")


@dataclass
class Checker:
    """Polls both nodes in a thread and records violations; the soak adds what it knows."""

    lab: NetLab
    poll_interval: float = 0.1
    violations: list[Violation] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    #: node -> the latest status seen (None: not answering).
    latest: dict[str, Status | None] = field(default_factory=dict)
    #: pid of a sentinel run -> when it was first seen dead (runs with no stop marker).
    seen_dead: dict[int, float] = field(default_factory=dict)
    polls: int = 0
    #: copies of the churn file seen midway through an in-place write (not a violation).
    unfinished_copies: int = 0
    #: the node whose churn file is being rewritten in place right now (soak sets it).
    churning: str | None = None
    #: workload writes made on a node whose sentinels were not running (see app_was_running).
    stray_writes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-checker", daemon=True)
        self._epochs: dict[str, int] = {}
        self._odd_since: float | None = None
        self._odd_reported = False
        self._torn_reported: set[tuple[str, str, str]] = set()
        self._next_tree_check = 0.0

    # -- life

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def violation(self, invariant: str, detail: str) -> None:
        with self._lock:
            self.violations.append(Violation(time.time(), invariant, detail))

    # -- what the soak tells it

    def open_window(self, kind: str, grace: float) -> Window:
        window = Window(kind, time.time(), grace=grace)
        with self._lock:
            self.windows.append(window)
        return window

    def close_window(self, window: Window) -> None:
        window.ended = time.time()

    def in_window(self, at: float) -> bool:
        with self._lock:
            return any(w.covers(at) for w in self.windows)

    def record(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def app_was_running(self, node: str, at: float) -> bool:
        """Whether ``node`` ran its sentinels at ``at``: what makes a write an application's.

        The workload picks a node from the last status polled, which may be
        up to one poll old: a write can land on a node that has just yielded
        (its sentinels stopped, its final cycle sent). Such a write is no
        change of an acting primary; it must still never vanish unkept.
        """
        now = time.time()
        for run in self.lab.runs():
            if run["node"] != node or run["start"] > at:
                continue
            end = run["stop"] if run["stop"] is not None else self.seen_dead.get(run["pid"], now)
            if at <= float(end):
                return True
        return False

    def primaries(self) -> list[str]:
        with self._lock:
            return [n for n, st in self.latest.items() if is_primary(st)]

    # -- the polling thread

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._poll()
            except Exception as exc:  # a checker bug must show, not end the soak silently
                self.violation("checker", f"the checker failed: {exc!r}")
            self._stop.wait(max(0.0, self.poll_interval - (time.monotonic() - began)))

    def _poll(self) -> None:
        now = time.time()
        statuses = {h.name: h.node.status(timeout=0.5) for h in self.lab}
        with self._lock:
            self.latest = statuses
            self.polls += 1
        for name, st in statuses.items():
            if st is None:
                continue
            epoch = int(st["epoch"])
            before = self._epochs.get(name)
            if before is not None and epoch < before:
                self.violation("epochs never decrease", f"{name}: epoch {before} -> {epoch}")
            self._epochs[name] = max(epoch, before or 0)
        self._check_roles(statuses, now)
        self._note_deaths(now)
        if time.monotonic() >= self._next_tree_check:
            self._next_tree_check = time.monotonic() + 0.5
            for host in self.lab:
                self._check_whole(host)

    def _check_roles(self, statuses: dict[str, Status | None], now: float) -> None:
        """Outside every fault window both nodes answer, and exactly one is primary."""
        if self.in_window(now) or any(st is None for st in statuses.values()):
            self._odd_since = None
            self._odd_reported = False
            return
        primaries = [n for n, st in statuses.items() if is_primary(st)]
        both_running = [
            n for n, st in statuses.items() if st is not None and st.get("active_sentinels")
        ]
        odd = len(primaries) != 1 or len(both_running) > 1
        if not odd:
            self._odd_since = None
            self._odd_reported = False
            return
        if self._odd_since is None:
            self._odd_since = now
        elif now - self._odd_since >= PERSIST and not self._odd_reported:
            self._odd_reported = True
            self.violation(
                "exactly one primary when healthy",
                f"primaries {primaries}, sentinels active on {both_running}, for "
                f"{now - self._odd_since:.2f} s with no fault going on",
            )

    def _note_deaths(self, now: float) -> None:
        for run in self.lab.runs():
            fresh = run["stop"] is None and run["pid"] not in self.seen_dead
            if fresh and not _pid_alive(run["pid"]):
                self.seen_dead[run["pid"]] = now

    def _check_whole(self, host: Host) -> None:
        """Every file visible under its real name is one whole version.

        The workload and sbs both rename into place. Only the churn fault's file
        is written in place: on either node it may show a moment of that write
        (a prefix of one version), never a mix of two.
        """
        for rel, data in read_tree(host.folder).items():
            if version_of(data) is not None:
                continue
            if rel.startswith("churn") and host.name == self.churning:
                # Read here while the churn rewrites it in place: this reader's own
                # view of a file changing under it, not something sbs wrote.
                continue
            if rel.startswith("churn") and is_unfinished_write(data):
                with self._lock:
                    self.unfinished_copies += 1
                continue
            key = (host.name, rel, digest(data))
            if key not in self._torn_reported:
                self._torn_reported.add(key)
                self.violation(
                    "no partial file visible",
                    f"{host.name}:{rel} is not one whole version ({len(data)} bytes)",
                )

    # -- checks at a quiet moment (workload paused, pair settled)

    def check_replicated(self, primary: Host, secondary: Host, *, timeout: float) -> float | None:
        """Wait until the primary reports everything replicated; then both folders must match.

        ``last_sync_at`` is when a cycle ended, and a cycle that ends after the
        last write may have scanned before it: the report that counts is the
        end of a cycle that began after the last write, i.e. the second
        ``last_sync_at`` past it (cycles run one after the other; a periodic
        full scan runs every ``node.period`` even when nothing changed), with
        ``files_pending`` 0. Returns how long the report took, or None (and a
        violation) if it never came.
        """
        last_write = max((op.at for op in self.ops if op.node == primary.name), default=0.0)
        began = time.monotonic()
        first_end: float | None = None
        while True:
            st = primary.node.status()
            ended = (st or {}).get("last_sync_at") or 0.0
            if st is not None and st["peer_connected"] and ended > last_write:
                if first_end is None:
                    first_end = ended
                elif ended > first_end and st["files_pending"] == 0:
                    break
            if time.monotonic() - began > timeout:
                brief = (
                    None
                    if st is None
                    else {
                        k: st.get(k)
                        for k in (
                            "files_pending",
                            "last_sync_at",
                            "last_sync_error",
                            "peer_connected",
                        )
                    }
                )
                self.violation(
                    "replication completes",
                    f"{primary.name} did not report its changes replicated "
                    f"within {timeout} s: {brief}",
                )
                return None
            time.sleep(0.05)
        took = time.monotonic() - began
        src, dst = read_tree(primary.folder), read_tree(secondary.folder)
        # Strict sync never empties a copy because the primary's folder became empty
        # (an unmounted share looks like that): then the extra files are expected.
        keep_extra = not src
        with self._lock:
            ops = list(self.ops)
        # A stray write on the secondary (see app_was_running) is not the primary's
        # to replicate; it stays until the primary changes that file, then is kept.
        strays_here = {
            op.digest
            for op in ops
            if op.node == secondary.name and op.kind == "write" and self._stray(op)
        }
        differ = sorted(
            rel
            for rel in set(src) | set(dst)
            if src.get(rel) != dst.get(rel)
            and not (keep_extra and rel not in src)
            and not (rel in dst and digest(dst[rel]) in strays_here)
        )
        if differ:
            time.sleep(3.0)  # is it late, or lost for good?
            later = read_tree(secondary.folder)
            src_now = read_tree(primary.folder)
            still = [rel for rel in differ if later.get(rel) != src_now.get(rel)]

            def show(rel: str) -> str:
                mine, theirs = src.get(rel), dst.get(rel)
                return (
                    f"{rel} ({primary.name}: {mine and version_of(mine)}, "
                    f"{secondary.name}: {theirs and version_of(theirs)})"
                )

            self.violation(
                "replicated means byte-identical",
                f"{primary.name} reported all replicated (files_pending 0, two cycles ended "
                f"since its last write at {last_write:.3f}), yet "
                f"{len(differ)} files differed on {secondary.name}: "
                + ", ".join(show(rel) for rel in differ[:6])
                + f"; 3 s later {len(still)} still differ",
            )
        for host in (primary, secondary):
            left = temp_files(host.folder)
            if left:
                time.sleep(3.0)  # a file being applied right now, or left behind?
                still = [name for name in temp_files(host.folder) if name in left]
                self.violation(
                    "no temporary file left",
                    f"{host.name}: {left[:8]} once replication was done; "
                    f"{len(still)} still there 3 s later",
                )
        return took

    def check_nothing_lost(self, primary: Host) -> int:
        """Every write is on the winner, was knowingly overwritten since, or is a kept conflict.

        Returns how many writes were checked.
        """
        current = {digest(data) for data in read_tree(primary.folder).values()}
        anywhere = current | {
            digest(data) for host in self.lab for data in read_tree(host.folder).values()
        }
        kept = conflict_digests(self.lab)
        with self._lock:
            ops = list(self.ops)
        replaced = {op.base for op in ops if op.base is not None}
        lost = [
            op
            for op in ops
            if op.kind == "write"
            and op.digest not in current
            and op.digest not in replaced
            and op.digest not in kept
            # A stray write (see app_was_running) may still wait on its node.
            and not (op.digest in anywhere and self._stray(op))
        ]
        for op in lost:
            self.violation(
                "no change lost",
                f"write of {op.path} on {op.node} at {op.at:.3f} is neither on {primary.name},"
                " nor overwritten since, nor kept as a conflict",
            )
        # Reported once: forget them so that the next checkpoint does not repeat them.
        if lost:
            with self._lock:
                self.ops = [op for op in self.ops if op not in lost]
        return sum(1 for op in ops if op.kind == "write")

    def _stray(self, op: Op) -> bool:
        if op.stray is None:
            op.stray = not self.app_was_running(op.node, op.at)
            if op.stray:
                with self._lock:
                    self.stray_writes += 1
        return op.stray

    # -- checks at the end, over the whole run

    def check_sentinel_overlaps(self, *, now: float) -> float:
        """Sentinels on both nodes at once only inside a fault window; the total time of it."""
        runs = self.lab.runs()

        def end(run: dict[str, Any]) -> float:
            if run["stop"] is not None:
                return float(run["stop"])
            return self.seen_dead.get(run["pid"], now)

        busy = {
            node: _union([(r["start"], end(r)) for r in runs if r["node"] == node])
            for node in ("a", "b")
        }
        total = 0.0
        for lo_a, hi_a in busy["a"]:
            for lo_b, hi_b in busy["b"]:
                lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
                if hi <= lo:
                    continue
                total += hi - lo
                outside = _outside(lo, hi, self.windows)
                if outside > 0.05:
                    when = time.strftime("%H:%M:%S", time.gmtime(lo))
                    self.violation(
                        "sentinels never on both while reachable",
                        f"sentinels ran on both nodes from {when} for {hi - lo:.2f} s, "
                        f"{outside:.2f} s of it outside any fault and its recovery time",
                    )
        return total

    def check_alerts(self) -> dict[str, int]:
        """Each promotion (a node starting sentinels with a new epoch) has exactly one alert."""
        promoted = Counter(
            (a["node_name"], int(a["epoch"]))
            for host in self.lab
            for a in alerts_of(host)
            if a["kind"] == "promoted"
        )
        started = {(r["node"], int(r["epoch"])) for r in self.lab.runs()}
        for key in sorted(started):
            if promoted[key] != 1:
                self.violation(
                    "one alert per takeover",
                    f"{key[0]} started sentinels with epoch {key[1]}: "
                    f"{promoted[key]} promoted alerts",
                )
        for key, count in sorted(promoted.items()):
            if count > 1 and key not in started:
                self.violation("one alert per takeover", f"{key}: {count} promoted alerts")
        takeovers = sum(
            1
            for host in self.lab
            for a in alerts_of(host)
            if a["kind"] == "promoted" and a["details"].get("how") == "takeover"
        )
        return {"promotions": len(started), "takeover_alerts": takeovers}


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The same time as ``spans``, as disjoint sorted intervals."""
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _outside(lo: float, hi: float, windows: Iterable[Window]) -> float:
    """How much of [lo, hi] no window covers."""
    spans = sorted((w.began, math.inf if w.ended is None else w.ended + w.grace) for w in windows)
    uncovered, at = 0.0, lo
    for began, ended in spans:
        if ended <= at:
            continue
        if began >= hi:
            break
        if began > at:
            uncovered += began - at
        at = max(at, ended)
        if at >= hi:
            break
    if at < hi:
        uncovered += hi - at
    return uncovered


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
