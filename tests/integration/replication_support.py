"""What the replication tests share: pairs with a replicated folder, tree comparisons, a raw peer.

Relative ``[[folders]]`` paths resolve under each node's own configuration
folder, so the folder ``data`` of a pair is ``pair.root / "a" / "data"`` on node
a and ``pair.root / "b" / "data"`` on node b: two "machines" on one host.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sbs_core.lab import HOSTS, NodeProcess, Pair
from sbs_core.messages import (
    Heartbeat,
    Hello,
    Message,
    NodeState,
    decode_message,
    encode_message,
)
from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX
from sbs_core.wire import (
    NONCE_SIZE,
    Authenticated,
    Closed,
    ControlReceived,
    DataReceived,
    SecureChannel,
)

# The pair's timings (the lab's defaults, spelled out because bounds use them).
HEARTBEAT = 0.2
DEAD_TIME = 1.0
PROBE = 0.5

FOLDER = "data"

Status = dict[str, Any]


def report(what: str, seconds: float) -> None:
    """A measured time, shown with ``pytest -s``: the bounds below were chosen from these."""
    print(f"[timing] {what}: {seconds:.3f} s")


def note(what: str, value: object) -> None:
    """Another measure worth seeing with ``pytest -s`` (a count, a number of bytes)."""
    print(f"[seen] {what}: {value}")


# -- pairs


def folders_toml(*, filter: str = "*", path: str = FOLDER) -> str:
    return f"\n[[folders]]\npath = {json.dumps(path)}\nfilter = {json.dumps(filter)}\n"


def replica_pair(
    root: Path,
    *,
    modes: tuple[str, str] = ("auto", "auto"),
    node: Mapping[str, object] | None = None,
    extra: str = "",
    filter: str = "*",
) -> Pair:
    """A pair replicating the folder ``data`` (with ``filter``); ``node`` adds ``[node]`` keys."""
    return Pair(
        root,
        modes=modes,
        heartbeat_interval=HEARTBEAT,
        dead_time=DEAD_TIME,
        probe_interval=PROBE,
        node_extra=dict(node or {}),
        extra=folders_toml(filter=filter) + extra,
    )


def data_of(node: NodeProcess) -> Path:
    return node.config.parent / FOLDER


def is_primary(st: Status) -> bool:
    return st["role"] == "primary" and not st["handing_over"]


def connected_primary(st: Status) -> bool:
    return is_primary(st) and bool(st["peer_connected"])


def connected_secondary(st: Status) -> bool:
    return st["role"] == "secondary" and bool(st["peer_connected"])


def start_pair(pair: Pair) -> None:
    """a first (it becomes primary), then b (its connected secondary)."""
    pair.a.start()
    pair.a.wait_for("primary", is_primary, timeout=10)
    pair.b.start()
    pair.b.wait_for("secondary", connected_secondary, timeout=10)
    pair.a.wait_for("primary with its secondary", connected_primary, timeout=10)


def status_of(node: NodeProcess) -> Status:
    st = node.status()
    assert st is not None, f"node {node.name} does not answer; log:\n{node.log_tail()}"
    return st


# -- waiting


def wait_until(what: str, test: Callable[[], bool], *, timeout: float, poll: float = 0.01) -> float:
    """Poll ``test`` until it holds; the seconds it took. AssertionError after ``timeout``."""
    began = time.monotonic()
    while True:
        if test():
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(poll)


def settled(read: Callable[[], Any], *, quiet: float, timeout: float) -> Any:
    """What ``read`` gives once unchanged for ``quiet`` s; AssertionError after ``timeout``."""
    began = time.monotonic()
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() - began > timeout:
            raise AssertionError(f"still changing after {timeout} s: {last!r}")
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def holds_for(what: str, test: Callable[[], bool], seconds: float, poll: float = 0.05) -> None:
    """``test`` stays true for a whole observation window (a change that must never come)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert test(), what
        time.sleep(poll)
    assert test(), what


# -- trees


def files_under(root: Path) -> Iterator[Path]:
    """Every regular file below ``root``, sbs's temporary files included."""
    for folder, _dirs, names in os.walk(root):
        for name in names:
            yield Path(folder, name)


def listing(root: Path) -> dict[str, int]:
    """relative POSIX path -> size of every file below ``root`` but sbs's temporary files."""
    found: dict[str, int] = {}
    if not root.is_dir():
        return found
    for path in files_under(root):
        if in_progress(path):
            continue
        try:
            found[path.relative_to(root).as_posix()] = path.stat().st_size
        except FileNotFoundError:
            continue  # replaced under our feet: the next poll sees it
    return found


def contents(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in listing(root)}


def mtimes(root: Path) -> dict[str, int]:
    return {rel: (root / rel).stat().st_mtime_ns for rel in listing(root)}


def temp_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in files_under(root) if in_progress(p))


def in_progress(path: Path) -> bool:
    """sbs's own file, not yet applied: a temporary one, or one in a new folder's hidden one."""
    return path.name.startswith(TEMP_PREFIX) or any(
        part.startswith(STAGING_PREFIX) for part in path.parts
    )


def same_bytes(src: Path, dst: Path) -> bool:
    """``dst`` holds exactly the files of ``src`` with the same bytes (sizes checked first)."""
    if listing(src) != listing(dst):
        return False
    try:
        return contents(src) == contents(dst)
    except FileNotFoundError:
        return False


def assert_same_tree(src: Path, dst: Path, *, with_mtimes: bool = False) -> None:
    """``dst`` holds the files of ``src`` and nothing else, byte for byte (and mtime, to the ns)."""
    assert sorted(listing(dst)) == sorted(listing(src))
    want, got = contents(src), contents(dst)
    for rel, data in want.items():
        assert got[rel] == data, f"{rel}: {len(got[rel])} bytes on the copy, {len(data)} expected"
    if with_mtimes:
        assert mtimes(dst) == mtimes(src)


def wait_same_tree(src: Path, dst: Path, *, timeout: float) -> float:
    return wait_until(f"{dst} equal to {src}", lambda: same_bytes(src, dst), timeout=timeout)


def has_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def log_text(node: NodeProcess) -> str:
    try:
        return node.log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- a peer that speaks the protocol by hand


class RawPeer:
    """A client that knows the pair's secret and sends whatever a test wants.

    It plays a compromised (or buggy) node: it authenticates, introduces itself
    with a Hello of its choosing and then sends hand-made messages. A thread
    reads what the node sends and heartbeats meanwhile, so that the node keeps
    the connection however long the test takes between two messages.
    """

    def __init__(self, pair: Pair, target: NodeProcess) -> None:
        host = HOSTS[0] if target is pair.a else HOSTS[1]
        source = HOSTS[1] if target is pair.a else HOSTS[0]
        secret = pair.secret_file.read_bytes().strip()
        self.port = pair.port
        self.sock = socket.create_connection(
            (host, pair.port), timeout=5, source_address=(source, 0)
        )
        self.sock.settimeout(None)
        self.channel = SecureChannel(secret, initiator=True, nonce=os.urandom(NONCE_SIZE))
        self.inbox: deque[Message] = deque()
        self.state = NodeState(
            node_id="crafted-peer",
            name="crafted",
            mode="primary",
            role="primary",
            epoch=1_000,
            sentinels=(),
        )
        self.closed = threading.Event()
        self.failure: BaseException | None = None
        self._authenticated = threading.Event()
        self._introduced = threading.Event()  # heartbeats may only follow our Hello
        self._lock = threading.Lock()
        self._stop = threading.Event()
        with self._lock:
            self._flush()
        self._reader = threading.Thread(target=self._run, name="raw-peer", daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._stop.set()
        self._reader.join(5)
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hello(self) -> Hello:
        """Authenticate, send our Hello and return the node's."""
        self._wait("authentication", self._authenticated.is_set, timeout=5)
        self.send(
            Hello(
                state=self.state, heartbeat_interval=HEARTBEAT, dead_time=DEAD_TIME, port=self.port
            )
        )
        self._introduced.set()
        found: Hello = self.take(Hello, timeout=5)
        return found

    def send(self, message: Message) -> None:
        with self._lock:
            self.channel.send_control(encode_message(message))
            self._flush()

    def send_data(self, payload: bytes) -> None:
        with self._lock:
            self.channel.send_data(payload)
            self._flush()

    def take(self, kind: type[Any], *, timeout: float) -> Any:
        """The next message of type ``kind``; the node's other messages before it are dropped."""

        def found() -> bool:
            while self.inbox:
                if isinstance(self.inbox[0], kind):
                    return True
                self.inbox.popleft()
            return False

        self._wait(kind.__name__, found, timeout=timeout)
        return self.inbox.popleft()

    def _wait(self, what: str, test: Callable[[], bool], *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            if self.failure is not None:
                raise AssertionError(f"the connection failed: {self.failure!r}")
            if self.closed.is_set():
                raise AssertionError(f"the node closed the connection before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} from the node within {timeout} s")
            time.sleep(0.002)

    def _run(self) -> None:
        next_heartbeat = 0.0
        try:
            while not self._stop.is_set() and not self.closed.is_set():
                if self._introduced.is_set() and time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT
                    self.send(Heartbeat(state=self.state))
                # select, not a socket timeout: sends from the test must not time out.
                readable, _, _ = select.select([self.sock], [], [], 0.05)
                if not readable:
                    continue
                try:
                    chunk = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                with self._lock:
                    self.channel.receive_data(chunk or None)
                    self._dispatch()
                    self._flush()
                if not chunk:
                    self.closed.set()
        except Exception as exc:  # shown by the waiting test, which fails with it
            self.failure = exc

    def _dispatch(self) -> None:
        for event in self.channel.events():
            match event:
                case Authenticated():
                    self._authenticated.set()
                case ControlReceived(payload=payload):
                    self.inbox.append(decode_message(payload))
                case DataReceived():
                    pass  # a secondary sends no file data; nothing here needs it
                case Closed():
                    self.closed.set()

    def _flush(self) -> None:
        out = self.channel.data_to_send()
        if out:
            self.sock.sendall(out)
