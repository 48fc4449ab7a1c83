"""The fault lab's figures: each scenario of ``scenarios.py`` run several times, published.

    python tests/faultlab/figures.py --runs 3 --output docs/reliability.md

Every run uses a fresh lab (two new namespaces, two new nodes). It prints each
run's figures, then replaces the section "## The fault lab" of the output
file. The exit status is 1 when a scenario failed outright.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scenarios
from netlab import NetLab, Timings, netlab_unavailable

Scenario = Callable[[NetLab], dict[str, Any]]

BUGS_HEADING = "### Bugs found by the fault lab"

#: name -> (what it does, the lab's options, the scenario)
SCENARIOS: dict[str, tuple[str, dict[str, Any], Scenario]] = {
    "sigkill": ("SIGKILL of the primary", {}, scenarios.sigkill_primary),
    "partition": ("link down 2 s with both nodes alive, then up", {}, scenarios.partition_and_heal),
    "one_way_a": (
        "one-way loss 3 s: the primary hears nothing from the secondary",
        {},
        lambda lab: scenarios.one_way_loss(lab, deaf="a"),
    ),
    "one_way_b": (
        "one-way loss 3 s: the secondary hears nothing from the primary",
        {},
        lambda lab: scenarios.one_way_loss(lab, deaf="b"),
    ),
    "hung": ("SIGSTOP of the primary, SIGCONT after the takeover", {}, scenarios.hung_primary),
    "simultaneous": ("both nodes started in the same millisecond", {}, scenarios.simultaneous),
    "clock": (
        "SIGKILL of the primary; the secondary's clocks 30 days ahead",
        {},
        scenarios.clock_offset_takeover,
    ),
    "churn": (
        "a 2 MiB file rewritten in place for 3 s while it is replicated",
        {},
        scenarios.files_changing_while_sent,
    ),
    "disk_full": (
        "the secondary's disk 1 MiB, a 3 MiB file, then 16 MiB",
        {"node_extra": {"period": 1.0}, "volumes": {"b": 16 << 10}},
        scenarios.disk_full_on_secondary,
    ),
}


def run_all(runs: int, only: list[str]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in only}
    for i in range(runs):
        for name in only:
            _, options, scenario = SCENARIOS[name]
            with (
                tempfile.TemporaryDirectory(prefix="sbs-figures-") as root,
                NetLab(Path(root) / "lab", timings=Timings(), **options) as lab,
            ):
                try:
                    got = scenario(lab)
                except AssertionError as exc:
                    got = {"failed": str(exc).splitlines()[0]}
                    traceback.print_exc()
            print(f"run {i + 1} {name}: {got}", flush=True)
            found[name].append(got)
    return found


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return (
        f"median {statistics.median(values):.2f} s, "
        f"min {min(values):.2f} s, max {max(values):.2f} s"
    )


def numbers(results: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in results if isinstance(r.get(key), int | float)]


def table(found: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One row per measure: the scenario, what was measured, and its spread over the runs."""
    rows = ["| scenario | measure | runs | figure |", "|---|---|---:|---|"]

    def row(name: str, label: str, key: str) -> None:
        results = found.get(name, [])
        if results:
            values = numbers(results, key)
            rows.append(f"| {SCENARIOS[name][0]} | {label} | {len(values)} | {spread(values)} |")

    row("sigkill", "takeover (kill -> last sentinel started on b)", "takeover")
    row("partition", "takeover by b (cut -> last sentinel started)", "takeover")
    row("partition", "split brain: b's takeover -> a's last sentinel stopped", "split_brain")
    row("partition", "heal -> one primary with a connected secondary", "one_primary_after_heal")
    row("partition", "heal -> the loser's last sentinel stopped", "sentinels_on_both_after_heal")
    for side in ("one_way_a", "one_way_b"):
        row(side, "loss -> both primary", "both_primary_after")
        row(side, "heal -> one primary with a connected secondary", "one_primary_after_heal")
    row("hung", "takeover (SIGSTOP -> last sentinel started on b)", "takeover")
    row("hung", "SIGCONT -> a's last sentinel stopped", "resumed_sentinels_stopped_after")
    row("simultaneous", "start -> one primary with a connected secondary", "settled_after_start")
    row("simultaneous", "time sentinels ran on both nodes", "sentinels_on_both")
    row("clock", "takeover (kill -> last sentinel started on b)", "takeover")
    row("disk_full", "space back -> the big file on b", "recovered_after")
    return rows


def facts(found: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What held in every run (or did not), in words."""
    lines: list[str] = []

    def count(name: str, test: Callable[[dict[str, Any]], bool]) -> str:
        results = found.get(name, [])
        return f"{sum(1 for r in results if test(r))} of {len(results)}"

    if "partition" in found:
        lines.append(
            "- Partition: both nodes primary during the cut in "
            + count("partition", lambda r: bool(r.get("both_primary_during_partition")))
            + " runs; the loser's own files merged into the winner in "
            + count("partition", lambda r: bool(r.get("merged")))
            + "; the file changed on both sides kept the winner's version and the loser's"
            " copy as a conflict in "
            + count(
                "partition",
                lambda r: bool(
                    r.get("winner_version_kept") and r.get("loser_version_in_conflicts")
                ),
            )
            + "."
        )
    for side, who in (("one_way_a", "primary"), ("one_way_b", "secondary")):
        if side in found:
            lines.append(
                f"- One-way loss (the {who} deaf): two primaries during the loss in "
                + count(side, lambda r: r.get("most_primaries_during_loss") == 2)
                + " runs; no change lost in "
                + count(side, lambda r: r.get("lost") == [])
                + "."
            )
    if "hung" in found:
        lines.append(
            "- Hung primary: on SIGCONT it learned from b's higher epoch that it was stale and"
            " stepped down, with equal epochs afterwards, in "
            + count(
                "hung",
                lambda r: (
                    r.get("primary") == "b" and len(set((r.get("epochs") or {}).values())) == 1
                ),
            )
            + " runs."
        )
    if "churn" in found:
        torn = sum(int(r.get("torn", 0)) for r in found["churn"])
        samples = sum(int(r.get("samples", 0)) for r in found["churn"])
        unfinished = sum(int(r.get("unfinished", 0)) for r in found["churn"])
        lines.append(
            f"- Files changing while sent: {samples} reads of the secondary's copy; {torn} a mix"
            f" of two versions; {unfinished} a copy of one moment of the in-place write (a"
            " prefix of one version, as the primary's own disk showed it)."
        )
    if "disk_full" in found:
        results = found["disk_full"]
        lines.append(
            "- Disk full on the secondary: nothing corrupted (no torn file, no partial file, no"
            " temporary file left) in "
            + count(
                "disk_full",
                lambda r: (
                    r.get("torn_seen") == []
                    and not r.get("partial_big_visible")
                    and r.get("temp_files_while_full") == []
                    and bool(r.get("small_kept"))
                ),
            )
            + " runs; the failure reported (last_sync_error) in "
            + count("disk_full", lambda r: bool(r.get("errors")))
            + ", alerted in "
            + count("disk_full", lambda r: bool(r.get("alerts")))
            + " (see the bugs below); most files pending on the primary: "
            + f"{max((int(r.get('most_files_pending', 0)) for r in results), default=0)}."
        )
    failed = [f"{name}: {r['failed']}" for name, rs in found.items() for r in rs if "failed" in r]
    lines.append("- Failed runs: " + ("; ".join(failed) if failed else "none") + ".")
    return lines


def write_doc(
    found: dict[str, list[dict[str, Any]]], output: Path, command: str, load: str
) -> None:
    # bench/ is a folder of scripts, not a package: it joins the path only to write a doc.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from benchdoc import load_line, machine_line, replace_section, revision  # noqa: PLC0415

    t = Timings()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""## The fault lab

Measured {now} on {machine_line()}; at the start: {load}; at the end: {load_line()};
{revision()}.

Command: `{command}`

Two Linux network namespaces joined by a veth pair (10.231.0.1 and 10.231.0.2,
which exist only inside them), a real `sbs run` in each with its own
configuration, folders and state directory; heartbeat_interval
{t.heartbeat_interval:g} s, dead_time {t.dead_time:g} s, probe_interval
{t.probe_interval:g} s. Faults are real: signals, `ip link set down`, nftables
rules, a tmpfs resized under the secondary's folder, a time namespace. The
harness is `tests/faultlab/netlab.py`, the scenarios `tests/faultlab/scenarios.py`
(the same functions the tests in `tests/faultlab/test_scenarios.py` assert on).
Sentinel start and stop times are stamped by the sentinels themselves.
What could not be done as asked: this kernel has no `sch_netem` (`tc qdisc add
... netem` answers "Specified qdisc kind is unknown"), so there is no added
latency; a slow link is nftables' rate limit (`limit rate over N kbytes/second
drop`) and a flaky one its random drop (`numgen random mod 100 < N drop`). A
running node's clock cannot jump: a time namespace fixes its offsets before its
first process, and `CLOCK_REALTIME` is not namespaced (stepping it would move
the whole machine's clock); the clock fault is a node that comes back with its
monotonic and boot clocks ahead (`nsenter --time`), 30 days here, 1 hour to 30
days in the soak.

{chr(10).join(table(found))}

{chr(10).join(facts(found))}
"""
    intro = (
        "# Reliability\n\nHow sbs behaves under real faults, and the commands that measured it.\n"
    )
    # The hand-written account of the bugs the lab found survives a rewrite.
    replace_section(output, "## The fault lab", text, intro=intro, keep=BUGS_HEADING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only", default="", help="scenarios, comma-separated: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--output", type=Path, help="write the section of this Markdown file")
    args = parser.parse_args(argv)
    reason = netlab_unavailable()
    if reason is not None:
        print(f"cannot run the fault lab: {reason}", file=sys.stderr)
        return 2
    only = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}")
    one, five, _ = os.getloadavg()
    load = f"load average {one:.2f} (1 min), {five:.2f} (5 min)"
    found = run_all(args.runs, only)
    print("\n".join([*table(found), "", *facts(found)]))
    if args.output:
        command = f"python tests/faultlab/figures.py --runs {args.runs}"
        if args.only:
            command += f" --only {args.only}"
        write_doc(found, args.output, command + f" --output {args.output}", load)
    return 1 if any("failed" in r for rs in found.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
