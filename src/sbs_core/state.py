"""A node's own durable state in ``state_dir``: its id, its epoch, the sentinel list.

Every write goes to a temporary file that is flushed, fsynced and renamed over
the old one (then the folder is fsynced), so a crash or a power cut leaves
either the old state or the new one, never half of either. The epoch is a
fencing token: it is written before any sentinel is started with it.

A lock file keeps two ``sbs run`` processes from sharing one state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import IO, Any

from sbs_core import durable
from sbs_core.errors import SbsError
from sbs_core.machine import PersistedState
from sbs_core.messages import Role

__all__ = ("StateDirLocked", "StateError", "StateStore", "write_atomically")

_FORMAT = 1
_ROLES: frozenset[str] = frozenset(("stopped", "starting", "primary", "secondary"))


class StateError(SbsError, OSError):
    """The state directory or a file in it is unusable; the message names the file."""


class StateDirLocked(StateError):
    """Another node process already uses this state directory."""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            durable.flush(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    durable.flush_folder(path.parent)


class StateStore:
    """Reads and writes ``state.json`` and ``node_id`` in one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state_file = state_dir / "state.json"
        self.node_id_file = state_dir / "node_id"
        self.lock_file = state_dir / "lock"
        self._lock: IO[bytes] | None = None

    def ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self.state_dir}: cannot create the state directory: {exc}") from exc

    def lock(self) -> None:
        """Take the directory's lock for this process; raise :class:`StateDirLocked` if taken."""
        self.ensure_dir()
        f = open(self.lock_file, "a+b")  # noqa: SIM115 - held open for the node's life
        try:
            _lock_file(f)
        except OSError:
            f.close()
            raise StateDirLocked(
                f"{self.state_dir}: another sbs node is running with this state directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def node_id(self) -> str:
        """This node's id, created on first use and never changed after."""
        try:
            text = self.node_id_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise StateError(f"{self.node_id_file}: cannot read: {exc}") from exc
        if text:
            return text
        self.ensure_dir()
        new = uuid.uuid4().hex
        write_atomically(self.node_id_file, (new + "\n").encode("ascii"))
        return new

    def load(self) -> PersistedState | None:
        """The saved state, or None before the first save."""
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.state_file}: cannot read: {exc}") from exc
        try:
            data: Any = json.loads(raw)
            epoch = data["epoch"]
            role = data["role"]
            sentinels = data["sentinels"]
            if (
                not isinstance(epoch, int)
                or epoch < 0
                or role not in _ROLES
                or not isinstance(sentinels, list)
                or not all(isinstance(s, str) for s in sentinels)
            ):
                raise ValueError("a value has the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            # Refuse rather than guess: a reset epoch would break fencing.
            raise StateError(
                f"{self.state_file}: unreadable state ({exc}); fix or remove it by hand "
                "(removing it resets this node's epoch)"
            ) from None
        checked_role: Role = role
        return PersistedState(epoch=epoch, role=checked_role, sentinels=tuple(sentinels))

    def save(self, state: PersistedState) -> None:
        self.ensure_dir()
        body = {
            "format": _FORMAT,
            "epoch": state.epoch,
            "role": state.role,
            "sentinels": list(state.sentinels),
        }
        write_atomically(self.state_file, (json.dumps(body, indent=1) + "\n").encode())


if sys.platform == "win32":
    import msvcrt

    def _lock_file(f: IO[bytes]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    def _lock_file(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
