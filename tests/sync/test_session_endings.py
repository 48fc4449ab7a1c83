"""A replication session that ends early ends cleanly: no stray error takes the node down.

- What the peer sends for a receiving session that has already ended is
  dropped, quietly. A session that fails (a refused path, a forged frame) stops
  reading its queue at once, while the frames the peer sent before it learnt
  of it still arrive. They are handed to the session from the connection's
  reader: an error there would end the connection, and with it the node's run.
- A sender whose connection closes mid-file fails with LinkClosed alone, which
  its callers catch; the helper reading the file ahead, cut off from it, must
  not add its own BrokenResourceError (an ExceptionGroup nobody catches).
"""

from __future__ import annotations

from typing import cast

import anyio
import pytest

from sbs_core.machine import ConnId
from sbs_core.messages import CycleEnd, SyncStart
from sbs_core.sync import engine


@pytest.mark.anyio
async def test_what_arrives_after_the_session_stopped_reading_is_dropped() -> None:
    start = SyncStart(session=3, roots=(), preserve_timestamps=False, window=engine.WINDOW)
    session = engine._ReceiverSession(cast(engine.SyncEngine, None), ConnId(1), start)
    session.put(b"queued while the session runs")
    assert session.queue_rx.receive_nowait() == b"queued while the session runs"

    session.queue_rx.close()  # the session failed: its loop is gone
    session.put(b"a data frame sent before the peer knew")
    session.put(CycleEnd(session=3, cycle=1))

    session.close()  # and once it is over, the same
    session.put(b"later still")


async def fail_when(go: anyio.Event, exc: BaseException) -> None:
    # As a worker thread's call: shielded until done, then it fails.
    with anyio.CancelScope(shield=True):
        await go.wait()
    raise exc


@pytest.mark.anyio
async def test_a_helper_cut_off_by_its_hosts_failure_leaves_only_the_hosts_error() -> None:
    tx, rx = anyio.create_memory_object_stream[bytes](1)
    read = anyio.Event()

    async def read_ahead() -> None:
        with tx:
            with anyio.CancelScope(shield=True):  # reading the next chunk in a thread
                await read.wait()
            tx.send_nowait(b"the next chunk")  # the host closed the stream meanwhile

    async def send_mid_file() -> None:
        async with engine._task_group() as tg:
            tg.start_soon(read_ahead)
            with rx:
                read.set()
                raise engine.LinkClosed("connection gone")

    with pytest.raises(engine.LinkClosed, match="gone"):
        await send_mid_file()


@pytest.mark.anyio
async def test_two_real_failures_still_come_out_together() -> None:
    go = anyio.Event()

    async def three_fail() -> None:
        async with engine._task_group() as tg:
            tg.start_soon(fail_when, go, OSError("one disk"))
            tg.start_soon(fail_when, go, OSError("another"))
            tg.start_soon(fail_when, go, anyio.BrokenResourceError())
            await anyio.lowlevel.checkpoint()
            go.set()
            await anyio.sleep_forever()

    with pytest.raises(ExceptionGroup) as caught:
        await three_fail()
    assert sorted(type(e).__name__ for e in caught.value.exceptions) == [
        "BrokenResourceError",
        "OSError",
        "OSError",
    ]
