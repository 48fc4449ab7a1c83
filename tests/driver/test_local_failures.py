"""A node's own disk failing (a full disk) never ends its run, and replication comes back.

Found when a disk filled up under a running pair: the primary's hash index
could not commit ("database or disk is full") and the error ended the node.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from memorypair import A_HOST, B_HOST, make_node, start_pair, tree

from sbs_core.sync import engine
from sbs_core.sync import index as index_module
from sbs_core.sync.direct import MIN_SIZE
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

    def put_many(self: index_module.HashIndex, rows: Any) -> None:
        if full["disk"]:
            failed.append("put_many")
            raise sqlite3.OperationalError("database or disk is full")
        real_put_many(self, rows)

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
