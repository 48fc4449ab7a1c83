"""Failover benchmark: how fast a real pair of ``sbs run`` processes changes hands.

Every run starts a fresh pair (``lab.Pair``: nodes a on 127.0.0.1 and b on
127.0.0.2, same port, a fresh temporary folder) whose two sentinels are
``lab.marker_sentinel`` processes, so the moment a sentinel really runs is read
from the file it writes, not from the node's own account of it. Then it injects
one fault and measures, with wall-clock times taken in this process and in the
sentinels (one machine, one clock):

1. primary killed (SIGKILL): kill -> b's sentinels running, and -> b's status says primary;
2. primary hung (SIGSTOP): stop -> b's sentinels running; a's sentinels after SIGCONT;
3. planned stop (SIGTERM): signal -> b's sentinels running, and the stop/start gap;
4. simultaneous start in ``auto``: first start -> one primary with its sentinels
   running and a connected secondary.

Usage: ``python bench/failover.py [--runs N] [--output docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchdoc import interpreter, load_line, machine_line, replace_section, revision

from sbs_core.lab import NodeProcess, Pair, is_primary, marker_sentinel, read_markers

SENTINELS = ("labels", "spooler")
HEARTBEAT_INTERVAL = 0.2
DEAD_TIME = 1.0
POLL = 0.01
# Bounds for each wait; far above the expected times, so that they only end
# runs that are broken, never slow-but-working ones.
ROLE_TIMEOUT = 10.0
FAULT_TIMEOUT = 10.0
STEP_DOWN_TIMEOUT = 15.0
START_SKEW_MAX = 0.05


class RunFailed(Exception):
    """A run that did not reach the state it measures."""


# ---------------------------------------------------------------------- results


@dataclass
class Metric:
    key: str
    label: str
    target: float | None = None
    target_text: str = "—"
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float] | None:
        if not self.values:
            return None
        data = sorted(self.values)
        return {
            "min": data[0],
            "median": statistics.median(data),
            "p90": _p90(data),
            "max": data[-1],
        }

    def met(self) -> bool | None:
        s = self.summary()
        if self.target is None or s is None:
            return None
        return s["median"] < self.target


def _p90(data: list[float]) -> float:
    # Linear interpolation between closest ranks (the "inclusive" method): with
    # 7 runs it lies between the 6th and the 7th value.
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(data, n=10, method="inclusive")[8]


@dataclass
class Scenario:
    key: str
    title: str
    metrics: list[Metric]
    runs: int = 0
    failures: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, what: str, by: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + by

    @property
    def ok_runs(self) -> int:
        return self.runs - len(self.failures)

    def median(self, key: str) -> float | None:
        metric = next(m for m in self.metrics if m.key == key)
        return statistics.median(metric.values) if metric.values else None


# ---------------------------------------------------------------------- helpers


def markers(pair: Pair) -> list[dict[str, Any]]:
    """The sentinel runs so far, read while sentinels may be writing their files.

    A sentinel writes a hidden temporary file and renames it; pathlib's glob
    matches dot files, so a read can meet one half written or already renamed.
    Such a read is retried, and entries from temporary files are ignored.
    """
    for _ in range(50):
        try:
            runs = read_markers(pair.markers)
        except (ValueError, FileNotFoundError):
            time.sleep(0.002)
            continue
        return [r for r in runs if not r["name"].startswith(".")]
    raise RunFailed("the marker files could not be read consistently")


def current_starts(pair: Pair, node: str, *, since: float = 0.0) -> dict[str, dict[str, Any]]:
    """Per sentinel name, the latest run on ``node`` that started after ``since``."""
    latest: dict[str, dict[str, Any]] = {}
    for run in markers(pair):
        if run["node"] != node or run["start"] < since:
            continue
        if run["name"] not in latest or run["start"] > latest[run["name"]]["start"]:
            latest[run["name"]] = run
    return latest


def wait_sentinels_running(pair: Pair, node: str, *, since: float, timeout: float) -> float:
    """When the last of the sentinels started on ``node`` after ``since`` (wall clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = current_starts(pair, node, since=since)
        if set(runs) >= set(SENTINELS):
            return max(float(runs[name]["start"]) for name in SENTINELS)
        time.sleep(POLL)
    raise RunFailed(
        f"sentinels of node {node} not running within {timeout:g} s "
        f"(started since the fault: {sorted(current_starts(pair, node, since=since))})"
    )


def wait_status(
    node: NodeProcess, what: str, test: Callable[[dict[str, Any]], bool], timeout: float
) -> float:
    """Poll the node's status (what ``sbs status`` reads) until ``test``; the wall time then."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        last = node.status()
        if last is not None and test(last):
            return time.time()
        if not node.alive:
            break
        time.sleep(POLL)
    raise RunFailed(f"node {node.name} not {what} within {timeout:g} s (last status {last})")


def full_primary(st: dict[str, Any]) -> bool:
    return is_primary(st) and set(st.get("active_sentinels") or ()) >= set(SENTINELS)


def connected_secondary(st: dict[str, Any]) -> bool:
    peer = st.get("peer") or {}
    return (
        st.get("role") == "secondary"
        and bool(st.get("peer_connected"))
        and peer.get("role") == "primary"
        and not st.get("active_sentinels")
    )


def primary_with_secondary(st: dict[str, Any]) -> bool:
    peer = st.get("peer") or {}
    return full_primary(st) and bool(st.get("peer_connected")) and peer.get("role") == "secondary"


def start_pair(pair: Pair) -> None:
    """a first (it finds nobody and becomes primary), then b as its secondary."""
    pair.a.start()
    wait_status(pair.a, "primary with its sentinels", full_primary, ROLE_TIMEOUT)
    wait_sentinels_running(pair, "a", since=0.0, timeout=ROLE_TIMEOUT)
    pair.b.start()
    wait_status(pair.b, "a connected secondary", connected_secondary, ROLE_TIMEOUT)
    wait_status(pair.a, "primary with a connected secondary", primary_with_secondary, ROLE_TIMEOUT)


def signal_node(node: NodeProcess, signum: signal.Signals) -> None:
    if node.proc is None:
        raise RunFailed(f"node {node.name} was never started")
    node.proc.send_signal(signum)


def logged_at(node: NodeProcess, marker: str) -> float | None:
    """Wall time of the node's first log line containing ``marker`` (millisecond resolution)."""
    try:
        text = node.log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if marker in line:
            # The logging default: local time, "2026-01-31 12:00:00,123".
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def promoted_in_log(node: NodeProcess) -> bool:
    try:
        return "] promoted: " in node.log.read_text(errors="replace")
    except OSError:
        return False


# ---------------------------------------------------------------------- scenarios


def run_kill(pair: Pair, sc: Scenario, _: int) -> dict[str, float]:
    start_pair(pair)
    began = time.time()
    pair.a.kill()
    said = wait_status(pair.b, "primary", is_primary, FAULT_TIMEOUT)
    running = wait_sentinels_running(pair, "b", since=began, timeout=FAULT_TIMEOUT)
    return {"sentinels": running - began, "status": said - began}


def run_hang(pair: Pair, sc: Scenario, _: int) -> dict[str, float]:
    start_pair(pair)
    began = time.time()
    pair.a.hang()
    try:
        running = wait_sentinels_running(pair, "b", since=began, timeout=FAULT_TIMEOUT)
    finally:
        resumed = time.time()
        pair.a.resume()
    wait_status(pair.a, "a secondary again after SIGCONT", connected_secondary, STEP_DOWN_TIMEOUT)
    wait_status(pair.b, "still primary", primary_with_secondary, ROLE_TIMEOUT)
    runs = markers(pair)
    stops = [r["stop"] for r in runs if r["node"] == "a"]
    if len(stops) < len(SENTINELS) or any(s is None for s in stops):
        raise RunFailed(f"a stepped down but its sentinels left no stop marker: {stops}")
    last_stop = max(float(s) for s in stops)
    first_b = min(float(r["start"]) for r in runs if r["node"] == "b")
    return {
        "sentinels": running - began,
        "after_resume": last_stop - resumed,
        "both": last_stop - first_b,
    }


def run_planned(pair: Pair, sc: Scenario, _: int) -> dict[str, float]:
    start_pair(pair)
    began = time.time()
    signal_node(pair.a, signal.SIGTERM)
    running = wait_sentinels_running(pair, "b", since=began, timeout=FAULT_TIMEOUT)
    assert pair.a.proc is not None
    try:
        pair.a.proc.wait(FAULT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"node a did not exit within {FAULT_TIMEOUT:g} s of SIGTERM") from exc
    runs = markers(pair)
    a_stops = [r["stop"] for r in runs if r["node"] == "a"]
    b_starts = [float(r["start"]) for r in runs if r["node"] == "b"]
    if len(a_stops) < len(SENTINELS) or any(s is None for s in a_stops):
        raise RunFailed(f"a's sentinels did not all write a stop marker: {a_stops}")
    a_stopped = max(float(s) for s in a_stops)
    gap = min(b_starts) - a_stopped
    if gap <= 0:
        sc.count("overlap")
    return {"sentinels": running - began, "a_stopped": a_stopped - began, "gap": gap}


def run_simultaneous(pair: Pair, sc: Scenario, index: int) -> dict[str, float]:
    # Alternate who goes first and spread the second start over 0-40 ms, so
    # that the runs cover both orders and several interleavings.
    first, second = (pair.a, pair.b) if index % 2 == 0 else (pair.b, pair.a)
    delay = random.Random(index).uniform(0.0, 0.04)
    t_first = time.time()
    first.start()
    while time.time() < t_first + delay:
        time.sleep(0.001)
    t_second = time.time()
    second.start()
    skew = t_second - t_first
    if skew > START_SKEW_MAX:
        raise RunFailed(f"the two starts were {skew * 1000:.0f} ms apart (more than 50 ms)")

    deadline = time.monotonic() + FAULT_TIMEOUT
    settled: tuple[float, NodeProcess] | None = None
    last: dict[str, dict[str, Any] | None] = {}
    while time.monotonic() < deadline and settled is None:
        last = {n.name: n.status() for n in pair}
        seen = time.time()
        for node, other in ((pair.a, pair.b), (pair.b, pair.a)):
            st, ost = last[node.name], last[other.name]
            if st and ost and full_primary(st) and connected_secondary(ost):
                settled = (seen, node)
        time.sleep(POLL)

    if settled is None:
        sc.count("not_one_primary")
        roles = {name: (st or {}).get("role", "no answer") for name, st in last.items()}
        _count_both(pair, sc)
        raise RunFailed(f"no single primary within {FAULT_TIMEOUT:g} s: roles {roles}")
    seen, winner = settled
    running = wait_sentinels_running(pair, winner.name, since=0.0, timeout=FAULT_TIMEOUT)
    _count_both(pair, sc)
    # Where the time goes: interpreter and imports until each node runs its
    # role machine (its "started" log line), then the protocol itself.
    started = [logged_at(n, "] started: ") for n in pair]
    if started[0] is None or started[1] is None:
        raise RunFailed("a node's log has no 'started' line")
    settle = max(seen, running) - t_first
    booted = max(started[0], started[1]) - t_first
    return {
        "settle": settle,
        "skew": skew,
        "booted": booted,
        "protocol": settle - booted,
        "protocol_skew": abs(started[0] - started[1]),
    }


def _count_both(pair: Pair, sc: Scenario) -> None:
    if len({r["node"] for r in markers(pair)}) > 1:
        sc.count("both_started")
    if all(promoted_in_log(n) for n in pair):
        sc.count("both_promoted")


SCENARIOS: dict[str, tuple[Callable[[Pair, Scenario, int], dict[str, float]], Scenario]] = {
    "kill": (
        run_kill,
        Scenario(
            "kill",
            "1. Primary killed (SIGKILL)",
            [
                Metric("sentinels", "kill → b's sentinels running", 1.0, "< 1 s (aim 0.3 s)"),
                Metric("status", "kill → b's status says primary"),
            ],
        ),
    ),
    "hang": (
        run_hang,
        Scenario(
            "hang",
            f"2. Primary hung (SIGSTOP), heartbeat {HEARTBEAT_INTERVAL} s, dead_time {DEAD_TIME} s",
            [
                Metric("sentinels", "SIGSTOP → b's sentinels running", 1.5, "< 1.5 s"),
                Metric("after_resume", "SIGCONT → a's sentinels stopped"),
                Metric("both", "sentinels running on both nodes"),
            ],
        ),
    ),
    "planned": (
        run_planned,
        Scenario(
            "planned",
            "3. Planned stop of the primary (SIGTERM)",
            [
                Metric("sentinels", "SIGTERM → b's sentinels running", 1.0, "< 1 s"),
                Metric("a_stopped", "SIGTERM → a's sentinels all stopped"),
                Metric("gap", "gap: a's last stop → b's first start"),
            ],
        ),
    ),
    "simultaneous": (
        run_simultaneous,
        Scenario(
            "simultaneous",
            "4. Both nodes started at once (mode auto)",
            [
                Metric("settle", "first start → one primary + connected secondary", 2.0, "< 2 s"),
                Metric("skew", "start skew (process spawn)"),
                Metric("booted", "first start → both role machines running (logs)"),
                Metric("protocol", "both role machines running → settled"),
                Metric("protocol_skew", "skew of the two role machines' start (logs)"),
            ],
        ),
    ),
}


# ---------------------------------------------------------------------- driver


def run_scenario(
    key: str, runs: int, deadline: float, keep: bool, say: Callable[[str], None]
) -> Scenario:
    func, sc = SCENARIOS[key]
    say(f"\n{sc.title}")
    for index in range(runs):
        sc.runs += 1
        label = f"  run {index + 1}/{runs}"
        if time.monotonic() > deadline:
            sc.failures.append(f"run {index + 1}: not run, the time budget was spent")
            say(f"{label}: NOT RUN (time budget spent)")
            continue
        root = Path(tempfile.mkdtemp(prefix=f"sbs-bench-{key}-"))
        failed: str | None = None
        try:
            with Pair(
                root,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                dead_time=DEAD_TIME,
                sentinels={
                    name: [sys.executable, "-c", marker_sentinel(root / "markers")]
                    for name in SENTINELS
                },
            ) as pair:
                assert pair.markers == root / "markers"
                values = func(pair, sc, index)
        except Exception as exc:  # any failure is a reported run, never a lost one
            failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if failed is not None:
            sc.failures.append(f"run {index + 1}: {failed} (files kept in {root})")
            say(f"{label}: FAILED: {failed}\n    files kept in {root}")
            continue
        for metric in sc.metrics:
            metric.values.append(values[metric.key])
        shown = ", ".join(f"{m.key} {values[m.key]:.3f} s" for m in sc.metrics)
        say(f"{label}: {shown}")
        if keep:
            say(f"    files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    _scenario_notes(sc)
    return sc


def _scenario_notes(sc: Scenario) -> None:
    ok = sc.ok_runs

    def med(key: str) -> str:
        value = sc.median(key)
        return "—" if value is None else f"{value:.3f} s"

    if sc.key == "kill":
        sc.notes.append(
            "The status row is when a status request over b's control channel (what "
            "`sbs status` reads) first answered `primary`, polled every 10 ms. b learns of "
            "the kill at once (the kernel closes a's socket), promotes and persists the new "
            f"epoch (status primary after {med('status')}); the rest, up to "
            f"{med('sentinels')}, is spawning the two sentinels one after the other and "
            "their own interpreter start-up until they write their start marker."
        )
    elif sc.key == "hang":
        sc.notes.append(
            f"b promotes dead_time ({DEAD_TIME} s) after the last message it received "
            f"from a, which a sent at most heartbeat_interval ({HEARTBEAT_INTERVAL} s) "
            f"before the SIGSTOP: {DEAD_TIME - HEARTBEAT_INTERVAL:g}-{DEAD_TIME:g} s of "
            f"the {med('sentinels')} median is that wait, the rest is promotion and "
            "sentinel start, as after a kill."
        )
        sc.notes.append(
            "a is resumed (SIGCONT) as soon as b's sentinels run; the benchmark then waits "
            "until a has stepped down to a connected secondary. a's sentinels are processes "
            "of their own that a SIGSTOP of the node does not freeze: they kept running "
            "while b's ran too (the 'on both nodes' row) until a, resumed, found b again "
            "and yielded to b's higher epoch. During a real hang that overlap lasts as "
            "long as the hang itself."
        )
    elif sc.key == "planned":
        sc.notes.append(
            f"No overlap (a's last stop marker before b's first start marker) in "
            f"{ok - sc.counts.get('overlap', 0)} of {ok} completed runs. a first stops its "
            f"sentinels ({med('a_stopped')}), then runs the final cycle and sends the "
            f"handover; the gap ({med('gap')}) is a's noticing that its sentinels exited, "
            "the final cycle and handover message, b's promotion and the start of b's "
            "sentinel processes."
        )
    elif sc.key == "simultaneous":
        sc.notes.append(
            "Second start 0-40 ms after the first, alternating which node goes first. "
            f"Sentinels started on both nodes (markers) in {sc.counts.get('both_started', 0)} "
            f"of {sc.runs} runs; both nodes promoted themselves (node logs) in "
            f"{sc.counts.get('both_promoted', 0)} of {sc.runs} runs; outcome not one primary "
            f"with a connected secondary in {sc.counts.get('not_one_primary', 0)} of "
            f"{sc.runs} runs. Most of the time ({med('booted')}) passes before both nodes' "
            "role machines run (their 'started' log line): interpreter start-up and imports, "
            "two processes at once, CPU-bound, so it grows with any other load on the "
            "machine; the protocol itself then settles in "
            f"{med('protocol')}. Import jitter spreads the two role machines' start far more "
            "than the spawn skew does."
        )


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(scenarios: Sequence[Scenario]) -> list[str]:
    rows = [
        "| scenario | runs | min (s) | median (s) | p90 (s) | max (s) | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        runs = f"{sc.ok_runs}/{sc.runs}" + (f" ({len(sc.failures)} failed)" if sc.failures else "")
        for i, m in enumerate(sc.metrics):
            s = m.summary() or {}
            met = m.met()
            met_text = "—" if met is None else "yes" if met else "**no**"
            if m.target is not None and not m.values:
                met_text = "**no** (no completed run)"
            if met is not None and sc.failures:
                met_text += f" ({len(sc.failures)} failed)"
            name = f"{sc.title}: {m.label}" if i == 0 else f"↳ {m.label}"
            rows.append(
                f"| {name} | {runs if i == 0 else len(m.values)} | {_fmt(s.get('min'))} | "
                f"{_fmt(s.get('median'))} | {_fmt(s.get('p90'))} | {_fmt(s.get('max'))} | "
                f"{m.target_text} | {met_text} |"
            )
    return rows


def report(scenarios: Sequence[Scenario]) -> list[str]:
    lines: list[str] = []
    for sc in scenarios:
        lines.append(sc.title)
        for m in sc.metrics:
            s = m.summary()
            if s is None:
                lines.append(f"  {m.label}: no completed run")
                continue
            figures = "  ".join(f"{k} {v:.3f} s" for k, v in s.items())
            verdict = ""
            if m.target is not None:
                verdict = (
                    f"  -> median {s['median']:.3f} s vs target {m.target_text}: "
                    f"{'MET' if m.met() else 'NOT MET'}"
                )
            lines.append(f"  {m.label} ({len(m.values)} runs): {figures}{verdict}")
        for failure in sc.failures:
            lines.append(f"  FAILED {failure}")
        lines.extend(f"  note: {n}" for n in sc.notes)
    return lines


INTRO = """# Benchmarks

Figures here are whole-process timings: real `sbs run` processes, started as an
operator would start them (one TOML file each), on loopback on one machine (node
a on 127.0.0.1, node b on 127.0.0.2, same port, as on two machines). Nothing is
mocked: times include TCP, the authenticated peer protocol, the role machine,
the state file written before every promotion and the start of the sentinels'
own processes. They measure this implementation on this machine, not a
network; on two real machines add the network's latency to every figure.

To reproduce, install the package (`pip install -e .`) and run, from the
repository root, the command shown in each section; for failover:

    python bench/failover.py --runs 7 --output docs/benchmarks.md

It prints every run and the summary, replaces its own section of this file, and
exits with status 1 when a run failed or a median missed its target. Figures
depend on the machine: compare runs made on the same one.

A section "## Replication" will follow once replication is wired in.
"""


def section(scenarios: Sequence[Scenario], command: str, measured: str) -> str:
    lines = [
        "## Failover",
        "",
        measured,
        "",
        f"Command: `{command}`",
        "",
        "Every run uses a fresh pair (fresh temporary folder, fresh port) whose two",
        "sentinels write a marker file the moment their process runs and another when",
        "they are stopped; a sentinel counts as running at its start marker.",
        f"Settings: heartbeat_interval {HEARTBEAT_INTERVAL} s, dead_time {DEAD_TIME} s,",
        "sentinels `labels` and `spooler`. Before a fault, each run waits until a is",
        "primary with both sentinels running and b is its connected secondary. p90 is",
        "interpolated between the closest ranks; 'met?' compares the median to the target.",
        "Rows marked ↳ are informational.",
        "",
        *table(scenarios),
        "",
    ]
    for sc in scenarios:
        for note in sc.notes:
            lines.append(f"- {sc.title}: {note}")
        for failure in sc.failures:
            lines.append(f"- {sc.title}: FAILED {failure}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7, help="runs per scenario (at least 5)")
    parser.add_argument("--output", type=Path, help="write the '## Failover' section here")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep every run's folder")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="seconds after which no new run starts"
    )
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    command = shlex.join([interpreter(), sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    machine = machine_line()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def say(text: str) -> None:
        print(text, flush=True)

    load_before = load_line()
    code = revision()
    say(f"machine: {machine}; {load_before}")
    say(code)
    say(f"command: {command}")
    deadline = time.monotonic() + args.budget
    began = time.monotonic()
    scenarios = [
        run_scenario(key, args.runs, deadline, args.keep, say) for key in args.scenario or SCENARIOS
    ]
    load = f"before: {load_before}; after: {load_line()}"
    say(f"\nresults ({time.monotonic() - began:.0f} s in all; {load})")
    for line in report(scenarios):
        say(line)
    if args.output is not None:
        replace_section(
            args.output,
            "## Failover",
            section(scenarios, command, f"Measured {when} on {machine}; {load}; {code}."),
            intro=INTRO,
        )
        say(f"wrote the '## Failover' section of {args.output}")
    failed = any(sc.failures for sc in scenarios)
    unmet = any(m.met() is False for sc in scenarios for m in sc.metrics)
    return 1 if failed or unmet else 0


if __name__ == "__main__":
    sys.exit(main())
