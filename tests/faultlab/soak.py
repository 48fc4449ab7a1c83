"""The chaos soak: the pair under a seeded random schedule of faults, with a workload and a checker.

    python tests/faultlab/soak.py --seed 7 --minutes 30 --output docs/reliability.md

Two namespaces, a real ``sbs run`` in each (see ``netlab.py``). A workload
writes, changes and deletes files on whichever node is primary; the schedule
(drawn from ``--seed``) injects one fault at a time, holds it, heals it, and
then checks at a quiet moment that the pair settled and replicated everything.
The checker (``invariants.py``) polls both nodes all along. At the end it
prints the seed, the faults injected, the takeover times (p50, p99, max) and
every violation; the exit status is 1 when there was one.

The schedule is reproducible from the seed; the timing of two processes on a
busy machine is not, so two runs with one seed inject the same faults with the
same hold times but need not see the same takeovers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from content import make_content, write_atomically, write_in_place
from invariants import Checker, Op, Window, digest
from netlab import (
    Host,
    NetLab,
    Timings,
    clear_faults,
    disk_space,
    drop_from_peer,
    fill_disk,
    flaky_link,
    hang,
    link_down,
    link_up,
    resume,
    sigkill,
    simultaneous_start,
    slow_link,
)
from scenarios import settled, start_pair

#: Start-up of a node and the exit of its sentinels on a loaded 2-core machine.
MARGIN = 1.0
VOLUME_KIB = 64 << 10
ANALYSIS_HEADING = "### What the violations are"
# Most files share four folders; a few have a folder each, which the workload
# removes with the file, so folders keep appearing on the primary (each one a
# new watch for its file watcher, see sbs_core.sync.watch).
NAMES = tuple(f"d{i % 4}/f{i:02d}.txt" for i in range(40)) + tuple(
    f"own{i}/f.txt" for i in range(6)
)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-share * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass
class Injected:
    kind: str
    detail: str
    began: float
    hold: float
    takeover: float | None = None
    settle: float | None = None


@dataclass
class SoakResult:
    seed: int
    minutes: float
    injected: list[Injected] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    writes: int = 0
    deletes: int = 0
    checkpoints: int = 0
    sentinel_overlap: float = 0.0
    promotions: int = 0
    takeover_alerts: int = 0
    elapsed: float = 0.0
    load_at_start: str = ""
    unfinished_copies: int = 0
    stray_writes: int = 0

    def takeovers(self, kind: str | None = None) -> list[float]:
        return [
            i.takeover
            for i in self.injected
            if i.takeover is not None and (kind is None or i.kind == kind)
        ]

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            return {
                "count": len(values),
                "p50": statistics.median(values),
                "p99": percentile(values, 0.99),
                "max": max(values),
            }

        kinds = sorted({i.kind for i in self.injected})
        return {
            "seed": self.seed,
            "minutes": self.minutes,
            "elapsed": self.elapsed,
            "faults": dict(Counter(i.kind for i in self.injected)),
            "takeover": stats(self.takeovers()),
            "takeover_by_fault": {k: stats(self.takeovers(k)) for k in kinds},
            "settle": stats([i.settle for i in self.injected if i.settle is not None]),
            "writes": self.writes,
            "deletes": self.deletes,
            "checkpoints": self.checkpoints,
            "promotions": self.promotions,
            "takeover_alerts": self.takeover_alerts,
            "sentinel_overlap": self.sentinel_overlap,
            "unfinished_copies": self.unfinished_copies,
            "stray_writes": self.stray_writes,
            "violations": self.violations,
        }


class Workload:
    """Writes, changes and deletes files on an acting primary, and tells the checker."""

    def __init__(self, lab: NetLab, checker: Checker, seed: int) -> None:
        self.lab = lab
        self.checker = checker
        self.rng = random.Random(seed)
        self.allowed = threading.Event()
        self.allowed.set()
        self.busy = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-workload", daemon=True)
        self.writes = self.deletes = 0
        self._seq = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.allowed.set()
        self._thread.join(10)

    @contextlib.contextmanager
    def paused(self) -> Any:
        self.allowed.clear()
        with self.busy:
            pass  # the change in progress is finished
        try:
            yield
        finally:
            self.allowed.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.allowed.wait()
            with self.busy:
                if self.allowed.is_set() and not self._stop.is_set():
                    try:
                        self._one()
                    except OSError as exc:
                        # A full disk on an acting primary is the operator's problem, not sbs's.
                        self.checker.violation("workload", f"could not change a file: {exc!r}")
                    except Exception as exc:  # a bug shows in this soak, not in a later test
                        self.checker.violation("workload", f"the workload failed: {exc!r}")
            self._stop.wait(self.rng.uniform(0.05, 0.3))

    def _one(self) -> None:
        primaries = sorted(self.checker.primaries())
        if not primaries:
            return
        host = self.lab.hosts[self.rng.choice(primaries)]
        rel = self.rng.choice(NAMES)
        path = host.folder / rel
        try:
            old: bytes | None = path.read_bytes()
        except FileNotFoundError:
            old = None
        base = None if old is None else digest(old)
        if old is not None and self.rng.random() < 0.25:
            path.unlink(missing_ok=True)
            if rel.startswith("own"):
                with contextlib.suppress(OSError):  # not empty: a conflict copy, say
                    path.parent.rmdir()
            self.deletes += 1
            self.checker.record(Op(time.time(), host.name, rel, "delete", None, base))
            return
        self._seq += 1
        data = make_content(f"{host.name}-{self._seq}", self.rng.randint(100, 20_000))
        write_atomically(path, data, scratch=host.scratch)
        self.writes += 1
        self.checker.record(Op(time.time(), host.name, rel, "write", digest(data), base))


class Soak:
    """One soak run; :meth:`run` returns its :class:`SoakResult`."""

    def __init__(
        self,
        *,
        seed: int,
        minutes: float,
        root: Path | None = None,
        timings: Timings | None = None,
        exclude: Iterable[str] = (),
        log: Callable[[str], None] = print,
    ) -> None:
        unknown = sorted(set(exclude) - set(self.FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown}; the faults are {sorted(self.FAULTS)}")
        self.kinds = sorted(set(self.FAULTS) - set(exclude))
        self.seed = seed
        self.minutes = minutes
        self.rng = random.Random(seed)
        self.timings = timings or Timings()
        self.root = root
        self.log = log
        self.result = SoakResult(seed=seed, minutes=minutes)
        self._settled_at = 0.0
        self._since: float | None = None

    # -- the faults: inject, hold, heal; they return a few words on what they did

    def _wait_up(self, host: Host) -> None:
        deadline = time.monotonic() + 20
        while host.node.status() is None:
            if not host.node.alive or time.monotonic() > deadline:
                self.checker.violation(
                    "node starts", f"{host.name} did not come up: {host.node.log_tail(8)}"
                )
                return
            time.sleep(0.05)

    def kill_primary(self, p: Host, s: Host, hold: float) -> str:
        sigkill(p)
        time.sleep(hold)
        p.node.start()
        self._wait_up(p)
        return f"SIGKILL {p.name}, restarted after {hold:.1f} s"

    def kill_secondary(self, p: Host, s: Host, hold: float) -> str:
        sigkill(s)
        time.sleep(hold)
        s.node.start()
        self._wait_up(s)
        return f"SIGKILL {s.name}, restarted after {hold:.1f} s"

    def hang_primary(self, p: Host, s: Host, hold: float) -> str:
        hang(p)
        time.sleep(hold)
        resume(p)
        return f"SIGSTOP {p.name} for {hold:.1f} s"

    def restart_primary(self, p: Host, s: Host, hold: float) -> str:
        p.node.stop(timeout=20)
        time.sleep(hold)
        p.node.start()
        self._wait_up(p)
        return f"planned stop of {p.name}, started after {hold:.1f} s"

    def partition(self, p: Host, s: Host, hold: float) -> str:
        link_down(self.lab)
        time.sleep(hold)
        link_up(self.lab)
        return f"link down {hold:.1f} s"

    def one_way(self, p: Host, s: Host, hold: float) -> str:
        deaf = self.rng.choice([p, s])
        drop_from_peer(self.lab, deaf)
        time.sleep(hold)
        clear_faults(self.lab)
        return f"{deaf.name} deaf to its peer for {hold:.1f} s"

    def flaky(self, p: Host, s: Host, hold: float) -> str:
        loss = self.rng.choice([10, 25, 40])
        flaky_link(self.lab, loss)
        time.sleep(hold)
        clear_faults(self.lab)
        return f"{loss} % loss both ways for {hold:.1f} s"

    def slow(self, p: Host, s: Host, hold: float) -> str:
        rate = self.rng.choice([20, 100, 500])
        slow_link(self.lab, rate)
        time.sleep(hold)
        clear_faults(self.lab)
        return f"link throttled to {rate} kB/s for {hold:.1f} s"

    def churn(self, p: Host, s: Host, hold: float) -> str:
        """A 1 MiB file rewritten in place on the primary while it is being sent."""
        rel = "churn.bin"
        path = p.folder / rel
        began, count = time.monotonic(), 0
        self.checker.churning = p.name
        base: str | None = None
        with contextlib.suppress(FileNotFoundError):
            base = digest(path.read_bytes())
        data = b""
        try:
            while time.monotonic() - began < hold:
                count += 1
                data = make_content(f"churn-{p.name}-{self.seed}-{time.time_ns()}", 1 << 20)
                write_in_place(path, data)
                time.sleep(0.03)
        finally:
            self.checker.churning = None
            self.checker.record(Op(time.time(), p.name, rel, "write", digest(data), base))
        return f"{rel} rewritten in place {count} times on {p.name}"

    def disk_full(self, p: Host, s: Host, hold: float) -> str:
        size = fill_disk(s, spare_kib=16)
        time.sleep(hold)
        disk_space(s, VOLUME_KIB)
        return f"{s.name}'s disk full ({size} KiB) for {hold:.1f} s"

    def both_restart(self, p: Host, s: Host, hold: float) -> str:
        s.node.stop(timeout=20)
        p.node.stop(timeout=20)
        time.sleep(hold)
        self._since = time.time()  # a takeover here runs from the start, not the stops
        simultaneous_start(self.lab)
        self._wait_up(p)
        self._wait_up(s)
        return f"both stopped, started together after {hold:.1f} s"

    def clock_jump(self, p: Host, s: Host, hold: float) -> str:
        host = self.rng.choice([p, s])
        offset = self.rng.choice([3600, 86_400, 30 * 86_400])
        sigkill(host)
        time.sleep(hold)
        self.lab.start_with_clock_offset(host, offset)
        self._wait_up(host)
        return f"{host.name} killed, back with its clocks {offset} s ahead"

    FAULTS: ClassVar[dict[str, Callable[[Soak, Host, Host, float], str]]] = {
        "kill_primary": kill_primary,
        "kill_secondary": kill_secondary,
        "hang_primary": hang_primary,
        "restart_primary": restart_primary,
        "partition": partition,
        "one_way_loss": one_way,
        "flaky_link": flaky,
        "slow_link": slow,
        "files_changing": churn,
        "disk_full": disk_full,
        "simultaneous_start": both_restart,
        "clock_jump": clock_jump,
    }

    # -- the run

    def run(self) -> SoakResult:
        began = time.monotonic()
        self.log(f"soak: seed {self.seed}, {self.minutes} minutes, faults {', '.join(self.kinds)}")
        node_extra = {"strict_sync": True, "max_delete": "100%", "period": 2.0}
        with NetLab(
            self.root,
            timings=self.timings,
            node_extra=node_extra,
            volumes={"a": VOLUME_KIB, "b": VOLUME_KIB},
        ) as lab:
            self.lab = lab
            self.checker = Checker(lab)
            start_pair(lab)
            self.checker.start()
            self.workload = Workload(lab, self.checker, self.seed + 1)
            self.workload.start()
            try:
                self._schedule(began)
            finally:
                self.workload.stop()
                self.checker.stop()
                with contextlib.suppress(Exception):
                    clear_faults(lab)
            self._final()
        self.result.elapsed = time.monotonic() - began
        self.result.writes, self.result.deletes = self.workload.writes, self.workload.deletes
        self.result.violations = [str(v) for v in self.checker.violations]
        self.result.unfinished_copies = self.checker.unfinished_copies
        self.result.stray_writes = self.checker.stray_writes
        return self.result

    def _schedule(self, began: float) -> None:
        deadline = began + self.minutes * 60
        time.sleep(self.rng.uniform(1.0, 3.0))
        while time.monotonic() < deadline:
            kind = self.rng.choice(self.kinds)
            hold = round(self.rng.uniform(0.5, 4.0), 2)
            self._inject(kind, hold)
            time.sleep(self.rng.uniform(1.0, 4.0))  # healthy, with the workload on

    def _inject(self, kind: str, hold: float) -> None:
        lab, t = self.lab, self.timings
        primary = settled(lab)
        if primary is None:
            # The previous checkpoint failed; give the pair one more chance.
            primary = self._settle(None)
            if primary is None:
                return
        p = lab.hosts[primary]
        s = lab.peer_of(p)
        window = self.checker.open_window(kind, grace=t.settle_time + MARGIN)
        at = time.time()
        self._since = None
        try:
            detail = self.FAULTS[kind](self, p, s, hold)
        finally:
            self.checker.close_window(window)
        injected = Injected(kind, detail, at, hold)
        self.result.injected.append(injected)
        winner = self._settle(window)
        injected.settle = None if window.ended is None else self._settled_at - window.ended
        if self._since is not None:  # both nodes started: whichever became primary
            took = [self._takeover(n, self._since) for n in ("a", "b")]
            injected.takeover = min((x for x in took if x is not None), default=None)
        else:
            injected.takeover = self._takeover(s.name, at)
        self.log(
            f"  {time.strftime('%H:%M:%S')} {kind}: {detail}; primary {primary} -> {winner}"
            + (f", takeover {injected.takeover:.2f} s" if injected.takeover is not None else "")
            + (
                f", settled {injected.settle:.2f} s after healing"
                if injected.settle is not None
                else ""
            )
        )
        if winner is not None:
            self._checkpoint(lab.hosts[winner])

    def _settle(self, window: Window | None) -> str | None:
        t = self.timings
        deadline = time.monotonic() + t.settle_time + 20
        while time.monotonic() < deadline:
            primary = settled(self.lab)
            if primary is not None:
                self._settled_at = time.time()
                return primary
            time.sleep(0.05)
        self.checker.violation(
            "one primary after healing",
            f"no settled pair {t.settle_time + 20:.0f} s after "
            f"{window.kind if window else 'the previous fault'}: "
            + "; ".join(f"{h.name}: {h.node.status()}" for h in self.lab),
        )
        for host in self.lab:  # repair what can be repaired, so the soak goes on
            if not host.node.alive:
                host.node.start()
        return None

    def _takeover(self, new: str, since: float) -> float | None:
        """Seconds until ``new`` ran every sentinel after the fault began (None: it did not)."""
        starts: dict[str, float] = {}
        for run in self.lab.runs():
            if run["node"] == new and run["start"] >= since:
                starts.setdefault(run["name"], run["start"])
        if len(starts) < 2:
            return None
        return max(starts.values()) - since

    def _checkpoint(self, primary: Host) -> None:
        secondary = self.lab.peer_of(primary)
        with self.workload.paused():
            self.checker.check_replicated(primary, secondary, timeout=30)
            self.checker.check_nothing_lost(primary)
        self.result.checkpoints += 1

    def _final(self) -> None:
        primary = self._settle(None)
        if primary is not None:
            self._checkpoint(self.lab.hosts[primary])
        time.sleep(1.0)  # the last alerts reach the hook
        self.result.sentinel_overlap = self.checker.check_sentinel_overlaps(now=time.time())
        counts = self.checker.check_alerts()
        self.result.promotions = counts["promotions"]
        self.result.takeover_alerts = counts["takeover_alerts"]


# -- reporting


def _spread(st: dict[str, float]) -> str:
    return f"p50 {st['p50']:.2f} s, p99 {st['p99']:.2f} s, max {st['max']:.2f} s"


def describe(result: SoakResult) -> list[str]:
    s = result.summary()
    lines = [
        f"seed {s['seed']}, {s['minutes']} minutes (ran {s['elapsed'] / 60:.1f})",
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(s["faults"].items())),
        f"workload: {s['writes']} writes, {s['deletes']} deletes; {s['checkpoints']} checkpoints"
        f" (stray writes, on a node just stepped down: {s['stray_writes']})",
        f"promotions {s['promotions']}, takeover alerts {s['takeover_alerts']}; "
        f"sentinels on both nodes {s['sentinel_overlap']:.2f} s in all (inside fault windows)",
    ]
    t = s["takeover"]
    if t:
        lines.append(
            f"takeover after a fault: {t['count']} takeovers, p50 {t['p50']:.2f} s, "
            f"p99 {t['p99']:.2f} s, max {t['max']:.2f} s"
        )
    for kind, st in sorted(s["takeover_by_fault"].items()):
        if st:
            lines.append(f"  {kind}: {st['count']}, " + _spread(st))
    lines.append(f"violations: {len(result.violations)}")
    lines += [f"  {v}" for v in result.violations]
    return lines


def write_doc(result: SoakResult, output: Path, command: str) -> None:
    # bench/ is a folder of scripts, not a package: it joins the path only to write a doc.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from benchdoc import load_line, machine_line, replace_section, revision  # noqa: PLC0415

    s = result.summary()
    rows = [
        "| fault | injected | takeovers | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in sorted(s["faults"]):
        st = s["takeover_by_fault"].get(kind)
        cells = (
            [str(st["count"]), f"{st['p50']:.2f} s", f"{st['p99']:.2f} s", f"{st['max']:.2f} s"]
            if st
            else ["0", "", "", ""]
        )
        rows.append(f"| {kind} | {s['faults'][kind]} | " + " | ".join(cells) + " |")
    t = s["takeover"]
    overall = f"all takeovers: {t['count']}, " + _spread(t) if t else "no takeover happened"
    st = s["settle"]
    settle = (
        "From healing to one primary with a connected secondary: " + _spread(st) + "." if st else ""
    )
    violations = "\n".join(f"- `{v}`" for v in result.violations) or "none"
    overlaps_ok = not any("sentinels never on both" in v for v in result.violations)
    where = (
        "every moment of it inside a fault window (a partition, a hung primary, a one-way "
        f"loss) or the {Timings().settle_time:g} s + {MARGIN:g} s after it"
        if overlaps_ok
        else "partly outside the fault windows: see the violations"
    )
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    excluded = sorted(set(Soak.FAULTS) - set(s["faults"]))
    text = f"""## The chaos soak

Measured {now} on {machine_line()}; at the start: {result.load_at_start}; at the end:
{load_line()}; {revision()}.

Command: `{command}`

Seed {result.seed}, {result.minutes:g} minutes asked, {result.elapsed / 60:.1f} ran;
{len(result.injected)} faults injected, one at a time, each held 0.5 to 4 s
(faults never drawn: {", ".join(excluded) or "none"}). Workload: {result.writes}
writes and {result.deletes} deletes on the acting primary. {result.checkpoints}
checkpoints (workload paused, pair settled, everything the primary reported as
replicated compared byte for byte, nothing lost). Promotions:
{result.promotions}; `promoted` alerts with `how = takeover`:
{result.takeover_alerts}. Sentinels ran on both nodes for
{result.sentinel_overlap:.2f} s in all, {where}. The file rewritten in place
by `files_changing` was seen midway through a write (a prefix of one version,
as on the writer's own disk; never a mix of two) {result.unfinished_copies} times.
Writes the workload made on a node whose sentinels had just stopped (it picks
the node from a status up to one poll old), looked at because they were
missing from the primary: {result.stray_writes}; those count as kept when
they are still on that node or among its conflict copies.

A *takeover* is counted when the node that was secondary when the fault began
runs every sentinel afterwards; its time runs from the injection (for
`simultaneous_start`, from the start of both nodes) to the start of its last
sentinel, as stamped by the sentinel itself.

{chr(10).join(rows)}

{overall}. {settle}

Violations:

{violations}
"""
    intro = (
        "# Reliability\n\nHow sbs behaves under real faults, and the commands that measured it.\n"
    )
    # A hand-written reading of the violations survives the rewrite.
    replace_section(output, "## The chaos soak", text, intro=intro, keep=ANALYSIS_HEADING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--output", type=Path, help="write the section of this Markdown file")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the lab's folder (logs)")
    parser.add_argument(
        "--exclude",
        default="",
        help=f"faults left out, comma-separated (of: {', '.join(sorted(Soak.FAULTS))})",
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sbs-soak-")) if args.keep else None
    exclude = [k for k in args.exclude.split(",") if k]
    soak = Soak(seed=args.seed, minutes=args.minutes, root=root, exclude=exclude)
    one, five, _ = os.getloadavg()
    result = soak.run()
    result.load_at_start = f"load average {one:.2f} (1 min), {five:.2f} (5 min)"
    print("\n".join(describe(result)))
    if root is not None:
        print(f"lab folder kept: {root}")
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    if args.output:
        command = f"python tests/faultlab/soak.py --seed {args.seed} --minutes {args.minutes:g}"
        if exclude:
            command += f" --exclude {','.join(exclude)}"
        write_doc(result, args.output, command + f" --output {args.output}")
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
