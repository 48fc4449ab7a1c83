"""Hostile traffic at a live node's peer port: it never crashes, writes outside, leaks or floods.

Each test starts real ``sbs run`` processes on loopback and sends them, from
127.0.0.3, what a stranger or a compromised peer might: garbage, torn and forged
handshakes, thousands of connections, and (with the secret) nonsense in place of
a Hello and hostile replication sessions. The random cases come from a seed that
is printed (``pytest -s``) and can be replayed with ``SBS_FUZZ_SEED``.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import xxhash
from fuzz_support import (
    PLANTED,
    authenticate,
    connect,
    frames_in,
    hostile_stream,
    log_bytes,
    lone_pair,
    node_host,
    outside_node,
    planted_anywhere,
    read_until_closed,
    refusal_lines,
    reset,
    rss,
    secret_of,
    seeds,
    status_of,
    wrong_secret_client,
)
from replication_support import RawPeer, wait_until

from sbs_core.lab import HOSTS, NodeProcess, Pair
from sbs_core.messages import (
    CycleAck,
    CycleEnd,
    Delete,
    Heartbeat,
    Inventory,
    Message,
    NodeState,
    Put,
    PutFile,
    RootSpec,
    Seal,
    SyncStart,
    encode_message,
)
from sbs_core.sync.engine import WINDOW

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and 127.0.0.3"),
]

# A refusal is logged once per host and minute: what a run of a few seconds may show.
MAX_REFUSAL_LINES = 2
STRANGERS = 600


def start_alone(pair: Pair, *, role: str) -> NodeProcess:
    node = pair.b
    node.start()
    node.wait_for(role, lambda st: st["role"] == role and not st["handing_over"], timeout=15)
    return node


def assert_unharmed(
    node: NodeProcess, pair: Pair, *, role: str, epoch: int, log_before: int
) -> bytes:
    """The node runs, answers, kept its role and its secret; what it logged meanwhile."""
    assert node.alive, node.log_tail()
    st = status_of(node)
    assert (st["role"], st["epoch"]) == (role, epoch), st
    secret = secret_of(pair)
    log = log_bytes(node)
    assert secret not in log, "the shared secret is in the node's log"
    assert secret not in json.dumps(st).encode(), "the shared secret is in the node's status"
    return log[log_before:]


def test_strangers_get_a_challenge_and_cost_one_log_line(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_bytes(b"must survive\n")
    with lone_pair(tmp_path / "pair") as pair:
        node = start_alone(pair, role="primary")
        host = node_host(pair, node)
        epoch = status_of(node)["epoch"]
        before = outside_node(tmp_path, node)
        log_before = len(log_bytes(node))
        rnd = random.Random(next(seeds(1)))
        kinds: Counter[str] = Counter()
        for index in range(STRANGERS):
            name, writes = hostile_stream(rnd)
            kinds[name] += 1
            sock = connect(host, pair.port)
            try:
                for chunk in writes:
                    sock.sendall(chunk)
                if index % 10 == 0:
                    # Listen to some to the end: the node's challenge is all they get
                    # (and a refusal naming its versions, if they asked for others).
                    sock.shutdown(socket.SHUT_WR)
                    frames = frames_in(read_until_closed(sock, 5.0))
                    types = [json.loads(payload)["type"] for _, payload in frames]
                    assert types[:1] == ["challenge"], (name, types)
                    assert set(types) <= {"challenge", "refuse"}, (name, types)
            except OSError:
                pass  # the node hung up first (a reset, a broken pipe): a refusal too
            finally:
                reset(sock)
        for _ in range(10):
            answer = frames_in(wrong_secret_client(host, pair.port, rnd))
            assert [json.loads(p)["type"] for _, p in answer] == ["challenge"]
        print(f"[fuzz] {sum(kinds.values())} hostile connections: {dict(kinds)}")

        # The port still serves the real peer: a handshake with the secret completes.
        time.sleep(0.5)
        sock, _ = authenticate(host, pair.port, secret_of(pair), source=HOSTS[0])
        sock.close()
        logged = assert_unharmed(node, pair, role="primary", epoch=epoch, log_before=log_before)
        lines = refusal_lines(node)
        assert 1 <= len(lines) <= MAX_REFUSAL_LINES, lines
        # Once per host and minute, whatever the connection sent: a line or two in all.
        assert len(logged) < 2048, logged.decode(errors="replace")
        assert outside_node(tmp_path, node) == before


def flood(host: str, port: int, *, threads: int, seconds: float) -> int:
    """Connections opened from ROGUE by ``threads`` threads for ``seconds``; how many."""
    done = [0] * threads
    end = time.monotonic() + seconds

    def run(slot: int) -> None:
        while time.monotonic() < end:
            try:
                sock = connect(host, port, timeout=1.0)
            except OSError:
                continue
            if slot % 2:
                with contextlib.suppress(OSError):
                    sock.send(b"SB\x01\x00" + slot.to_bytes(4, "big"))
            reset(sock)
            done[slot] += 1

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 10)
    return sum(done)


def test_a_connection_flood_does_not_disturb_the_pair(tmp_path: Path) -> None:
    with Pair(tmp_path / "pair", heartbeat_interval=0.2, dead_time=1.0) as pair:
        pair.a.start()
        pair.a.wait_for("primary", lambda st: st["role"] == "primary", timeout=15)
        pair.b.start()
        pair.b.wait_for(
            "connected secondary",
            lambda st: st["role"] == "secondary" and bool(st["peer_connected"]),
            timeout=15,
        )
        roles = {n.name: (status_of(n)["role"], status_of(n)["epoch"]) for n in pair}
        memory = rss(pair.a.pid)
        log_before = len(log_bytes(pair.a))
        opened = flood(HOSTS[0], pair.port, threads=4, seconds=3.0)
        print(f"[fuzz] {opened} connections in 3 s ({opened / 3:.0f}/s)")
        assert opened > 1000, "the flood itself was too slow to prove anything"
        for node in pair:
            st = status_of(node)
            assert (st["role"], st["epoch"]) == roles[node.name], st
            assert st["peer_connected"], st
            # The pair's own heartbeats (every 0.2 s) never came near dead_time (1 s).
            assert st["peer"]["longest_silence"] < 0.7, st["peer"]
        assert rss(pair.a.pid) - memory < 16 << 20
        logged = assert_unharmed(
            pair.a, pair, role="primary", epoch=roles["a"][1], log_before=log_before
        )
        # From 127.0.0.3, and from "?" for connections reset before the node saw their address.
        assert 1 <= len(refusal_lines(pair.a, None)) <= 2 * MAX_REFUSAL_LINES, logged
        assert len(logged) < 2048, logged.decode(errors="replace")
        # Every handshake slot came back: a peer with the secret still gets in.
        sock, _ = authenticate(HOSTS[0], pair.port, secret_of(pair))
        sock.close()


def nonsense_for_hello(rnd: random.Random) -> tuple[str, bytes, bool]:
    """(name, payload, is a control frame) for what comes in place of a Hello."""
    state = NodeState(
        node_id="fuzz", name="fuzz", mode="auto", role="secondary", epoch=0, sentinels=()
    )
    choices: list[tuple[str, bytes, bool]] = [
        ("random bytes", rnd.randbytes(rnd.randrange(1, 2000)), True),
        ("random data frame", rnd.randbytes(rnd.randrange(0, 2000)), False),
        ("unknown type of a megabyte", json.dumps({"type": "x" * (1 << 20)}).encode(), True),
        ("json list", b"[" * 5000 + b"]" * 5000, True),
        ("heartbeat first", encode_message(Heartbeat(state=state)), True),
        ("hello without fields", b'{"type":"hello"}', True),
        ("bad utf-8", b'{"type":"\xff\xfe"}', True),
        ("huge number", b'{"type":"hello","port":' + b"9" * 4000 + b"}", True),
    ]
    return rnd.choice(choices)


def test_a_peer_with_the_secret_sending_nonsense_is_dropped_quietly(tmp_path: Path) -> None:
    with lone_pair(tmp_path / "pair") as pair:
        node = start_alone(pair, role="primary")
        host = node_host(pair, node)
        epoch = status_of(node)["epoch"]
        before = outside_node(tmp_path, node)
        log_before = len(log_bytes(node))
        secret = secret_of(pair)
        rnd = random.Random(next(seeds(1)))
        for _ in range(30):
            name, payload, control = nonsense_for_hello(rnd)
            sock, channel = authenticate(host, pair.port, secret)
            try:
                if control:
                    channel.send_control(payload)
                else:
                    channel.send_data(payload)
                sock.sendall(channel.data_to_send())
                # The node ends the connection, at once or when its Hello never comes.
                read_until_closed(sock, 5.0)
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                reset(sock)
            assert node.alive, (name, node.log_tail())
        logged = assert_unharmed(node, pair, role="primary", epoch=epoch, log_before=log_before)
        assert 1 <= len(refusal_lines(node)) <= MAX_REFUSAL_LINES, logged
        # A megabyte-long type tag is not copied into the log, even once.
        assert len(logged) < 4096, logged[:4096].decode(errors="replace")
        assert outside_node(tmp_path, node) == before


# -- hostile replication sessions from a peer with the secret


def hostile_paths(pair: Pair) -> list[str]:
    """Wire paths that would land outside b's folder; each names PLANTED."""
    return [
        f"../{PLANTED}",
        f"../../{PLANTED}",
        f"a/../../{PLANTED}",
        str(pair.root / PLANTED),
        f"/tmp/{PLANTED}",
        f"C:/{PLANTED}",
        f"..\\{PLANTED}",
        f"link/{PLANTED}",
        f"./../{PLANTED}",
        f"data/../../{PLANTED}",
    ]


def hostile_session_message(
    rnd: random.Random, pair: Pair, folder: RootSpec, sessions: list[int]
) -> tuple[Message | bytes, ...]:
    """A message (or data bytes) a compromised primary might send, valid on the wire."""
    # Mostly the latest session (which may have been accepted), sometimes any other.
    session = sessions[-1] if rnd.random() < 0.7 else rnd.choice([*sessions, rnd.randrange(2**63)])
    paths = hostile_paths(pair)
    safe = [f"ok-{rnd.randrange(8)}.txt", f"sub/ok-{rnd.randrange(8)}.txt"]
    root_id = rnd.choice([folder.id, folder.id, "unknown-root", "x" * 512])
    size = rnd.choice([0, 1, 10, 1000, 2**40, 2**63 - 1])
    kind = rnd.randrange(10)
    if kind == 0:
        root = rnd.choice(
            [
                folder,
                RootSpec(
                    id="evil", path=rnd.choice(["..", "/", str(pair.root), "../b"]), filter="*"
                ),
            ]
        )
        sessions.append(rnd.randrange(1000))
        window = rnd.choice([0, 1, WINDOW, 2**62])
        return (
            SyncStart(
                session=sessions[-1], roots=(root,), preserve_timestamps=False, window=window
            ),
        )
    if kind in (1, 2):
        names = rnd.sample(paths, rnd.randint(1, 3)) + rnd.sample(safe, rnd.randint(0, 2))
        files = tuple(PutFile(root=root_id, path=p, size=size, mtime_ns=0) for p in names)
        body = f"hostile {PLANTED}\n".encode()
        put = Put(session=session, files=files)
        # Out of order: the data before its Put, or after the Seal, or twice.
        order: tuple[Message | bytes, ...] = rnd.choice(
            [(put, body), (body, put), (put, body, body)]
        )
        digests = tuple(xxhash.xxh3_128(body).hexdigest() for _ in files)
        return (*order, Seal(session=session, digests=digests[: rnd.randint(0, len(digests))]))
    if kind == 3:
        return (rnd.randbytes(rnd.randrange(1, 70_000)),)
    if kind == 4:
        return (Seal(session=session, digests=("0" * 32,) * rnd.randint(0, 3)),)
    if kind == 5:
        chosen = [*rnd.sample(paths, 2), "ok-1.txt"]
        return (Delete(session=session, root=root_id, paths=tuple(chosen)),)
    if kind == 6:
        return (CycleEnd(session=session, cycle=rnd.randrange(2**63)),)
    if kind == 7:
        return (CycleAck(session=session, cycle=1, applied=size, refused=((root_id, "x", "y"),)),)
    if kind == 8:
        entries = ((rnd.choice(paths), size, 0, ""),)
        return (Inventory(session=session, root=root_id, entries=entries, last=True),)
    name, good = safe[0], b"a good file\n"
    put = Put(
        session=session, files=(PutFile(root=folder.id, path=name, size=len(good), mtime_ns=0),)
    )
    return (put, good, Seal(session=session, digests=(xxhash.xxh3_128(good).hexdigest(),)))


def test_hostile_sessions_from_a_peer_with_the_secret_never_write_outside(tmp_path: Path) -> None:
    with lone_pair(tmp_path / "pair", mode="backup") as pair:
        node = pair.b
        dst = node.config.parent / "data"
        dst.mkdir()
        # A link in the folder that leads out of it (put there by b's own admin, say).
        (dst / "link").symlink_to(tmp_path, target_is_directory=True)
        (node.config.parent / "victim.txt").write_bytes(b"must survive\n")
        (tmp_path / "canary.txt").write_bytes(b"must survive too\n")
        start_alone(pair, role="secondary")
        before = outside_node(tmp_path, node)
        log_before = len(log_bytes(node))
        folder = RootSpec(id="folder:data|*", path="data", filter="*")
        rnd = random.Random(next(seeds(1)))
        sessions = [1]
        sent = 0

        def refused() -> list[str]:
            logged = log_bytes(node)[log_before:].decode(errors="replace")
            lines = logged.splitlines()
            return [line for line in lines if "refused the peer's sync session" in line]

        with RawPeer(pair, node) as peer:
            peer.hello()
            node.wait_for("following the crafted peer", lambda st: st["peer_connected"], timeout=5)
            peer.send(
                SyncStart(session=1, roots=(folder,), preserve_timestamps=False, window=WINDOW)
            )
            for _ in range(150):
                assert not peer.closed.is_set(), node.log_tail()
                for item in hostile_session_message(rnd, pair, folder, sessions):
                    if isinstance(item, bytes):
                        peer.send_data(item)
                    else:
                        peer.send(item)
                    sent += 1
            print(f"[fuzz] {sent} hostile messages and data frames sent")
            # The same refusal again and again: one line, not one per session.
            evil = RootSpec(id="evil", path="/", filter="*")
            for session in range(5000, 5100):
                peer.send(
                    SyncStart(session=session, roots=(evil,), preserve_timestamps=False, window=0)
                )
            # Each SyncStart ends the session before it, refused or not yet looked at:
            # the last one is refused once nothing follows it (logged by the node's
            # logging thread, a moment later).
            wait_until("the refusal logged", lambda: bool(refused()), timeout=10.0)
            honest_session(peer, folder, dst)
            assert node.alive, node.log_tail()
        status_of(node)
        assert outside_node(tmp_path, node) == before
        assert planted_anywhere() == []
        assert secret_of(pair) not in log_bytes(node)
        assert 1 <= len(refused()) <= MAX_REFUSAL_LINES, refused()


def honest_session(peer: RawPeer, folder: RootSpec, dst: Path) -> None:
    """After all that, a well-formed session still gets its file written, in the folder."""
    good = b"an honest file\n"
    peer.send(SyncStart(session=9999, roots=(folder,), preserve_timestamps=False, window=WINDOW))
    deadline = time.monotonic() + 10
    while (inventory := peer.take(Inventory, timeout=10)).session != 9999 or not inventory.last:
        assert time.monotonic() < deadline, "no inventory for the honest session"
    one = PutFile(root=folder.id, path="honest.txt", size=len(good), mtime_ns=0)
    peer.send(Put(session=9999, files=(one,)))
    peer.send_data(good)
    peer.send(Seal(session=9999, digests=(xxhash.xxh3_128(good).hexdigest(),)))
    peer.send(CycleEnd(session=9999, cycle=1))
    while (ack := peer.take(CycleAck, timeout=10)).session != 9999:
        assert time.monotonic() < deadline, "no acknowledgement for the honest session"
    assert ack.applied == 1, ack
    assert (dst / "honest.txt").read_bytes() == good


# -- strangers holding every handshake slot


def test_strangers_holding_handshakes_do_not_lock_the_peer_out(tmp_path: Path) -> None:
    # Idle connections that never finish their handshake, renewed before the node
    # times them out, once kept a starting b from reaching a: b took a's silence for
    # "nobody answered", became primary and ran its sentinels beside a's.
    with Pair(tmp_path / "pair", heartbeat_interval=0.2, dead_time=1.0) as pair:
        pair.a.start()
        pair.a.wait_for("primary", lambda st: st["role"] == "primary", timeout=15)
        stop = threading.Event()

        def hold() -> None:
            held: list[socket.socket] = []
            try:
                while not stop.is_set():
                    fresh = [connect(HOSTS[0], pair.port) for _ in range(12)]
                    for sock in held:
                        reset(sock)
                    held = fresh
                    stop.wait(1.0)  # the node gives up on a handshake after 2 s
            finally:
                for sock in held:
                    reset(sock)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            time.sleep(0.5)
            pair.b.start()
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                st = pair.b.status() or {"role": "not answering yet"}
                assert st["role"] != "primary", f"b became primary beside a: {st}"
                time.sleep(0.05)
            assert status_of(pair.b)["peer_connected"], pair.b.log_tail()
            assert status_of(pair.a)["role"] == "primary"
        finally:
            stop.set()
            holder.join(10)
