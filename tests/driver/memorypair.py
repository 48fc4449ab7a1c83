"""Two real nodes replicating a folder over the in-memory network, for the driver tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from sbs_core.config import load_config
from sbs_core.driver import Node
from sbs_core.lab import write_node_config
from sbs_core.testing import FakeController
from sbs_core.transport import MemoryNetwork
from sbs_core.transport.base import Transport

SENTINELS = ("labels",)
FOLDERS = '\n[[folders]]\npath = "data"\nfilter = "*"\n'
A_HOST, B_HOST = "10.9.0.1", "10.9.0.2"


def node_in_memory(
    tmp_path: Path,
    network: MemoryNetwork,
    name: str,
    local: str,
    remote: str,
    *,
    sentinels: tuple[str, ...] = SENTINELS,
    transport: Transport | None = None,
    **config: Any,
) -> Node:
    """A real node on the in-memory network, its configuration in ``tmp_path/name``.

    ``config`` goes to :func:`~sbs_core.lab.write_node_config` (heartbeat,
    mode, folders ...); ``transport`` replaces the network's own for ``local``.
    """
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s" * 32)
    path = write_node_config(
        tmp_path / name,
        name=name,
        local=local,
        remote=remote,
        port=4445,
        secret_file=secret,
        probe_interval=0.1,
        sentinels={s: ["unused"] for s in sentinels},
        **config,
    )
    return Node(
        load_config(path),
        transport=transport or network.transport(local),
        controller=FakeController(sentinels),
    )


def make_node(
    tmp_path: Path,
    network: MemoryNetwork,
    name: str,
    local: str,
    remote: str,
    *,
    transport: Transport | None = None,
) -> Node:
    """A node replicating ``tmp_path/name/data`` strictly (``transport``: the network's own)."""
    return node_in_memory(
        tmp_path,
        network,
        name,
        local,
        remote,
        transport=transport,
        heartbeat_interval=0.05,
        dead_time=1.0,
        node_extra={"strict_sync": True},
        extra=FOLDERS,
    )


def tree(root: Path) -> dict[str, bytes]:
    """The visible files under ``root``; the receiver's hidden staging (dot names) left out."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder, name)
                # Renamed away while looked at: the next look sees it.
                with contextlib.suppress(FileNotFoundError):
                    found[str(path.relative_to(root))] = path.read_bytes()
    return found


async def start_pair(tg: TaskGroup, a: Node, b: Node) -> None:
    """Run ``a`` until it is primary, then ``b``: started together, either may win."""
    tg.start_soon(a.run)
    with anyio.fail_after(10):
        while a.status().get("role") != "primary":
            await anyio.sleep(0.01)
    tg.start_soon(b.run)
