"""Large files are opened and read ahead of the one being sent; none is left open or lost.

The sender opens the next large files (and reads their first chunks) in a
worker thread while it streams one: the files opened ahead of a session that
ends are closed. (A file that cannot be opened: tests/driver/test_local_failures.py.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from memorypair import A_HOST, B_HOST, make_node, start_pair, tree

from sbs_core.sync import engine
from sbs_core.sync.direct import MIN_SIZE
from sbs_core.transport import MemoryNetwork

FILES = 4
# Larger than the first read: such a file stays open until it is sent.
STAYS_OPEN = engine.READ_AHEAD * engine.CHUNK + MIN_SIZE


def large_files(src: Path, size: int = MIN_SIZE * 2) -> dict[str, bytes]:
    src.mkdir(parents=True)
    files = {f"big{i}.bin": os.urandom(size + i) for i in range(FILES)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


@pytest.mark.anyio
async def test_files_opened_ahead_of_a_session_that_ends_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    files = large_files(src, STAYS_OPEN)
    opened: list[engine._LargeRead] = []
    real_open_large = engine._open_large

    def noted_open_large(folder: Path, path: str) -> engine._LargeRead | None:
        large = real_open_large(folder, path)
        if large is not None:
            opened.append(large)
        return large

    monkeypatch.setattr(engine, "_open_large", noted_open_large)
    # The first file's sending stops after its first chunks, until the session
    # ends; meanwhile the opener fills its queue (and waits with one more).
    real_send_rest = engine.SyncEngine._send_rest
    held: list[str] = []

    async def send_rest_once_held(
        self: engine.SyncEngine, session: Any, large: engine._LargeRead
    ) -> None:
        if not held:
            held.append(large.path)
            await anyio.sleep_forever()
        await real_send_rest(self, session, large)

    monkeypatch.setattr(engine.SyncEngine, "_send_rest", send_rest_once_held)
    network = MemoryNetwork()
    a = make_node(tmp_path, network, "a", A_HOST, B_HOST)
    b = make_node(tmp_path, network, "b", B_HOST, A_HOST)

    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(20):
            while not (held and len(opened) == FILES):
                await anyio.sleep(0.01)
        assert not any(large.finished for large in opened)  # all open, one held
        network.break_connections(A_HOST)
        with anyio.fail_after(10):
            while any(not large._f.closed for large in opened[:FILES]):
                await anyio.sleep(0.01)
        # The pair reconnects, and a later session sends every file after all.
        with anyio.fail_after(30):
            while not (dst.exists() and tree(dst) == files):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()

    assert all(large._f.closed for large in opened)


@pytest.mark.anyio
async def test_large_files_go_in_groups_and_one_torn_in_a_group_goes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    src.mkdir(parents=True)
    # Six files of just under 1 MiB: four fit the first reads of a group (4 MiB), two the next.
    files = {f"mid{i}.bin": os.urandom(engine.CHUNK - 4096 + i) for i in range(6)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    groups: list[list[str]] = []
    real_stream_group = engine.SyncEngine._stream_group

    async def noted_stream_group(
        self: engine.SyncEngine, session: Any, root: Any, group: list[engine._LargeRead]
    ) -> list[tuple[int, str] | None]:
        groups.append([large.path for large in group])
        return await real_stream_group(self, session, root, group)

    monkeypatch.setattr(engine.SyncEngine, "_stream_group", noted_stream_group)
    # mid2.bin changes after it was read whole, before the sender looks at it again.
    real_finish = engine._LargeRead.finish
    changed: list[bytes] = []

    def finish_after_a_change(self: engine._LargeRead) -> None:
        if self.path == "mid2.bin" and not changed:
            changed.append(os.urandom(engine.CHUNK))
            (src / "mid2.bin").write_bytes(changed[0])
        real_finish(self)

    monkeypatch.setattr(engine._LargeRead, "finish", finish_after_a_change)
    network = MemoryNetwork()
    a = make_node(tmp_path, network, "a", A_HOST, B_HOST)
    b = make_node(tmp_path, network, "b", B_HOST, A_HOST)

    caplog.set_level(logging.INFO, logger="sbs.sync")
    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(30):
            while not (changed and dst.exists() and tree(dst) == tree(src)):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()

    assert tree(dst)["mid2.bin"] == changed[0]
    # The sender saw the change at its second look: the read was not sent as the file.
    torn = [r.getMessage() for r in caplog.records if "changed while it was read" in r.getMessage()]
    assert len(torn) == 1
    assert "mid2.bin" in torn[0]
    # In the folder's listing order: four files, then the other two.
    assert [len(group) for group in groups[:2]] == [4, 2]
    assert sorted(path for group in groups[:2] for path in group) == sorted(files)
    assert ["mid2.bin"] in groups[2:]  # sent again, alone, in a later cycle
