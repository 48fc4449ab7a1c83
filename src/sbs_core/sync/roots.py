"""Which folders are replicated, and where each one lives on the receiving node.

The sender names every root (``settings`` for ``app.settings_folder``, one per
``[[folders]]`` entry) and sends its path as written relative to the sender's
configuration folder when it lies inside it, else as an absolute path. The
receiver puts a relative root under its *own* configuration folder and an
absolute one at the same absolute path; ``settings`` goes to the receiver's own
``app.settings_folder`` when it has one. So two nodes on two machines with the
same layout use the same folders, and two nodes on one machine (each with its
own folder) do not collide.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from sbs_core.config import Config
from sbs_core.messages import RootSpec
from sbs_core.state import write_atomically
from sbs_core.sync.paths import UnsafePathError, check_wire_path

__all__ = (
    "LocalRoot",
    "load_peer_roots",
    "receiver_roots",
    "root_identity",
    "save_peer_roots",
    "sender_roots",
)


@dataclass(frozen=True, slots=True)
class LocalRoot:
    spec: RootSpec
    path: Path


def root_identity(root: LocalRoot) -> tuple[int, int] | None:
    """The (device, inode) of the folder at ``root``'s path, None if none is there.

    A root moved away and replaced, or a share unmounted or remounted, gets new ones.
    """
    try:
        st = os.stat(root.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _wire_form(path: Path, base: Path) -> str:
    try:
        return PurePosixPath(*path.relative_to(base).parts).as_posix()
    except ValueError:
        return str(path)


def sender_roots(config: Config, stored: tuple[RootSpec, ...] = ()) -> list[LocalRoot]:
    """This node's roots as a sender.

    A node with no folders of its own (a secondary that took over) replicates the
    folders its former primary sent it, so that its changes go back on handback.
    """
    base = config.config_file.parent
    roots: list[LocalRoot] = []
    if config.app.settings_folder is not None:
        spec = RootSpec(
            id="settings", path=_wire_form(config.app.settings_folder, base), filter="*"
        )
        roots.append(LocalRoot(spec, config.app.settings_folder))
    for folder in config.folders:
        wire = _wire_form(folder.path, base)
        spec = RootSpec(id=f"folder:{wire}|{folder.filter}", path=wire, filter=folder.filter)
        roots.append(LocalRoot(spec, folder.path))
    if not roots and stored:
        return receiver_roots(config, stored)
    return roots


def _local_path(config: Config, spec: RootSpec) -> Path:
    if spec.id == "settings" and config.app.settings_folder is not None:
        return config.app.settings_folder
    windows = PureWindowsPath(spec.path)
    if spec.path.startswith("/") or (windows.drive and windows.root):
        path = Path(spec.path)
        if path == Path(path.anchor) or ".." in path.parts:
            raise UnsafePathError(f"root {spec.id!r}: {spec.path!r} may not be a whole drive")
        return path
    rel = check_wire_path(spec.path)
    return config.config_file.parent.joinpath(*rel.parts)


def receiver_roots(config: Config, specs: tuple[RootSpec, ...]) -> list[LocalRoot]:
    """Where the sender's roots live here; UnsafePathError for a root that may not be used."""
    state = os.path.realpath(config.node.state_dir)
    roots = []
    for spec in specs:
        path = _local_path(config, spec)
        real = os.path.realpath(path)
        if real == state or real.startswith(state + os.sep) or state.startswith(real + os.sep):
            raise UnsafePathError(f"root {spec.id!r}: {path} overlaps the state directory")
        roots.append(LocalRoot(spec, path))
    return roots


def save_peer_roots(state_dir: Path, specs: tuple[RootSpec, ...]) -> None:
    body = [{"id": s.id, "path": s.path, "filter": s.filter} for s in specs]
    write_atomically(state_dir / "sync_roots.json", json.dumps(body, indent=1).encode())


def load_peer_roots(state_dir: Path) -> tuple[RootSpec, ...]:
    try:
        body = json.loads((state_dir / "sync_roots.json").read_text(encoding="utf-8"))
        return tuple(RootSpec(id=r["id"], path=r["path"], filter=r["filter"]) for r in body)
    except (OSError, ValueError, KeyError, TypeError):
        return ()
