"""The loop watch: a stalled event loop is measured and logged with where it is stuck."""

from __future__ import annotations

import logging
import time

import anyio
import pytest
from alertkit import primary_status

from sbs_core.cli import format_status
from sbs_core.loopwatch import LoopWatch


def hold_the_loop_for_the_test(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call, as a bug would make on the loop


@pytest.mark.anyio
async def test_a_stall_is_logged_while_it_lasts_with_the_code_it_is_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = LoopWatch(warn_after=0.2, tick=0.02)
    caplog.set_level(logging.WARNING, "sbs")
    async with anyio.create_task_group() as tg:
        await tg.start(watch.run)
        await anyio.sleep(0.1)
        hold_the_loop_for_the_test(0.5)
        # The warning was written by the watch's thread during the stall.
        logged_during = [r.getMessage() for r in caplog.records]
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()

    (message,) = logged_during  # one warning for one stall, though it lasted 2.5x warn_after
    assert message.startswith("the event loop has not run for ")
    assert 0.2 <= float(message.split()[7]) < 0.5  # said while the loop was held up
    assert "hold_the_loop_for_the_test" in message
    assert "time.sleep(seconds)" in message
    assert watch.stalls == 1
    assert 0.45 <= watch.longest < 2.0
    assert watch.snapshot() == {"loop_longest_stall": round(watch.longest, 3), "loop_stalls": 1}


@pytest.mark.anyio
async def test_a_loop_that_keeps_running_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(warn_after=0.5, tick=0.02)
    caplog.set_level(logging.WARNING, "sbs")
    async with anyio.create_task_group() as tg:
        await tg.start(watch.run)
        for _ in range(20):
            hold_the_loop_for_the_test(0.01)  # short steps, as the loop's real work is
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()

    assert caplog.records == []
    assert watch.stalls == 0
    assert watch.longest < 0.5


@pytest.mark.anyio
async def test_two_stalls_are_two_warnings(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(warn_after=0.2, tick=0.02)
    caplog.set_level(logging.WARNING, "sbs")
    async with anyio.create_task_group() as tg:
        await tg.start(watch.run)
        for _ in range(2):
            hold_the_loop_for_the_test(0.4)
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()

    assert len(caplog.records) == 2
    assert watch.stalls == 2


def test_a_stall_over_before_the_thread_looked_is_logged_once_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What the loop's task does after a stall, with the thread's two possible pasts.
    watch = LoopWatch(warn_after=0.5)
    caplog.set_level(logging.WARNING, "sbs")
    watch._note(0.6)  # the thread never saw it: the task says so, without the place
    watch._reported = watch._last
    watch._note(0.7)  # the thread logged this one while it lasted: not twice
    watch._note(0.2)  # no stall

    assert [r.getMessage() for r in caplog.records] == [
        "the event loop did not run for 0.85 s, so no heartbeat went out meanwhile (the peer"
        " takes over after node.dead_time); it was over too soon to see where"
    ]
    assert (watch.stalls, watch.longest) == (2, 0.7)


def test_the_tick_is_half_the_warning_time_unless_given_and_always_shorter() -> None:
    assert LoopWatch(warn_after=0.5).tick == 0.25
    with pytest.raises(ValueError, match="tick"):
        LoopWatch(warn_after=0.1, tick=0.1)


def screen(**extra: object) -> list[str]:
    return format_status(primary_status(**extra)).splitlines()


def test_the_status_screen_names_stalls_only_when_there_were_some() -> None:
    stalled = screen(loop_stalls=2, loop_longest_stall=1.234)
    assert "stalls     the event loop stalled 2 times, longest 1.23 s (the log says where)" in (
        stalled
    )
    once = screen(loop_stalls=1, loop_longest_stall=0.5)
    assert "stalls     the event loop stalled 1 time, longest 0.50 s (the log says where)" in once
    for quiet in (screen(loop_stalls=0, loop_longest_stall=0.02), screen(loop_stalls=None)):
        assert not any(line.startswith("stalls") for line in quiet)
