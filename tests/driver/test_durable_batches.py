"""A durable first sync in many batches: flushed before renamed, the disk's work overlapped.

The receiver commits every COMMIT_FILES files. Each batch's flush starts in
the background and the batch before it, flushed already, is renamed into
place meanwhile; the cycle's last batch is flushed beside the renames of the
one before it too. Nothing is renamed before its flush has ended.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from memorypair import A_HOST, B_HOST, make_node, start_pair, tree

from sbs_core.sync import engine
from sbs_core.sync.apply import Applier, Incoming, Outcome
from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX
from sbs_core.transport import MemoryNetwork

Batch = frozenset[str]


def key(batch: Sequence[Incoming]) -> Batch:
    return frozenset(incoming.path for incoming in batch)


@pytest.mark.anyio
async def test_each_batch_is_flushed_beside_the_renames_of_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Puts of 4, then 8 files; a commit once 10 are ready: about 5 batches of 60 files.
    monkeypatch.setattr(engine, "FIRST_BATCH_FILES", 4)
    monkeypatch.setattr(engine, "BATCH_FILES", 8)
    monkeypatch.setattr(engine, "COMMIT_FILES", 10)
    src, dst = tmp_path / "a" / "data", tmp_path / "b" / "data"
    files = {f"f{i // 12}/n{i:02d}.lab": os.urandom(100 + i) for i in range(60)}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    events: list[tuple[str, Batch, float]] = []
    real_flush, real_commit = Applier.flush, Applier.commit

    def noted_flush(self: Applier, batch: Sequence[Incoming]) -> list[str | None]:
        events.append(("flush", key(batch), time.monotonic()))
        try:
            return real_flush(self, batch)
        finally:
            events.append(("flushed", key(batch), time.monotonic()))

    def slow_commit(
        self: Applier, batch: Sequence[Incoming], *, flushed: Sequence[str | None] | None = None
    ) -> list[Outcome]:
        events.append(("commit", key(batch), time.monotonic()))
        time.sleep(0.3)  # a worker thread's: time enough for the next batch's flush to begin
        try:
            return real_commit(self, batch, flushed=flushed)
        finally:
            events.append(("committed", key(batch), time.monotonic()))

    monkeypatch.setattr(Applier, "flush", noted_flush)
    monkeypatch.setattr(Applier, "commit", slow_commit)
    network = MemoryNetwork()
    a = make_node(tmp_path, network, "a", A_HOST, B_HOST)
    b = make_node(tmp_path, network, "b", B_HOST, A_HOST)
    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(30):
            while not (dst.exists() and tree(dst) == files):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()

    commits = [batch for kind, batch, _ in events if kind == "commit"]
    assert len(commits) >= 4
    assert frozenset().union(*commits) == set(files)
    when = {(kind, batch): at for kind, batch, at in events}
    for batch in commits:
        # Flushed whole before anything of it was renamed.
        assert when["flushed", batch] <= when["commit", batch]
    for before, after in itertools.pairwise(commits):
        # The next batch's flush began while the one before was being renamed.
        assert when["flush", after] < when["committed", before]
    assert not [p for p in dst.rglob("*") if p.name.startswith((TEMP_PREFIX, STAGING_PREFIX))]
