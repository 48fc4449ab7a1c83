"""Logging that never holds up the event loop.

A node's log lines go to a terminal, files or the Windows event log, and any of
them can block for a while: a disk busy with a large sync, a pipe nobody reads
fast enough, an event log service slow to answer. The thread that logs is
mostly the event loop, which also sends the heartbeats; a peer that hears none
for ``dead_time`` takes over. So :func:`logging_off_the_loop` puts a queue in
front of the handlers: logging a record only formats its message and queues
it, and one writer thread hands the records to the handlers, in order.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ("logging_off_the_loop",)


@contextmanager
def logging_off_the_loop(handlers: Sequence[logging.Handler]) -> Iterator[None]:
    """Send the root logger's records to ``handlers`` through a queue and a writer thread.

    On leaving, every record logged before is written, then the handlers are
    closed. Each handler's own level still applies.
    """
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    front = logging.handlers.QueueHandler(records)
    writer = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root = logging.getLogger()
    writer.start()
    root.addHandler(front)
    try:
        yield
    finally:
        root.removeHandler(front)
        writer.stop()  # writes what is queued, then ends the thread
        for handler in handlers:
            handler.close()
