"""A peer that cannot prove the shared secret gets nothing: no pairing, no state, no bytes."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from pair_support import (
    PROBE,
    SENTINELS,
    full_primary,
    log_text,
    marker_commands,
    marker_pair,
    pid_alive,
    runs_on,
    wait_running,
)

from sbs_core.lab import HOSTS, read_markers, write_node_config
from sbs_core.wire import NONCE_SIZE, SecureChannel
from sbs_core.wire.frames import HEADER_SIZE, MAGIC

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and the parent-death signal"),
]

# How long b tries to pair with the wrong secret: many probes of each node.
_WATCH = 3.0


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_challenge(sock: socket.socket) -> bytes:
    """The one frame a stranger may get: the 8-byte header and a challenge payload."""
    header = recv_exactly(sock, HEADER_SIZE)
    magic, _version, kind, length = struct.unpack(">2sBBI", header)
    assert magic == MAGIC
    assert kind == 0  # a control frame
    payload = recv_exactly(sock, length)
    message = json.loads(payload)
    assert message["type"] == "challenge"
    assert set(message) == {"type", "versions", "nonce"}
    return header + payload


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if it keeps the connection open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with our bytes unread: a reset, which is a close too
    except TimeoutError:
        raise AssertionError(f"the node kept the connection open for {timeout} s") from None
    return data


def test_wrong_secret_gets_nothing(tmp_path: Path) -> None:
    with marker_pair(tmp_path / "pair") as pair:
        pair.a.start()
        pair.a.wait_for("primary", full_primary(), timeout=10)
        a_pids = sorted(r["pid"] for r in wait_running(pair, "a"))

        # b: same pair in every respect but the secret, plus one sentinel of its
        # own, so that its pair list shows whether it ever got a's.
        other_secret = tmp_path / "other-secret"
        other_secret.write_text(os.urandom(24).hex() + "\n")
        other_secret.chmod(0o600)
        b_sentinels = marker_commands(pair.markers)
        b_sentinels["audit"] = b_sentinels["labels"]
        write_node_config(
            pair.b.config.parent,
            name="b",
            local=HOSTS[1],
            remote=HOSTS[0],
            port=pair.port,
            secret_file=other_secret,
            sentinels=b_sentinels,
        )
        pair.b.start()
        pair.b.wait_for("refused", lambda st: bool(st.get("last_error")), timeout=10)

        # While both keep probing (every probe_interval), b never pairs, never
        # learns a's state, never runs anything, and a never notices a peer.
        watch_until = time.monotonic() + _WATCH
        while time.monotonic() < watch_until:
            st_b, st_a = pair.b.status(), pair.a.status()
            assert st_b is not None, pair.b.log_tail()
            assert st_a is not None, pair.a.log_tail()
            assert st_b["role"] == "starting", st_b
            assert st_b["peer_connected"] is False
            assert st_b["peer"] is None
            assert st_b["epoch"] == 0
            assert st_b["active_sentinels"] == []
            assert full_primary()(st_a), st_a
            assert st_a["peer_connected"] is False
            time.sleep(0.05)

        # b's pair list is its own autostart default, not the list a would send.
        st_b = pair.b.status()
        assert st_b is not None
        assert st_b["sentinels"] == ["audit", *SENTINELS]
        st_a = pair.a.status()
        assert st_a is not None
        assert st_a["sentinels"] == list(SENTINELS)
        assert "handshake failed" in st_b["last_error"]
        # Nothing from a was persisted on b: no state, or one without a's epoch.
        state_file = pair.b.state_dir / "state.json"
        if state_file.exists():
            assert json.loads(state_file.read_text())["epoch"] == 0
        assert runs_on(read_markers(pair.markers), "b") == []

        # a says so, but once per cause and direction, not once per attempt: b's
        # probes of a and a's of b were refused at least _WATCH / PROBE = 6 times
        # each; seen: 2 lines (one as the connected side, one as the connecting).
        refusals = [line for line in log_text(pair.a).splitlines() if "refused" in line]
        assert refusals, pair.a.log_tail()
        assert any(HOSTS[1] in line for line in refusals)
        assert len(refusals) <= 4 < 2 * _WATCH / PROBE, refusals

        # A raw client: garbage after the challenge ends the connection, and
        # the challenge is all it ever received.
        with socket.create_connection((HOSTS[0], pair.port), timeout=5) as raw:
            challenge = read_challenge(raw)
            raw.sendall(b"GET / HTTP/1.1\r\nHost: sbs\r\n\r\n")
            assert read_until_closed(raw, timeout=5) == b""

        # A client that speaks the protocol but proves the wrong secret gets the
        # same: the challenge, then a closed connection (nothing to replay offline).
        channel = SecureChannel(
            b"not the pair's secret", initiator=True, nonce=os.urandom(NONCE_SIZE)
        )
        with socket.create_connection((HOSTS[0], pair.port), timeout=5) as raw:
            raw.sendall(channel.data_to_send())
            challenge = read_challenge(raw)
            channel.receive_data(challenge)
            proof = channel.data_to_send()
            assert proof  # our proof, made with the wrong secret
            raw.sendall(proof)
            assert read_until_closed(raw, timeout=5) == b""
        # The payload is a small JSON object around a hex nonce, and nothing else.
        assert NONCE_SIZE * 2 < len(challenge) - HEADER_SIZE < 200

        # a is untouched: primary, the same sentinel processes, no peer.
        st_a = pair.a.status()
        assert st_a is not None
        assert full_primary()(st_a)
        assert st_a["peer_connected"] is False
        runs = read_markers(pair.markers)
        assert sorted(r["pid"] for r in runs) == a_pids
        assert all(pid_alive(pid) for pid in a_pids)
        assert pair.primaries() == ["a"]
