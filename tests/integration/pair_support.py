"""What the end-to-end tests share: pairs whose sentinels leave markers, and proofs built on them.

Every sentinel here is :func:`sbs_core.lab.marker_sentinel`, so where and when
each run started and stopped is read back from files, not guessed from status
polls. All nodes of the pair run on this host and the sentinels stamp their
markers with the same wall clock (``time.time()``), so comparing a run on node
a with one on node b needs no allowance for clock skew: :data:`CLOCK_SKEW` is 0.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sbs_core.lab import NodeProcess, Pair, marker_sentinel, read_markers

SENTINELS = ("labels", "spooler")

# Same host, same clock: a stop stamped after a start really happened after it.
CLOCK_SKEW = 0.0

# The timings of the pair (the lab's defaults, spelled out because bounds use them).
HEARTBEAT = 0.2
DEAD_TIME = 1.0
PROBE = 0.5

Status = dict[str, Any]
Run = dict[str, Any]


def marker_commands(markers: Path) -> dict[str, list[str]]:
    command = [sys.executable, "-c", marker_sentinel(markers)]
    return dict.fromkeys(SENTINELS, command)


def marker_pair(root: Path, **kwargs: Any) -> Pair:
    """A :class:`Pair` in ``root`` whose two sentinels write markers to ``pair.markers``."""
    return Pair(root, sentinels=marker_commands(root / "markers"), **kwargs)


# -- what a status says


def full_primary(names: Iterable[str] = SENTINELS) -> Callable[[Status], bool]:
    wanted = sorted(names)

    def test(st: Status) -> bool:
        return (
            st["role"] == "primary"
            and not st["handing_over"]
            and sorted(st["active_sentinels"]) == wanted
        )

    return test


def connected_secondary(st: Status) -> bool:
    return st["role"] == "secondary" and bool(st["peer_connected"]) and not st["active_sentinels"]


def connected_primary(names: Iterable[str] = SENTINELS) -> Callable[[Status], bool]:
    full = full_primary(names)
    return lambda st: full(st) and bool(st["peer_connected"])


def start_in_order(pair: Pair) -> list[Run]:
    """a first (it becomes primary with both sentinels), then b (its connected secondary).

    Returns the runs once both of a's sentinels have written their start markers.
    """
    pair.a.start()
    pair.a.wait_for("primary", full_primary(), timeout=10)
    pair.b.start()
    pair.b.wait_for("secondary", connected_secondary, timeout=10)
    pair.a.wait_for("primary with its peer", connected_primary(), timeout=10)
    return wait_running(pair, "a")


def status_json(node: NodeProcess) -> Status:
    """What ``sbs status --json`` prints for ``node``, the way a tool would read it."""
    done = node.sbs("status", "--json", timeout=20)
    assert done.returncode == 0, done.stderr
    status: Status = json.loads(done.stdout)
    return status


def seed_node_id(node: NodeProcess, node_id: str) -> None:
    """Fix a node's id before its first start (ids break ties between equal nodes)."""
    node.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (node.state_dir / "node_id").write_text(node_id + "\n", encoding="ascii")


def log_text(node: NodeProcess) -> str:
    try:
        return node.log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- markers


def wait_markers(
    pair: Pair, what: str, test: Callable[[list[Run]], bool], *, timeout: float = 10.0
) -> list[Run]:
    """Poll the marker folder until ``test`` holds for the runs recorded so far."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_markers(pair.markers)
        if test(runs):
            return runs
        if time.monotonic() > deadline:
            raise TimeoutError(f"markers never showed {what} within {timeout} s: {runs}")
        time.sleep(0.01)


def wait_running(
    pair: Pair, node: str, names: Iterable[str] = SENTINELS, *, timeout: float = 10.0
) -> list[Run]:
    """Wait until exactly ``names`` run on ``node``, by their markers and live pids.

    A status lists a sentinel as soon as its process is spawned; its marker comes
    a moment later, once the interpreter has started.
    """
    wanted = set(names)
    return wait_markers(
        pair,
        f"{sorted(wanted)} running on {node}",
        lambda runs: running_names(runs, node) == wanted,
        timeout=timeout,
    )


def runs_on(runs: Iterable[Run], node: str, *, epoch: int | None = None) -> list[Run]:
    return [r for r in runs if r["node"] == node and (epoch is None or r["epoch"] == epoch)]


def running_names(runs: Iterable[Run], node: str) -> set[str]:
    """The sentinels whose processes are alive on ``node`` (by their pids), by name."""
    return {r["name"] for r in runs if r["node"] == node and pid_alive(r["pid"])}


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pids: Iterable[int], *, timeout: float) -> float:
    """Poll until every pid is gone; the wall-clock time at which that was seen."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        pending = {pid for pid in pending if pid_alive(pid)}
        if not pending:
            return time.time()
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {sorted(pending)} still alive after {timeout} s")
        time.sleep(0.002)


def assert_no_overlap(runs: list[Run], *, died_by: Mapping[int, float] | None = None) -> None:
    """No moment in which a sentinel ran on node a while one ran on node b.

    A run ends at its stop marker; a run without one is either still alive (it
    has not ended) or was killed, and then ``died_by[pid]`` must give a time by
    which it was seen dead, or nothing can be proved about it.
    """
    died_by = died_by or {}

    def end(run: Run) -> float:
        if run["stop"] is not None:
            return float(run["stop"])
        if pid_alive(run["pid"]):
            return math.inf
        assert run["pid"] in died_by, f"run {run} was killed and its end is unknown"
        return died_by[run["pid"]]

    for x in runs_on(runs, "a"):
        for y in runs_on(runs, "b"):
            # Disjoint: one ended (within the skew allowance) before the other began.
            disjoint = end(x) <= y["start"] + CLOCK_SKEW or end(y) <= x["start"] + CLOCK_SKEW
            assert disjoint, f"sentinel runs overlap: {x} on a and {y} on b"


def report(what: str, seconds: float) -> None:
    """A measured time, shown with ``pytest -s``: the margins below were chosen from these."""
    print(f"[timing] {what}: {seconds:.3f} s")
