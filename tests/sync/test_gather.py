"""The receiver takes data frames that wait together in one hand-out, with the Seal behind them.

Each hand-out is one worker-thread call on the secondary; a file's frames and
its Seal in one call halve the calls of a first sync of many mid-sized files.
"""

from __future__ import annotations

import anyio
import pytest

from sbs_core.messages import CycleEnd, Put, PutFile, Seal, SyncMessage
from sbs_core.sync import engine
from sbs_core.wire import DataPayload

PUT = Put(session=1, files=(PutFile(root="r", path="f", size=6, mtime_ns=0),))
SEAL = Seal(session=1, digests=("d",))


async def handed_out(*items: SyncMessage | DataPayload) -> list[object]:
    tx, rx = anyio.create_memory_object_stream[SyncMessage | DataPayload](len(items))
    for item in items:
        tx.send_nowait(item)
    tx.close()
    with rx:
        return [out async for out in engine._gather_data(rx)]


@pytest.mark.anyio
async def test_frames_waiting_together_come_with_the_seal_behind_them() -> None:
    out = await handed_out(PUT, b"abc", b"def", SEAL, CycleEnd(session=1, cycle=1))
    assert out == [PUT, engine._Data([b"abc", b"def"], SEAL), CycleEnd(session=1, cycle=1)]


@pytest.mark.anyio
async def test_a_seal_not_right_behind_the_frames_comes_alone() -> None:
    end = CycleEnd(session=1, cycle=2)
    out = await handed_out(PUT, b"abc", end, SEAL)
    assert out == [PUT, engine._Data([b"abc"]), end, SEAL]


@pytest.mark.anyio
async def test_a_hand_out_stops_at_its_size_and_the_seal_waits_for_the_next() -> None:
    big = bytes(engine.GATHER_BYTES)
    out = await handed_out(PUT, big, b"x", SEAL)
    assert out == [PUT, engine._Data([big]), engine._Data([b"x"], SEAL)]
