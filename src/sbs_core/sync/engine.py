"""Replication sessions: the sender on the node with files to push, the receiver on its peer.

A session runs on one authenticated connection. The sender opens it with
``SyncStart`` (the roots); the receiver answers with its ``Inventory`` (what it
holds, with content digests from its hash index), so a first cycle after a
(re)connection sends only what differs. Each cycle then sends ``Put`` headers
followed by the files' bytes in data frames and a ``Seal`` with their digests,
``Delete`` lists in strict mode, and ``CycleEnd``; the receiver makes the cycle
durable and answers ``CycleAck``. The receiver grants ``Credit`` as it writes, so
it never has to stop reading its socket (heartbeats share it) and neither side
holds more than one window of data in memory.

All file I/O and hashing run in worker threads; the event loop only moves bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sbs_core.config import Config
from sbs_core.errors import ForgedFrameError, RemoteProtocolError, SbsError, os_reason
from sbs_core.machine import ConnId
from sbs_core.messages import (
    Credit,
    CycleAck,
    CycleEnd,
    Delete,
    Inventory,
    Message,
    Put,
    PutFile,
    RootSpec,
    Seal,
    SyncMessage,
    SyncStart,
)
from sbs_core.sync.apply import (
    READ_FLAGS,  # never through a link; a FIFO put in a file's place does not hang
    WHOLE_FILE_MAX,
    Applier,
    FileIdentity,
    Incoming,
    IntegrityError,
    Outcome,
    deletion_allowed,
    identity_of,
)
from sbs_core.sync.index import HashIndex, IndexRow
from sbs_core.sync.listing import FolderListing, look, still_absent
from sbs_core.sync.paths import UnsafePathError, quoted
from sbs_core.sync.roots import (
    LocalRoot,
    load_peer_roots,
    receiver_roots,
    root_identity,
    save_peer_roots,
    sender_roots,
)
from sbs_core.sync.scan import (
    FileStat,
    ScanResult,
    digest_of,
    hash_file,
    new_hasher,
    scan_root,
)
from sbs_core.sync.watch import FolderWatch
from sbs_core.wire import DataPayload, SealedFrame

__all__ = ("Link", "LinkClosed", "SyncEngine", "SyncStatus")


logger = logging.getLogger("sbs.sync")

#: A file to send, as a scan found it: its path, its stat and its digest if known.
Candidate = tuple[str, FileStat, str | None]

CHUNK = 1 << 20  # data frame size
SMALL = 256 * 1024  # files up to this size are read whole and batched
BATCH_BYTES = 8 << 20
BATCH_FILES = 2048
# A cycle's first batch is small and each next one twice as large, up to
# BATCH_FILES: the receiver starts writing while the sender reads the rest.
FIRST_BATCH_FILES = 64
READ_BATCHES = 1  # batches read ahead of the one being sent: memory, not speed
# A batch's Put must fit a frame (8 MiB) whatever its paths' lengths (up to 4 KiB).
BATCH_NAMES = 1 << 20  # characters of paths in one Put, with PUT_FILE_OVERHEAD each
PUT_FILE_OVERHEAD = 100
WINDOW = 16 << 20  # bytes in flight between sender and receiver
READ_AHEAD = 4  # chunks of a large file read (in one worker-thread call) ahead of sending
# Large files opened and read (their first READ_AHEAD chunks, so most of them
# whole) ahead of the one being sent: measured on "mixed", opening, closing and
# noting each file one after the other left the sender idle 2.8 s of 4.4.
# They come in groups of at most READ_AHEAD chunks read (or one file), each
# group one worker-thread call and one Put and Seal: a call, a Put and a Seal
# for each file of 1 MiB cost both nodes 0.6-0.8 ms of CPU a file.
OPEN_AHEAD = 2  # groups
GROUP_FILES = 64
INDEX_ROWS = 256  # sent large files noted in the index together, in one worker-thread call
GATHER_BYTES = 4 << 20  # data frames written in one worker-thread call on the receiver
# A Put of small files whose data is at most this many bytes is held in memory
# until its Seal and written in one worker-thread call, each file whole.
HOLD_BYTES = BATCH_BYTES
# A peer that keeps opening sessions this node refuses gets one alert per interval.
REFUSED_ALERT_INTERVAL = 60.0
# A file the peer could not apply this many cycles in a row is a problem to report.
RETRY_CYCLES_ALERT = 3
# A sending session that this node's own disk or folders ended (a full disk, an
# I/O error) starts again after this many seconds, while the peer is connected.
SESSION_RESTART_DELAY = 5.0
INVENTORY_CHUNK = 2000
# Groups of candidates a full scan may find ahead of the reading. Few: the scan
# and the reads share the interpreter, and a scan running far ahead took its
# time from the reads that the secondary waits for at the start of a first sync
# ("small", no durable writes: pair runs 7-8% faster with 2 than with 16; the
# scan ends later, and nothing waits for it but the deletions, sent last).
SCAN_AHEAD = 2
# A full scan with more files than this missing from memory reads the folder's
# stored digests in one query instead of one query per file.
BULK_LOOKUP = 100
LISTING_STEP = 256  # files of a kept listing looked at together, as a scan gives a folder's
# A receiver commits (flushes, then renames into place) what it has applied
# once a Put's Seal leaves it holding this many files or bytes (about 3,600
# files of "small": two Puts), and at the end of each cycle. A flush
# ends with a flush of the disk's own cache, and on the virtual disk measured
# the pair stood idle while it ran: with a commit every 64 MiB, 0.3-0.55 s at
# each file of durable "large" (docs/benchmarks.md). A crash before a flush
# costs at most that batch, sent again.
COMMIT_FILES = 2000
COMMIT_BYTES = 1 << 30
WATCH_STEP_MS = 50  # quiet time that ends a burst of file events
# A full cycle that reads at least this many files, and at least half of those
# listed so far, does it with the watcher stopped (see SyncEngine._pause_watching).
WATCH_PAUSE_FILES = 1000
# The watcher's thread returns this often even when nothing changes (each return
# is a trip through the event loop); a stop is seen within WATCH_STEP_MS anyway.
WATCH_RETURN_MS = 10_000
NOT_REPLICATED_SHOWN = 20  # in the status; the log names each once


class LinkClosed(SbsError, ConnectionError):
    """The connection a session ran on is gone."""


class Link(Protocol):
    """How the engine talks to its peer: one ordered lane per connection."""

    async def send(self, conn: ConnId, message: Message) -> None: ...

    async def send_data(self, conn: ConnId, payload: bytes) -> None: ...

    def drop(self, conn: ConnId, reason: str) -> None:
        """Close ``conn``: its peer broke the protocol (``reason`` says how)."""


Alert = Callable[[str, str, Literal["info", "warning", "error"]], None]


@dataclass(slots=True)
class SyncStatus:
    last_sync_at: float | None = None
    files_pending: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_sync_error: str | None = None
    files_sent: int = 0
    files_received: int = 0
    conflicts: list[str] = field(default_factory=list)
    held_deletes: int = 0
    last_scan_at: float | None = None  # the last complete scan of every folder
    # How the primary finds changes (see SyncEngine._watch_status).
    watch_state: Literal["watching", "paused", "failed", "off"] = "off"
    watched_folders: int = 0
    watch_error: str | None = None
    # Files the primary leaves out, and why (see SyncEngine._show_left_out).
    not_replicated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The replication keys of ``sbs status --json`` (a stopped node shows the defaults)."""
        return {
            "last_sync_at": self.last_sync_at,
            "files_pending": self.files_pending,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "last_sync_error": self.last_sync_error,
            "files_sent": self.files_sent,
            "files_received": self.files_received,
            "conflicts": list(self.conflicts[-20:]),
            "held_deletes": self.held_deletes,
            "last_scan_at": self.last_scan_at,
            "watch_state": self.watch_state,
            "watched_folders": self.watched_folders,
            "watch_error": self.watch_error,
            "not_replicated": len(self.not_replicated),
            "not_replicated_files": self.not_replicated[:NOT_REPLICATED_SHOWN],
        }


def _identities(roots: Sequence[LocalRoot]) -> dict[str, tuple[int, int]]:
    """Each root's (device, inode), for those there (see :func:`root_identity`)."""
    seen = {root.spec.id: root_identity(root) for root in roots}
    return {root_id: identity for root_id, identity in seen.items() if identity is not None}


@dataclass(slots=True)
class _Local:
    size: int
    mtime_ns: int
    ino: int
    digest: str


# ---------------------------------------------------------------------------- sender


@dataclass(slots=True)
class _Trigger:
    full: bool = False  # scan every folder
    # The period is up (or the session begins): run the update scripts. Never
    # for a scan that only catches up (the watcher restarted, a retry, deletions
    # confirmed): an export may be costly, and it runs once a period.
    periodic: bool = False
    paths: dict[str, set[str]] = field(default_factory=dict)  # root id -> changed paths
    final: anyio.Event | None = None
    # A split-brain loser pushing to the winner: a file the winner changed too is
    # kept here as a conflict instead of overwriting the winner's.
    yielding: bool = False


class _SenderSession:
    def __init__(self, engine: SyncEngine, conn: ConnId, session: int) -> None:
        self.engine = engine
        self.conn = conn
        self.id = session
        tx, rx = anyio.create_memory_object_stream[SyncMessage](math.inf)
        self.inbox_tx: MemoryObjectSendStream[SyncMessage] = tx
        self.inbox_rx: MemoryObjectReceiveStream[SyncMessage] = rx
        self.credit = WINDOW
        self.credit_event = anyio.Event()
        self.known: dict[str, dict[str, tuple[int, str]]] = {}
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self.final_only = False  # opened for one final cycle, and ends with it
        # The listing kept while this node waited for a secondary is still being
        # kept (and watched) until this session's first cycle takes it.
        self.listing_pending = False

    def deliver(self, message: SyncMessage) -> None:
        if isinstance(message, Credit):
            self.credit += message.bytes
            self.credit_event.set()
            self.credit_event = anyio.Event()
        else:
            self.inbox_tx.send_nowait(message)

    async def take(self, kind: type[Any]) -> Any:
        message = await self.inbox_rx.receive()
        if not isinstance(message, kind):
            raise RemoteProtocolError(f"sync: expected {kind.__name__}, got {message.type}")
        return message

    async def spend(self, size: int) -> None:
        while self.credit < size and self.credit < WINDOW:
            await self.credit_event.wait()
        self.credit -= size

    def close(self) -> None:
        """Once the session is over (it no longer gets messages: it is not the sender)."""
        self.inbox_tx.close()
        self.inbox_rx.close()


# ---------------------------------------------------------------------------- receiver


class _ReceiverSession:
    def __init__(self, engine: SyncEngine, conn: ConnId, start: SyncStart) -> None:
        self.engine = engine
        self.conn = conn
        self.id = start.session
        self.start = start
        tx, rx = anyio.create_memory_object_stream[SyncMessage | DataPayload](math.inf)
        self.queue_tx: MemoryObjectSendStream[SyncMessage | DataPayload] = tx
        self.queue_rx: MemoryObjectReceiveStream[SyncMessage | DataPayload] = rx
        self.queued_bytes = 0
        self.scope = anyio.CancelScope()
        self.ended = anyio.Event()

    def put(self, item: SyncMessage | DataPayload) -> None:
        """Queue what the peer sent for the session; dropped once the session has ended.

        A session that fails (a refused path, a forged frame) stops reading its
        queue at once, while what the peer sent before it learns of that still
        arrives; that is no fault of the connection's.
        """
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.queue_tx.send_nowait(item)

    def close(self) -> None:
        """Once the session is over (it no longer gets messages: it is not the receiver)."""
        self.queue_tx.close()
        self.queue_rx.close()


class SyncEngine:
    """Both sides of replication for one node; the driver feeds it and asks it to push."""

    def __init__(self, config: Config, *, link: Link, alert: Alert) -> None:
        self.config = config
        self._link = link
        self._deliver = alert
        self._loop_thread: int | None = None  # the event loop's (see _alert)
        self._state_dir = config.node.state_dir
        self._index: HashIndex | None = None
        self._local: dict[tuple[str, str], _Local] = {}
        self._bases: dict[tuple[str, str], str] = {}  # bases written by this run
        self._tg: TaskGroup | None = None
        self._sender: _SenderSession | None = None
        self._receiver: _ReceiverSession | None = None
        self._next_session = 1
        self._trigger = _Trigger(full=True)
        self._wake = anyio.Event()
        self._watching = False  # the file watcher runs on every root
        self._watched: dict[str, tuple[int, int]] = {}  # root id -> (device, inode) watched
        self._watch_run = anyio.Event()
        self._watch_ended = False
        self._watch_paused = False  # stopped while a full cycle reads (see _pause_watching)
        # Not started before a session's first cycle ends (see _run_sender).
        self._watch_deferred = False
        self._folder_watch: FolderWatch | None = None  # the last one started
        self._watch_error: str | None = None  # why the last start failed, until one works
        # A primary waiting for a secondary watches its roots and keeps their
        # listing current, by root id, for the next session's first cycle
        # (see sync.listing). None while nothing is kept.
        self._primary = False
        self._listing: dict[str, FolderListing] | None = None
        self._listing_refresh = False  # a worker thread applies changes to it
        self.status = SyncStatus()
        self._peer_roots = load_peer_roots(self._state_dir)
        self._held: dict[str, int] = {}  # root id -> deletions held back by the cap
        self._held_why: dict[str, str] = {}  # root id -> why they are held
        self._script_failure: str | None = None  # of the last full cycle's update scripts
        self._refused_alert_at = -math.inf
        self._failure_alert_at = -math.inf
        self._retry_cycles = 0  # cycles in a row that left files to retry
        self._refused_since_alert = 0
        self._deletes_confirmed = False
        # What the primary leaves out, one line each: by root id, what its last
        # full scan could not replicate (names, special files); by (root id, path),
        # files that could not be read. Each is logged once, until it is gone.
        # Noted by the scanning and the reading threads at once: under a lock.
        self._left_out: dict[str, list[str]] = {}
        self._unreadable: dict[tuple[str, str], str] = {}
        self._left_out_lock = threading.Lock()

    # ------------------------------------------------------------------ life

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._loop_thread = threading.get_ident()
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._index = await anyio.to_thread.run_sync(HashIndex, self._state_dir / "hashes.db")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._watch)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            index, self._index = self._index, None
            if index is not None:
                # Closing checkpoints the index (0.18 s measured under a busy
                # disk): in a worker thread, while the node may still talk.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(index.close)

    def roots(self) -> list[LocalRoot]:
        return sender_roots(self.config, self._peer_roots)

    # ------------------------------------------------------------------ driver hooks

    def attach(self, conn: ConnId) -> None:
        """This node is primary and ``conn`` leads to its secondary: replicate to it."""
        if self._sender is not None and self._sender.conn == conn:
            return
        self.detach()
        if self._tg is None or not self.roots():
            return
        session = _SenderSession(self, conn, self._take_session_id())
        self._sender = session
        self._tg.start_soon(self._run_sender, session)

    def detach(self) -> None:
        session, self._sender = self._sender, None
        if session is not None:
            session.scope.cancel()

    def set_primary(self, primary: bool) -> None:
        """This node became primary, or is no longer: a primary watches even with no secondary.

        Waiting for a secondary, it keeps its folders' listing current, so that
        the first cycle of a secondary that connects sends at once (see
        :mod:`sbs_core.sync.listing`).
        """
        if primary != self._primary:
            self._primary = primary
            self._watch_run.set()  # the watcher loop looks again (see _watch_roots)

    async def final_cycle(self, conn: ConnId, *, yielding: bool = False) -> None:
        """Push every change to ``conn`` and return once the peer made it durable.

        ``yielding``: this node lost a split brain; files changed on both nodes stay
        the peer's, and this node's copies are kept under ``state_dir/conflicts``.
        """
        if self._tg is None or not self.roots():
            return
        session = self._sender
        only_for_this = session is None or session.conn != conn
        if session is None or only_for_this:
            self.detach()
            session = _SenderSession(self, conn, self._take_session_id())
            session.final_only = True
            self._sender = session
            self._tg.start_soon(self._run_sender, session)
        try:
            await self._final_cycle_on(session, yielding=yielding)
        finally:
            if only_for_this and self._sender is session:
                # A session opened for the final cycle (a split-brain loser
                # yielding to a primary) ends with it: once secondary, this
                # node must not go on pushing its files to the new primary.
                self.detach()

    async def _final_cycle_on(self, session: _SenderSession, *, yielding: bool) -> None:
        done = anyio.Event()
        self._trigger.full = True
        self._trigger.final = done
        self._trigger.yielding = yielding
        self._wake.set()
        async with anyio.create_task_group() as tg:

            async def watch_session() -> None:
                await session.finished.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_session)
            await done.wait()
            tg.cancel_scope.cancel()
        if not done.is_set():
            raise LinkClosed(self.status.last_sync_error or "the sync session ended")

    def on_message(self, conn: ConnId, message: SyncMessage) -> None:
        if isinstance(message, SyncStart):
            self._start_receiver(conn, message)
            return
        sender = self._sender
        if isinstance(message, Inventory | CycleAck | Credit):
            if sender is not None and sender.conn == conn and message.session == sender.id:
                sender.deliver(message)
            return
        receiver = self._receiver
        if receiver is not None and receiver.conn == conn and message.session == receiver.id:
            receiver.put(message)

    def on_data(self, conn: ConnId, payload: DataPayload) -> None:
        receiver = self._receiver
        if receiver is None or receiver.conn != conn:
            return
        receiver.queued_bytes += len(payload)
        if receiver.queued_bytes > 2 * WINDOW + CHUNK:
            raise RemoteProtocolError("sync: the peer sent more data than it was granted")
        receiver.put(payload)

    def on_closed(self, conn: ConnId) -> None:
        if self._sender is not None and self._sender.conn == conn:
            self.detach()
        receiver = self._receiver
        if receiver is not None and receiver.conn == conn:
            self._receiver = None
            receiver.scope.cancel()

    def snapshot(self) -> dict[str, Any]:
        self._watch_status()
        return self.status.as_dict()

    def _watch_status(self) -> None:
        """Bring the file watcher's keys of the status up to date."""
        status = self.status
        if self._watching:
            status.watch_state = "watching"
        elif self._watch_paused:
            status.watch_state = "paused"
        elif self._watch_error is not None and (self._sender is not None or self._primary):
            status.watch_state = "failed"
        else:
            status.watch_state = "off"  # not primary, or starting
        watch = self._folder_watch
        watching = status.watch_state == "watching"
        status.watched_folders = watch.watched if watching and watch is not None else 0
        status.watch_error = self._watch_error if status.watch_state == "failed" else None

    def confirm_deletes(self) -> int:
        """Let the deletions held back by ``node.max_delete`` through at the next cycle."""
        held = sum(self._held.values())
        self._deletes_confirmed = True
        self._trigger.full = True
        self._wake.set()
        return held

    def _take_session_id(self) -> int:
        session = self._next_session
        self._next_session += 1
        return session

    @property
    def index(self) -> HashIndex:
        assert self._index is not None, "the sync engine is not running"
        return self._index

    # ------------------------------------------------------------------ watching

    async def _watch(self) -> None:
        # The watcher's thread cannot be cancelled, only told to stop: when this
        # task is cancelled, the watcher's event is set before the task group
        # waits for it, and it returns within WATCH_STEP_MS.
        self._watch_ended = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_roots)
            try:
                await anyio.sleep_forever()
            finally:
                self._watch_ended = True
                self._watch_run.set()

    async def _watch_roots(self) -> None:
        while not self._watch_ended:
            # One event per watcher: set to stop, or to watch again (a root moved).
            run = self._watch_run = anyio.Event()
            roots = [r for r in self.roots() if r.path.is_dir()] if self._watch_wanted() else []
            if not roots:
                with anyio.move_on_after(self.config.node.period):
                    await run.wait()
                continue
            try:
                self._watched = await anyio.to_thread.run_sync(_identities, roots)

                def changed(paths: list[str], roots: list[LocalRoot] = roots) -> None:
                    anyio.from_thread.run_sync(self._note_changes, roots, paths)

                watch = self._folder_watch = FolderWatch(
                    [r.path for r in roots],
                    on_ready=functools.partial(anyio.from_thread.run_sync, self._watch_started),
                    on_changes=changed,
                    step_ms=WATCH_STEP_MS,
                    return_ms=WATCH_RETURN_MS,
                )
                # In a worker thread, which sees ``run`` set within WATCH_STEP_MS.
                await anyio.to_thread.run_sync(watch.run, run)
            except (OSError, RuntimeError, ImportError) as exc:  # ImportError: a broken install
                self._watching = False
                why = str(exc) or type(exc).__name__
                if why != self._watch_error:  # once per distinct failure, not every retry
                    logger.warning("file watching failed (%s); full scans until it recovers", why)
                    self._alert(
                        "replication_failed",
                        f"file watching failed: {why}; every cycle scans every folder until it "
                        "recovers",
                        "warning",
                    )
                self._watch_error = why
                with anyio.move_on_after(self.config.node.period):
                    await run.wait()
            finally:
                self._watching = False
                self._listing = None  # events no longer reach it

    def _watch_wanted(self) -> bool:
        """Whether the file watcher should run now.

        A node sending to its peer watches, except while a first cycle or a
        pause holds it (see :meth:`_run_sender`, :meth:`_pause_watching`); a
        session begins with a full scan, so nothing is missed meanwhile. A
        primary waiting for a secondary watches to keep its listing current,
        until the next session's first cycle takes it.
        """
        sender = self._sender
        if sender is None:
            return self._primary
        if sender.listing_pending:
            return True
        return not self._watch_paused and not self._watch_deferred

    def _watch_started(self) -> None:
        self._watching = True
        if self._watch_error is not None:
            logger.info("file watching works again")
        self._watch_error = None
        # What changed while nothing watched is known only to a scan.
        self._trigger.full = True
        self._wake.set()
        if self._sender is None and self._primary and self._tg is not None:
            listing = self._listing = {r.spec.id: FolderListing(r) for r in self.roots()}
            self._tg.start_soon(self._keep_listing, listing)

    async def _keep_listing(self, listing: dict[str, FolderListing]) -> None:
        """List every root for the secondary to come, then apply what the watcher notes."""
        began = time.monotonic()
        await anyio.to_thread.run_sync(_list_all, listing.values())
        if self._listing is not listing:
            return  # taken or dropped meanwhile
        broken = [f"{one.root.path}: {one.broken}" for one in listing.values() if one.broken]
        if broken:
            logger.info("folder listing not kept: %s", "; ".join(broken))
        else:
            logger.info(
                "listed %d files in %.2f s; kept current until a secondary connects",
                sum(one.files for one in listing.values()),
                time.monotonic() - began,
            )
        await self._refresh_listing()

    async def _refresh_listing(self) -> None:
        """Apply the changes noted in the kept listing, in a worker thread, one run at a time."""
        listing = self._listing
        if listing is None or self._listing_refresh:
            return  # the running refresh looks again when it ends
        self._listing_refresh = True
        try:
            while True:
                await anyio.to_thread.run_sync(_refresh_all, listing.values())
                if self._listing is not listing or not any(o.pending for o in listing.values()):
                    return
        finally:
            self._listing_refresh = False

    def _take_listing(self, session: _SenderSession) -> dict[str, FolderListing]:
        """The kept listing for ``session``'s first cycle, if it can be trusted; stops keeping it.

        A listing is kept only while the watcher that feeds it runs (see
        _watch_started and _watch_roots). It stops now, until the cycle's end
        (as for any session), and its start then asks for a full scan, which
        finds what changed after this.
        """
        session.listing_pending = False
        listing, self._listing = self._listing, None
        self._watch_run.set()
        return {root_id: one for root_id, one in (listing or {}).items() if one.listed}

    def _pause_watching(self) -> None:
        """Stop the watcher while a full cycle reads most of the tree (event loop only).

        The watcher is told of every file this node opens (inotify reports
        opens, and watchfiles asks for them): reading 20,000 files cost the
        primary about 0.4 s of CPU in wake-ups for events nothing uses, on the
        two cores it shares with the transfer. The full scan that follows the
        restart (see :meth:`_watch_roots`) finds whatever changed meanwhile.
        """
        if not self._watch_paused:
            self._watch_paused = True
            self._watch_run.set()
            logger.info("file watching paused while this cycle reads most files")

    def _resume_watching(self) -> None:
        """After a cycle: start the watcher if a pause or the session's first cycle held it."""
        deferred, self._watch_deferred = self._watch_deferred, False
        if deferred and not self._watch_paused:
            self._watch_run.set()  # its start asks for a full scan (see _watch_started)
        elif self._watch_paused:
            self._watch_paused = False
            self._watch_run.set()
            logger.info("file watching resumed; a full scan looks for changes made meanwhile")

    async def _watch_holds(self) -> bool:
        """Whether the watcher still watches every root where it is.

        A root that was moved away, replaced or unmounted raises no event in a
        watcher that follows the old folder: watch again, and scan.
        """
        if not self._watching:
            return False
        if await anyio.to_thread.run_sync(self._same_roots_watched):
            return True
        self._watching = False
        self._watch_run.set()  # in the event loop's thread: anyio's events are not thread-safe
        return False

    def _same_roots_watched(self) -> bool:
        """Whether each root is still the folder the watcher was given (blocks: a stat per root)."""
        roots = [r for r in self.roots() if r.path.is_dir()]
        return _identities(roots) == self._watched

    def _note_changes(self, roots: Sequence[LocalRoot], paths: Sequence[str]) -> None:
        listing = self._listing
        noted = self._trigger.paths if listing is None else {}
        for raw in paths:
            changed = Path(raw)
            for root in roots:
                try:
                    rel = changed.relative_to(root.path)
                except ValueError:
                    continue
                if rel.parts and not rel.name.startswith(".sbs-tmp-"):
                    noted.setdefault(root.spec.id, set()).add(rel.as_posix())
                break
        if listing is not None:
            for root_id, names in noted.items():
                if root_id in listing:
                    listing[root_id].note(names)
            if noted and self._tg is not None:
                self._tg.start_soon(self._refresh_listing)
        elif self._trigger.paths:
            self._wake.set()

    # ------------------------------------------------------------------ sender

    async def _run_sender(self, session: _SenderSession) -> None:
        # The watcher starts once the session's first cycle is over, and its
        # start asks for a full scan, which finds what changed before it
        # watched. Started before that cycle, it held the first scan back
        # 0.06 s on 20,000 files (listing the folders and adding their
        # watches), and a first sync then stopped it again (_pause_watching).
        # A session for one final cycle has no use for it at all. A watcher
        # that keeps a listing for this session goes on until the first cycle
        # takes it (see _take_listing).
        self._watch_deferred = not session.final_only
        session.listing_pending = not session.final_only and self._listing is not None
        if not session.listing_pending:
            self._watch_run.set()  # the watcher loop looks again (see _watch_roots)
        again = False
        try:
            with session.scope:
                try:
                    await self._sender_loop(session)
                except (LinkClosed, RemoteProtocolError):
                    raise  # ConnectionErrors, so OSErrors too: the link, not this node
                except (OSError, sqlite3.Error) as exc:
                    # This node's disk or folders: the link is fine, so the
                    # replication starts again in a while (detach cancels the wait).
                    reason = f"{type(exc).__name__}: {exc}"
                    self.status.last_sync_error = reason
                    logger.warning("sync session %d ended: %s", session.id, reason)
                    self._alert_failure(
                        f"replication stopped on this node: {reason}; it starts again"
                        f" in {SESSION_RESTART_DELAY:g} s"
                    )
                    await anyio.sleep(SESSION_RESTART_DELAY)
                    again = True
        except (LinkClosed, RemoteProtocolError) as exc:
            self.status.last_sync_error = f"{type(exc).__name__}: {exc}"
            logger.warning("sync session %d ended: %s", session.id, exc)
        finally:
            session.finished.set()
            if self._sender is session:
                self._sender = None
                if not session.listing_pending:  # else it keeps the listing for the next
                    self._watch_run.set()  # and stops, or keeps a listing (see _watch_wanted)
                if again:
                    self.attach(session.conn)
            session.close()

    async def _sender_loop(self, session: _SenderSession) -> None:
        roots = self.roots()
        await self._link.send(
            session.conn,
            SyncStart(
                session=session.id,
                roots=tuple(r.spec for r in roots),
                preserve_timestamps=self.config.node.preserve_timestamps,
                window=WINDOW,
            ),
        )
        while True:
            inventory: Inventory = await session.take(Inventory)
            known = session.known.setdefault(inventory.root, {})
            for path, size, _mtime, digest in inventory.entries:
                known[path] = (size, digest)
            if inventory.last:
                break
        self._trigger.full = self._trigger.periodic = True
        cycle = 0
        node = self.config.node
        next_cycle = next_scan = anyio.current_time()
        while True:
            trigger = self._trigger
            if not (trigger.full or trigger.periodic or trigger.paths or trigger.final):
                with anyio.move_on_after(max(0.0, next_cycle - anyio.current_time())):
                    await self._wake.wait()
                now = anyio.current_time()
                if now >= next_cycle:
                    # With a watcher running, what changed is known: scanning
                    # every folder is only the occasional safety net. Held
                    # deletions are looked at again by every scan, so while there
                    # are some, every cycle scans.
                    quiet = now < next_scan and not any(self._held.values())
                    self._trigger.periodic = True
                    if not (quiet and await self._watch_holds()):
                        self._trigger.full = True
                continue
            self._trigger = _Trigger()
            self._wake = anyio.Event()
            cycle += 1
            if trigger.full:
                next_scan = anyio.current_time() + node.rescan_interval
            if trigger.periodic:
                next_cycle = anyio.current_time() + node.period
                if not trigger.final:
                    await self._run_update_scripts()
            # Read before the cycle: a confirmation given while it runs is for the next one.
            confirmed = trigger.full and self._deletes_confirmed
            try:
                ok = await self._cycle(session, cycle, roots, trigger)
            finally:
                self._resume_watching()
            if confirmed:
                self._deletes_confirmed = False
            if trigger.final is not None:
                trigger.final.set()
                if session.final_only or trigger.yielding:
                    # Nothing after it: a cycle queued meanwhile (a file event)
                    # would push this node's files again, without yielding.
                    return
            if not ok:
                # Retry what failed soon, not only at the next full scan.
                self._trigger.full = True
                await anyio.sleep(1.0)

    async def _run_update_scripts(self) -> None:
        self._script_failure = None
        for command in self.config.app.update_scripts:
            timeout = self.config.app.update_script_timeout
            try:
                result = await anyio.to_thread.run_sync(_run_script, command, timeout)
            except (OSError, subprocess.SubprocessError) as exc:
                result = str(exc)
            if result:
                self._script_failure = f"update script {command[0]}: {result}"
                self.status.last_sync_error = self._script_failure
                self._alert(
                    "replication_failed", f"update script {list(command)} {result}", "error"
                )

    async def _cycle(
        self, session: _SenderSession, cycle: int, roots: list[LocalRoot], trigger: _Trigger
    ) -> bool:
        began = time.monotonic()
        plan: list[tuple[LocalRoot, list[str]]] = []  # each root and its deletions
        self.status.files_pending = 0
        sent_files: dict[str, dict[str, tuple[int, str]]] = {}
        sent_count = sent_bytes = 0
        listing = self._take_listing(session) if session.listing_pending else {}
        for root in roots:
            if trigger.full:
                # Sending starts with the first folders listed, not after the whole scan.
                done, deletes = await self._scan_and_send(
                    session, root, yielding=trigger.yielding, listing=listing.get(root.spec.id)
                )
            else:
                names = trigger.paths.get(root.spec.id, set())
                if not names:
                    continue
                candidates, deletes = await anyio.to_thread.run_sync(
                    self._diff_paths, session, root, sorted(names)
                )
                if trigger.yielding:
                    candidates = await anyio.to_thread.run_sync(
                        self._keep_conflicts_of_loser, session, root, candidates
                    )
                done = await self._send_root(session, root, _listed(candidates))
            plan.append((root, deletes))
            sent_files[root.spec.id] = done
            sent_count += len(done)
            sent_bytes += sum(size for size, _ in done.values())
            if deletes:
                for start in range(0, len(deletes), INVENTORY_CHUNK):
                    chunk = tuple(deletes[start : start + INVENTORY_CHUNK])
                    await self._link.send(
                        session.conn, Delete(session=session.id, root=root.spec.id, paths=chunk)
                    )
        await self._link.send(session.conn, CycleEnd(session=session.id, cycle=cycle))
        ack: CycleAck = await session.take(CycleAck)
        failed = {(r, p) for r, p, _ in (*ack.retry, *ack.refused)}
        agreed: list[tuple[str, str, str]] = []
        forgotten: list[tuple[str, str]] = []
        for root, deletes in plan:
            known = session.known.setdefault(root.spec.id, {})
            for path, value in sent_files.get(root.spec.id, {}).items():
                if (root.spec.id, path) not in failed:
                    known[path] = value
                    agreed.append((root.spec.id, path, value[1]))
            for path in deletes:
                if (root.spec.id, path) not in failed:
                    known.pop(path, None)
                    forgotten.append((root.spec.id, path))
        await anyio.to_thread.run_sync(self._set_bases, agreed, forgotten)
        self.status.files_pending = len(failed)
        self.status.files_sent += sent_count
        if ack.error or ack.refused:
            detail = ack.error or "; ".join(f"{p}: {why}" for _, p, why in ack.refused[:5])
            self.status.last_sync_error = detail
            self._alert_failure(f"replication cycle {cycle}: {detail}")
        elif ack.retry:
            # Files the peer could not apply (locked, a full disk): sent again at
            # once, and reported, so that a standing problem is never silent.
            self._retry_cycles += 1
            shown = "; ".join(f"{p}: {why}" for _, p, why in ack.retry[:3])
            detail = f"{len(ack.retry)} file(s) not applied by the peer, retried: {shown}"
            self.status.last_sync_error = detail
            if self._retry_cycles >= RETRY_CYCLES_ALERT:
                self._alert_failure(f"replication cycle {cycle}: {detail}")
        else:
            self._retry_cycles = 0
            # The cycle went well, but held deletions and failed scripts still need
            # the operator: a successful cycle must not hide them.
            standing = [*self._held_why.values(), self._script_failure]
            self.status.last_sync_error = "; ".join(p for p in standing if p) or None
            self.status.last_sync_at = time.time()
            if trigger.full:
                self.status.last_scan_at = self.status.last_sync_at
        if sent_count or deletes_count(plan):
            logger.info(
                "cycle %d: sent %d files (%.1f MB), %d deletes, %d to retry, in %.2f s",
                cycle,
                sent_count,
                sent_bytes / 1e6,
                deletes_count(plan),
                len(ack.retry),
                time.monotonic() - began,
            )
        return not (ack.retry or ack.refused or ack.error)

    async def _scan_and_send(
        self,
        session: _SenderSession,
        root: LocalRoot,
        *,
        yielding: bool,
        listing: FolderListing | None = None,
    ) -> tuple[dict[str, tuple[int, str]], list[str]]:
        """A full scan of ``root``, sending what differs as the folders are listed.

        Returns what was sent (as :meth:`_send_root`) and strict sync's
        deletions, which only the whole scan can tell. ``listing``: kept up
        to date while this node waited for a secondary; it stands in for the
        scan if it can still be trusted.
        """
        tx, rx = anyio.create_memory_object_stream[list[Candidate]](SCAN_AHEAD)
        deletes: list[str] = []

        async def produce() -> None:
            nonlocal deletes
            # If the sending stopped, its own error is the one to report.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                async with tx:
                    deletes = await anyio.to_thread.run_sync(
                        self._scan_and_diff, session, root, yielding, tx, listing
                    )

        async with _task_group() as tg:
            tg.start_soon(produce)
            async with rx:
                sent = await self._send_root(session, root, rx)
        return sent, deletes

    def _scan_and_diff(
        self,
        session: _SenderSession,
        root: LocalRoot,
        yielding: bool,
        out: MemoryObjectSendStream[list[Candidate]],
        listing: FolderListing | None = None,
    ) -> list[str]:
        """Scan ``root`` (blocks), handing the differing files to ``out`` as folders are listed.

        Files are handed over (and agreements written) in groups, not folder by
        folder: a tree of many small folders must not cost a trip to the event
        loop and a transaction per folder.
        """
        root_id = root.spec.id
        known = session.known.get(root_id, {})
        stored: dict[str, tuple[int, int, int, str]] | None = None
        misses = 0
        candidates: list[Candidate] = []
        agreed: list[tuple[str, str, str]] = []
        group = FIRST_BATCH_FILES  # grows like the batches: few trips to the event loop
        listed = to_read = 0
        pause = False  # the watcher is to stop before the next files are read

        def hand_over() -> None:
            nonlocal candidates, group, pause
            if pause:
                anyio.from_thread.run_sync(self._pause_watching)
                pause = False
            if candidates:
                anyio.from_thread.run(out.send, candidates)
                candidates = []
                group = min(2 * group, BATCH_FILES)

        def on_folder(files: list[FileStat]) -> None:
            nonlocal stored, misses, agreed, listed, to_read, pause
            listed += len(files)
            for st in files:
                if stored is None and (root_id, st.path) not in self._local:
                    misses += 1
                    if misses > BULK_LOOKUP:
                        stored = self.index.digests(root_id)  # one query, not one per file
                digest = self._cached_digest(root_id, st, stored)
                have = known.get(st.path)
                if have is not None and digest is not None and have == (st.size, digest):
                    agreed.append((root_id, st.path, digest))
                    continue
                candidates.append((st.path, st, digest))
                to_read += 1
            if to_read >= WATCH_PAUSE_FILES and 2 * to_read >= listed and not self._watch_paused:
                pause = True
            if len(agreed) >= INVENTORY_CHUNK:
                self._set_bases(agreed, [])
                agreed = []
            if len(candidates) >= group and not yielding:
                hand_over()  # (a split brain's loser looks at all of them at once, below)

        scan = listing.refresh() if listing is not None else None
        if scan is not None:
            logger.info(
                "first cycle from the listing of %s kept while no secondary was connected"
                " (%d files)",
                root.path,
                len(scan.files),
            )
            files = list(scan.files.values())
            for start in range(0, len(files), LISTING_STEP):
                on_folder(files[start : start + LISTING_STEP])
        else:
            scan = scan_root(root.path, root.spec.filter, on_folder=on_folder)
        self._set_bases(agreed, [])
        if yielding:
            candidates = self._keep_conflicts_of_loser(session, root, candidates)
        hand_over()
        deletes: list[str] = []
        if self.config.node.strict_sync:
            gone = [p for p in known if p not in scan.files]
            if listing is not None and gone:
                # A listing misses what no event told of: nothing is deleted on
                # its word alone, and a full scan follows for what is still here.
                gone, present = still_absent(root, gone)
                if present:
                    logger.info(
                        "%d files the listing of %s lacked are there: a full scan follows",
                        len(present),
                        root.path,
                    )
                    self._trigger.full = True
            deletes = self._allowed_deletes(root, gone, scan.complete, len(scan.files), len(known))
        for error in scan.errors[:3]:
            logger.warning("scan of %s: %s", root.path, error)
        self._note_left_out(root, scan)
        return deletes

    def _alert(self, kind: str, message: str, level: Literal["info", "warning", "error"]) -> None:
        """Raise an alert; from a worker thread (a scan's findings), on the event loop.

        The alerts' queues belong to the loop: set from another thread, their
        waiting task would only notice at the loop's next wake-up.
        """
        if self._loop_thread in (None, threading.get_ident()):
            self._deliver(kind, message, level)
        else:
            anyio.from_thread.run_sync(self._deliver, kind, message, level)

    def _alert_left_out(self, new: Sequence[str]) -> None:
        """One alert for the files newly found left out (called without the lock held)."""
        if new:
            more = f" (and {len(new) - 1} more: sbs status --json)" if len(new) > 1 else ""
            self._alert("replication_failed", f"not replicated: {new[0]}{more}", "warning")

    def _note_left_out(self, root: LocalRoot, scan: ScanResult) -> None:
        """Log what a full scan found that cannot be replicated, once while it stays so."""
        root_id = root.spec.id
        with self._left_out_lock:
            before = set(self._left_out.get(root_id, ()))
            lines = [f"{root.path}: {line}" for line in scan.unsendable]
            if not scan.complete:  # what was not listed may still be there
                lines += [line for line in before if line not in lines]
            new = [line for line in lines if line not in before]
            for line in new:
                logger.warning("%s", line)
            self._left_out[root_id] = lines
            if scan.complete:
                for key in [k for k in self._unreadable if k[0] == root_id]:
                    if key[1] not in scan.files:  # deleted, or no longer a file to send
                        del self._unreadable[key]
            self._show_left_out()
        self._alert_left_out(new)

    def _note_names(self, root: LocalRoot, found: Sequence[str]) -> None:
        """Log what a cycle without a full scan found that cannot be replicated, as it does."""
        if not found:
            return
        new = []
        with self._left_out_lock:
            lines = self._left_out.setdefault(root.spec.id, [])
            for line in (f"{root.path}: {line}" for line in found):
                if line not in lines:
                    logger.warning("%s", line)
                    lines.append(line)
                    new.append(line)
            self._show_left_out()
        self._alert_left_out(new)

    def _note_unreadable(
        self, root: LocalRoot, failed: Iterable[tuple[str, str]], read: Iterable[str]
    ) -> None:
        """Log files that could not be read, once per reason; forget those read since."""
        root_id = root.spec.id
        new = []
        with self._left_out_lock:
            if self._unreadable:
                for path in read:
                    self._unreadable.pop((root_id, path), None)
            for path, reason in failed:
                line = f"{root.path}: {quoted(path)} is not replicated: cannot read it: {reason}"
                if self._unreadable.get((root_id, path)) != line:
                    logger.warning("%s", line)
                    self._unreadable[(root_id, path)] = line
                    new.append(line)
            self._show_left_out()
        self._alert_left_out(new)

    def _forget_left_out(self) -> None:
        with self._left_out_lock:
            self._left_out.clear()
            self._unreadable.clear()
            self._show_left_out()

    def _show_left_out(self) -> None:
        """The status's list, from both (with the lock held)."""
        lines = [line for lines in self._left_out.values() for line in lines]
        self.status.not_replicated = lines + list(self._unreadable.values())

    def _diff_paths(
        self, session: _SenderSession, root: LocalRoot, names: list[str]
    ) -> tuple[list[tuple[str, FileStat, str | None]], list[str]]:
        known = session.known.get(root.spec.id, {})
        found: dict[str, tuple[str, FileStat, str | None]] = {}
        gone: list[str] = []
        for name in names:
            now = look(root, name)
            if not now.exists:
                if name in known:
                    gone.append(name)
                elif self.config.node.strict_sync and any(p.startswith(name + "/") for p in known):
                    # A folder deleted or moved away (or an unmounted share): its files
                    # raise no events of their own, and only a full scan tells the cases
                    # apart. The loop runs it next; it waits for this thread meanwhile.
                    self._trigger.full = True
                continue
            if now.error is not None and not now.folder:
                continue  # unreadable now: the next full scan says why
            for path, fs in now.files.items():
                found[path] = (path, fs, self._cached_digest(root.spec.id, fs))
            self._note_names(root, now.unsendable)
        candidates = list(found.values())
        deletes: list[str] = []
        if gone and self.config.node.strict_sync:
            remaining = max(0, len(known) - len(gone))
            deletes = self._allowed_deletes(root, gone, root.path.is_dir(), remaining, len(known))
        return candidates, deletes

    def _allowed_deletes(
        self, root: LocalRoot, gone: list[str], complete: bool, source: int, target: int
    ) -> list[str]:
        """Strict sync's deletions that may go now; the others are held back, with an alert."""
        root_id = root.spec.id
        if not gone:
            self._held.pop(root_id, None)
            self._held_why.pop(root_id, None)
            self.status.held_deletes = sum(self._held.values())
            return []
        count, share = self.config.node.delete_cap()
        if self._deletes_confirmed and complete:
            count = share = None  # the operator confirmed: only the safety rules remain
        allowed, why = deletion_allowed(
            source_complete=complete,
            source_count=source,
            target_count=target,
            to_delete=len(gone),
            max_delete_count=count,
            max_delete_share=share,
        )
        if allowed:
            self._held.pop(root_id, None)
            self._held_why.pop(root_id, None)
        else:
            first = self._held.get(root_id) != len(gone)
            self._held[root_id] = len(gone)
            message = f"strict sync of {root.path}: {len(gone)} deletions held back: {why}"
            self._held_why[root_id] = message
            self.status.last_sync_error = message
            if first:  # once per distinct hold, not every cycle
                self._alert("replication_failed", message, "warning")
        self.status.held_deletes = sum(self._held.values())
        return gone if allowed else []

    # The *base* of a file is the content both nodes last agreed on (sent and
    # acknowledged, or received and applied). A local file that differs from its
    # base was changed on this node since: it is never overwritten silently.

    def base_of(self, root_id: str, path: str) -> str | None:
        return self.index.base(root_id, path)

    def _set_bases(
        self, agreed: Sequence[tuple[str, str, str]], forgotten: Sequence[tuple[str, str]]
    ) -> None:
        # Every full scan re-agrees on every unchanged file: write only what is new,
        # or an idle pair would rewrite its whole index every period.
        new = [(r, p, d) for r, p, d in agreed if self._bases.get((r, p)) != d]
        if new:
            self.index.set_bases(new)
            self._bases.update(((r, p), d) for r, p, d in new)
        if forgotten:
            self.index.forget_bases(forgotten)
            for key in forgotten:
                self._bases.pop(key, None)

    def _note_received(self, rows: Sequence[tuple[str, str, int, int, int, str]]) -> None:
        """Files received and applied: each digest is stored as its file's base too."""
        self.index.put_many(rows, agreed=True)
        self._bases.update(((r[0], r[1]), r[5]) for r in rows)

    def _forget_files(self, keys: Sequence[tuple[str, str]]) -> None:
        """Files deleted by both nodes: neither a digest nor a base is left of them."""
        self.index.forget(keys)
        for key in keys:
            self._bases.pop(key, None)

    def local_digest(self, root_id: str, path: str, full: Path) -> str | None:
        """The digest of this node's file now (cached by stat), or None when there is none."""
        try:
            st = os.stat(full)
        except OSError:
            return None
        stat_ = FileStat(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)
        cached = self._cached_digest(root_id, stat_)
        if cached is not None:
            return cached
        found = hash_file(full)
        return found.digest if found is not None else None

    def _keep_conflicts_of_loser(
        self,
        session: _SenderSession,
        root: LocalRoot,
        candidates: list[tuple[str, FileStat, str | None]],
    ) -> list[tuple[str, FileStat, str | None]]:
        """Split brain lost: keep (not send) this node's files that the winner changed too."""
        known = session.known.get(root.spec.id, {})
        keeper = Applier(
            {root.spec.id: root.path},
            conflicts_dir=self._state_dir / "conflicts",
            preserve_timestamps=True,
        )
        send = []
        kept_bases = []
        for path, st, digest in candidates:
            theirs = known.get(path)
            if theirs is None:
                send.append((path, st, digest))  # the winner has no such file: ours goes
                continue
            base = self.base_of(root.spec.id, path)
            if base is not None and theirs[1] == base:
                send.append((path, st, digest))  # the winner left it alone: ours goes
                continue
            # No base (the peer's acknowledgement of our last version was lost
            # with the link) means the winner's version cannot be known
            # unchanged: it stays, and ours is kept.
            mine = digest or self.local_digest(root.spec.id, path, root.path / path)
            if mine is None or mine == base or mine == theirs[1]:
                continue  # only the winner changed it: nothing of ours to keep
            kept = keeper.keep_conflict(root.spec.id, path, reason="split brain: changed on both")
            if kept is not None:
                kept_bases.append((root.spec.id, path, mine))
                self.status.conflicts.append(str(kept))
        if kept_bases:
            shown = ", ".join(p for _, p, _ in kept_bases[:10])
            self._alert(
                "split_brain",
                f"{len(kept_bases)} file(s) changed on both nodes during the split brain keep "
                f"the winner's copy; this node's are kept under {self._state_dir / 'conflicts'}: "
                f"{shown}",
                "warning",
            )
        # Kept already: when the winner's version arrives here it may replace ours.
        self._set_bases(kept_bases, [])
        return send

    def _cached_digest(
        self,
        root_id: str,
        st: FileStat,
        stored: dict[str, tuple[int, int, int, str]] | None = None,
    ) -> str | None:
        """The digest known for this file as it is now; ``stored``: the root's index, read."""
        cached = self._local.get((root_id, st.path))
        if cached is not None and (cached.size, cached.mtime_ns, cached.ino) == (
            st.size,
            st.mtime_ns,
            st.ino,
        ):
            return cached.digest
        if stored is None:
            digest = self.index.get(
                root_id, st.path, size=st.size, mtime_ns=st.mtime_ns, ino=st.ino
            )
        else:
            digest = HashIndex.digest_in(
                stored, st.path, size=st.size, mtime_ns=st.mtime_ns, ino=st.ino
            )
        if digest is not None:
            self._local[(root_id, st.path)] = _Local(st.size, st.mtime_ns, st.ino, digest)
        return digest

    async def _send_root(
        self,
        session: _SenderSession,
        root: LocalRoot,
        source: AsyncIterable[list[Candidate]],
    ) -> dict[str, tuple[int, str]]:
        """Send what the receiver lacks; return path -> (size, digest) of what was sent.

        ``source`` gives the candidates in groups as they are found: small
        files go in batches as soon as one is full, large ones after them.
        """
        sent: dict[str, tuple[int, str]] = {}
        known = session.known.get(root.spec.id, {})
        large: list[Candidate] = []
        progress = _Progress(root.path, 0)
        tx, rx = anyio.create_memory_object_stream[list[_Read]](READ_BATCHES)

        async def reader() -> None:
            batcher = _Batcher()
            async with tx:
                async for candidates in source:
                    self.status.files_pending += len(candidates)
                    progress.total += len(candidates)
                    for candidate in candidates:
                        if candidate[1].size > SMALL:
                            large.append(candidate)
                        elif (batch := batcher.add(candidate)) is not None:
                            await tx.send(
                                await anyio.to_thread.run_sync(self._read_and_note, root, batch)
                            )
                if (batch := batcher.rest()) is not None:
                    await tx.send(await anyio.to_thread.run_sync(self._read_and_note, root, batch))

        async with _task_group() as tg:
            tg.start_soon(reader)
            async with rx:
                async for reads in rx:
                    progress.advance(len(reads), sum(r.size for r in reads))
                    fresh = [
                        r
                        for r in reads
                        if r.data is not None and known.get(r.path) != (r.size, r.digest)
                    ]
                    if not fresh:
                        continue
                    await self._put(session, root, fresh)
                    for r in fresh:
                        sent[r.path] = (r.size, r.digest)
        todo = []
        for path, st, digest in large:
            if digest is not None and known.get(path) == (st.size, digest):
                progress.advance(1, st.size)
            else:
                todo.append((path, st))
        if todo:
            sent.update(await self._send_large(session, root, todo, progress))
        return sent

    def _read_and_note(self, root: LocalRoot, batch: list[Candidate]) -> list[_Read]:
        """Read a batch of small files, and note their digests (blocks).

        Noted here, in the worker thread: the index rows of a full batch
        (2,048 files) take 5-10 ms, which the event loop, and so the
        heartbeats, waited for when they were written there.
        """
        failed: list[tuple[str, str]] = []
        reads = _read_batch(root.path, batch, failed)
        self._remember(root.spec.id, reads)
        if failed or self._unreadable:
            self._note_unreadable(root, failed, (r.path for r in reads))
        return reads

    def _remember(self, root_id: str, reads: list[_Read]) -> None:
        rows = []
        for r in reads:
            if r.data is not None:
                self._local[(root_id, r.path)] = _Local(r.size, r.mtime_ns, r.ino, r.digest)
                rows.append((root_id, r.path, r.size, r.mtime_ns, r.ino, r.digest))
        if rows:
            self.index.put_many(rows)

    async def _put(self, session: _SenderSession, root: LocalRoot, reads: list[_Read]) -> None:
        files = tuple(
            PutFile(root=root.spec.id, path=r.path, size=r.size, mtime_ns=r.mtime_ns) for r in reads
        )
        await self._link.send(session.conn, Put(session=session.id, files=files))
        # Frames joined from the files' data one at a time: no copy of the batch.
        parts: list[memoryview] = []
        filled = 0
        for r in reads:
            data = memoryview(r.data or b"")
            while data:
                take = min(len(data), CHUNK - filled)
                parts.append(data[:take])
                filled += take
                data = data[take:]
                if filled == CHUNK:
                    await self._send_frame(session, b"".join(parts))
                    parts, filled = [], 0
        if parts:
            await self._send_frame(session, b"".join(parts))
        await self._link.send(
            session.conn, Seal(session=session.id, digests=tuple(r.digest for r in reads))
        )

    async def _send_frame(self, session: _SenderSession, chunk: bytes) -> None:
        await session.spend(len(chunk))
        await self._link.send_data(session.conn, chunk)
        self.status.bytes_sent += len(chunk)

    async def _send_large(
        self,
        session: _SenderSession,
        root: LocalRoot,
        todo: list[tuple[str, FileStat]],
        progress: _Progress,
    ) -> dict[str, tuple[int, str]]:
        """Stream each large file of ``todo``; path -> (size, digest) of what was sent.

        A worker thread opens the next files and reads their first chunks (most
        files whole, then closed) while a group is sent, so nothing waits for a
        file's opening; the files sent are noted in the index in groups.
        """
        sent: dict[str, tuple[int, str]] = {}
        rows: list[IndexRow] = []
        tx, rx = anyio.create_memory_object_stream[list[_LargeRead]](OPEN_AHEAD)

        async def opener() -> None:
            async with tx:
                start = 0
                while start < len(todo):
                    group, start, missing, failed = await anyio.to_thread.run_sync(
                        _open_group, root.path, todo, start
                    )
                    progress.advance(len(missing), sum(missing))
                    if failed or self._unreadable:
                        self._note_unreadable(root, failed, (large.path for large in group))
                    if not group:
                        continue
                    try:
                        await tx.send(group)
                    except BaseException:
                        _close_all(group)  # the sending ended: these will not be sent
                        raise

        try:
            async with _task_group() as tg:
                tg.start_soon(opener)
                try:
                    async for group in rx:
                        progress.advance(len(group), sum(large.size for large in group))
                        results = await self._stream_group(session, root, group)
                        for large, result in zip(group, results, strict=True):
                            if result is None:
                                continue
                            sent[large.path] = result
                            size, digest = result
                            before = large.before
                            rows.append(
                                IndexRow(
                                    root.spec.id,
                                    large.path,
                                    size,
                                    before.st_mtime_ns,
                                    before.st_ino,
                                    digest,
                                )
                            )
                        if len(rows) >= INDEX_ROWS:
                            await self._note_sent(rows)
                            rows = []
                finally:
                    # Opened ahead but not sent (the session ended): closed here, and
                    # the opener's next ones when it finds the stream closed.
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        while True:
                            _close_all(rx.receive_nowait())
                    rx.close()
        finally:
            with anyio.CancelScope(shield=True):
                await self._note_sent(rows)
        return sent

    async def _note_sent(self, rows: list[IndexRow]) -> None:
        # In a worker thread, as every index call: a commit can wait seconds for
        # a busy disk, or for the index's lock held by a thread that does.
        if rows:
            await anyio.to_thread.run_sync(self.index.put_many, rows)

    async def _stream_group(
        self, session: _SenderSession, root: LocalRoot, group: list[_LargeRead]
    ) -> list[tuple[int, str] | None]:
        """Send large files opened (and partly read) ahead, under one Put and one Seal.

        Returns each file's (size, digest), None for one that changed while it
        was read (it goes again next cycle).
        """
        files = tuple(
            PutFile(
                root=root.spec.id,
                path=large.path,
                size=large.size,
                mtime_ns=large.before.st_mtime_ns,
            )
            for large in group
        )
        try:
            await self._link.send(session.conn, Put(session=session.id, files=files))
            for large in group:
                for chunk in large.take_first():
                    await self._send_frame(session, chunk)
                if not large.finished:
                    await self._send_rest(session, large)
            digests = tuple(large.digest() for large in group)
            await self._link.send(session.conn, Seal(session=session.id, digests=digests))
        finally:
            unfinished = [large for large in group if not large.finished]
            if unfinished:
                # Shielded: a session cancelled mid-file (its connection gone) still closes them.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_finish_all, unfinished)
        results: list[tuple[int, str] | None] = []
        for large, digest in zip(group, digests, strict=True):
            before = large.before
            if not digest:
                full = root.path / large.path
                logger.info("%s changed while it was read: it goes again next cycle", full)
                self._trigger.paths.setdefault(root.spec.id, set()).add(large.path)
                results.append(None)
                continue
            self._local[(root.spec.id, large.path)] = _Local(
                large.size, before.st_mtime_ns, before.st_ino, digest
            )
            results.append((large.size, digest))
        return results

    async def _send_rest(self, session: _SenderSession, large: _LargeRead) -> None:
        """The chunks of a file larger than its first read, read in a worker thread ahead."""
        chunks = large.chunks
        tx, rx = anyio.create_memory_object_stream[bytes](READ_AHEAD)

        async def reader() -> None:
            async with tx:
                while chunks.remaining > 0:
                    for chunk in await anyio.to_thread.run_sync(chunks.take, READ_AHEAD):
                        await tx.send(chunk)

        async with _task_group() as tg:
            tg.start_soon(reader)
            async with rx:
                async for chunk in rx:
                    await self._send_frame(session, chunk)
        await anyio.to_thread.run_sync(large.finish)

    # ------------------------------------------------------------------ receiver

    def _start_receiver(self, conn: ConnId, start: SyncStart) -> None:
        old, self._receiver = self._receiver, None
        if old is not None:
            old.scope.cancel()
        if self._tg is None:
            return
        session = _ReceiverSession(self, conn, start)
        self._receiver = session
        # A secondary sends nothing: what it left out as a primary is no longer news.
        self._forget_left_out()
        self._tg.start_soon(self._run_receiver, session, old)

    async def _run_receiver(
        self, session: _ReceiverSession, previous: _ReceiverSession | None
    ) -> None:
        try:
            with session.scope:
                if previous is not None:
                    # A commit of the old session may still be renaming files in
                    # a worker thread: the new inventory must come after it.
                    await previous.ended.wait()
                await self._receiver_loop(session)
        except ForgedFrameError as exc:
            # A data frame opened here failed its check, as the channel fails one
            # it opens itself: nothing of it was used, and the connection goes.
            self.status.last_sync_error = str(exc)
            self._link.drop(session.conn, str(exc))
        except (RemoteProtocolError, UnsafePathError) as exc:
            # First: both are ConnectionErrors, so the clause below would swallow them.
            self.status.last_sync_error = str(exc)
            self._alert_refused(str(exc))
        except (LinkClosed, OSError) as exc:
            logger.warning("receiving sync session %d ended: %s", session.id, exc)
        finally:
            session.ended.set()
            if self._receiver is session:
                self._receiver = None
            session.close()

    def _alert_failure(self, detail: str) -> None:
        # A failing cycle is retried every second: one alert (and log line) a
        # minute says it; the status always has the latest.
        now = anyio.current_time()
        if now - self._failure_alert_at < REFUSED_ALERT_INTERVAL:
            return
        self._failure_alert_at = now
        self._alert("replication_failed", detail, "error")

    def _alert_refused(self, reason: str) -> None:
        # A broken or compromised primary may send refused sessions by the thousand:
        # each would be a log line and an alert. The status always has the last one.
        now = anyio.current_time()
        if now - self._refused_alert_at < REFUSED_ALERT_INTERVAL:
            self._refused_since_alert += 1
            return
        more = self._refused_since_alert
        self._refused_alert_at, self._refused_since_alert = now, 0
        also = f" ({more} more refused since the last alert)" if more else ""
        self._alert(
            "replication_failed", f"refused the peer's sync session: {reason}{also}", "error"
        )

    async def _receiver_loop(self, session: _ReceiverSession) -> None:
        start = session.start
        roots = receiver_roots(self.config, start.roots)
        if start.roots != self._peer_roots:
            self._peer_roots = start.roots
            await anyio.to_thread.run_sync(save_peer_roots, self._state_dir, start.roots)
            self._log_folder_difference(start.roots)
        applier = Applier(
            {r.spec.id: r.path for r in roots},
            conflicts_dir=self._state_dir / "conflicts",
            preserve_timestamps=start.preserve_timestamps,
            durable=self.config.node.durable_writes,
        )
        await anyio.to_thread.run_sync(applier.cleanup_temp_files)
        try:
            await self._send_inventory(session, roots)
            async with _task_group() as background, session.queue_rx:
                receiver = _Receiving(self, session, applier, background)
                async for item in _gather_data(session.queue_rx):
                    try:
                        await receiver.handle(item)
                    except (RemoteProtocolError, UnsafePathError, LinkClosed):
                        raise  # the peer's fault, or no peer (OSErrors too): the session ends
                    except (OSError, sqlite3.Error) as exc:
                        # This node's disk, not the peer: the cycle's files are
                        # retried and its ack says why; the session goes on.
                        await anyio.to_thread.run_sync(receiver.fail, exc)
                        if isinstance(item, CycleEnd):
                            await receiver.handle(item)  # the ack, with the error
        finally:
            # A session cut short leaves no temporary file behind in the folders.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(applier.abort_all)

    def _log_folder_difference(self, specs: tuple[RootSpec, ...]) -> None:
        own = {r.spec.id for r in sender_roots(self.config)}
        theirs = {s.id for s in specs}
        if own and own != theirs:
            logger.warning(
                "this node's own folders differ from the primary's; while secondary it "
                "replicates the primary's: %s",
                ", ".join(sorted(theirs)),
            )

    async def _send_inventory(self, session: _ReceiverSession, roots: list[LocalRoot]) -> None:
        if not roots:
            await self._link.send(
                session.conn, Inventory(session=session.id, root="", entries=(), last=True)
            )
            return
        for n, root in enumerate(roots):
            entries = await anyio.to_thread.run_sync(self._inventory_of, root)
            last_root = n == len(roots) - 1
            chunks = [
                entries[i : i + INVENTORY_CHUNK] for i in range(0, len(entries), INVENTORY_CHUNK)
            ]
            chunks = chunks or [[]]
            for i, chunk in enumerate(chunks):
                await self._link.send(
                    session.conn,
                    Inventory(
                        session=session.id,
                        root=root.spec.id,
                        entries=tuple(chunk),
                        last=last_root and i == len(chunks) - 1,
                    ),
                )

    def _inventory_of(self, root: LocalRoot) -> list[tuple[str, int, int, str]]:
        scan = scan_root(root.path, root.spec.filter)
        stored = self.index.digests(root.spec.id)  # one query, not one per file
        entries = []
        rows = []
        for path, st in scan.files.items():
            digest = HashIndex.digest_in(
                stored, path, size=st.size, mtime_ns=st.mtime_ns, ino=st.ino
            )
            if digest is None:
                found = hash_file(root.path / path)
                if found is None:
                    continue  # changing right now: the sender sends it anyway
                digest = found.digest
                rows.append((root.spec.id, path, st.size, st.mtime_ns, st.ino, digest))
            entries.append((path, st.size, st.mtime_ns, digest))
        if rows:
            self.index.put_many(rows)
        return entries


class _Progress:
    """A log line every few seconds while a long cycle runs, so a first sync is not silent."""

    EVERY = 5.0

    def __init__(self, root: Path, total: int) -> None:
        self.root = root
        self.total = total
        self.done = 0
        self.bytes = 0
        self.began = self.last = time.monotonic()

    def advance(self, files: int, size: int) -> None:
        self.done += files
        self.bytes += size
        now = time.monotonic()
        if now - self.last >= self.EVERY:
            self.last = now
            logger.info(
                "syncing %s: %d of %d files checked, %.0f MB, %.0f s",
                self.root,
                self.done,
                self.total,
                self.bytes / 1e6,
                now - self.began,
            )


def _open_group(
    folder: Path, todo: Sequence[tuple[str, FileStat]], start: int
) -> tuple[list[_LargeRead], int, list[int], list[tuple[str, str]]]:
    """Open ``todo``'s files from ``start`` on, reading their first chunks (blocks).

    Stops before a file whose first read (by its scanned size) would take the
    group past READ_AHEAD chunks (a group has one file at least), or at
    GROUP_FILES. Returns the group, where the next one starts, the scanned
    sizes of the files that could not be opened (skipped), and ``(path, why)``
    of those among them that are there but could not be read.
    """
    group: list[_LargeRead] = []
    missing: list[int] = []
    failed: list[tuple[str, str]] = []
    budget = READ_AHEAD * CHUNK
    taken = 0  # the group's first reads, from the scanned sizes
    index = start
    try:
        while index < len(todo) and len(group) < GROUP_FILES:
            path, st = todo[index]
            first = min(st.size, budget)
            if group and taken + first > budget:
                break
            index += 1
            try:
                large = _open_large(folder, path)
            except OSError as exc:
                missing.append(st.size)
                if not _vanished(exc):
                    failed.append((path, os_reason(exc)))
                continue
            group.append(large)
            taken += first
    except BaseException:
        _close_all(group)
        raise
    return group, index, missing, failed


def _close_all(group: Iterable[_LargeRead]) -> None:
    for large in group:
        large.close()


def _finish_all(group: Iterable[_LargeRead]) -> None:
    """Finish each file (see :meth:`_LargeRead.finish`); every one closed, even after a failure."""
    try:
        for large in group:
            large.finish()
    finally:
        _close_all(group)


def _open_large(folder: Path, path: str) -> _LargeRead:
    """Open a large file and read its first chunks (blocks); OSError if it cannot.

    A file that is no longer a regular file (a FIFO put in its place) raises
    :class:`IsADirectoryError`, which, as for a folder, means it is gone.
    """
    fd = os.open(folder / path, READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "no longer a regular file", path)
        f = open(fd, "rb")  # noqa: SIM115 - closed by _LargeRead, here or after the sending
    except BaseException:
        os.close(fd)
        raise
    try:
        return _LargeRead(path, f)
    except BaseException:
        f.close()
        raise


class _LargeRead:
    """A large file being sent: opened, its first chunks read, the rest read as they go.

    A file whose first read took it all is closed at once (:attr:`finished`).
    """

    def __init__(self, path: str, f: BinaryIO) -> None:
        self.path = path
        self._f = f
        self.before = os.fstat(f.fileno())
        self.size = self.before.st_size
        self.chunks = _Chunks(f, self.size)
        self._first = self.chunks.take(READ_AHEAD)
        self._after: os.stat_result | None = None
        if self.chunks.remaining == 0:
            self.finish()

    @property
    def finished(self) -> bool:
        return self._after is not None

    def take_first(self) -> list[bytes]:
        first, self._first = self._first, []
        return first

    def finish(self) -> None:
        """Look at the file once more and close it (blocks)."""
        if self._after is None:
            try:
                self._after = os.fstat(self._f.fileno())
            finally:
                self._f.close()

    def close(self) -> None:
        """Close it unsent (blocks, briefly: the file was only read)."""
        self._f.close()

    def digest(self) -> str:
        """The content hash, or "" if the file changed while it was read (torn)."""
        after = self._after
        same = after is not None and (after.st_size, after.st_mtime_ns) == (
            self.size,
            self.before.st_mtime_ns,
        )
        return "" if self.chunks.torn or not same else self.chunks.hasher.hexdigest()


class _Chunks:
    """The data frames of one large file as announced: ``size`` bytes, hashed as read.

    A file that shrinks while it is read still gives its announced size (zeros),
    so the frames match the Put; ``torn`` then makes the Seal discard it.
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.remaining = size
        self.torn = False
        self.hasher = new_hasher()

    def take(self, count: int) -> list[bytes]:
        """The next ``count`` frames or fewer (blocks: one worker-thread call for them all)."""
        frames: list[bytes] = []
        while self.remaining > 0 and len(frames) < count:
            frames.append(self.next())
        return frames

    def next(self) -> bytes:
        """The next frame (blocks)."""
        want = min(CHUNK, self.remaining)
        chunk = b"" if self.torn else self._f.read(want)
        if not chunk:
            self.torn = True
            chunk = bytes(want)
        self.hasher.update(chunk)
        self.remaining -= len(chunk)
        return chunk


@dataclass(slots=True)
class _Data:
    """Data frames that were waiting together, and the Seal right behind them if it was."""

    frames: list[DataPayload]
    seal: Seal | None = None


async def _gather_data(
    queue: MemoryObjectReceiveStream[SyncMessage | DataPayload],
) -> AsyncIterator[SyncMessage | _Data]:
    """The queue's items, with data frames already waiting handed out together.

    Each hand-out is one worker-thread call on the receiver: per frame, the
    calls cost the event loop more than the writing. A Seal already waiting
    behind them comes with them, for the same call.
    """
    held: SyncMessage | None = None
    while True:
        if held is not None:
            item: SyncMessage | DataPayload = held
            held = None
        else:
            try:
                item = await queue.receive()
            except anyio.EndOfStream:
                return
        if not isinstance(item, bytes | SealedFrame):
            yield item
            continue
        frames: list[DataPayload] = [item]
        size = len(item)
        seal: Seal | None = None
        while size < GATHER_BYTES:
            try:
                more = queue.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if isinstance(more, Seal):
                seal = more
                break
            if not isinstance(more, bytes | SealedFrame):
                held = more
                break
            frames.append(more)
            size += len(more)
        yield _Data(frames, seal)


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[TaskGroup]:
    """A task group whose one failure comes out as itself, not inside an ExceptionGroup.

    The callers catch LinkClosed and OSError by type; a helper task's failure
    must reach them the same way as the host's. A helper that reads ahead for
    the host fails with BrokenResourceError when the host's failure closed the
    stream between them: only the host's failure tells why, so only it comes out.
    """
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        causes = [e for e in group.exceptions if not isinstance(e, anyio.BrokenResourceError)]
        failures = causes or group.exceptions
        if len(failures) == 1:
            raise failures[0] from None
        raise


@dataclass(slots=True)
class _Read:
    path: str
    size: int
    mtime_ns: int
    ino: int
    digest: str
    data: bytes | None  # None: vanished or changed while read


class _Batcher:
    """Groups small files into batches, bounded in data, file count and Put size."""

    def __init__(self) -> None:
        self.current: list[Candidate] = []
        self.size = self.names = 0
        self.most = FIRST_BATCH_FILES

    def add(self, item: Candidate) -> list[Candidate] | None:
        """Take ``item``; the batch it completed (without it), if any."""
        name = len(item[0]) + PUT_FILE_OVERHEAD
        full = None
        if self.current and (
            self.size + item[1].size > BATCH_BYTES
            or len(self.current) >= self.most
            or self.names + name > BATCH_NAMES
        ):
            full = self.current
            self.current, self.size, self.names = [], 0, 0
            self.most = min(2 * self.most, BATCH_FILES)
        self.current.append(item)
        self.size += item[1].size
        self.names += name
        return full

    def rest(self) -> list[Candidate] | None:
        """The last, partial batch, if there is one."""
        rest, self.current = self.current, []
        return rest or None


async def _listed(candidates: list[Candidate]) -> AsyncIterator[list[Candidate]]:
    """Candidates known all at once, as a source for :meth:`SyncEngine._send_root`."""
    yield candidates


def _read_batch(
    root: Path, batch: list[tuple[str, FileStat, str | None]], failed: list[tuple[str, str]]
) -> list[_Read]:
    """Read the files of ``batch`` whole; those that cannot be read go to ``failed``.

    A file that vanished or changed since the scan is simply left out (the next
    cycle sees what it became); ``failed`` gets ``(path, why)`` for the others.
    """
    reads = []
    prefix = os.path.join(root, "")
    for path, _st, _digest in batch:
        # os-level calls: a file object would cost more than these few small reads.
        try:
            fd = os.open(prefix + path, READ_FLAGS)
        except OSError as exc:
            if not _vanished(exc):
                failed.append((path, os_reason(exc)))
            continue
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                continue  # no longer a file (see READ_FLAGS)
            # One byte more than the size: a file that grew shows as torn.
            data = os.read(fd, before.st_size + 1)
            while len(data) < before.st_size:  # a short read, rare: go on
                more = os.read(fd, before.st_size + 1 - len(data))
                if not more:
                    break
                data += more
            after = os.fstat(fd)
        except OSError as exc:
            if not _vanished(exc):
                failed.append((path, os_reason(exc)))
            continue
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
            data
        ) != before.st_size:
            continue  # being written: the next cycle sends it whole
        reads.append(
            _Read(
                path=path,
                size=len(data),
                mtime_ns=before.st_mtime_ns,
                ino=before.st_ino,
                digest=digest_of(data),
                data=data,
            )
        )
    return reads


def _run_script(command: tuple[str, ...], timeout: float) -> str:
    """Run one update script; an empty string when it succeeded, else what went wrong."""
    try:
        done = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"exited with {done.returncode}: {tail[0][:200]}"
    return ""


def _list_all(listings: Iterable[FolderListing]) -> None:
    for listing in listings:
        listing.list()


def _refresh_all(listings: Iterable[FolderListing]) -> None:
    for listing in listings:
        listing.refresh()


def deletes_count(plan: list[tuple[LocalRoot, list[str]]]) -> int:
    return sum(len(d) for _, d in plan)


@dataclass(eq=False)
class _Flushing:
    """A batch whose data is being made durable while the next one is written."""

    batch: list[tuple[PutFile, Incoming]]
    done: anyio.Event = field(default_factory=anyio.Event)
    reasons: list[str | None] | None = None  # Applier.flush's answer, once done


class _Receiving:
    """Applies one session's Put/data/Seal/Delete/CycleEnd stream, in order."""

    def __init__(
        self,
        engine: SyncEngine,
        session: _ReceiverSession,
        applier: Applier,
        background: TaskGroup,
    ) -> None:
        self.engine = engine
        self.session = session
        self.applier = applier
        # Where a durable batch's flush runs while the batch before it is
        # renamed and the next is written: the disk's time overlaps the
        # interpreter's. ``flushing``: that batch, until it is renamed.
        self.background = background
        self.flushing: _Flushing | None = None
        self.files: list[PutFile] = []
        self.incoming: list[Incoming | None] = []
        self.unopened = False  # files of the last Put not yet begun (see handle)
        self.current = 0  # index in files of the file being filled
        self.filled = 0  # bytes written into files[current]
        # The data frames of a Put of small files, held until its Seal (see HOLD_BYTES).
        self.held: list[DataPayload] | None = None
        self.held_bytes = 0
        self.held_total = 0  # what the Put announced
        self.buffer: bytearray | None = None  # where held frames are opened, one at a time
        self.ready: list[tuple[PutFile, Incoming]] = []
        self.ready_bytes = 0
        self.applied = 0
        self.retry: list[tuple[str, str, str]] = []
        self.refused: list[tuple[str, str, str]] = []
        self.credit_owed = 0
        self.kept: list[str] = []  # conflict copies of this cycle: one alert for all
        # Set when this node could not apply (a full disk): the rest of the cycle
        # is received and dropped, every file of it retried, and its ack says why.
        self.broken: str | None = None

    async def handle(self, item: SyncMessage | _Data) -> None:
        if isinstance(item, _Data):  # data frames, gathered by _gather_data
            await self._receive(item)
            return
        match item:
            case Put(files=files):
                if self.current < len(self.files):
                    raise RemoteProtocolError("sync: a Put before the last one was sealed")
                self.files = list(files)
                self.incoming = []
                self.current = self.filled = 0
                total = sum(f.size for f in files)
                if total <= HOLD_BYTES and all(f.size < WHOLE_FILE_MAX for f in files):
                    self.held, self.held_bytes, self.held_total = [], 0, total
                else:
                    # Opened by the next worker-thread call, the one that writes
                    # their data: a call of their own cost 0.8 ms a file on "mixed".
                    self.unopened = True
            case Seal(digests=digests):
                await self._sealed(digests)
            case Delete(root=root, paths=paths):
                outcomes = await anyio.to_thread.run_sync(self._delete, root, paths)
                self._count(outcomes)
            case CycleEnd(cycle=cycle):
                await self._next_batch()
                last, self.flushing = self.flushing, None
                await self._commit_flushed(last)  # the cycle's last batch
                await self._grant()
                ack = CycleAck(
                    session=self.session.id,
                    cycle=cycle,
                    applied=self.applied,
                    retry=tuple(self.retry),
                    refused=tuple(self.refused),
                    error=self.broken or "",
                )
                self.applied = 0
                self.retry, self.refused = [], []
                self.broken = None  # the next cycle tries again
                if self.kept:
                    shown = ", ".join(self.kept[:10]) + (" ..." if len(self.kept) > 10 else "")
                    self.engine._alert(
                        "split_brain",
                        f"{len(self.kept)} file(s) changed on this node too were kept: {shown}",
                        "warning",
                    )
                    self.kept = []
                await self.engine._link.send(self.session.conn, ack)
                self.engine.status.last_sync_at = time.time()
            case _:
                raise RemoteProtocolError(f"sync: unexpected {item.type} in a session")

    async def _receive(self, data: _Data) -> None:
        frames, seal = data.frames, data.seal
        size = sum(len(frame) for frame in frames)
        self.session.queued_bytes -= size
        held = self.held is not None
        if held:
            self._hold(frames, size)
        else:
            # The Seal right behind the frames is applied in the same call.
            digests = seal.digests if seal is not None else None
            await anyio.to_thread.run_sync(self._write_all, frames, digests)
        self.engine.status.bytes_received += size
        self.credit_owed += size
        if self.credit_owed >= WINDOW // 4:
            await self._grant()
        if seal is not None:
            await self._sealed(seal.digests, applied=not held)

    async def _sealed(self, digests: tuple[str, ...], *, applied: bool = False) -> None:
        """A Put's files are complete: check them (unless ``applied`` already), maybe commit."""
        if not applied:
            if self.held is not None:
                await anyio.to_thread.run_sync(self._write_held, digests)
            else:
                await anyio.to_thread.run_sync(self._seal, digests)
        if len(self.ready) >= COMMIT_FILES or self.ready_bytes >= COMMIT_BYTES:
            await self._next_batch()

    async def _next_batch(self) -> None:
        """Commit what is ready: durable, in two steps, the second at the next call.

        Its flush starts in the background, and then the batch before it,
        flushed meanwhile, is renamed into place: the disk's write-back runs
        beside those renames rather than beside the writing of the next batch,
        which it slowed (docs/benchmarks.md), and a cycle's last flush beside
        the renames of the batch before it.
        """
        before, self.flushing = self.flushing, None
        if not self.applier.durable:
            await anyio.to_thread.run_sync(self._commit)
            return
        if self.ready:
            self._start_flush()
        await self._commit_flushed(before)

    def _start_flush(self) -> None:
        flushing = _Flushing(self.ready)
        self.ready, self.ready_bytes = [], 0
        self.flushing = flushing
        self.background.start_soon(self._flush, flushing)

    async def _flush(self, flushing: _Flushing) -> None:
        try:
            incomings = [incoming for _, incoming in flushing.batch]
            flushing.reasons = await anyio.to_thread.run_sync(self.applier.flush, incomings)
        finally:
            flushing.done.set()

    async def _commit_flushed(self, flushing: _Flushing | None) -> None:
        """Rename the batch of ``flushing`` once its flush is done, if there is one."""
        if flushing is None:
            return
        await flushing.done.wait()
        if flushing.reasons is None:
            return  # the flush failed: its error ends the session (the task group's)
        await anyio.to_thread.run_sync(self._commit_batch, flushing.batch, flushing.reasons)

    async def _grant(self) -> None:
        if self.credit_owed:
            owed, self.credit_owed = self.credit_owed, 0
            await self.engine._link.send(
                self.session.conn, Credit(session=self.session.id, bytes=owed)
            )

    def fail(self, exc: Exception) -> None:
        """Nothing more of this cycle can be applied here: retry all of it (blocks)."""
        reason = f"cannot apply on {self.engine.config.node.name}: {_reason_of(exc)}"
        if self.broken is None:
            logger.error("replication: %s; the cycle's files are retried", reason)
        self.broken = reason
        for f, incoming in self.ready:
            incoming.abort()
            self.retry.append((f.root, f.path, reason))
        self.ready, self.ready_bytes = [], 0
        for index, (f, pending) in enumerate(zip(self.files, self.incoming, strict=False)):
            if pending is not None:
                pending.abort()
                self.incoming[index] = None
                self.retry.append((f.root, f.path, reason))

    def _hold(self, frames: list[DataPayload], size: int) -> None:
        assert self.held is not None
        if self.held_bytes + size > self.held_total:
            raise RemoteProtocolError("sync: more data than the Put announced")
        self.held.extend(frames)
        self.held_bytes += size

    def _write_held(self, digests: tuple[str, ...]) -> None:
        """Write a held Put's files, each whole, checked before anything is created."""
        held, self.held = self.held or [], None
        files, self.files, self.incoming = self.files, [], []
        self.current = self.filled = 0
        if len(digests) != len(files) or self.held_bytes != self.held_total:
            raise RemoteProtocolError("sync: a Seal that does not match its Put")
        write_whole = self.applier.write_whole
        pieces = _cut(self._opened(held), (f.size for f in files))
        for f, digest, piece in zip(files, digests, pieces, strict=True):
            if not digest:
                continue  # torn on the sender: it comes again
            if self.broken is not None:
                self.retry.append((f.root, f.path, self.broken))
                continue
            try:
                incoming = write_whole(f.root, f.path, piece, mtime_ns=f.mtime_ns, digest=digest)
            except UnsafePathError as exc:
                self.refused.append((f.root, f.path, str(exc)))
                continue
            except IntegrityError as exc:
                self.retry.append((f.root, f.path, str(exc)))
                continue
            except OSError as exc:
                self.retry.append((f.root, f.path, _reason_of(exc)))
                continue
            self.ready.append((f, incoming))
            self.ready_bytes += f.size

    def _opened(self, frames: list[DataPayload]) -> Iterator[bytes | memoryview]:
        """Each held frame's payload in turn, a sealed one opened into one reused buffer.

        Each payload is used up (its files written, the start of one that goes
        on copied by :func:`_cut`) before the next frame is opened over it.
        Opening them all first held a second copy of the whole batch (the
        secondary's peak on "small" 99-100 MB against 92-93 MB now) and cost a
        fresh megabyte, and its page faults, for every frame.
        """
        for index, frame in enumerate(frames):
            frames[index] = b""  # the sealed frame's memory goes as the batch is written
            if not isinstance(frame, SealedFrame):
                yield frame
            elif frame.size > CHUNK:
                yield frame.open()  # not what a sender sends, but not wrong either
            else:
                if self.buffer is None:
                    self.buffer = bytearray(CHUNK)
                payload = memoryview(self.buffer)[: frame.size]
                frame.open_into(payload)
                yield payload

    def _open_all(self) -> None:
        # Each file is begun when the one before it is complete, and closed
        # when its last byte is written: one file open at a time, whatever
        # the batch's size (file descriptors are limited, 1024 on many systems).
        if self.unopened:
            self.unopened = False
            self._advance()

    def _begin(self, f: PutFile) -> None:
        if self.broken is not None:
            self.retry.append((f.root, f.path, self.broken))
            self.incoming.append(None)
            return
        try:
            incoming: Incoming | None = self.applier.begin(
                f.root, f.path, size=f.size, mtime_ns=f.mtime_ns, digest=""
            )
        except UnsafePathError as exc:
            self.refused.append((f.root, f.path, str(exc)))
            incoming = None
        except OSError as exc:
            self.retry.append((f.root, f.path, str(exc)))
            incoming = None
        self.incoming.append(incoming)

    def _advance(self) -> None:
        """Move past every complete file (closing it), beginning the next one."""
        while self.current < len(self.files):
            f = self.files[self.current]
            if len(self.incoming) == self.current:
                self._begin(f)
            if self.filled < f.size:
                return
            incoming = self.incoming[self.current]
            if incoming is not None:
                try:
                    incoming.close()
                except OSError as exc:  # aborted by close()
                    self.retry.append((f.root, f.path, _reason_of(exc)))
                    self.incoming[self.current] = None
            self.current += 1
            self.filled = 0

    def _write_all(self, frames: list[DataPayload], digests: tuple[str, ...] | None) -> None:
        """Write the frames into the Put's files, then seal them if ``digests`` came too."""
        self._open_all()
        for frame in frames:
            if not isinstance(frame, SealedFrame):
                self._write(frame)
            elif not self._write_sealed(frame):
                self._write(frame.open())  # every frame is checked, even one no file takes
        if digests is not None:
            self._seal(digests)

    def _write_sealed(self, frame: SealedFrame) -> bool:
        """Open a frame straight into its file, if it lies within one; False if not."""
        if self.current >= len(self.files):
            return False
        f = self.files[self.current]
        target = self.incoming[self.current]
        if target is None or frame.size > f.size - self.filled:
            return False
        try:
            target.write_sealed(frame)
        except ForgedFrameError:
            raise  # an OSError too (a ConnectionError), but the peer's doing: not a retry
        except OSError as exc:
            self.retry.append((f.root, f.path, str(exc)))
            target.abort()
            self.incoming[self.current] = None
        self.filled += frame.size
        self._advance()
        return True

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.current >= len(self.files):
                raise RemoteProtocolError("sync: more data than the Put announced")
            f = self.files[self.current]
            take = min(len(view), f.size - self.filled)
            target = self.incoming[self.current]
            if target is not None:
                try:
                    target.write(view[:take])
                except OSError as exc:
                    self.retry.append((f.root, f.path, str(exc)))
                    target.abort()
                    self.incoming[self.current] = None
            self.filled += take
            view = view[take:]
            self._advance()

    def _seal(self, digests: tuple[str, ...]) -> None:
        self._open_all()  # a Put of empty files has no data to open them
        if len(digests) != len(self.files) or self.current < len(self.files):
            raise RemoteProtocolError("sync: a Seal that does not match its Put")
        for f, incoming, digest in zip(self.files, self.incoming, digests, strict=True):
            if incoming is None:
                continue
            if not digest:
                incoming.abort()  # torn on the sender: it comes again
                continue
            incoming.expect(digest)
            try:
                incoming.finish()
            except IntegrityError as exc:
                self.retry.append((f.root, f.path, str(exc)))
                continue
            except OSError as exc:  # a full disk may show only at the last flush
                self.retry.append((f.root, f.path, _reason_of(exc)))
                continue
            self.ready.append((f, incoming))
            self.ready_bytes += f.size
        self.files, self.incoming = [], []
        self.current = self.filled = 0

    def _commit(self) -> None:
        if self.ready:
            batch, self.ready = self.ready, []
            self.ready_bytes = 0
            self._commit_batch(batch, None)

    def _commit_batch(
        self, batch: list[tuple[PutFile, Incoming]], flushed: list[str | None] | None
    ) -> None:
        if self.broken is not None:
            # This node could not apply since the flush began: none of it, then.
            for f, incoming in batch:
                incoming.abort()
                self.retry.append((f.root, f.path, self.broken))
            return
        for f, incoming in batch:
            # What begin() found will do: a change made here since is caught by the guard.
            if incoming.found is None:  # nothing there: nothing to keep (most of a first sync)
                incoming.guard(None)
                continue
            looked_at = self._keep_if_changed_here(
                f.root, f.path, incoming.digest, found=incoming.found
            )
            incoming.guard(looked_at)
        outcomes = self.applier.commit([incoming for _, incoming in batch], flushed=flushed)
        rows = []
        for (f, incoming), outcome in zip(batch, outcomes, strict=True):
            if outcome.status == "applied":
                # The rename keeps what finish() saw: inode, size and times.
                info = incoming.finished_info
                if info is None:
                    continue
                rows.append(
                    (f.root, f.path, info.st_size, info.st_mtime_ns, info.st_ino, incoming.digest)
                )
        if rows:
            self.engine._note_received(rows)
        self.engine.status.files_received += len(rows)
        self._count(outcomes)

    def _keep_if_changed_here(
        self,
        root: str,
        path: str,
        incoming: str | None,
        *,
        found: os.stat_result | Literal[False] | None = False,
    ) -> FileIdentity | None:
        """A file changed on this node since its base is kept, never overwritten silently.

        Returns the identity of the file looked at (None: there was none), for
        :meth:`Incoming.guard`: a change made here after this look is kept too.
        """
        if found is None:
            return None
        engine = self.engine
        target = self.applier.target_of(root, path)
        if found is False:  # not looked at yet
            try:
                found = os.lstat(target)
            except OSError:
                return None
        looked_at = identity_of(found)
        mine = engine.local_digest(root, path, target)
        if mine is None or mine == incoming:
            return looked_at
        if engine.base_of(root, path) == mine:
            return looked_at  # unchanged here since both nodes agreed on it
        self._note_kept(path, self.applier.keep_conflict(root, path, reason="changed on this node"))
        return looked_at

    def _note_kept(self, path: str, kept: Path | None) -> None:
        if kept is not None:
            logger.warning("%s was changed on this node too: kept at %s", path, kept)
            self.engine.status.conflicts.append(str(kept))
            self.kept.append(str(kept))

    def _delete(self, root: str, paths: tuple[str, ...]) -> list[Outcome]:
        looked_at = {path: self._keep_if_changed_here(root, path, None) for path in paths}
        outcomes = self.applier.delete_many(root, paths, replaces=looked_at)
        self.engine._forget_files([(root, p) for p in paths])
        return outcomes

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        for o in outcomes:
            if o.kept is not None:
                self._note_kept(o.path, o.kept)
            if o.status == "applied":
                self.applied += 1
            elif o.status == "retry":
                self.retry.append((o.root_id, o.path, o.reason))
            else:
                self.refused.append((o.root_id, o.path, o.reason))


def _cut(frames: Iterable[bytes | memoryview], sizes: Iterable[int]) -> Iterator[memoryview]:
    """Each size's bytes from ``frames`` (which hold exactly their sum), in order.

    A file within one frame is a view into it; only one that spans frames is
    copied, so a held batch is never joined whole (that copy doubled its memory).
    A frame is not looked at again once the next one is taken, and a piece
    must be used before the next one is asked for: ``frames`` may give every
    frame in the same buffer (:meth:`_Receiving._opened`).
    """
    rest = iter(frames)
    view = memoryview(b"")
    for size in sizes:
        if len(view) >= size:
            yield view[:size]
            view = view[size:]
            continue
        whole = bytearray(size)
        filled = len(view)
        whole[:filled] = view
        while filled < size:
            view = memoryview(next(rest))
            taken = min(size - filled, len(view))
            whole[filled : filled + taken] = view[:taken]
            filled += taken
            view = view[taken:]
        yield memoryview(whole)


def _vanished(exc: OSError) -> bool:
    """The file is gone, or is no longer a file (a link or a folder now): not a failure."""
    return isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError) or (
        exc.errno == errno.ELOOP
    )


def _reason_of(exc: Exception) -> str:
    """An OS or database error as an operator reads it: "No space left on device"."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"
