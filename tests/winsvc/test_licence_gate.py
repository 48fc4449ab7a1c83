"""The licence applied by a running node: held sentinels at startup, allowed after a takeover."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from sbs_core.cli import format_status
from sbs_core.config import load_config
from sbs_core.driver import Node
from sbs_core.lab import Pair, free_port, marker_sentinel, read_markers, write_node_config
from sbs_core.licence import (
    Licence,
    LicenceGate,
    generate_key_pair,
    issue_licence,
    load_private_key,
    verify_licence,
)
from sbs_core.testing import FakeController
from sbs_core.transport import MemoryNetwork

SENTINELS = ("labels", "spooler")


def licence_text(private_pem: bytes, kind: str) -> str:
    return issue_licence(
        load_private_key(private_pem),
        Licence(licensee="ACME", kind=kind, issued=dt.date.today(), serial=f"{kind}-1"),  # type: ignore[arg-type]
    )


def gate(kind: str) -> LicenceGate:
    pem, public = generate_key_pair()
    data = licence_text(pem, kind).encode()
    return LicenceGate(verify_licence(data, public, host=None, today=dt.date.today()))


@pytest.mark.anyio
async def test_a_backup_node_alone_at_startup_holds_its_sentinels_and_says_why(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret").write_text("s" * 32)
    path = write_node_config(
        tmp_path / "b",
        name="b",
        local="10.9.0.2",
        remote="10.9.0.1",
        port=4445,
        secret_file=tmp_path / "secret",
        heartbeat_interval=0.05,
        dead_time=0.3,
        probe_interval=0.1,
        sentinels={s: ["unused"] for s in SENTINELS},
    )
    controller = FakeController(SENTINELS)
    node = Node(
        load_config(path),
        transport=MemoryNetwork().transport("10.9.0.2"),
        controller=controller,
        gate=gate("backup"),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.run)
        with anyio.fail_after(5):
            while node.status().get("sentinels_held") != list(SENTINELS):
                await anyio.sleep(0.01)
        status = node.status()
        assert status["role"] == "primary"
        assert controller.running_sentinels() == frozenset()
        assert controller.application_running  # the application is not licensed away
        assert status["licence"]["kind"] == "backup"
        assert "became primary at startup" in status["licence"]["held_back"]
        assert status["sentinels_held_reason"] == status["licence"]["held_back"]
        assert "held       labels, spooler not started: a backup licence" in format_status(status)
        node.request_stop()
    assert controller.running_sentinels() == frozenset()


@pytest.mark.anyio
async def test_a_standard_licence_holds_nothing(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s" * 32)
    path = write_node_config(
        tmp_path / "a",
        name="a",
        local="10.9.0.1",
        remote="10.9.0.2",
        port=4445,
        secret_file=tmp_path / "secret",
        probe_interval=0.1,
        sentinels={s: ["unused"] for s in SENTINELS},
    )
    controller = FakeController(SENTINELS)
    node = Node(
        load_config(path),
        transport=MemoryNetwork().transport("10.9.0.1"),
        controller=controller,
        gate=gate("standard"),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.run)
        with anyio.fail_after(5):
            while controller.running_sentinels() != frozenset(SENTINELS):
                await anyio.sleep(0.01)
        assert node.status()["sentinels_held"] == []
        assert node.status()["licence"]["held_back"] is None
        node.request_stop()


def _wait(what: str, test: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and the parent-death signal")
def test_a_real_backup_node_runs_sentinels_only_when_it_took_over(tmp_path: Path) -> None:
    pem, public = generate_key_pair()
    markers = tmp_path / "pair" / "markers"
    markers.mkdir(parents=True)
    extra = f"\n[licence]\nfile = 'node.lic'\npublic_key = '{public}'\n"
    with Pair(
        tmp_path / "pair",
        extra=extra,
        sentinels={"labels": [sys.executable, "-c", marker_sentinel(markers)]},
        heartbeat_interval=0.2,
        dead_time=1.0,
    ) as pair:
        (pair.a.config.parent / "node.lic").write_text(licence_text(pem, "standard"))
        (pair.b.config.parent / "node.lic").write_text(licence_text(pem, "backup"))
        check = pair.b.sbs("check")
        assert check.returncode == 0, check.stderr
        assert "licence: backup licence for ACME" in check.stdout

        # b alone: primary at startup, sentinels held back, and says why.
        pair.b.start()
        pair.b.wait_for("primary holding", lambda st: st.get("sentinels_held") == ["labels"])
        shown = pair.b.sbs("status")
        assert "held       labels not started: a backup licence allows" in shown.stdout
        as_json = json.loads(pair.b.sbs("status", "--json").stdout)
        assert as_json["licence"]["kind"] == "backup"
        time.sleep(0.5)
        assert read_markers(markers) == []
        pair.b.stop()

        # a (standard) first, then b; a dies: b took over, so b may run them.
        pair.a.start()
        pair.a.wait_for("primary", lambda st: st.get("active_sentinels") == ["labels"])
        pair.b.start()
        pair.b.wait_for("secondary", lambda st: st.get("role") == "secondary")
        _wait("a's sentinel", lambda: len(read_markers(markers)) == 1)
        pair.a.kill()
        pair.b.wait_for("primary by takeover", lambda st: st.get("active_sentinels") == ["labels"])
        assert pair.b.status()["sentinels_held"] == []  # type: ignore[index]
        _wait("b's sentinel", lambda: len(read_markers(markers)) == 2)
        nodes = [run["node"] for run in sorted(read_markers(markers), key=lambda r: r["start"])]
        assert nodes == ["a", "b"]


def test_sbs_run_refuses_a_tampered_licence_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem, public = generate_key_pair()
    folder = tmp_path / "n"
    (tmp_path / "secret").write_text("s" * 32)
    path = write_node_config(
        folder,
        name="n",
        local="127.0.0.1",
        remote="127.0.0.2",
        port=4445,
        secret_file=tmp_path / "secret",
        extra=f"\n[licence]\nfile = 'node.lic'\npublic_key = '{public}'\n",
    )
    text = licence_text(pem, "standard").replace("ACME", "ACMF")
    (folder / "node.lic").write_text(text)
    from sbs_core.cli import main  # noqa: PLC0415

    assert main(["run", "--config", str(path)]) == 2
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sbs: licence refused: licence file" in err
    assert "has been tampered with" in err


def test_sbs_run_leaves_the_windows_controller_to_the_service(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s" * 32)
    path = write_node_config(
        tmp_path / "n",
        name="n",
        local="127.0.0.1",
        remote="127.0.0.2",
        port=free_port("127.0.0.1"),
        secret_file=tmp_path / "secret",
        sentinels={},
    )
    path.write_text(path.read_text().replace('kind = "process"', 'kind = "windows"'))
    run = subprocess.run(
        [sys.executable, "-m", "sbs_core", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "is run by the Windows service shell (python -m sbs_winsvc)" in run.stderr
