"""What the peer sends for a receiving session that has already ended is dropped, quietly.

A session that fails (a refused path, a forged frame) stops reading its queue at
once, while the frames the peer sent before it learnt of it still arrive. They
are handed to the session from the connection's reader: an error there would
end the connection, and with it the node's run.
"""

from __future__ import annotations

from typing import cast

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
