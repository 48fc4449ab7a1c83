"""Reliability under load: heartbeats while replicating, and a rogue client flooding the port.

Two runs of a real pair of ``sbs run`` processes on loopback, both with
``heartbeat_interval = 0.2`` and ``dead_time = 1.0`` (a silence of one second is a
dead peer, so any stall of a node's event loop shows up as a false takeover):

1. heartbeats under load: a holds the "large" data set of ``bench/replication.py``
   (4 files of 256 MiB, fixed seed) in its replicated folder; b joins, and for
   ``--minutes`` the files are rewritten in place on a, one after the other, each
   as soon as b has applied the previous one. Recorded: role and epoch changes
   (false takeovers), losses of the connection, the longest heartbeat gap
   (``peer.longest_silence`` on both nodes), the slowest status answer, and the
   bytes replicated;
2. rogue client: while the pair is connected, a separate process opens
   ``--rate`` connections per second (default 1,000) to a's peer port from
   127.0.0.3 for ``--flood-seconds``, and sends each nothing, garbage, a hostile
   frame header or half a handshake before resetting it. Recorded: the longest
   heartbeat gap, takeovers, the RSS of both nodes sampled every half second
   (before, during, after), the connection rate achieved, and the lines a wrote
   to its log about the refusals.

Usage: ``python bench/reliability_load.py [--minutes 10] [--flood-seconds 30]
[--output docs/reliability.md]``; the section "## Bad input and load" of the
output is rewritten (other sections are left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import multiprocessing
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from benchdoc import interpreter, load_line, machine_line, replace_section, revision
from replication import MIB, Noise, data_set, generate

from sbs_core.lab import HOSTS, NodeProcess, Pair, is_primary

HEARTBEAT_INTERVAL = 0.2
DEAD_TIME = 1.0
FOLDERS = '\n[[folders]]\npath = "data"\n'
HEADING = "## Bad input and load"
# The hand-written part of the section (the fuzzing figures) survives a rewrite.
KEEP = "### Fuzzing"
INTRO = "# Reliability\n"
ROGUE_HOST = "127.0.0.3"
# Status requests go through the node's event loop: often enough to catch a
# role change, rarely enough that polling is no load of its own.
POLL = 0.5
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# An applied rewrite of a 256 MiB file normally takes seconds; far above that,
# the churn moves on to the next file (and the run says so).
APPLY_TIMEOUT = 180.0
# Before and after the flood: the baseline and the recovery of memory.
QUIET_SECONDS = 5.0
# A connection the node has not accepted within this time is given up.
ROGUE_PENDING = 0.5
ROGUE_MAX_OPEN = 256
# The gap allowed between two heartbeats: one interval plus a scheduling allowance.
TARGET_GAP = HEARTBEAT_INTERVAL + 0.3
REFUSAL_MARKERS = ("refused a connection", "broke the protocol")


class RunFailed(Exception):
    """A run that did not reach the state it measures."""


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------- looking at nodes


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RunFailed(f"no VmRSS for pid {pid}")


def log_lines(node: NodeProcess, markers: Sequence[str]) -> int:
    try:
        text = node.log.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if any(m in line for m in markers))


@dataclass
class Watch:
    """What the polls of both nodes saw: role changes, connection losses, gaps, latencies."""

    start: dict[str, tuple[str, int]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    disconnected_polls: int = 0
    unanswered_polls: int = 0
    polls: int = 0
    longest_gap: dict[str, float] = field(default_factory=lambda: {"a": 0.0, "b": 0.0})
    slowest_status: float = 0.0
    last: dict[str, dict[str, Any]] = field(default_factory=dict)

    def poll(self, pair: Pair) -> None:
        self.polls += 1
        for node in pair:
            began = time.monotonic()
            st = node.status(timeout=5.0)
            self.slowest_status = max(self.slowest_status, time.monotonic() - began)
            if st is None:
                self.unanswered_polls += 1
                if not node.alive:
                    raise RunFailed(f"node {node.name} exited; log:\n{node.log_tail(15)}")
                continue
            now = (str(st.get("role")), int(st.get("epoch") or 0))
            self.start.setdefault(node.name, now)
            last = self.last.get(node.name)
            before = (str(last.get("role")), int(last.get("epoch") or 0)) if last else now
            if now != before:
                self.changes.append(f"{node.name}: {before[0]}/{before[1]} -> {now[0]}/{now[1]}")
            self.last[node.name] = st
            if not st.get("peer_connected"):
                self.disconnected_polls += 1
            peer = st.get("peer") or {}
            gap = float(peer.get("longest_silence") or 0.0)
            self.longest_gap[node.name] = max(self.longest_gap[node.name], gap)

    @property
    def takeovers(self) -> int:
        """Epoch raises seen on either node: each is a promotion that should not have been."""
        raised = 0
        for name, (_, epoch) in self.start.items():
            now = self.last.get(name, {})
            raised += max(0, int(now.get("epoch") or 0) - epoch)
        return raised

    @property
    def gap(self) -> float:
        return max(self.longest_gap.values())


def promotions_logged(pair: Pair) -> int:
    """Promotions after the start-up one: b never should, a did once, at its start."""
    return max(0, log_lines(pair.a, ("] promoted: ",)) - 1) + log_lines(pair.b, ("] promoted: ",))


def start_pair(pair: Pair) -> None:
    pair.a.start()
    pair.a.wait_for("primary", is_primary, timeout=START_TIMEOUT, poll=0.05)
    pair.b.start()
    pair.b.wait_for(
        "connected secondary",
        lambda st: st.get("role") == "secondary" and bool(st.get("peer_connected")),
        timeout=START_TIMEOUT,
        poll=0.05,
    )


def stop_pair(pair: Pair) -> None:
    # b first: stopping the primary first would hand the role over.
    pair.b.stop(STOP_TIMEOUT)
    pair.a.stop(STOP_TIMEOUT)


# ---------------------------------------------------------------------- 1. heartbeats under load


@dataclass
class LoadResult:
    seconds: float = 0.0
    rewrites: int = 0
    rewrites_applied: int = 0
    bytes_written: int = 0
    bytes_replicated: int = 0
    files_replicated: int = 0
    watch: Watch = field(default_factory=Watch)
    promotions: int = 0
    loads: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Churn(threading.Thread):
    """Rewrites a's large files in place, one at a time, each once b applied the last one."""

    def __init__(self, src: Path, files: Sequence[str], applied: Callable[[], int]) -> None:
        super().__init__(daemon=True, name="churn")
        self.src = src
        self.files = list(files)
        self.applied = applied
        self.stop = threading.Event()
        self.rewrites = 0
        self.confirmed = 0
        self.bytes_written = 0
        self.timeouts = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                rel = self.files[self.rewrites % len(self.files)]
                before = self.applied()
                self._rewrite(self.src / rel, self.rewrites)
                self.rewrites += 1
                deadline = time.monotonic() + APPLY_TIMEOUT
                while not self.stop.is_set() and self.applied() <= before:
                    if time.monotonic() > deadline:
                        self.timeouts += 1
                        break
                    time.sleep(0.1)
                else:
                    if self.applied() > before:
                        self.confirmed += 1
        except BaseException as exc:  # reported by the main thread, which owns the run
            self.error = exc

    def _rewrite(self, path: Path, round_: int) -> None:
        noise = Noise(round_, f"churn:{path.name}")
        size = path.stat().st_size
        # In place, as an application saving over its file: the sender may well
        # read it half-written, and must notice and send it again.
        with open(path, "r+b") as f:
            left = size
            while left > 0 and not self.stop.is_set():
                step = min(MIB, left)
                f.write(noise.take(step))
                left -= step
                self.bytes_written += step
            f.flush()
            os.fdatasync(f.fileno())


def heartbeats_under_load(work: Path, minutes: float) -> LoadResult:
    ds = data_set("large")
    res = LoadResult()
    need = 2 * ds.total + 512 * MIB
    free = shutil.disk_usage(work).free
    if free < need:
        raise RunFailed(f"{free // MIB} MiB free in {work}, {need // MIB} MiB needed")
    root = work / "load"
    pair = Pair(
        root,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        dead_time=DEAD_TIME,
        extra=FOLDERS,
    )
    src = root / "a" / "data"
    began = time.monotonic()
    generate(ds, src)
    say(f"  generated {ds.count} x {ds.files[0][1] // MIB} MiB in {time.monotonic() - began:.1f} s")
    watch = res.watch
    latest: dict[str, int] = {"files": 0}
    churn = Churn(src, [rel for rel, _ in ds.files], lambda: latest["files"])
    try:
        start_pair(pair)
        began = time.monotonic()
        first = pair.b.status(timeout=5.0) or {}
        base_bytes = int(first.get("bytes_received") or 0)
        base_files = int(first.get("files_received") or 0)
        # The initial copy of the whole set is the first load; the churn follows it.
        churn_started = False
        end = began + minutes * 60
        next_report = began + 60
        while time.monotonic() < end:
            watch.poll(pair)
            b = watch.last.get("b", {})
            latest["files"] = int(b.get("files_received") or 0)
            if not churn_started and latest["files"] - base_files >= ds.count:
                say(f"  initial copy done after {time.monotonic() - began:.1f} s; churn starts")
                churn.start()
                churn_started = True
            if churn.error is not None:
                raise RunFailed(f"the churn failed: {churn.error!r}")
            if time.monotonic() >= next_report:
                next_report += 60
                res.loads.append(os.getloadavg()[0])
                say(
                    f"  {(time.monotonic() - began) / 60:.0f} min: rewrites {churn.rewrites}, "
                    f"replicated {(int(b.get('bytes_received') or 0) - base_bytes) / MIB:.0f} "
                    f"MiB, longest gap a {watch.longest_gap['a']:.3f} s b "
                    f"{watch.longest_gap['b']:.3f} s, changes {watch.changes or 'none'}, "
                    f"{load_line()}"
                )
            time.sleep(POLL)
        res.seconds = time.monotonic() - began
        churn.stop.set()
        churn.join(60)
        watch.poll(pair)
        b = watch.last.get("b", {})
        res.bytes_replicated = int(b.get("bytes_received") or 0) - base_bytes
        res.files_replicated = int(b.get("files_received") or 0) - base_files
        res.rewrites = churn.rewrites
        res.rewrites_applied = churn.confirmed
        res.bytes_written = churn.bytes_written
        res.promotions = promotions_logged(pair)
        if not churn_started:
            res.notes.append("the initial copy did not finish within the run: no rewrites")
        if churn.timeouts:
            res.notes.append(f"{churn.timeouts} rewrites not applied within {APPLY_TIMEOUT:g} s")
        if res.bytes_replicated > ds.total + res.bytes_written:
            res.notes.append(
                "more bytes were replicated than written: a file read while it was being "
                "rewritten is sent torn, found torn by its digest, and sent again"
            )
    finally:
        churn.stop.set()
        try:
            stop_pair(pair)
        finally:
            pair.close()
            shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------- 2. rogue client


def hostile_payload(rnd: random.Random, index: int) -> bytes:
    """What a rogue connection sends: each kind of nonsense in turn."""
    kind = index % 5
    if kind == 0:
        return b""  # connect and reset: the cheapest attack
    if kind == 1:
        return rnd.randbytes(rnd.randint(1, 512))
    if kind == 2:
        # A well-formed header announcing an absurd length, a different one each time.
        return struct.pack(">2sBBI", b"SB", 1, 0, rnd.randint(4097, 2**32 - 1))
    if kind == 3:
        return struct.pack(">2sBBI", b"SB", 1, 0, 100) + b'{"type":"chal'  # half a frame
    return b"GET / HTTP/1.1\r\nHost: sbs\r\n\r\n"


def rogue(out: Connection, *, host: str, port: int, rate: float, seconds: float, seed: int) -> None:
    """Open ``rate`` connections a second for ``seconds``; send the counts through ``out``.

    Runs in its own process, so the flood never competes with the bench's own
    polling for the interpreter lock. Every socket is reset on close (linger 0):
    no TIME_WAIT, so 30,000 connections do not run out of local ports.
    """
    rnd = random.Random(seed)
    linger = struct.pack("ii", 1, 0)
    pending: dict[socket.socket, float] = {}
    counts = {"attempts": 0, "connected": 0, "not_accepted": 0, "errors": 0, "max_open": 0}
    interval = 1.0 / rate
    began = time.monotonic()
    end = began + seconds
    next_at = began

    def close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()

    while True:
        now = time.monotonic()
        if now >= end:
            break
        while next_at <= now and len(pending) < ROGUE_MAX_OPEN:
            next_at += interval
            counts["attempts"] += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((ROGUE_HOST, 0))
                code = sock.connect_ex((host, port))
            except OSError:
                code = -1
            if code in (0, errno.EINPROGRESS):
                pending[sock] = now + ROGUE_PENDING
            else:
                counts["errors"] += 1
                close(sock)
        if next_at <= now:
            next_at = now + interval  # too many open: the rate drops, and the count shows it
        counts["max_open"] = max(counts["max_open"], len(pending))
        wait = max(0.0, min(next_at - time.monotonic(), 0.01))
        _, writable, _ = select.select([], list(pending), [], wait) if pending else ([], [], [])
        if not pending and wait:
            time.sleep(wait)
        for sock in writable:
            del pending[sock]
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                counts["errors"] += 1
            else:
                counts["connected"] += 1
                payload = hostile_payload(rnd, counts["connected"])
                if payload:
                    with contextlib.suppress(OSError):
                        sock.send(payload)
            close(sock)
        now = time.monotonic()
        for sock, deadline in list(pending.items()):
            if deadline <= now:
                del pending[sock]
                counts["not_accepted"] += 1
                close(sock)
    for sock in pending:
        counts["not_accepted"] += 1
        close(sock)
    counts["elapsed_ms"] = round((time.monotonic() - began) * 1000)
    out.send(counts)
    out.close()


@dataclass
class FloodResult:
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    watch: Watch = field(default_factory=Watch)
    gap_before: float = 0.0
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    refusal_lines: int = 0
    refusal_text: list[str] = field(default_factory=list)
    log_lines: int = 0
    promotions: int = 0
    notes: list[str] = field(default_factory=list)

    def memory(self, name: str) -> tuple[int, int, int]:
        """(before the flood, after the quiet period that follows it, the most at any time)."""
        samples = self.rss[name]
        return samples[0][1], samples[-1][1], max(v for _, v in samples)


def refusals(node: NodeProcess) -> list[str]:
    """The refusal lines of ``node``'s log, without their time stamps."""
    try:
        text = node.log.read_text(errors="replace")
    except OSError:
        return []
    lines = [ln for ln in text.splitlines() if any(m in ln for m in REFUSAL_MARKERS)]
    return [ln.split(" sbs: ", 1)[-1] for ln in lines]


def all_log_lines(node: NodeProcess) -> int:
    try:
        return len(node.log.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def rogue_client(work: Path, seconds: float, rate: float) -> FloodResult:
    res = FloodResult()
    root = work / "flood"
    pair = Pair(root, heartbeat_interval=HEARTBEAT_INTERVAL, dead_time=DEAD_TIME)
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=rogue,
        args=(sender,),
        kwargs={"host": HOSTS[0], "port": pair.port, "rate": rate, "seconds": seconds, "seed": 7},
        daemon=True,
    )
    watch = res.watch
    try:
        start_pair(pair)
        res.rss = {n.name: [] for n in pair}

        def sample(phase_end: float) -> None:
            while time.monotonic() < phase_end:
                watch.poll(pair)
                for node in pair:
                    res.rss[node.name].append((time.monotonic(), rss(node.pid)))
                time.sleep(POLL)

        sample(time.monotonic() + QUIET_SECONDS)
        res.gap_before = watch.gap
        refusals_before = log_lines(pair.a, REFUSAL_MARKERS)
        lines_before = all_log_lines(pair.a)
        began = time.monotonic()
        proc.start()
        sample(began + seconds)
        proc.join(seconds + 30)
        res.seconds = time.monotonic() - began
        if not receiver.poll(5):
            raise RunFailed("the rogue client sent no counts")
        res.counts = receiver.recv()
        sample(time.monotonic() + QUIET_SECONDS)
        res.refusal_lines = log_lines(pair.a, REFUSAL_MARKERS) - refusals_before
        res.refusal_text = refusals(pair.a)[refusals_before:]
        res.log_lines = all_log_lines(pair.a) - lines_before
        res.promotions = promotions_logged(pair)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        try:
            stop_pair(pair)
        finally:
            pair.close()
            shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------- the page


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def load_rows(res: LoadResult) -> list[str]:
    w = res.watch
    takeovers = w.takeovers + res.promotions
    loads = ", ".join(f"{x:.2f}" for x in res.loads) or "—"
    return [
        "| figure | value | target | met? |",
        "|---|---|---|---|",
        f"| run length | {res.seconds / 60:.1f} min | as asked | — |",
        f"| false takeovers (epoch raises; promotions in the logs) | {w.takeovers}; "
        f"{res.promotions} | 0 | {yes(takeovers == 0)} |",
        f"| role changes seen | {'; '.join(w.changes) or 'none'} | none | {yes(not w.changes)} |",
        f"| polls without a connected peer / unanswered | {w.disconnected_polls} / "
        f"{w.unanswered_polls} of {2 * w.polls} | 0 | "
        f"{yes(w.disconnected_polls == 0 and w.unanswered_polls == 0)} |",
        f"| longest heartbeat gap (a hears b; b hears a) | {w.longest_gap['a']:.3f} s; "
        f"{w.longest_gap['b']:.3f} s | < {TARGET_GAP:.1f} s (dead_time {DEAD_TIME:g} s) | "
        f"{yes(w.gap < TARGET_GAP)} |",
        f"| slowest status answer | {w.slowest_status:.3f} s | — | — |",
        f"| rewrites of a 256 MiB file on a (applied on b) | {res.rewrites} "
        f"({res.rewrites_applied}) | — | — |",
        f"| written on a by the churn / replicated to b | {mib(res.bytes_written)} / "
        f"{mib(res.bytes_replicated)} ({res.files_replicated} files, initial copy included) "
        "| — | — |",
        f"| 1-min load average, every minute | {loads} | — | — |",
    ]


def flood_rows(res: FloodResult, rate: float) -> list[str]:
    w = res.watch
    c = res.counts
    elapsed = max(1e-9, c.get("elapsed_ms", 0) / 1000)
    takeovers = w.takeovers + res.promotions
    mem = {name: res.memory(name) for name in res.rss}
    flat = all(end - start < 8 * MIB for start, end, _ in mem.values())
    memory = "; ".join(
        f"{name}: {mib(start)} / {mib(top)} / {mib(end)}" for name, (start, end, top) in mem.items()
    )
    return [
        "| figure | value | target | met? |",
        "|---|---|---|---|",
        f"| connection attempts (per second) | {c.get('attempts', 0)} "
        f"({c.get('attempts', 0) / elapsed:.0f}/s) | {rate:.0f}/s for "
        f"{elapsed:.0f} s | {yes(c.get('attempts', 0) / elapsed >= 0.95 * rate)} |",
        f"| accepted by the kernel / not accepted in {ROGUE_PENDING:g} s / errors | "
        f"{c.get('connected', 0)} / {c.get('not_accepted', 0)} / {c.get('errors', 0)} | — | — |",
        f"| false takeovers (epoch raises; promotions in the logs) | {w.takeovers}; "
        f"{res.promotions} | 0 | {yes(takeovers == 0)} |",
        f"| polls without a connected peer / unanswered | {w.disconnected_polls} / "
        f"{w.unanswered_polls} of {2 * w.polls} | 0 | "
        f"{yes(w.disconnected_polls == 0 and w.unanswered_polls == 0)} |",
        f"| longest heartbeat gap before the flood | {res.gap_before:.3f} s | — | — |",
        f"| longest heartbeat gap, whole run (a hears b; b hears a) | "
        f"{w.longest_gap['a']:.3f} s; {w.longest_gap['b']:.3f} s | < {TARGET_GAP:.1f} s | "
        f"{yes(w.gap < TARGET_GAP)} |",
        f"| slowest status answer | {w.slowest_status:.3f} s | — | — |",
        f"| RSS before / most / {QUIET_SECONDS:g} s after | {memory} | growth < 8 MiB | "
        f"{yes(flat)} |",
        f"| lines a logged about refusals (all lines) | {res.refusal_lines} "
        f"({res.log_lines}) | a few | {yes(res.refusal_lines <= 10)} |",
    ]


def method(minutes: float, seconds: float, rate: float) -> list[str]:
    return [
        *textwrap.wrap(
            "Both runs use a fresh pair of `sbs run` processes (`lab.Pair`: a on 127.0.0.1, "
            f"b on 127.0.0.2) with heartbeat_interval {HEARTBEAT_INTERVAL:g} s and dead_time "
            f"{DEAD_TIME:g} s; both nodes' status is polled every {POLL:g} s. A false "
            "takeover is an epoch raised on either node or a promotion in a log; the "
            "heartbeat gap is the status field `peer.longest_silence` (the longest wait "
            "between two control messages from the peer on the connection), highest value "
            "seen.",
            80,
        ),
        "",
        *textwrap.wrap(
            f"Heartbeats under load ({minutes:g} min): a holds the 'large' data set of "
            "`bench/replication.py` (4 files of 256 MiB, incompressible, fixed seed) in its "
            '`[[folders]] path = "data"`; b joins empty and copies it; then the four files '
            "are rewritten in place on a (new content, flushed with fdatasync), one after "
            "the other, each as soon as b's `files_received` shows the previous one "
            "applied, until the time is up. a hashes each file while it is being "
            "rewritten and sends it again; b writes, flushes and renames.",
            80,
        ),
        "",
        *textwrap.wrap(
            f"Rogue client ({seconds:g} s): a separate process opens {rate:.0f} TCP "
            f"connections a second from {ROGUE_HOST} to a's peer port (at most "
            f"{ROGUE_MAX_OPEN} open at once; one not accepted within {ROGUE_PENDING:g} s "
            "is dropped) and sends each, in turn, nothing, 1-512 random bytes, a frame "
            "header announcing a different absurd length, half a handshake frame, or an "
            "HTTP request, then resets it. RSS (VmRSS) of both node processes is sampled "
            f"every {POLL:g} s, from {QUIET_SECONDS:g} s before the flood to "
            f"{QUIET_SECONDS:g} s after it.",
            80,
        ),
    ]


def section(
    load: LoadResult | None,
    flood: FloodResult | None,
    failures: Sequence[str],
    *,
    command: str,
    machine: str,
    when: str,
    loads: str,
    minutes: float,
    seconds: float,
    rate: float,
) -> str:
    lines = [
        HEADING,
        "",
        f"Measured {when} on {machine}; {loads}; {revision()}.",
        "",
        f"Command: `{command}`",
        "",
        *method(minutes, seconds, rate),
        "",
    ]
    if load is not None:
        lines += ["### Heartbeats under load", "", *load_rows(load), ""]
        lines += [f"- {n}" for n in load.notes]
        lines += [""] if load.notes else []
    if flood is not None:
        lines += ["### Rogue client on the peer port", "", *flood_rows(flood, rate), ""]
        lines += [f"- {n}" for n in flood.notes]
        if flood.refusal_text:
            lines += ["", "What a logged about the flood:", "", "```"]
            lines += [textwrap.shorten(t, 160) for t in flood.refusal_text[:5]]
            lines += ["```"]
        lines += [""]
    lines += [f"- FAILED {f}" for f in failures]
    # Parts that end with a blank line meet parts that start with one.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def _on_term(signum: int, frame: FrameType | None) -> None:
    # Turns a polite kill into an exception, so every cleanup below still runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="heartbeats-under-load run")
    parser.add_argument("--flood-seconds", type=float, default=30.0, help="rogue-client run")
    parser.add_argument("--rate", type=float, default=1000.0, help="rogue connections per second")
    parser.add_argument("--skip", choices=("load", "flood"), help="leave one of the runs out")
    parser.add_argument("--output", type=Path, help=f"write the '{HEADING}' section here")
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.flood_seconds <= 0 or args.rate <= 0:
        parser.error("--minutes, --flood-seconds and --rate must be positive")

    command = shlex.join([interpreter(), sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    machine = machine_line()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    signal.signal(signal.SIGTERM, _on_term)
    load_before = load_line()
    say(f"machine: {machine}; {load_before}")
    say(f"command: {command}")
    work = Path(tempfile.mkdtemp(prefix="sbs-bench-reliability-", dir=args.workdir))
    load: LoadResult | None = None
    flood: FloodResult | None = None
    failures: list[str] = []
    try:
        if args.skip != "flood":
            say(f"\nrogue client: {args.rate:.0f}/s for {args.flood_seconds:g} s")
            try:
                flood = rogue_client(work, args.flood_seconds, args.rate)
            except (RunFailed, TimeoutError) as exc:
                failures.append(f"rogue client: {exc}")
            if flood is not None:
                for row in flood_rows(flood, args.rate)[2:]:
                    say("  " + row)
        load_flood = load_line()
        if args.skip != "load":
            say(f"\nheartbeats under load: {args.minutes:g} min")
            try:
                load = heartbeats_under_load(work, args.minutes)
            except (RunFailed, TimeoutError) as exc:
                failures.append(f"heartbeats under load: {exc}")
            if load is not None:
                for row in load_rows(load)[2:]:
                    say("  " + row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads = f"before: {load_before}; after the flood: {load_flood}; at the end: {load_line()}"
    say(f"\n{loads}")
    for failure in failures:
        say(f"FAILED {failure}")
    if args.output is not None:
        text = section(
            load,
            flood,
            failures,
            command=command,
            machine=machine,
            when=when,
            loads=loads,
            minutes=args.minutes,
            seconds=args.flood_seconds,
            rate=args.rate,
        )
        replace_section(args.output, HEADING, text, intro=INTRO, keep=KEEP)
        say(f"wrote the '{HEADING}' section of {args.output}")
    bad = bool(failures)
    if load is not None:
        bad |= load.watch.takeovers + load.promotions > 0 or bool(load.watch.changes)
    if flood is not None:
        bad |= flood.watch.takeovers + flood.promotions > 0 or bool(flood.watch.changes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
