"""Logging off the event loop: a handler that blocks does not block the code that logs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from sbs_core.logs import logging_off_the_loop

log = logging.getLogger("sbs.test_logs")


class Kept(logging.Handler):
    """Keeps each record's message and the thread that wrote it; may wait for a release."""

    def __init__(self, level: int = logging.NOTSET, gate: threading.Event | None = None):
        super().__init__(level)
        self.gate = gate
        self.lines: list[tuple[str, int, bool]] = []  # message, writer thread, released then
        self.closed = False

    def emit(self, record: logging.LogRecord) -> None:
        released = self.gate.wait(10) if self.gate is not None else True
        self.lines.append((self.format(record), threading.get_ident(), released))

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture(autouse=True)
def root_at_debug() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    yield
    root.setLevel(level)


def test_records_are_written_in_order_by_another_thread_and_all_before_the_end() -> None:
    kept = Kept()
    with logging_off_the_loop([kept]):
        for i in range(500):
            log.info("line %d", i)

    assert [m for m, _, _ in kept.lines] == [f"line {i}" for i in range(500)]
    assert {t for _, t, _ in kept.lines} != {threading.get_ident()}
    assert len({t for _, t, _ in kept.lines}) == 1  # one writer: the order holds
    assert kept.closed


def test_logging_returns_while_the_handler_is_blocked() -> None:
    release = threading.Event()
    kept = Kept(gate=release)
    with logging_off_the_loop([kept]):
        log.warning("first")  # the writer blocks on it until the release
        log.warning("second")
        release.set()  # reached only because logging did not wait for the handler

    # Every record was written after the release, none after a 10 s time-out.
    assert kept.lines
    assert all(released for _, _, released in kept.lines)
    assert [m for m, _, _ in kept.lines] == ["first", "second"]


def test_each_handler_keeps_its_level_and_tracebacks_are_kept() -> None:
    everything, warnings = Kept(), Kept(logging.WARNING)
    everything.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    with logging_off_the_loop([everything, warnings]):
        log.debug("detail")
        try:
            raise ValueError("the cause")
        except ValueError:
            log.exception("it failed")

    assert [m.split("\n")[0] for m, _, _ in everything.lines] == ["DEBUG detail", "ERROR it failed"]
    assert "ValueError: the cause" in everything.lines[1][0]
    assert [m.split("\n")[0] for m, _, _ in warnings.lines] == ["it failed"]
    assert logging.getLogger().handlers.count(everything) == 0  # only the queue was the root's
