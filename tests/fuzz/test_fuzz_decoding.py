"""Fuzzing the decoders a peer's bytes meet first: the frame reader, the open channel, the messages.

``tests/wire`` already feeds garbage to a channel in its handshake; these go
further in: garbage after genuine frames, tampered sealed frames on an open
channel, and any JSON at all (or any bytes) offered as a message. The one
outcome allowed for bad input is :class:`~sbs_core.errors.RemoteProtocolError`
with a short reason: never another exception, never a forged frame, never a
message that does not survive its own round trip.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbs_core.errors import LocalProtocolError, RemoteProtocolError
from sbs_core.messages import (
    CycleAck,
    CycleEnd,
    Delete,
    Goodbye,
    Handover,
    Heartbeat,
    Hello,
    Inventory,
    Message,
    NodeState,
    Put,
    PutFile,
    RootSpec,
    Seal,
    SyncStart,
    decode_message,
    encode_message,
)
from sbs_core.wire import (
    NONCE_SIZE,
    ControlReceived,
    DataReceived,
    Frame,
    FrameCipher,
    FrameKind,
    FrameReader,
    SecureChannel,
    encode_frame,
)

# Examples per test: enough to find the classic mistakes, few enough for a fast CI.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A reason is logged and shown in the status: it must stay short whatever the peer sent.
MAX_REASON = 250

KEY = bytes(range(32))
SECRET = b"fuzzing secret"


def split(data: bytes, rnd: random.Random) -> list[bytes]:
    parts, at = [], 0
    while at < len(data):
        step = rnd.randint(1, 97)
        parts.append(data[at : at + step])
        at += step
    return parts


# -- the frame reader


@FUZZ
@given(
    frames=st.lists(st.tuples(st.sampled_from(FrameKind), st.binary(max_size=300)), max_size=4),
    garbage=st.binary(max_size=600),
    sealed=st.booleans(),
    max_payload=st.integers(0, 400),
    rnd=st.randoms(use_true_random=False),
)
def test_garbage_after_genuine_frames_never_alters_them_or_forges_one(
    frames: list[tuple[FrameKind, bytes]],
    garbage: bytes,
    sealed: bool,
    max_payload: int,
    rnd: random.Random,
) -> None:
    sender = FrameCipher(KEY) if sealed else None
    receiver = FrameCipher(KEY) if sealed else None
    wire = b"".join(encode_frame(kind, payload, sender) for kind, payload in frames)
    reader = FrameReader()
    got: list[Frame] = []
    failed = False
    reason = ""
    for chunk in split(wire + garbage, rnd):
        reader.feed(chunk)
        try:
            while (
                frame := reader.next_frame(max_payload=max_payload, cipher=receiver)
            ) is not None:
                got.append(frame)
        except RemoteProtocolError as exc:
            reason = str(exc)
            failed = True
            break
    # The genuine frames come out as sent, up to the first one over the limit.
    expected: list[tuple[FrameKind, bytes]] = []
    for kind, payload in frames:
        if len(payload) > max_payload:
            assert failed, "an oversized frame was not refused"
            break
        expected.append((kind, payload))
    assert len(reason) <= MAX_REASON
    assert [(f.kind, f.payload) for f in got[: len(expected)]] == expected
    if sealed:
        # Garbage cannot pass the integrity check: nothing beyond the genuine frames.
        assert len(got) == len(expected)


def open_pair() -> tuple[SecureChannel, SecureChannel]:
    initiator = SecureChannel(SECRET, initiator=True, nonce=b"i" * NONCE_SIZE)
    responder = SecureChannel(SECRET, initiator=False, nonce=b"r" * NONCE_SIZE)
    while not (initiator.authenticated and responder.authenticated):
        responder.receive_data(initiator.data_to_send())
        initiator.receive_data(responder.data_to_send())
    list(initiator.events())
    list(responder.events())
    return initiator, responder


@FUZZ
@given(
    payload=st.binary(max_size=500),
    control=st.booleans(),
    bit=st.integers(min_value=0),
    rnd=st.randoms(use_true_random=False),
)
def test_a_tampered_sealed_frame_is_never_delivered(
    payload: bytes, control: bool, bit: int, rnd: random.Random
) -> None:
    sender, receiver = open_pair()
    if control:
        sender.send_control(payload)
    else:
        sender.send_data(payload)
    wire = bytearray(sender.data_to_send())
    at = bit % (len(wire) * 8)
    wire[at // 8] ^= 1 << (at % 8)
    try:
        for chunk in split(bytes(wire), rnd):
            receiver.receive_data(chunk)
    except RemoteProtocolError:
        with pytest.raises(LocalProtocolError):
            receiver.send_control(b"{}")
    # Refused, or (a length made longer) still waiting for the rest: never delivered.
    delivered = [e for e in receiver.events() if isinstance(e, ControlReceived | DataReceived)]
    assert delivered == []


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=2000), rnd=st.randoms(use_true_random=False))
def test_garbage_on_an_open_channel_delivers_nothing(garbage: bytes, rnd: random.Random) -> None:
    _, receiver = open_pair()
    reason = ""
    try:
        for chunk in split(garbage, rnd):
            receiver.receive_data(chunk)
        receiver.receive_data(None)
    except RemoteProtocolError as exc:
        reason = str(exc)
    assert len(reason) <= MAX_REASON
    delivered = [e for e in receiver.events() if isinstance(e, ControlReceived | DataReceived)]
    assert delivered == []


# -- message validation

STATE = NodeState(
    node_id="n1", name="node", mode="auto", role="primary", epoch=3, sentinels=("labels",)
)
ROOT = RootSpec(id="folder:data|*", path="data", filter="*")
SAMPLES: tuple[Message, ...] = (
    Hello(state=STATE, heartbeat_interval=0.2, dead_time=1.0, port=4445, software="sbs"),
    Heartbeat(state=STATE),
    Handover(epoch=4, sentinels=("labels",), reason="stopping"),
    Goodbye(reason="stopping", detail="bye"),
    SyncStart(session=1, roots=(ROOT,), preserve_timestamps=True, window=1 << 20),
    Inventory(session=1, root=ROOT.id, entries=(("a.txt", 3, 10, "ab"),), last=True),
    Put(session=1, files=(PutFile(root=ROOT.id, path="a.txt", size=3, mtime_ns=10),)),
    Seal(session=1, digests=("ab",)),
    Delete(session=1, root=ROOT.id, paths=("a.txt",)),
    CycleEnd(session=1, cycle=2),
    CycleAck(session=1, cycle=2, applied=1, retry=(("r", "p", "why"),)),
)
PUT_FILE = PutFile(root=ROOT.id, path="a.txt", size=3, mtime_ns=10)
FIELDS = sorted({f.name for m in (*SAMPLES, STATE, ROOT, PUT_FILE) for f in dataclasses.fields(m)})

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(["../x", "/etc/passwd", "C:/x", "", "primary", "hello"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=15,
)


def check_outcome(payload: bytes) -> None:
    """A valid message that survives its own round trip, or the peer's fault in a few words."""
    try:
        message = decode_message(payload)
    except RemoteProtocolError as exc:
        reason = str(exc)
    else:
        assert decode_message(encode_message(message)) == message
        return
    assert len(reason) <= MAX_REASON, reason[:500]


@FUZZ
@given(value=json_values)
def test_any_json_value_is_a_message_or_the_peers_fault(value: object) -> None:
    check_outcome(json.dumps(value).encode())


@FUZZ
@given(
    sample=st.sampled_from(SAMPLES),
    changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=3),
    dropped=st.lists(st.sampled_from(FIELDS), max_size=2),
)
def test_a_valid_message_with_fields_changed_or_dropped(
    sample: Message, changes: dict[str, object], dropped: list[str]
) -> None:
    body = json.loads(encode_message(sample))
    body.update(changes)
    for name in dropped:
        body.pop(name, None)
    check_outcome(json.dumps(body).encode())


@FUZZ
@given(
    sample=st.sampled_from(SAMPLES),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4
    ),
)
def test_a_valid_message_with_bytes_changed(sample: Message, flips: list[tuple[int, int]]) -> None:
    payload = bytearray(encode_message(sample))
    for at, value in flips:
        payload[at % len(payload)] = value
    check_outcome(bytes(payload))


@FUZZ
@given(payload=st.binary(max_size=1000))
def test_any_bytes_are_a_message_or_the_peers_fault(payload: bytes) -> None:
    check_outcome(payload)


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"type": "x" * (1 << 20)}).encode(),
        json.dumps({"type": "goodbye", "reason": "y" * 100_000}).encode(),
        json.dumps({"type": "seal", "session": 1, "digests": ["z" * 100_000]}).encode(),
        b'{"type": "hello", "port": ' + b"9" * 5000 + b"}",
        b"[" * 100_000,
    ],
    ids=["tag", "literal", "digest", "number", "nesting"],
)
def test_a_huge_input_gives_a_short_reason(payload: bytes) -> None:
    # The reason goes to the log and the status: a megabyte-long type tag once made
    # a megabyte-long log line.
    with pytest.raises(RemoteProtocolError) as caught:
        decode_message(payload)
    assert len(str(caught.value)) <= MAX_REASON


def test_the_coverage_guided_harness_runs_clean() -> None:
    # A short run keeps tests/fuzz/atheris_wire.py working; long runs are done by hand
    # (docs/reliability.md).
    pytest.importorskip("atheris")
    harness = Path(__file__).with_name("atheris_wire.py")
    done = subprocess.run(
        [sys.executable, str(harness), "-runs=5000", "-max_len=2048", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 5000 runs" in done.stderr, done.stderr[-3000:]
