"""What the Windows service runs, with nothing Windows-only in it: load, check, run, stop.

:class:`ServiceRunner` is driven from two threads. The service's thread calls
:meth:`~ServiceRunner.prepare` (configuration and licence: a refusal stops the
service before it reports running) and then :meth:`~ServiceRunner.run`, which
runs the node's event loop in that thread until the node has stopped. The
SCM's thread calls :meth:`~ServiceRunner.request_stop`, which crosses into the
event loop through an anyio blocking portal and asks the node for its planned
stop; a stop asked before the loop runs is remembered and done as soon as it does.

It is the same node as ``sbs run``: the only differences are the controller
(``controller.kind = "windows"`` runs Windows services through the SCM) and
the licence, which ``sbs run`` checks the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
from anyio.from_thread import BlockingPortal

from sbs_core import __version__
from sbs_core.config import Config, load_config
from sbs_core.controller import ServiceController
from sbs_core.driver import ControllerFactory, Node
from sbs_core.licence import LicenceGate, gate_for

__all__ = ("ServiceRunner", "controller_factory_for")

logger = logging.getLogger("sbs.service")


def controller_factory_for(config: Config) -> ControllerFactory | None:
    """The controller the node's configuration asks for; None: the node's own (processes)."""
    if config.controller.kind != "windows":
        return None

    def build(config: Config) -> AbstractAsyncContextManager[ServiceController]:
        from sbs_winsvc.scm import ServiceManager, WindowsController  # noqa: PLC0415 - Windows

        return WindowsController.from_config(config, ServiceManager())

    return build


class ServiceRunner:
    """Runs one node for the service; thread-safe :meth:`request_stop`."""

    def __init__(
        self,
        config_file: Path,
        *,
        controller_factory: ControllerFactory | None = None,
        host: str | None = None,
    ) -> None:
        self.config_file = config_file
        self.done = threading.Event()
        self._controller_factory = controller_factory
        self._host = host
        self._lock = threading.Lock()
        self._stop_requested = False
        self._portal: BlockingPortal | None = None
        self._node: Node | None = None
        self._config: Config | None = None
        self._gate: LicenceGate | None = None

    @property
    def node(self) -> Node | None:
        return self._node

    def prepare(self) -> Config:
        """Load the configuration and check the licence; raise what refuses the start."""
        if self._config is None:
            config = load_config(self.config_file)
            self._gate = gate_for(config, host=self._host)
            self._config = config
        return self._config

    def run(self) -> None:
        """Run the node in this thread until its planned stop completes."""
        try:
            config = self.prepare()
            anyio.run(self._main, config)
        finally:
            self.done.set()

    def request_stop(self) -> None:
        """Ask for the planned stop, from any thread; a second call stops at once."""
        with self._lock:
            self._stop_requested = True
            portal, node = self._portal, self._node
        if portal is None or node is None:
            return  # _main asks the node as soon as it exists
        # RuntimeError: the loop has just ended, so the node is stopped already.
        with contextlib.suppress(RuntimeError):
            portal.call(node.request_stop)

    async def _main(self, config: Config) -> None:
        for warning in config.warnings():
            logger.warning("%s: %s", config.config_file, warning)
        if self._gate is not None:
            logger.info("licence: %s", self._gate.licence.describe())
        logger.info(
            "sbs %s starting: node %s on %s:%d, peer %s, mode %s, controller %s",
            __version__,
            config.node.name,
            config.node.local_address,
            config.node.port,
            config.node.remote_address,
            config.node.mode,
            config.controller.kind,
        )
        factory = self._controller_factory or controller_factory_for(config)
        node = Node(config, controller_factory=factory, gate=self._gate)
        async with BlockingPortal() as portal:
            with self._lock:
                self._portal, self._node = portal, node
                early = self._stop_requested
            try:
                if early:
                    node.request_stop()
                await node.run()
            finally:
                with self._lock:
                    self._portal = None
        logger.info("sbs stopped")
