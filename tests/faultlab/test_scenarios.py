"""The pair under real faults: two network namespaces, a real ``sbs run`` in each.

Bounds are built from the pair's timers (heartbeat 0.2 s, dead time 1 s, probe
0.5 s) plus a margin for a loaded 2-core machine, stated at each assertion.
Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import pytest
import scenarios
from netlab import NetLab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# Process start-up, status polls and sentinel exits on a loaded machine.
MARGIN = 1.0


def show(name: str, figures: dict[str, object]) -> None:
    print(f"[faultlab] {name}: {figures}")


def test_sigkill_of_the_primary(lab: NetLab) -> None:
    got = scenarios.sigkill_primary(lab)
    show("sigkill", got)
    # The kernel closes the dead node's connection: no dead_time to wait.
    assert got["takeover"] < lab.timings.dead_time
    assert got["primary_after_return"] == "b"


def test_partition_with_both_sides_alive_then_heal(lab: NetLab) -> None:
    got = scenarios.partition_and_heal(lab)
    show("partition", got)
    t = lab.timings
    # Nothing can tell a partition from a dead peer: b takes over after dead_time
    # while a, cut off, stays primary. That is the split brain being measured.
    assert got["both_primary_during_partition"]
    # Silence is counted from the last heartbeat heard, up to one interval before the cut.
    assert t.dead_time - t.heartbeat_interval <= got["takeover"] <= t.dead_time + MARGIN
    assert got["one_primary_after_heal"] <= t.settle_time + MARGIN
    assert got["sentinels_on_both_after_heal"] <= t.settle_time + MARGIN
    # The loser's changes reached the winner.
    assert got["merged"]
    assert got["split_brain_alerts"] >= 1


def test_partition_keeps_the_winners_version_of_a_file_changed_on_both_sides(
    lab: NetLab,
) -> None:
    got = scenarios.partition_and_heal(lab)
    show("partition, both changed", got)
    # The file changed on both sides keeps the winner's version; the loser's copy
    # is kept as a conflict; no temporary file is left behind.
    assert got["winner_version_kept"], got
    assert got["loser_version_in_conflicts"], got
    assert got["temp_files"] == [], got


@pytest.mark.parametrize("deaf", ["a", "b"])
def test_one_way_loss(lab: NetLab, deaf: str) -> None:
    got = scenarios.one_way_loss(lab, deaf=deaf)
    show(f"one-way loss, {deaf} deaf", got)
    assert got["one_primary_after_heal"] <= lab.timings.settle_time + MARGIN
    assert got["sentinels_on_both_after_heal"] <= lab.timings.settle_time + MARGIN
    assert got["lost"] == []


@pytest.mark.lab(node_extra={"period": 1.0}, volumes={"b": 16 << 10})
def test_disk_full_on_the_secondary(lab: NetLab) -> None:
    got = scenarios.disk_full_on_secondary(lab)
    show("disk full", got)
    # The primary knows the file did not arrive.
    assert got["most_files_pending"] >= 1
    # Nothing corrupted: the old file intact, no partial file, no temporary left.
    assert got["torn_seen"] == []
    assert got["small_kept"]
    assert not got["partial_big_visible"]
    assert got["temp_files_while_full"] == []
    # period = 1 s: the failed file goes again at the next cycles.
    assert got["recovered_after"] <= 10


@pytest.mark.lab(node_extra={"period": 1.0}, volumes={"b": 16 << 10})
def test_disk_full_on_the_secondary_is_reported(lab: NetLab) -> None:
    got = scenarios.disk_full_on_secondary(lab)
    show("disk full, report", got)
    assert any("space" in e.lower() for e in got["errors"]), got["errors"]
    assert got["alerts"] >= 1


@pytest.mark.lab(
    node_extra={"period": 2.0, "strict_sync": True, "max_delete": "100%"},
    volumes={"b": 64 << 10},
)
def test_replication_resumes_after_the_secondary_disk_was_full(lab: NetLab) -> None:
    got = scenarios.disk_full_during_changes(lab)
    show("disk full during changes", got)
    assert got["caught_up_after"] is not None or got["errors"], got
    assert got["caught_up_after"] is not None, got


def test_hung_primary_steps_down_when_resumed(lab: NetLab) -> None:
    got = scenarios.hung_primary(lab)
    show("hung primary", got)
    t = lab.timings
    assert got["a_sentinels_ran_while_hung"]
    assert t.dead_time - t.heartbeat_interval <= got["takeover"] <= t.dead_time + MARGIN
    # The resumed node learns from b's higher epoch that it is stale: one
    # heartbeat interval, plus 0.5 s to connect and let two processes exit.
    assert got["resumed_sentinels_stopped_after"] <= t.heartbeat_interval + 0.5
    assert got["primary"] == "b"
    assert got["b_epoch"] > got["a_epoch_before"]
    assert got["epochs"]["a"] == got["epochs"]["b"] == got["b_epoch"]


def test_simultaneous_start(lab: NetLab) -> None:
    got = scenarios.simultaneous(lab)
    show("simultaneous start", got)
    assert got["settled_after_start"] <= lab.timings.settle_time + 5  # includes start-up
    assert got["sentinels_on_both"] <= lab.timings.settle_time


def test_files_changing_while_being_sent(lab: NetLab) -> None:
    got = scenarios.files_changing_while_sent(lab)
    show("files changing", got)
    assert got["samples"] > 0
    assert got["torn"] == 0


def test_clock_offset_on_one_node(lab: NetLab) -> None:
    got = scenarios.clock_offset_takeover(lab)
    show("clock offset", got)
    assert got["takeover"] < lab.timings.dead_time
    assert got["primary_after_return"] == "b"
