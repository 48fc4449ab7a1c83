"""The local control channel: how ``sbs status`` and ``sbs sentinels`` reach a running node.

It never uses the peer port. On POSIX it is a Unix socket in the node's state
directory (the directory is 0700 and the socket 0600, so only the node's own
user, normally root, can use it). Where Unix sockets are missing it is a TCP
socket on 127.0.0.1 whose port and a random token are written to a file in the
state directory, readable only by whoever may read that directory.

One request per connection: the client writes one JSON object and a newline,
the node answers with one JSON object and a newline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, Listener, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from sbs_core.errors import ControlError
from sbs_core.state import write_atomically

__all__ = ("ControlServer", "NodeNotRunning", "control_request", "socket_path")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

_MAX_REQUEST = 64 * 1024
_UNIX = hasattr(socket, "AF_UNIX") and sys.platform != "win32"
# sun_path holds 108 bytes on Linux, 104 on macOS; stay clear of both.
_MAX_SOCKET_PATH = 100


class NodeNotRunning(ControlError):
    """No node is listening on this state directory's control channel."""


def socket_path(state_dir: Path) -> Path:
    """Where the control socket of the node with this state directory lives."""
    path = state_dir.absolute() / "control.sock"
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    # A deep state directory cannot hold a socket: use a private folder in the
    # temp dir, named after the state directory so client and node agree.
    digest = hashlib.sha256(os.fsencode(state_dir.absolute())).hexdigest()[:20]
    owner = 0
    if sys.platform != "win32":  # no Unix sockets there
        owner = os.getuid()
    return Path(tempfile.gettempdir()) / f"sbs-{owner}" / f"{digest}.sock"


def _token_file(state_dir: Path) -> Path:
    return state_dir / "control.json"


class ControlServer:
    """Serves control requests for one node until cancelled."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.state_dir = state_dir
        self._handler = handler
        self._token = secrets.token_hex(16)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await self._listen()
        try:
            async with listener:
                task_status.started()
                await listener.serve(self._serve_one)
        finally:
            self._cleanup()

    async def _listen(self) -> Listener[Any]:
        if _UNIX:
            path = socket_path(self.state_dir)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The caller holds the state directory's lock, so a socket file left
            # here belongs to a node that died: replace it.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old_umask = os.umask(0o177)
            try:
                return await anyio.create_unix_listener(path)
            finally:
                os.umask(old_umask)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        body = json.dumps({"port": port, "token": self._token}).encode()
        write_atomically(_token_file(self.state_dir), body)
        return listener

    def _cleanup(self) -> None:
        target = socket_path(self.state_dir) if _UNIX else _token_file(self.state_dir)
        with contextlib.suppress(OSError):
            target.unlink()

    async def _serve_one(self, stream: ByteStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    reader = BufferedByteReceiveStream(stream)
                    line = await reader.receive_until(b"\n", _MAX_REQUEST)
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    if not _UNIX and not secrets.compare_digest(
                        str(request.pop("token", "")), self._token
                    ):
                        answer: dict[str, Any] = {"ok": False, "error": "bad control token"}
                    else:
                        answer = await self._handler(request)
                    await stream.send(json.dumps(answer).encode() + b"\n")
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
                return
            except (ValueError, TimeoutError, anyio.BrokenResourceError, OSError):
                return


def control_request(state_dir: Path, request: dict[str, Any], *, timeout: float = 3.0) -> Any:
    """Send one request to the node that owns ``state_dir`` and return its answer (blocking)."""
    payload = dict(request)
    try:
        if sys.platform != "win32" and _UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = os.fspath(socket_path(state_dir))
        else:
            info = json.loads(_token_file(state_dir).read_text())
            payload["token"] = info["token"]
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("127.0.0.1", int(info["port"]))
    except (OSError, ValueError, KeyError) as exc:
        raise NodeNotRunning(f"no node is running with state directory {state_dir}") from exc
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NodeNotRunning(f"no node is running with state directory {state_dir}") from exc
        except OSError as exc:
            raise ControlError(f"cannot reach the node's control channel: {exc}") from exc
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"the node's control channel failed: {exc}") from exc
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError("the node gave no answer on its control channel") from None
