"""Fault scenarios on a :class:`netlab.NetLab`, each returning what it measured.

The tests (``test_scenarios.py``) assert on the figures and facts returned
here; ``figures.py`` runs the same functions several times and publishes them.
A scenario raises AssertionError when the pair never reaches the state it
waits for (with the nodes' statuses in the message).

Times of sentinel starts and stops come from the marker files the sentinels
write themselves (one host, one wall clock), not from status polls.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from content import (
    is_unfinished_write,
    make_content,
    version_of,
    write_atomically,
    write_in_place,
)
from netlab import (
    SENTINELS,
    Host,
    NetLab,
    alerts_of,
    clear_faults,
    disk_space,
    drop_from_peer,
    fill_disk,
    hang,
    link_down,
    link_up,
    resume,
    sigkill,
    simultaneous_start,
)

from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX

Status = dict[str, Any]
Run = dict[str, Any]
Figures = dict[str, Any]


# -- waiting and looking


def wait_until(what: str, test: Callable[[], bool], *, timeout: float, poll: float = 0.02) -> float:
    """Poll ``test`` until it holds; the seconds it took. AssertionError after ``timeout``."""
    began = time.monotonic()
    while not test():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(poll)
    return time.monotonic() - began


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def running_on(lab: NetLab, node: str) -> list[Run]:
    return [r for r in lab.runs() if r["node"] == node and pid_alive(r["pid"])]


def all_running_on(lab: NetLab, node: str) -> bool:
    return sorted(r["name"] for r in running_on(lab, node)) == sorted(SENTINELS)


def is_primary(st: Status | None) -> bool:
    return st is not None and st["role"] == "primary" and not st["handing_over"]


def settled(lab: NetLab) -> str | None:
    """The primary's name when the pair is whole: one primary, one connected secondary."""
    sts = lab.statuses()
    primaries = [n for n, st in sts.items() if is_primary(st)]
    if len(primaries) != 1:
        return None
    other = "b" if primaries[0] == "a" else "a"
    st_p, st_o = sts[primaries[0]], sts[other]
    if st_p is None or st_o is None or not st_p["peer_connected"]:
        return None
    if st_o["role"] != "secondary" or not st_o["peer_connected"] or st_o["active_sentinels"]:
        return None
    return primaries[0]


def describe(lab: NetLab) -> str:
    lines = []
    for host in lab:
        st = host.node.status()
        brief = (
            None
            if st is None
            else {k: st.get(k) for k in ("role", "epoch", "peer_connected", "active_sentinels")}
        )
        lines.append(f"{host.name}: {brief}; log:\n{host.node.log_tail(12)}")
    return "\n".join(lines)


def wait_settled(lab: NetLab, *, timeout: float) -> tuple[str, float]:
    """Wait for one primary with its connected secondary; (primary, seconds it took)."""
    began = time.monotonic()
    while True:
        primary = settled(lab)
        if primary is not None:
            return primary, time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"the pair did not settle within {timeout} s:\n{describe(lab)}")
        time.sleep(0.02)


def start_pair(lab: NetLab) -> None:
    """a first (primary, both sentinels running), then b (its connected secondary)."""
    lab.a.node.start()
    lab.a.node.wait_for("primary", is_primary, timeout=15)
    wait_until("a's sentinels running", lambda: all_running_on(lab, "a"), timeout=10)
    lab.b.node.start()
    assert wait_settled(lab, timeout=15)[0] == "a", describe(lab)


def tree(host: Host) -> dict[str, bytes]:
    """The replicated folder of ``host``: relative path -> bytes (sbs's temporary files aside)."""
    found: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(host.folder):
        dirs[:] = [d for d in dirs if not d.startswith(STAGING_PREFIX)]  # a new folder, filling
        for name in names:
            if name.startswith(TEMP_PREFIX):
                continue
            path = Path(folder, name)
            try:
                found[path.relative_to(host.folder).as_posix()] = path.read_bytes()
            except FileNotFoundError:
                continue  # replaced while listed
    return found


def temp_files(host: Host) -> list[str]:
    return sorted(
        name
        for folder, _d, names in os.walk(host.folder)
        for name in names
        if name.startswith(TEMP_PREFIX) or STAGING_PREFIX in folder
    )


def kept_conflicts(lab: NetLab) -> dict[str, bytes]:
    """Every copy kept aside as a conflict on either node: path -> bytes."""
    kept: dict[str, bytes] = {}
    for host in lab:
        root = host.node.state_dir / "conflicts"
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = Path(folder, name)
                if name != "conflict.json":
                    kept[str(path)] = path.read_bytes()
    return kept


def write(lab: NetLab, host: Host, rel: str, version: str, size: int = 2000) -> bytes:
    data = make_content(version, size)
    write_atomically(host.folder / rel, data, scratch=host.scratch)
    return data


def wait_same_trees(lab: NetLab, *, timeout: float) -> float:
    return wait_until(
        "both folders identical", lambda: tree(lab.a) == tree(lab.b), timeout=timeout, poll=0.05
    )


def promotions(lab: NetLab, how: str | None = None) -> list[dict[str, Any]]:
    """The ``promoted`` alerts of both nodes (of one ``how``: startup, takeover, handover)."""
    found = []
    for host in lab:
        for alert in alerts_of(host):
            if alert["kind"] == "promoted" and (how is None or alert["details"].get("how") == how):
                found.append(alert)
    return found


def sentinels_started_on(lab: NetLab, node: str, after: float) -> list[Run]:
    return [r for r in lab.runs() if r["node"] == node and r["start"] >= after]


def takeover_time(lab: NetLab, node: str, since: float, *, timeout: float) -> float:
    """Seconds from ``since`` (wall clock) until ``node`` ran both sentinels again."""
    wait_until(
        f"both sentinels started on {node}",
        lambda: {r["name"] for r in sentinels_started_on(lab, node, since)} == set(SENTINELS),
        timeout=timeout,
    )
    return float(max(r["start"] for r in sentinels_started_on(lab, node, since))) - since


def overlap(runs: Iterable[Run], *, now: float) -> float:
    """Total time during which sentinels ran on a and b at once (runs still going end now)."""
    spans: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    for r in runs:
        end = r["stop"] if r["stop"] is not None else now
        spans[r["node"]].append((r["start"], end))
    total = 0.0
    for start_a, end_a in spans["a"]:
        for start_b, end_b in spans["b"]:
            total += max(0.0, min(end_a, end_b) - max(start_a, start_b))
    return total


# -- the scenarios


def sigkill_primary(lab: NetLab) -> Figures:
    """SIGKILL of the primary: the kernel closes its connection, b takes over at once."""
    start_pair(lab)
    a_pids = [r["pid"] for r in running_on(lab, "a")]
    killed_at = time.time()
    sigkill(lab.a)
    took = takeover_time(lab, "b", killed_at, timeout=lab.timings.dead_time + 5)
    wait_until("a's sentinels dead", lambda: not any(pid_alive(p) for p in a_pids), timeout=5)
    lab.a.node.start()
    primary, _ = wait_settled(lab, timeout=15)
    return {"takeover": took, "primary_after_return": primary}


def partition_and_heal(lab: NetLab, *, hold: float = 2.0) -> Figures:
    """Link down with both nodes alive, changes on both sides, then the link comes back."""
    t = lab.timings
    start_pair(lab)
    base = write(lab, lab.a, "shared.txt", "base")
    wait_until("shared.txt on b", lambda: tree(lab.b).get("shared.txt") == base, timeout=10)

    cut_at = time.time()
    link_down(lab)
    takeover = takeover_time(lab, "b", cut_at, timeout=t.dead_time + 5)
    both_primary = sorted(lab.primaries()) == ["a", "b"]
    a_only = write(lab, lab.a, "from-a.txt", "a-only")
    b_only = write(lab, lab.b, "from-b.txt", "b-only")
    a_shared = write(lab, lab.a, "shared.txt", "a-side")
    b_shared = write(lab, lab.b, "shared.txt", "b-side")
    time.sleep(hold)

    healed_at = time.time()
    link_up(lab)
    winner, settle = wait_settled(lab, timeout=t.settle_time + 10)
    loser = "b" if winner == "a" else "a"
    wait_until(
        f"{loser}'s sentinels stopped",
        lambda: not running_on(lab, loser),
        timeout=5,
    )
    runs = lab.runs()
    loser_stop = max((r["stop"] or healed_at) for r in runs if r["node"] == loser)
    wait_same_trees(lab, timeout=15)
    final = tree(lab.hosts[winner])
    winner_shared, loser_shared = (a_shared, b_shared) if winner == "a" else (b_shared, a_shared)
    kept = kept_conflicts(lab)
    return {
        "takeover": takeover,
        "both_primary_during_partition": both_primary,
        "split_brain": loser_stop - cut_at - takeover,
        "one_primary_after_heal": settle,
        "sentinels_on_both_after_heal": max(0.0, loser_stop - healed_at),
        "winner": winner,
        "merged": final.get("from-a.txt") == a_only and final.get("from-b.txt") == b_only,
        "winner_version_kept": final.get("shared.txt") == winner_shared,
        "loser_version_in_conflicts": loser_shared in kept.values(),
        "shared_on_each": {h.name: version_of(tree(h).get("shared.txt", b"")) for h in lab},
        "conflict_versions": sorted(str(version_of(data)) for data in kept.values()),
        "split_brain_alerts": sum(
            1 for h in lab for alert in alerts_of(h) if alert["kind"] == "split_brain"
        ),
        "temp_files": temp_files(lab.a) + temp_files(lab.b),
    }


def one_way_loss(lab: NetLab, *, deaf: str, hold: float = 3.0) -> Figures:
    """``deaf`` hears nothing from its peer while its peer still hears it; then the loss ends."""
    t = lab.timings
    start_pair(lab)
    lost_at = time.time()
    drop_from_peer(lab, lab.hosts[deaf])
    most = 0
    first_two: float | None = None
    written: dict[str, bytes] = {}
    while time.time() - lost_at < hold:
        primaries = lab.primaries()
        most = max(most, len(primaries))
        if len(primaries) == 2 and first_two is None:
            first_two = time.time() - lost_at
        for name in primaries:
            rel = f"oneway-{name}.txt"
            if rel not in written:
                written[rel] = write(lab, lab.hosts[name], rel, f"oneway-{name}")
        time.sleep(0.05)
    healed_at = time.time()
    clear_faults(lab)
    winner, settle = wait_settled(lab, timeout=t.settle_time + 10)
    wait_same_trees(lab, timeout=15)
    final = tree(lab.hosts[winner])
    kept = set(kept_conflicts(lab).values())
    lost = [rel for rel, data in written.items() if final.get(rel) != data and data not in kept]
    loser = "b" if winner == "a" else "a"
    loser_runs = [r for r in lab.runs() if r["node"] == loser]
    loser_stop = max((r["stop"] or healed_at) for r in loser_runs) if loser_runs else healed_at
    return {
        "most_primaries_during_loss": most,
        "both_primary_after": first_two,
        "one_primary_after_heal": settle,
        "sentinels_on_both_after_heal": max(0.0, loser_stop - healed_at),
        "lost": lost,
        "written": sorted(written),
    }


def disk_full_on_secondary(lab: NetLab, *, window: float = 5.0) -> Figures:
    """b's volume shrinks to 1 MiB; a 3 MiB file cannot fit; then space returns.

    The lab needs ``volumes={"b": ...}`` and nodes with a short ``node.period``:
    the failed file goes again at the next cycle. For ``window`` seconds after
    the big file is written, the statuses and alerts of both nodes are watched
    for a report.
    """
    start_pair(lab)
    room = lab.b.volume_kib
    assert room is not None, "the lab needs volumes={'b': KiB}"
    disk_space(lab.b, 1024)
    small = write(lab, lab.a, "small.txt", "small")
    wait_until("small.txt on b", lambda: tree(lab.b).get("small.txt") == small, timeout=10)
    big = write(lab, lab.a, "big.bin", "big", size=3 << 20)
    errors: set[str] = set()
    most_pending = 0
    torn: list[str] = []
    began = time.monotonic()
    while time.monotonic() - began < window:
        for host in lab:
            st = host.node.status()
            if st is not None and st["last_sync_error"]:
                errors.add(str(st["last_sync_error"]))
            if st is not None and host is lab.a:
                most_pending = max(most_pending, int(st["files_pending"]))
        torn += [rel for rel, data in tree(lab.b).items() if version_of(data) is None]
        time.sleep(0.05)
    alerts = [a for h in lab for a in alerts_of(h) if a["kind"] == "replication_failed"]
    on_b = tree(lab.b)
    leftovers = temp_files(lab.b)

    freed_at = time.monotonic()
    disk_space(lab.b, room)
    recovered = wait_until(
        "big.bin on b after space returned",
        lambda: tree(lab.b).get("big.bin") == big,
        timeout=30,
        poll=0.1,
    )
    wait_until(
        "nothing pending on a",
        lambda: (st := lab.a.node.status()) is not None and st["files_pending"] == 0,
        timeout=30,
        poll=0.1,
    )
    return {
        "errors": sorted(errors),
        "alerts": len(alerts),
        "most_files_pending": most_pending,
        "torn_seen": sorted(set(torn)),
        "small_kept": on_b.get("small.txt") == small,
        "partial_big_visible": "big.bin" in on_b,
        "temp_files_while_full": leftovers,
        "recovered_after": recovered,
        "pending_cleared_after": time.monotonic() - freed_at,
    }


def hung_primary(lab: NetLab) -> Figures:
    """SIGSTOP of the primary; b takes over; a is resumed and must step down by epoch."""
    t = lab.timings
    start_pair(lab)
    a_epoch = running_on(lab, "a")[0]["epoch"]
    hung_at = time.time()
    hang(lab.a)
    took = takeover_time(lab, "b", hung_at, timeout=t.dead_time + 5)
    a_still_running = all_running_on(lab, "a")
    resumed_at = time.time()
    resume(lab.a)
    wait_until(
        "a's sentinels stopped",
        lambda: all(r["stop"] is not None for r in lab.runs() if r["node"] == "a"),
        timeout=10,
    )
    stopped = max(r["stop"] for r in lab.runs() if r["node"] == "a") - resumed_at
    primary, _ = wait_settled(lab, timeout=10)
    sts = lab.statuses()
    epochs = {n: (st or {}).get("epoch") for n, st in sts.items()}
    b_epoch = min(r["epoch"] for r in sentinels_started_on(lab, "b", hung_at))
    return {
        "takeover": took,
        "a_sentinels_ran_while_hung": a_still_running,
        "resumed_sentinels_stopped_after": stopped,
        "primary": primary,
        "epochs": epochs,
        "a_epoch_before": a_epoch,
        "b_epoch": b_epoch,
    }


def simultaneous(lab: NetLab) -> Figures:
    """Both nodes started in the same millisecond: one primary, and for how long two."""
    began = time.time()
    simultaneous_start(lab)
    primary, took = wait_settled(lab, timeout=lab.timings.settle_time + 15)
    wait_until(
        "the secondary's sentinels stopped",
        lambda: not running_on(lab, "b" if primary == "a" else "a"),
        timeout=5,
    )
    return {
        "primary": primary,
        "settled_after_start": took,
        "sentinels_on_both": overlap(lab.runs(), now=time.time()),
        "since": began,
    }


def files_changing_while_sent(lab: NetLab, *, seconds: float = 3.0) -> Figures:
    """A 2 MiB file rewritten in place on the primary while replication reads it.

    A reader samples b's copy all along. Each sample is one whole version, or a
    moment of one in-place write (a prefix of one version: the primary's own
    disk showed the same), counted as ``unfinished``; a mix of two versions
    counts as ``torn``.
    """
    start_pair(lab)
    path = lab.a.folder / "churn.bin"
    copy = lab.b.folder / "churn.bin"
    samples = torn = unfinished = 0
    versions_seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        nonlocal samples, torn, unfinished
        while not stop.is_set():
            try:
                data = copy.read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None:
                samples += 1
                version = version_of(data)
                if version is not None:
                    versions_seen.add(version)
                elif is_unfinished_write(data):
                    unfinished += 1  # a faithful copy of one moment of the in-place write
                else:
                    torn += 1  # a mix of two versions
            time.sleep(0.01)

    reader = threading.Thread(target=sample, name="churn-reader", daemon=True)
    reader.start()
    began = time.monotonic()
    written = 0
    try:
        while time.monotonic() - began < seconds:
            written += 1
            write_in_place(path, make_content(f"churn-{written}", 2 << 20))
            time.sleep(0.02)
    finally:
        try:
            final = path.read_bytes()
            wait_until(
                "the last version on b",
                lambda: copy.exists() and copy.read_bytes() == final,
                timeout=20,
            )
        finally:
            # Stopped whatever happened: a reader left running would fail a later test.
            stop.set()
            reader.join(5)
    return {
        "versions_written": written,
        "versions_seen_on_b": len(versions_seen),
        "samples": samples,
        "torn": torn,
        "unfinished": unfinished,
    }


def clock_offset_takeover(lab: NetLab, *, offset: int = 30 * 86400) -> Figures:
    """b runs with its monotonic clock 30 days ahead of a's; a SIGKILL takeover still works."""
    lab.a.node.start()
    lab.a.node.wait_for("primary", is_primary, timeout=15)
    wait_until("a's sentinels running", lambda: all_running_on(lab, "a"), timeout=10)
    lab.start_with_clock_offset(lab.b, offset)
    assert wait_settled(lab, timeout=15)[0] == "a", describe(lab)
    data = write(lab, lab.a, "clock.txt", "clock")
    wait_until("clock.txt on b", lambda: tree(lab.b).get("clock.txt") == data, timeout=10)
    killed_at = time.time()
    sigkill(lab.a)
    took = takeover_time(lab, "b", killed_at, timeout=lab.timings.dead_time + 5)
    lab.a.node.start()
    primary, _ = wait_settled(lab, timeout=15)
    return {"takeover": took, "primary_after_return": primary}


def disk_full_during_changes(lab: NetLab, *, seed: int = 3) -> Figures:
    """b's disk fills up while a's files are created, changed and deleted; then space returns.

    The lab needs ``volumes`` for b and ``strict_sync``. Returns what a reports
    ten seconds after the space came back, and whether b caught up.
    """
    rng = random.Random(seed)
    start_pair(lab)
    room = lab.b.volume_kib
    assert room is not None, "the lab needs volumes={'b': KiB}"
    names = [f"d{i % 4}/f{i:02d}.txt" for i in range(40)]
    for name in names[:20]:
        write(lab, lab.a, name, "init-" + name.replace("/", "-"), size=rng.randint(100, 20_000))
    wait_same_trees(lab, timeout=20)
    fill_disk(lab.b, spare_kib=16)
    for i in range(30):
        name = rng.choice(names)
        if rng.random() < 0.25 and (lab.a.folder / name).exists():
            (lab.a.folder / name).unlink()
        else:
            write(lab, lab.a, name, f"v{i}", size=rng.randint(100, 20_000))
        time.sleep(0.1)
    errors: set[str] = set()
    alerts = 0
    disk_space(lab.b, room)
    freed_at = time.time()
    caught_up: float | None = None
    while time.time() - freed_at < 10:
        for host in lab:
            st = host.node.status()
            if st is not None and st["last_sync_error"]:
                errors.add(str(st["last_sync_error"]))
        if caught_up is None and tree(lab.a) == tree(lab.b):
            caught_up = time.time() - freed_at
        time.sleep(0.2)
    alerts = sum(1 for h in lab for a in alerts_of(h) if a["kind"] == "replication_failed")
    st = lab.a.node.status()
    assert st is not None, describe(lab)
    return {
        "caught_up_after": caught_up,
        "files_pending": st["files_pending"],
        "last_sync_ago": time.time() - (st["last_sync_at"] or 0),
        "errors": sorted(errors),
        "alerts": alerts,
    }
