"""A node's own disk failing (a full disk) never ends its run, and replication comes back.

Found when a disk filled up under a running pair: the primary's hash index
could not commit ("database or disk is full") and the error ended the node.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from memorypair import A_HOST, B_HOST, FOLDERS, make_node, node_in_memory, start_pair, tree

from sbs_core.alerts.events import AlertEvent
from sbs_core.sync import engine
from sbs_core.sync import index as index_module
from sbs_core.sync.direct import MIN_SIZE
from sbs_core.sync.scan import FileStat
from sbs_core.transport import MemoryNetwork


@pytest.mark.anyio
async def test_an_index_that_cannot_be_written_pauses_the_replication_without_ending_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    src.mkdir(parents=True)
    for i in range(20):
        (src / f"small{i}.txt").write_bytes(os.urandom(100 + i))
    for i in range(2):
        (src / f"big{i}.bin").write_bytes(os.urandom(MIN_SIZE * 2 + i))
    full = {"disk": True}
    failed: list[str] = []
    real_put_many = index_module.HashIndex.put_many

    def put_many(self: index_module.HashIndex, rows: Any, *, agreed: bool = False) -> None:
        if full["disk"]:
            failed.append("put_many")
            raise sqlite3.OperationalError("database or disk is full")
        real_put_many(self, rows, agreed=agreed)

    monkeypatch.setattr(index_module.HashIndex, "put_many", put_many)
    monkeypatch.setattr(engine, "SESSION_RESTART_DELAY", 0.3)
    network = MemoryNetwork()
    a = make_node(tmp_path, network, "a", A_HOST, B_HOST)
    b = make_node(tmp_path, network, "b", B_HOST, A_HOST)
    errors: set[str] = set()

    caplog.set_level(logging.WARNING, logger="sbs")
    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(20):
            while len(failed) < 3:
                errors.add(str(a.status().get("last_sync_error")))
                await anyio.sleep(0.01)
        full["disk"] = False  # space is freed
        with anyio.fail_after(20):
            while not (dst.exists() and tree(dst) == tree(src)):
                await anyio.sleep(0.02)
        # Both nodes ran on: the primary kept its role all along.
        assert a.status()["role"] == "primary"
        assert b.status()["role"] == "secondary"
        tg.cancel_scope.cancel()

    assert any("database or disk is full" in e for e in errors)
    assert any("replication stopped on this node" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
@pytest.mark.parametrize("size", [100, MIN_SIZE * 2], ids=["small", "large"])
async def test_a_file_that_cannot_be_read_is_named_once_and_goes_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    src.mkdir(parents=True)
    files = {f"file{i}.bin": os.urandom(size + i) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    locked = src / "file2.bin"
    refused = {"now": True}
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if refused["now"] and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    network = MemoryNetwork()
    # A full scan every half second: each one tries the file again.
    a, b = (
        node_in_memory(
            tmp_path,
            network,
            name,
            local,
            remote,
            heartbeat_interval=0.05,
            dead_time=1.0,
            node_extra={"period": 0.2, "rescan_interval": 0.5},
            extra=FOLDERS,
        )
        for name, local, remote in (("a", A_HOST, B_HOST), ("b", B_HOST, A_HOST))
    )
    others = {name: data for name, data in files.items() if name != "file2.bin"}
    # The alert is raised by the reading thread: it must reach the alerts on the loop's.
    published: list[tuple[str, str, int]] = []
    real_publish = a._notifier.publish

    def publish(event: AlertEvent) -> None:
        published.append((event.kind, event.message, threading.get_ident()))
        real_publish(event)

    monkeypatch.setattr(a._notifier, "publish", publish)

    caplog.set_level(logging.WARNING, logger="sbs")
    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(20):
            while not (dst.exists() and tree(dst) == others and a.status()["not_replicated"]):
                await anyio.sleep(0.02)
        [line] = a.status()["not_replicated_files"]
        assert line == f"{src}: 'file2.bin' is not replicated: cannot read it: Permission denied"
        # Each full scan tries again; the log says it once.
        with anyio.fail_after(20):
            while (scanned := a.status()["last_scan_at"]) is None:
                await anyio.sleep(0.02)
            while a.status()["last_scan_at"] < scanned + 1.0:
                await anyio.sleep(0.02)
        assert a.status()["not_replicated"] == 1
        warned = [r for r in caplog.records if "'file2.bin' is not replicated" in r.getMessage()]
        assert len(warned) == 2  # the line, and the alert's
        [alert] = [p for p in published if "not replicated" in p[1]]
        assert alert == ("replication_failed", f"not replicated: {line}", threading.get_ident())

        refused["now"] = False  # its owner makes it readable
        with anyio.fail_after(20):
            while not (dst.exists() and tree(dst) == files):
                await anyio.sleep(0.02)
        assert a.status()["not_replicated"] == 0
        assert a.status()["not_replicated_files"] == []
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("size", [100, MIN_SIZE * 2], ids=["small", "large"])
def test_a_file_replaced_by_a_link_or_a_fifo_after_the_scan_is_not_read(
    tmp_path: Path, size: int
) -> None:
    # Between the scan and the read: a link must not be followed (it may lead
    # out of the folder), a FIFO must not hang the reader; neither is a failure.
    folder = tmp_path / "data"
    folder.mkdir()
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"s" * size)
    (folder / "plain.bin").write_bytes(b"p" * size)
    scanned = FileStat("x", size, 0, 0)
    (folder / "link.bin").symlink_to(secret)
    os.mkfifo(folder / "fifo.bin")
    names = ["link.bin", "fifo.bin", "plain.bin"]

    if size <= engine.SMALL:
        failed: list[tuple[str, str]] = []
        reads = engine._read_batch(folder, [(n, scanned, None) for n in names], failed)
        assert [(r.path, r.data) for r in reads] == [("plain.bin", b"p" * size)]
    else:
        group, _, missing, failed = engine._open_group(folder, [(n, scanned) for n in names], 0)
        try:
            assert [large.path for large in group] == ["plain.bin"]
            assert missing == [size, size]
        finally:
            engine._close_all(group)
    assert failed == []
