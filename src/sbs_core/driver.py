"""The one async layer: wires the pure role machine to sockets, processes and files.

:class:`Node` runs, in one anyio task group, a listener on the peer port, the
connections (each a :class:`~sbs_core.wire.SecureChannel` over a transport
stream), a controller worker that carries out sentinel starts and stops in
order, the local control channel, and the main loop that feeds every event to
the :class:`~sbs_core.machine.RoleMachine` and carries out what it returns.

Only the main loop changes the machine (others only read it). Events are stamped with the time they
are *handled*, so the machine's clock never goes backwards.

The node's state is saved (an fsync) in a worker thread, never on the event
loop: a busy disk can hold a save for seconds (4 s measured here while another
program wrote 3 GB), longer than ``dead_time``. What the machine asked for
after a save waits for it, in order; meanwhile the peer keeps hearing
heartbeats with the state it last heard, so a slow disk never looks like a
dead node, and the peer learns a new state only once it is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from sbs_core import __version__
from sbs_core.alerts import AlertEvent, Notifier
from sbs_core.config import Config
from sbs_core.connection import (
    ConnectionGone,
    Heard,
    PeerConnection,
    describe,
    handshake,
    remote_host,
)
from sbs_core.control import ControlServer
from sbs_core.controller import ProcessController, ServiceController
from sbs_core.errors import (
    ConfigError,
    NotPrimaryError,
    ProtocolError,
    SbsError,
    UnknownSentinelError,
)
from sbs_core.licence import SentinelPermission
from sbs_core.loopwatch import LoopWatch
from sbs_core.machine import (
    Action,
    Alert,
    AlertKind,
    AllStopped,
    Close,
    Connect,
    ConnectFailed,
    ConnectionClosed,
    ConnId,
    Event,
    Exit,
    FinalCycleDone,
    MachineSettings,
    MessageReceived,
    PeerConnected,
    PersistedState,
    PersistState,
    PromotionKind,
    RoleMachine,
    RunFinalCycle,
    Send,
    SentinelChangeRequested,
    Started,
    StartSentinels,
    StopAll,
    StopRequested,
    StopSentinels,
    TimerFired,
)
from sbs_core.messages import (
    SYNC_MESSAGES,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    NodeState,
    SyncMessage,
)
from sbs_core.state import StateStore
from sbs_core.sync.engine import LinkClosed, SyncEngine
from sbs_core.transport import TcpTransport, Transport
from sbs_core.wire import NONCE_SIZE, DataPayload, SecureChannel

__all__ = ("ControllerFactory", "FileSync", "Node", "SentinelGate")

logger = logging.getLogger("sbs")

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Unauthenticated connections that may be in their handshake at once; more are
# closed at once, so a flood on the peer port cannot starve the real peer.
_MAX_HANDSHAKES = 8
# Handshakes with the configured peer's address (and our own connections to it) have
# slots of their own: strangers holding all the others in endless handshakes made a
# starting peer see silence, take it for "nobody answered" and become primary too.
_MAX_PEER_HANDSHAKES = 4
_OUTBOX_FRAMES = 512
_REFUSAL_LOG_INTERVAL = 60.0
# Lines about refused connections per interval, all hosts together, and the hosts
# remembered for it: what a flood from many addresses can make us write or keep.
_REFUSAL_LINES = 10
_REFUSAL_HOSTS = 1024
# A planned stop ends at the latest this long after the final cycle's and the
# controller's own timeouts: a stuck final cycle or an unkillable child must not
# keep the node from stopping.
_STOP_GRACE = 10.0


class FileSync(Protocol):
    """Replication, as the driver sees it (:class:`~sbs_core.sync.SyncEngine` is the real one)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run background work (file watching, sessions) until cancelled."""
        ...

    def attach(self, conn: ConnId) -> None:
        """This node is primary and ``conn`` leads to its secondary: replicate to it."""
        ...

    def detach(self) -> None: ...

    def set_primary(self, primary: bool) -> None:
        """This node became primary, or is no longer (told before :meth:`attach`).

        A primary may prepare for the secondary to come (the real engine keeps
        its folders' listing current).
        """
        ...

    async def final_cycle(self, conn: ConnId, *, yielding: bool = False) -> None:
        """Push every local change to the peer on ``conn`` before a handover.

        ``yielding``: this node lost a split brain, so files changed on both nodes
        stay the peer's and this node keeps its own copies aside.
        """
        ...

    def on_message(self, conn: ConnId, message: SyncMessage) -> None: ...

    def on_data(self, conn: ConnId, payload: DataPayload) -> None:
        """A data frame from ``conn``, as the peer sent it: still sealed.

        The node's channel hands data frames on unopened (a
        :class:`~sbs_core.wire.SealedFrame`): call ``open()`` or ``open_into()``
        before using a byte of it, in any one thread; it raises
        :class:`~sbs_core.errors.ForgedFrameError` for a frame changed on the
        way, and the connection should then be dropped. Plain ``bytes`` are
        already open.
        """
        ...

    def on_closed(self, conn: ConnId) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...

    def confirm_deletes(self) -> int:
        """Let held-back strict-sync deletions through once; how many were held."""
        ...


class SentinelGate(Protocol):
    """A policy asked before every start of sentinels.

    The licence's is :class:`~sbs_core.licence.LicenceGate`.
    """

    def permit(self, how: PromotionKind) -> SentinelPermission:
        """May sentinels start now, on a node that became primary ``how``?"""
        ...

    def snapshot(self) -> dict[str, Any]:
        """What ``sbs status`` shows of the policy (under the key ``licence``)."""
        ...


ControllerFactory = Callable[[Config], AbstractAsyncContextManager[ServiceController]]
"""Builds the controller of a node from its configuration; entered once the node runs."""

EventFactory = Callable[[float], Event]


@dataclass(kw_only=True, slots=True)
class _Request:
    """An event from the control channel whose outcome its caller waits for."""

    factory: EventFactory
    done: anyio.Event = field(default_factory=anyio.Event)
    error: str | None = None


class _Wake:
    """Wakes the main loop without an event: a save carried out an Exit (see _save_then_go_on)."""


class Node:
    """One sbs node: ``await Node(config).run()`` until a planned stop completes."""

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport | None = None,
        controller: ServiceController | None = None,
        controller_factory: ControllerFactory | None = None,
        sync: Callable[[Node], FileSync] | None = None,
        notifier: Notifier | None = None,
        gate: SentinelGate | None = None,
    ) -> None:
        """``controller`` is an already running controller; ``controller_factory`` one the
        node enters itself once it holds its state directory's lock (the Windows shell's).
        ``gate``: a policy asked before every start of sentinels (a licence)."""
        self.config = config
        node = config.node
        self._transport: Transport = transport or TcpTransport()
        self._controller_override = controller
        self._controller_factory = controller_factory
        if (
            controller is None
            and controller_factory is None
            and config.controller.kind != "process"
        ):
            raise ConfigError(
                str(config.config_file),
                "controller.kind",
                f"{config.controller.kind!r} is run by the Windows service shell"
                " (python -m sbs_winsvc), not by 'sbs run'",
            )
        self._gate = gate
        # Sentinels the gate held back in the current relay, and why.
        self._held: tuple[tuple[str, ...], str] | None = None
        self._notifier = notifier or Notifier(config)
        self._sync: FileSync = (
            sync(self) if sync else SyncEngine(config, link=self, alert=self._sync_alert)
        )
        self._store = StateStore(node.state_dir)
        self._state_save_error: str | None = None  # the last save of the state failed: why
        # A save runs in a worker thread; what came after it waits here, in order.
        self._saving = False
        self._after_save: deque[Action] = deque()
        # The state the peer last heard (Hello or Heartbeat): what it hears during a save.
        self._told: NodeState | None = None
        self._secret = node.read_secret()
        self._known_sentinels = {s.name for s in config.controller.sentinels}
        self._conns: dict[ConnId, PeerConnection] = {}
        self._closing: list[PeerConnection] = []
        self._replicating_to: ConnId | None = None
        self._told_primary = False  # what the replication was last told of the role
        self._next_conn = 1
        self._handshakes = anyio.Semaphore(_MAX_HANDSHAKES)
        self._peer_handshakes = anyio.Semaphore(_MAX_PEER_HANDSHAKES)
        # host -> (when its last refusal was logged, refusals not logged since).
        self._refusals_logged: dict[str, tuple[float, int]] = {}
        self._refusal_window_at = -_REFUSAL_LOG_INTERVAL
        self._refusal_lines = 0
        self._events_tx, self._events_rx = anyio.create_memory_object_stream[
            EventFactory | _Request | _Wake
        ](max_buffer_size=4096)
        self._ctl_tx, self._ctl_rx = anyio.create_memory_object_stream[Action](max_buffer_size=1024)
        self._machine: RoleMachine | None = None
        self._controller: ServiceController | None = None
        self._exited = False
        self._stop_requested_at: float | None = None
        self._stop_asked: anyio.Event | None = None  # set with _stop_requested_at, once running
        self._started_wall = time.time()
        self._tg: TaskGroup | None = None
        # Half of dead_time: a stall that long is worth a warning, well before a takeover.
        self._loop_watch = LoopWatch(warn_after=node.dead_time / 2)

    # ------------------------------------------------------------------ public

    @property
    def machine(self) -> RoleMachine:
        assert self._machine is not None, "the node is not running"
        return self._machine

    def request_stop(self) -> None:
        """Ask for a planned stop (final cycle, handover); a second call stops at once."""
        if self._stop_requested_at is not None:
            logger.warning("second stop request: stopping now, without handover")
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            return
        self._stop_requested_at = anyio.current_time()
        if self._stop_asked is not None:
            self._stop_asked.set()
        self._post(lambda now: StopRequested(now=now))

    def status(self) -> dict[str, Any]:
        """The node's state as ``sbs status --json`` shows it."""
        node = self.config.node
        if self._machine is None:
            return {"role": "starting", "mode": node.mode, "name": node.name}
        st = self._machine.status()
        running = sorted(self._controller.running_sentinels()) if self._controller else []
        peer: dict[str, Any] | None = None
        if st.peer is not None:
            conn = next(iter(self._conns.values()), None)
            peer = {
                "name": st.peer.name,
                "node_id": st.peer.node_id,
                "role": st.peer.role,
                "mode": st.peer.mode,
                "epoch": st.peer.epoch,
                "address": conn.peer_host if conn else node.remote_address,
                "last_heard_ago": round(time.time() - conn.last_heard_wall, 3) if conn else None,
                "longest_silence": round(conn.longest_silence, 3) if conn else None,
            }
        return {
            "role": st.role,
            "mode": st.mode,
            "epoch": st.epoch,
            "peer_connected": st.peer_connected,
            "active_sentinels": running,
            "sentinels": list(st.sentinels),
            "handing_over": st.handing_over,
            "name": st.name,
            "node_id": st.node_id,
            "local_address": node.local_address,
            "remote_address": node.remote_address,
            "port": node.port,
            "peer": peer,
            "last_error": st.last_error,
            "state_save_error": self._state_save_error,
            "pid": os.getpid(),
            "started_at": self._started_wall,
            "version": __version__,
            **self._gate_status(),
            **self._sync.snapshot(),
            **self._notifier.snapshot(),
            **self._loop_watch.snapshot(),
        }

    def _gate_status(self) -> dict[str, Any]:
        held, reason = self._held if self._held is not None else ((), None)
        licence = None
        if self._gate is not None:
            licence = {**self._gate.snapshot(), "held_back": reason}
        return {
            "licence": licence,
            "sentinels_held": list(held),
            "sentinels_held_reason": reason,
        }

    async def run(self) -> None:
        """Run until a planned stop completes (or the caller cancels)."""
        node = self.config.node
        try:
            self._store.lock()
            persisted = self._store.load() or PersistedState(
                sentinels=tuple(s.name for s in self.config.controller.sentinels if s.autostart)
            )
            self._machine = RoleMachine(
                MachineSettings(
                    node_id=self._store.node_id(),
                    name=node.name,
                    mode=node.mode,
                    port=node.port,
                    heartbeat_interval=node.heartbeat_interval,
                    dead_time=node.dead_time,
                    probe_interval=node.probe_interval,
                    final_cycle_timeout=node.final_cycle_timeout,
                    software=f"sbs {__version__}",
                ),
                persisted,
            )
            listener = await self._listen()
            async with self._make_controller() as controller, listener:
                self._controller = controller
                control = ControlServer(node.state_dir, self._on_control)
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await tg.start(self._loop_watch.run)
                    await tg.start(control.serve)
                    await tg.start(self._sync.run)
                    await tg.start(self._notifier.run)
                    tg.start_soon(listener.serve, self._accepted)
                    tg.start_soon(self._controller_worker)
                    self._stop_asked = anyio.Event()
                    tg.start_soon(self._stop_watchdog, self._stop_asked)
                    self._post(lambda now: Started(now=now))
                    await self._main_loop()
                    await self._flush_closing()
                    await self._notifier.drain(5.0)
                    tg.cancel_scope.cancel()
        finally:
            self._tg = None
            for stream in (self._events_tx, self._events_rx, self._ctl_tx, self._ctl_rx):
                stream.close()
            self._store.unlock()

    # ------------------------------------------------------------------ setup

    async def _listen(self) -> Any:
        node = self.config.node
        try:
            return await self._transport.listen(node.local_address, node.port)
        except OSError as exc:
            raise SbsError(
                f"cannot listen on {node.local_address}:{node.port} (node.local_address, "
                f"node.port): {exc.strerror or exc}"
            ) from exc

    def _make_controller(self) -> Any:
        if self._controller_override is not None:
            return _NoopContext(self._controller_override)
        if self._controller_factory is not None:
            return self._controller_factory(self.config)
        ctl = self.config.controller
        return ProcessController(
            {s.name: s.command for s in ctl.sentinels if s.command},
            application=ctl.application,
            log_dir=self.config.node.state_dir / "logs",
            stop_timeout=ctl.stop_timeout,
        )

    # ------------------------------------------------------------------ main loop

    def _post(self, item: EventFactory | _Request | _Wake) -> None:
        try:
            self._events_tx.send_nowait(item)
        except anyio.WouldBlock:
            logger.error("event queue full: dropping an event")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def _main_loop(self) -> None:
        machine = self.machine
        while not self._exited:
            deadline = machine.next_deadline()
            item: EventFactory | _Request | _Wake | None = None
            if deadline is None:
                item = await self._events_rx.receive()
            else:
                delay = deadline - anyio.current_time()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        item = await self._events_rx.receive()
            now = anyio.current_time()
            if isinstance(item, _Wake):
                continue
            if item is None:
                self._execute(machine.handle(TimerFired(now=now)))
            elif isinstance(item, _Request):
                try:
                    self._execute(machine.handle(item.factory(now)))
                except NotPrimaryError as exc:
                    item.error = str(exc)
                item.done.set()
            else:
                self._execute(machine.handle(item(now)))

    def _execute(self, actions: list[Action]) -> None:
        self._carry_out(actions)
        if not self._saving:
            self._follow_replication_target()

    def _follow_replication_target(self) -> None:
        primary = self.machine.role == "primary"
        if primary != self._told_primary:
            self._told_primary = primary
            self._sync.set_primary(primary)
        target = self.machine.replication_target()
        if target != self._replicating_to:
            self._replicating_to = target
            if target is None:
                self._sync.detach()
            else:
                self._sync.attach(target)

    def _carry_out(self, actions: list[Action] | deque[Action]) -> None:
        handback = any(isinstance(a, Alert) and a.kind == "handback" for a in actions)
        for action in actions:
            if self._saving:
                # Everything waits for the save, in order. A heartbeat also goes out
                # now, saying what the peer heard last: alive, nothing new yet.
                self._after_save.append(action)
                if (
                    isinstance(action, Send)
                    and isinstance(action.message, Heartbeat)
                    and self._told is not None
                ):
                    self._send(action.conn, Heartbeat(state=self._told))
                continue
            match action:
                case Connect():
                    assert self._tg is not None
                    self._tg.start_soon(self._connect)
                case Send(conn=conn, message=message):
                    if isinstance(message, Heartbeat):
                        self._told = message.state
                    self._send(conn, message)
                case Close(conn=conn, goodbye=goodbye):
                    self._close(conn, goodbye)
                case StartSentinels() | StopSentinels() | StopAll():
                    self._ctl_tx.send_nowait(action)
                case RunFinalCycle(conn=conn, reason=reason):
                    assert self._tg is not None
                    self._tg.start_soon(self._final_cycle, conn, reason == "yield")
                case PersistState(epoch=epoch, role=role, sentinels=sentinels):
                    assert self._tg is not None
                    self._saving = True
                    state = PersistedState(epoch=epoch, role=role, sentinels=sentinels)
                    self._tg.start_soon(self._save_then_go_on, state)
                case Alert():
                    # A handback is one event for the operator: its own mail says it all.
                    self._alert(action, mail=not (action.kind == "promoted" and handback))
                case Exit():
                    self._exited = True

    async def _save_then_go_on(self, state: PersistedState) -> None:
        """Save ``state`` in a worker thread, then carry out what waited for it."""
        error = await anyio.to_thread.run_sync(self._write_state, state)
        self._saved(state, error)
        self._saving = False
        waiting, self._after_save = self._after_save, deque()
        self._carry_out(waiting)  # which may begin the next save
        if not self._saving:
            self._follow_replication_target()
        if self._exited:
            self._post(_Wake())  # the main loop may be waiting for an event

    def _hello(self) -> Hello:
        """The Hello for a new connection: during a save, with the state heard before it."""
        hello = self.machine.hello()
        if self._saving and self._told is not None:
            return dataclasses.replace(hello, state=self._told)
        self._told = hello.state
        return hello

    def _write_state(self, state: PersistedState) -> str | None:
        """Write ``state`` durably (blocks); None, or why the disk refused."""
        try:
            self._store.save(state)
        except OSError as exc:
            return f"{exc.strerror or exc} ({self._store.state_file})"
        return None

    def _saved(self, state: PersistedState, reason: str | None) -> None:
        """Note a save's outcome. The role, epoch and sentinels are saved before acting on them.

        A node that cannot save (a full disk) still does its job: a standby that
        must take over is needed most when things go wrong, and stopping it would
        leave the pair without a primary. The failure is logged, alerted and in
        the status until a save succeeds; meanwhile a restart of this node would
        start from the state saved last.
        """
        if reason is not None:
            first = self._state_save_error is None
            self._state_save_error = reason
            if first:
                self._alert(
                    Alert(
                        kind="state_not_saved",
                        message=(
                            f"cannot save this node's state ({state.role}, epoch {state.epoch}):"
                            f" {reason}; it runs on, but a restart would start from the state"
                            " saved last"
                        ),
                        level="error",
                    )
                )
            return
        if self._state_save_error is not None:
            logger.info("the node's state is saved again (%s)", self._store.state_file)
            self._state_save_error = None

    def _alert(self, alert: Alert, *, mail: bool = True) -> None:
        machine = self.machine
        node = self.config.node
        logger.log(
            _LEVELS[alert.level],
            "[%s %s epoch=%d] %s: %s",
            node.name,
            machine.role,
            machine.epoch,
            alert.kind,
            alert.message,
        )
        if not mail:
            return
        sync = self._sync.snapshot()
        running = tuple(sorted(self._controller.running_sentinels())) if self._controller else ()
        self._notifier.publish(
            AlertEvent.from_alert(
                alert,
                node_name=node.name,
                node_address=node.local_address,
                role=machine.role,
                epoch=machine.epoch,
                sentinels_started=machine.status().sentinels if alert.kind == "promoted" else (),
                sentinels_stopped=running if alert.kind in ("demoted", "stopped") else (),
                last_sync_at=sync.get("last_sync_at"),
                conflicts=tuple(sync.get("conflicts", ())) if alert.kind == "split_brain" else (),
            )
        )

    async def _stop_watchdog(self, asked: anyio.Event) -> None:
        # Sleeps until a stop is asked for: an idle node pays no wake-up for it
        # (it looked twice a second: about a third of an idle secondary's
        # wake-ups at the default settings, with the heartbeats and the loop watch).
        bound = self.config.node.final_cycle_timeout + self.config.controller.stop_timeout
        bound += _STOP_GRACE
        if self._stop_requested_at is None:
            await asked.wait()
        started = self._stop_requested_at
        assert started is not None
        await anyio.sleep(max(0.0, started + bound - anyio.current_time()))
        logger.error("planned stop did not finish within %.0f s: stopping now", bound)
        self._exited = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ controller

    async def _controller_worker(self) -> None:
        controller = self._controller
        assert controller is not None
        async for action in self._ctl_rx:
            try:
                match action:
                    case StartSentinels(names=names, epoch=epoch, how=how):
                        await controller.start_application(epoch=epoch)
                        startable = self._permitted(self._startable(names), how)
                        await controller.start_sentinels(startable, epoch=epoch)
                    case StopSentinels(names=names):
                        if self._held is not None:
                            held, reason = self._held
                            self._held = (tuple(n for n in held if n not in names), reason)
                        await controller.stop_sentinels(self._startable(names))
                    case StopAll():
                        self._held = None
                        await controller.stop_sentinels(None)
                        await controller.stop_application()
            except (SbsError, OSError) as exc:
                logger.error("controller: %s failed: %s", type(action).__name__, exc)
            if isinstance(action, StopAll):
                self._post(lambda now: AllStopped(now=now))

    def _permitted(self, names: list[str], how: PromotionKind) -> list[str]:
        """``names`` if the gate allows sentinels now, else none (remembered as held)."""
        if self._gate is None or not names:
            return names
        permission = self._gate.permit(how)
        if permission.allowed:
            self._held = None
            return names
        before = set(self._held[0]) if self._held is not None else set()
        held = tuple(sorted(before | set(names)))
        if self._held is None or self._held[1] != permission.reason:
            logger.warning("sentinels %s not started: %s", ", ".join(held), permission.reason)
        self._held = (held, permission.reason)
        return []

    def _startable(self, names: tuple[str, ...]) -> list[str]:
        unknown = [n for n in names if n not in self._known_sentinels]
        if unknown:
            logger.warning(
                "sentinel(s) %s are active on the pair but not configured on this node "
                "([[controller.sentinels]]); not started here",
                ", ".join(unknown),
            )
        return [n for n in names if n in self._known_sentinels]

    async def _final_cycle(self, conn: ConnId, yielding: bool) -> None:
        try:
            await self._sync.final_cycle(conn, yielding=yielding)
        except Exception as exc:  # any failure is reported; the handover goes on
            detail = f"{type(exc).__name__}: {exc}"
            self._post(lambda now: FinalCycleDone(now=now, ok=False, detail=detail))
        else:
            self._post(lambda now: FinalCycleDone(now=now, ok=True))

    # ------------------------------------------------------------------ control channel

    async def _on_control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "sentinel":
            name, active = request.get("name"), request.get("active")
            if not isinstance(name, str) or not isinstance(active, bool):
                return {"ok": False, "error": "a sentinel request needs a name and active"}
            if name not in self._known_sentinels:
                err = UnknownSentinelError(
                    f"unknown sentinel {name!r}; configured: "
                    + (", ".join(sorted(self._known_sentinels)) or "none")
                )
                return {"ok": False, "error": str(err)}
            req = _Request(factory=functools.partial(_sentinel_change, name=name, active=active))
            self._post(req)
            with anyio.fail_after(5):
                await req.done.wait()
            if req.error is not None:
                return {"ok": False, "error": req.error}
            return {"ok": True, "status": self.status()}
        if cmd == "confirm_deletes":
            held = self._sync.confirm_deletes()
            return {"ok": True, "held": held, "status": self.status()}
        return {"ok": False, "error": f"unknown request {cmd!r}"}

    # ------------------------------------------------------------------ connections

    async def _connect(self) -> None:
        node = self.config.node
        try:
            with anyio.fail_after(node.connect_timeout):
                stream = await self._transport.connect(
                    node.remote_address, node.port, local_host=node.local_address
                )
        except (OSError, TimeoutError) as exc:
            reason = f"{node.remote_address}:{node.port}: {describe(exc)}"
            self._post(lambda now: ConnectFailed(now=now, answered=False, reason=reason))
            return
        await self._run_stream(stream, initiated=True)

    async def _accepted(self, stream: ByteStream) -> None:
        if self._handshake_slots(remote_host(stream), initiated=False).value == 0:
            # A flood of half-open handshakes: refuse the excess outright.
            await anyio.aclose_forcefully(stream)
            return
        await self._run_stream(stream, initiated=False)

    def _handshake_slots(self, host: str, *, initiated: bool) -> anyio.Semaphore:
        if initiated or host == self.config.node.remote_address:
            return self._peer_handshakes
        return self._handshakes

    async def _run_stream(self, stream: ByteStream, *, initiated: bool) -> None:
        peer_host = remote_host(stream)
        # Data frames are opened by the replication's writing thread, not the event loop.
        channel = SecureChannel(
            self._secret, initiator=initiated, nonce=os.urandom(NONCE_SIZE), defer_data=True
        )
        heard = Heard()
        try:
            async with self._handshake_slots(peer_host, initiated=initiated):
                with anyio.fail_after(self.config.node.connect_timeout):
                    hello = await handshake(stream, channel, self._hello, heard)
        except (
            ProtocolError,
            OSError,
            TimeoutError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ) as exc:
            await anyio.aclose_forcefully(stream)
            reason = describe(exc)
            if initiated:
                # Bytes from the peer then a failure: something answered and refused
                # us (wrong secret, version). Silence is not an answer.
                got = heard.anything
                self._post(
                    lambda now: ConnectFailed(
                        now=now, answered=got, reason=f"{peer_host}: handshake failed: {reason}"
                    )
                )
            else:
                self._log_refusal(peer_host, reason)
            return
        except BaseException:
            # Cancelled mid-handshake (the node is stopping): the stream is still ours.
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
            raise
        conn_id = self._next_conn
        self._next_conn += 1
        conn = PeerConnection(conn_id, stream, channel, peer_host)
        self._conns[conn_id] = conn
        self._post(
            lambda now: PeerConnected(now=now, conn=conn_id, hello=hello, initiated=initiated)
        )

        def on_message(message: Message) -> None:
            if isinstance(message, SYNC_MESSAGES):
                self._sync.on_message(conn_id, message)
            else:
                self._post(functools.partial(_received, conn=conn_id, message=message))

        def on_data(payload: DataPayload) -> None:
            self._sync.on_data(conn_id, payload)

        reason = "closed"
        try:
            reason = await conn.run(on_message, on_data)
        finally:
            self._conns.pop(conn_id, None)
            self._sync.on_closed(conn_id)
            final = reason
            self._post(lambda now: ConnectionClosed(now=now, conn=conn_id, reason=final))

    async def _flush_closing(self) -> None:
        # The last words of a planned stop (Handover, Goodbye) must reach the
        # peer before the task group is cancelled; bounded, the peer may be gone.
        with anyio.move_on_after(2):
            for conn in self._closing:
                await conn.flushed.wait()

    def _send(self, conn_id: ConnId, message: Message) -> None:
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.send_urgent(message)

    def _close(self, conn_id: ConnId, goodbye: Goodbye | None) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        self._closing = [c for c in self._closing if not c.flushed.is_set()]
        self._closing.append(conn)
        conn.close(goodbye)

    # ------------------------------------------------------------------ the sync link

    async def send(self, conn: ConnId, message: Message) -> None:
        """Replication's ordered lane to ``conn`` (waits while the lane is full)."""
        peer = self._conns.get(conn)
        if peer is None:
            raise LinkClosed(f"connection {conn} is closed")
        try:
            await peer.send_bulk(message)
        except ConnectionGone as exc:
            raise LinkClosed(str(exc)) from None

    async def send_data(self, conn: ConnId, payload: bytes) -> None:
        peer = self._conns.get(conn)
        if peer is None:
            raise LinkClosed(f"connection {conn} is closed")
        try:
            await peer.send_data(payload)
        except ConnectionGone as exc:
            raise LinkClosed(str(exc)) from None

    def drop(self, conn: ConnId, reason: str) -> None:
        """Close ``conn`` because its peer broke the protocol (replication found it out)."""
        peer = self._conns.get(conn)
        if peer is not None:
            peer.break_off(reason)

    def _sync_alert(
        self, kind: str, message: str, level: Literal["info", "warning", "error"]
    ) -> None:
        if self._machine is None:
            logger.log(_LEVELS[level], "%s: %s", kind, message)
            return
        self._alert(Alert(kind=_alert_kind(kind), message=message, level=level))

    def _log_refusal(self, host: str, reason: str) -> None:
        # Keyed by host alone: the reason is the peer's doing (a length it announced,
        # a byte it sent), and keyed on it a client could make us write a line per
        # connection. What is not logged is counted, and the count told next time.
        now = anyio.current_time()
        if now - self._refusal_window_at >= _REFUSAL_LOG_INTERVAL:
            self._refusal_window_at = now
            self._refusal_lines = 0
        logged_at, missed = self._refusals_logged.pop(host, (-_REFUSAL_LOG_INTERVAL, 0))
        if now - logged_at < _REFUSAL_LOG_INTERVAL or self._refusal_lines >= _REFUSAL_LINES:
            self._refusals_logged[host] = (logged_at, missed + 1)
        else:
            self._refusal_lines += 1
            self._refusals_logged[host] = (now, 0)
            more = f" ({missed} more refused from this host, not logged)" if missed else ""
            logger.warning("refused a connection from %s: %s%s", host, reason, more)
        if len(self._refusals_logged) > _REFUSAL_HOSTS:
            # Popped and put back on every refusal: the first is the longest quiet.
            del self._refusals_logged[next(iter(self._refusals_logged))]


def _sentinel_change(now: float, *, name: str, active: bool) -> Event:
    return SentinelChangeRequested(now=now, name=name, active=active)


def _alert_kind(kind: str) -> AlertKind:
    known: dict[str, AlertKind] = {
        "replication_failed": "replication_failed",
        "split_brain": "split_brain",
    }
    return known.get(kind, "replication_failed")


def _received(now: float, *, conn: ConnId, message: Message) -> Event:
    return MessageReceived(now=now, conn=conn, message=message)


class _NoopContext:
    """Presents an already-managed controller as an async context manager."""

    def __init__(self, controller: ServiceController) -> None:
        self._controller = controller

    async def __aenter__(self) -> ServiceController:
        return self._controller

    async def __aexit__(self, *exc: object) -> None:
        return None


def install_signal_handlers(node: Node, tg: TaskGroup) -> None:
    """SIGTERM and Ctrl+C ask for a planned stop; a second one stops at once."""
    if sys.platform == "win32":
        signal.signal(signal.SIGINT, lambda *_: node.request_stop())
        return

    async def watch() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                node.request_stop()

    tg.start_soon(watch)
