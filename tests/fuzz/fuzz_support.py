"""What the live fuzz tests share: a node on loopback, hostile clients, and the checks after them.

A live fuzz test starts one real ``sbs run`` process (node b of a
:class:`~sbs_core.lab.Pair`, whose a is never started), throws hostile traffic
at its peer port, and then asks the same questions every time: is the process
alive and answering, did it write anything outside its own folders, did its
secret reach its log or its status, and did it log the refusals once rather
than once per connection.

The hostile client connects from :data:`ROGUE` (127.0.0.3), so the node's
refusals of it are told apart from those of the pair's own addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbs_core.lab import HOSTS, NodeProcess, Pair
from sbs_core.wire import (
    HANDSHAKE_MAX_PAYLOAD,
    HEADER_SIZE,
    NONCE_SIZE,
    Authenticated,
    FrameKind,
    SecureChannel,
    encode_frame,
)

# The fuzz tests reuse the hand-driven authenticated peer of the replication tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

ROGUE = "127.0.0.3"
HEARTBEAT = 0.2
DEAD_TIME = 1.0
FOLDER = "data"
REFUSAL_MARKERS = ("refused a connection", "broke the protocol")
#: A file name every hostile path in the tests ends with: found anywhere, it escaped.
PLANTED = f"sbs-fuzz-planted-{os.getpid()}"

Status = dict[str, Any]


def folders_toml() -> str:
    return f'\n[[folders]]\npath = "{FOLDER}"\nfilter = "*"\n'


def lone_pair(root: Path, *, mode: str = "auto") -> Pair:
    """A pair of which only b is started (in ``mode``); a's address answers nothing."""
    return Pair(
        root,
        modes=("auto", mode),
        heartbeat_interval=HEARTBEAT,
        dead_time=DEAD_TIME,
        probe_interval=0.5,
        extra=folders_toml(),
    )


def secret_of(pair: Pair) -> bytes:
    return pair.secret_file.read_bytes().strip()


def status_of(node: NodeProcess) -> Status:
    st = node.status(timeout=5.0)
    assert st is not None, f"node {node.name} does not answer; log:\n{node.log_tail()}"
    return st


def log_bytes(node: NodeProcess) -> bytes:
    try:
        return node.log.read_bytes()
    except FileNotFoundError:
        return b""


def refusal_lines(node: NodeProcess, host: str | None = ROGUE) -> list[str]:
    """The lines ``node`` logged about refusing or dropping connections from ``host`` (or any).

    A connection reset before the node asked for its address is logged as from "?".
    """
    text = log_bytes(node).decode(errors="replace")
    return [
        line
        for line in text.splitlines()
        if (host is None or host in line) and any(marker in line for marker in REFUSAL_MARKERS)
    ]


# -- what lies outside the node's folders


def tree(root: Path, *, skip: tuple[Path, ...]) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes, but those below any of ``skip``."""
    found: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in names:
            path = here / name
            if path in skip:
                continue
            try:
                found[str(path)] = path.read_bytes() if not path.is_symlink() else b"<link>"
            except OSError:
                continue
    return found


def outside_node(root: Path, node: NodeProcess) -> dict[str, bytes]:
    """The files of the test's folder that the node has no business writing.

    The node writes its state directory, its log and its replicated folder;
    everything else (the secret, the other node's folder, the canaries) must
    stay byte for byte as it was.
    """
    return tree(root, skip=(node.state_dir, node.log, node.config.parent / FOLDER))


def planted_anywhere() -> list[Path]:
    """Files named :data:`PLANTED` anywhere in the system's temporary folder."""
    found: list[Path] = []
    for folder, _dirs, names in os.walk(tempfile.gettempdir(), onerror=lambda _: None):
        found += [Path(folder, n) for n in names if PLANTED in n]
    return found


# -- hostile clients


def connect(node_host: str, port: int, *, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((node_host, port), timeout=timeout, source_address=(ROGUE, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a reset: no TIME_WAIT, so thousands of connections keep ports free."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the node sends until it closes; AssertionError if it keeps the connection open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the node kept a hostile connection open for {timeout} s") from None
    return data


def frames_in(data: bytes) -> list[tuple[int, bytes]]:
    """(kind, payload) of each frame in the clear in ``data``; a torn last one is dropped."""
    frames = []
    while len(data) >= HEADER_SIZE:
        _magic, _version, kind, length = struct.unpack(">2sBBI", data[:HEADER_SIZE])
        if len(data) < HEADER_SIZE + length:
            break
        frames.append((kind, data[HEADER_SIZE : HEADER_SIZE + length]))
        data = data[HEADER_SIZE + length :]
    return frames


def handshake_frame(message: object) -> bytes:
    return encode_frame(FrameKind.CONTROL, json.dumps(message).encode())


def hostile_stream(rnd: random.Random) -> tuple[str, list[bytes]]:
    """One hostile conversation: its name and the writes that make it up."""
    nonce = rnd.randbytes(NONCE_SIZE).hex()
    header = struct.Struct(">2sBBI")
    kind = rnd.randrange(10)
    if kind == 0:
        return "nothing", []
    if kind == 1:
        return "random bytes", [rnd.randbytes(rnd.randint(1, 3000))]
    if kind == 2:
        # A header mutated in one field, then a body of whatever length.
        magic = rnd.choice([b"SB", b"BS", rnd.randbytes(2)])
        fields = (magic, rnd.choice([1, 0, 2, 255]), rnd.randrange(256), rnd.randrange(64))
        return "mutated header", [header.pack(*fields) + rnd.randbytes(rnd.randrange(64))]
    if kind == 3:
        length = rnd.randint(HANDSHAKE_MAX_PAYLOAD + 1, 2**32 - 1)
        return "absurd length", [header.pack(b"SB", 1, 0, length) + rnd.randbytes(100)]
    if kind == 4:
        whole = handshake_frame({"type": "challenge", "versions": [1], "nonce": nonce})
        return "truncated challenge", [whole[: rnd.randrange(1, len(whole))]]
    if kind == 5:
        # A challenge, then a proof that cannot be right, split over several writes.
        proof = handshake_frame({"type": "proof", "mac": rnd.randbytes(32).hex()})
        challenge = handshake_frame({"type": "challenge", "versions": [1], "nonce": nonce})
        cut = rnd.randrange(1, len(proof))
        return "forged proof", [challenge, proof[:cut], proof[cut:]]
    if kind == 6:
        message = rnd.choice(
            [
                {"type": "refuse", "reason": "x" * rnd.randrange(3000), "versions": [9]},
                {"type": "challenge", "versions": [2, 3], "nonce": nonce},
                {"type": "challenge", "versions": "1", "nonce": nonce},
                {"type": "hello"},
                [1, 2, 3],
                "x" * rnd.randrange(4000),
            ]
        )
        return "hostile handshake message", [handshake_frame(message)]
    if kind == 7:
        payload = rnd.randbytes(rnd.randrange(200))
        return "data frame in the handshake", [encode_frame(FrameKind.DATA, payload)]
    if kind == 8:
        return "http", [b"GET / HTTP/1.1\r\nHost: sbs\r\n\r\n"]
    whole = handshake_frame({"type": "challenge", "versions": [1], "nonce": nonce})
    return "byte by byte", [whole[i : i + 1] for i in range(len(whole))]


def wrong_secret_client(host: str, port: int, rnd: random.Random) -> bytes:
    """A client speaking the protocol with a wrong secret; what the node sent it."""
    channel = SecureChannel(rnd.randbytes(24), initiator=True, nonce=rnd.randbytes(NONCE_SIZE))
    with connect(host, port) as sock:
        sock.sendall(channel.data_to_send())
        # The challenge comes first; the proof made from it is the wrong one.
        data = sock.recv(HEADER_SIZE + HANDSHAKE_MAX_PAYLOAD)
        channel.receive_data(data)
        sock.sendall(channel.data_to_send())
        return data + read_until_closed(sock, 5.0)


def authenticate(
    host: str, port: int, secret: bytes, *, source: str = ROGUE
) -> tuple[socket.socket, SecureChannel]:
    """A connection that completed the real handshake (as a peer holding the secret would)."""
    channel = SecureChannel(secret, initiator=True, nonce=os.urandom(NONCE_SIZE))
    sock = socket.create_connection((host, port), timeout=5.0, source_address=(source, 0))
    try:
        sock.sendall(channel.data_to_send())
        deadline = time.monotonic() + 5.0
        while not channel.authenticated:
            if time.monotonic() > deadline:
                raise AssertionError("the handshake did not complete within 5 s")
            chunk = sock.recv(65536)
            channel.receive_data(chunk or None)
            out = channel.data_to_send()
            if out:
                sock.sendall(out)
        assert any(isinstance(e, Authenticated) for e in channel.events())
    except BaseException:
        sock.close()
        raise
    return sock, channel


def node_host(pair: Pair, node: NodeProcess) -> str:
    return HOSTS[0] if node is pair.a else HOSTS[1]


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def seeds(count: int) -> Iterator[int]:
    """``count`` seeds from SBS_FUZZ_SEED (printed, so a failure can be replayed) or the clock."""
    base = int(os.environ.get("SBS_FUZZ_SEED") or time.time_ns() % 2**32)
    print(f"[fuzz] SBS_FUZZ_SEED={base}")
    rnd = random.Random(base)
    for _ in range(count):
        yield rnd.randrange(2**32)
