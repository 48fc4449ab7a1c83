"""The command line against real nodes: sentinels, status, check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pair_support import (
    SENTINELS,
    full_primary,
    marker_pair,
    runs_on,
    start_in_order,
    status_json,
    wait_dead,
    wait_markers,
    wait_running,
)

from sbs_core.lab import HOSTS, NodeProcess, read_markers, write_node_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and the parent-death signal"),
]


def sbs(*args: str) -> subprocess.CompletedProcess[str]:
    """``sbs ARGS`` with a bound: a command that should refuse must not hang the suite."""
    return subprocess.run(
        [sys.executable, "-m", "sbs_core", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def sentinel_list(node: NodeProcess) -> dict[str, str]:
    done = node.sbs("sentinels", "list", timeout=20)
    assert done.returncode == 0, done.stderr
    return dict(line.split() for line in done.stdout.splitlines())


@pytest.mark.timeout(90)
def test_sentinels_command_and_the_choice_survives(tmp_path: Path) -> None:
    with marker_pair(tmp_path / "pair") as pair:
        a_runs = runs_on(start_in_order(pair), "a")

        done = pair.a.sbs("sentinels", "stop", "labels")
        assert done.returncode == 0, done.stderr
        assert "labels" in done.stdout
        labels = next(r for r in a_runs if r["name"] == "labels")
        wait_markers(
            pair,
            "labels stopped on a",
            lambda rs: any(r["pid"] == labels["pid"] and r["stop"] for r in rs),
            timeout=5,
        )
        st = status_json(pair.a)
        assert st["active_sentinels"] == ["spooler"]
        assert st["sentinels"] == ["spooler"]
        assert sentinel_list(pair.a) == {"labels": "off", "spooler": "running"}
        # The secondary learns the new list from the primary's next heartbeat.
        pair.b.wait_for("told of the change", lambda s: s["sentinels"] == ["spooler"], timeout=5)

        # Refusals, each with exit 1 and a message that says why.
        done = pair.b.sbs("sentinels", "start", "labels")
        assert done.returncode == 1
        assert "secondary" in done.stderr, done.stderr
        done = pair.a.sbs("sentinels", "stop", "printer")
        assert done.returncode == 1
        assert "printer" in done.stderr
        assert "labels, spooler" in done.stderr, done.stderr

        # Failover: the new primary starts what was active, only that.
        spooler_pid = next(r["pid"] for r in a_runs if r["name"] == "spooler")
        pair.a.kill()
        wait_dead([spooler_pid], timeout=2.0)
        pair.b.wait_for("primary", full_primary(["spooler"]), timeout=5)
        wait_running(pair, "b", ["spooler"])

        done = pair.a.sbs("sentinels", "stop", "labels")
        assert done.returncode == 1
        assert "no node is running" in done.stderr, done.stderr
        assert "sbs run" in done.stderr

        # A restart of the node keeps the choice too (b alone: nobody answers).
        assert pair.b.stop(timeout=15) == 0
        pair.b.start()
        pair.b.wait_for("primary", full_primary(["spooler"]), timeout=10)
        runs = wait_running(pair, "b", ["spooler"])
        assert [r["name"] for r in runs_on(runs, "b")] == ["spooler", "spooler"]

        done = pair.b.sbs("sentinels", "start", "labels")
        assert done.returncode == 0, done.stderr
        pair.b.wait_for("primary", full_primary(SENTINELS), timeout=5)
        wait_running(pair, "b", SENTINELS)
        assert status_json(pair.b)["sentinels"] == list(SENTINELS)


def test_status_of_a_stopped_and_of_a_running_node(tmp_path: Path) -> None:
    with marker_pair(tmp_path / "pair") as pair:
        # Never started: nothing saved yet, and still a clean answer.
        st = status_json(pair.a)
        assert st["role"] == "stopped"
        assert st["epoch"] == 0
        assert st["peer_connected"] is False
        assert st["active_sentinels"] == []
        done = pair.a.sbs("status")
        assert done.returncode == 0, done.stderr
        assert "STOPPED" in done.stdout
        assert f"peer       {HOSTS[1]}: not connected" in done.stdout
        assert not pair.a.state_dir.exists()  # looking wrote nothing

        start_in_order(pair)
        running = status_json(pair.a)
        screen = pair.a.sbs("status").stdout
        lines = screen.splitlines()
        assert len(lines) <= 10, screen
        assert any(line.startswith("role") and "PRIMARY" in line for line in lines), screen
        assert any(
            line.startswith("peer") and f"b at {HOSTS[1]}: connected, secondary" in line
            for line in lines
        ), screen
        assert "labels, spooler" in screen

        assert pair.a.stop(timeout=15) == 0
        assert pair.b.stop(timeout=15) == 0
        for node in pair:
            st = status_json(node)
            saved = json.loads((node.state_dir / "state.json").read_text())
            # Tools read the same keys whether the node runs or not.
            assert set(st) >= set(running), set(running) - set(st)
            assert st["node_id"] == (node.state_dir / "node_id").read_text().strip()
            assert st["role"] == "stopped"
            assert st["epoch"] == saved["epoch"] >= 1
            assert st["peer_connected"] is False
            assert st["active_sentinels"] == []
        # Nothing runs once both are stopped: every run has its stop marker.
        assert all(r["stop"] is not None for r in read_markers(pair.markers))


def test_check_and_run_refuse_an_invalid_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    done = sbs("secret", str(secret))
    assert done.returncode == 0, done.stderr
    assert secret.stat().st_mode & 0o777 == 0o600

    good = write_node_config(
        tmp_path / "good", name="a", local=HOSTS[0], remote=HOSTS[1], port=4445, secret_file=secret
    )
    done = sbs("check", "--config", str(good))
    assert done.returncode == 0, done.stderr
    assert f"{good}: OK" in done.stdout

    text = good.read_text()
    missing_remote = tmp_path / "no-remote" / "sbs.toml"
    empty_remote = tmp_path / "empty-remote" / "sbs.toml"
    missing_secret = tmp_path / "no-secret" / "sbs.toml"
    for path, body in (
        (missing_remote, "".join(li for li in text.splitlines(True) if "remote_address" not in li)),
        (empty_remote, text.replace(f'remote_address = "{HOSTS[1]}"', 'remote_address = ""')),
        (missing_secret, text.replace(str(secret), str(tmp_path / "nowhere"))),
    ):
        assert body != text
        path.parent.mkdir()
        path.write_text(body)

    for path, key, detail in (
        (missing_remote, "node.remote_address", "refuses to start"),
        (empty_remote, "node.remote_address", "empty"),
        (missing_secret, "node.secret_file", str(tmp_path / "nowhere")),
    ):
        checked = sbs("check", "--config", str(path))
        assert checked.returncode == 2
        assert str(path) in checked.stderr
        assert key in checked.stderr
        assert detail in checked.stderr, checked.stderr
        # ``run`` refuses the same way, before anything is created or started.
        ran = sbs("run", "--config", str(path))
        assert ran.returncode == 2
        assert ran.stderr == checked.stderr
        assert not (path.parent / "state").exists()
