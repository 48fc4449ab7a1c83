"""The secure channel: handshake, sealed frames, and every way a peer can get it wrong.

Two channels are driven through an in-memory pump that hands each side's
outgoing bytes to the other, whole, one byte at a time, or in random pieces.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbs_core.errors import (
    AuthenticationError,
    ForgedFrameError,
    LocalProtocolError,
    RemoteProtocolError,
)
from sbs_core.wire import (
    HANDSHAKE_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_FRAME_LIMIT,
    TAG_SIZE,
    Authenticated,
    ChannelEvent,
    Closed,
    ControlReceived,
    DataReceived,
    FrameKind,
    SealedDataReceived,
    SecureChannel,
    encode_frame,
    encode_header,
)

SECRET = b"the pair's shared secret"
NONCE_I = bytes(range(32))
NONCE_R = bytes(range(100, 132))

Chunker = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_chunker(rnd: random.Random, max_chunk: int = 64) -> Chunker:
    def split(data: bytes) -> list[bytes]:
        out = []
        position = 0
        while position < len(data):
            size = rnd.randint(1, max_chunk)
            out.append(data[position : position + size])
            position += size
        return out

    return split


def make_pair(
    *,
    initiator_secret: bytes = SECRET,
    responder_secret: bytes = SECRET,
    max_frame: int = 4096,
    defer_data: bool = False,
) -> tuple[SecureChannel, SecureChannel]:
    initiator = SecureChannel(initiator_secret, initiator=True, nonce=NONCE_I, max_frame=max_frame)
    responder = SecureChannel(
        responder_secret, initiator=False, nonce=NONCE_R, max_frame=max_frame, defer_data=defer_data
    )
    return initiator, responder


def deliver(src: SecureChannel, dst: SecureChannel, chunker: Chunker = whole) -> list[ChannelEvent]:
    for chunk in chunker(bytes(src.data_to_send())):
        dst.receive_data(chunk)
    return list(dst.events())


def feed(channel: SecureChannel, *reads: bytes | bytearray | None) -> None:
    for data in reads:
        channel.receive_data(data)


def handshake(
    initiator: SecureChannel,
    responder: SecureChannel,
    chunker: Chunker = whole,
    responder_first: Callable[[], bool] = lambda: False,
) -> tuple[list[ChannelEvent], list[ChannelEvent]]:
    """Pump until both sides are quiet; return the events each side saw."""
    seen_by_initiator: list[ChannelEvent] = []
    seen_by_responder: list[ChannelEvent] = []
    for _ in range(10):
        if responder_first():
            seen_by_initiator += deliver(responder, initiator, chunker)
        seen_by_responder += deliver(initiator, responder, chunker)
        seen_by_initiator += deliver(responder, initiator, chunker)
    return seen_by_initiator, seen_by_responder


def open_pair(
    max_frame: int = 4096, *, defer_data: bool = False
) -> tuple[SecureChannel, SecureChannel]:
    """A pair past its handshake; with ``defer_data`` the responder hands data frames on sealed."""
    initiator, responder = make_pair(max_frame=max_frame, defer_data=defer_data)
    assert handshake(initiator, responder) == ([Authenticated()], [Authenticated()])
    return initiator, responder


def handshake_frame(message: object) -> bytes:
    # Compact separators, as the channel writes them, so whole frames can be compared.
    return encode_frame(FrameKind.CONTROL, json.dumps(message, separators=(",", ":")).encode())


def challenge(nonce: object = NONCE_R.hex(), versions: object = (1,)) -> bytes:
    return handshake_frame({"type": "challenge", "versions": versions, "nonce": nonce})


# --- the handshake -------------------------------------------------------------


@pytest.mark.parametrize("chunker", [whole, bytewise])
def test_handshake_authenticates_both_sides(chunker: Chunker) -> None:
    initiator, responder = make_pair()
    assert not initiator.authenticated
    assert not responder.authenticated
    events = handshake(initiator, responder, chunker)
    assert events == ([Authenticated()], [Authenticated()])
    assert initiator.authenticated
    assert responder.authenticated
    assert initiator.data_to_send() == responder.data_to_send() == b""


@given(
    rnd=st.randoms(use_true_random=False),
    nonces=st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=2, unique=True),
    secret=st.binary(min_size=1, max_size=100),
)
def test_handshake_survives_any_split_and_order(
    rnd: random.Random, nonces: list[bytes], secret: bytes
) -> None:
    initiator = SecureChannel(secret, initiator=True, nonce=nonces[0])
    responder = SecureChannel(secret, initiator=False, nonce=nonces[1])
    events = handshake(initiator, responder, random_chunker(rnd, 40), lambda: rnd.random() < 0.5)
    assert events == ([Authenticated()], [Authenticated()])


def test_construction_queues_our_challenge() -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    assert channel.data_to_send() == handshake_frame(
        {"type": "challenge", "versions": [1], "nonce": NONCE_I.hex()}
    )
    assert channel.data_to_send() == b""


def test_the_secret_never_goes_on_the_wire() -> None:
    initiator, responder = make_pair()
    transcript = bytearray()
    for _ in range(3):
        for src, dst in ((initiator, responder), (responder, initiator)):
            data = src.data_to_send()
            transcript += data
            dst.receive_data(data)
    assert initiator.authenticated
    assert responder.authenticated
    assert SECRET not in transcript
    assert SECRET.hex().encode() not in transcript


def test_wrong_secret_gets_only_the_responders_challenge() -> None:
    initiator, responder = make_pair(initiator_secret=b"a guess")
    responder_challenge = responder.data_to_send()
    assert responder_challenge == challenge()
    initiator.receive_data(responder_challenge)
    with pytest.raises(AuthenticationError):
        responder.receive_data(initiator.data_to_send())
    # Everything the responder ever produced is its challenge: no proof, no key material.
    assert responder.data_to_send() == b""
    assert list(responder.events()) == []
    assert b"proof" not in responder_challenge
    assert not responder.authenticated
    assert not initiator.authenticated
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        initiator.receive_data(None)


def test_initiator_refuses_a_responder_without_the_secret() -> None:
    initiator = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    initiator.receive_data(challenge())
    with pytest.raises(AuthenticationError):
        initiator.receive_data(handshake_frame({"type": "proof", "mac": "00" * 32}))
    assert not initiator.authenticated


def test_a_proof_from_another_session_is_refused() -> None:
    initiator, responder = make_pair()
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    recorded_proof = responder.data_to_send()
    fresh = SecureChannel(SECRET, initiator=True, nonce=bytes(32))
    with pytest.raises(AuthenticationError):
        fresh.receive_data(challenge() + recorded_proof)


@pytest.mark.parametrize("role_is_initiator", [True, False])
def test_reflected_nonce_is_refused(role_is_initiator: bool) -> None:
    channel = SecureChannel(SECRET, initiator=role_is_initiator, nonce=NONCE_I)
    with pytest.raises(RemoteProtocolError, match="own nonce"):
        channel.receive_data(challenge(nonce=NONCE_I.hex()))


def test_reflected_challenge_frame_is_refused() -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    with pytest.raises(RemoteProtocolError):
        channel.receive_data(channel.data_to_send())


@pytest.mark.parametrize(
    "nonce",
    [
        "00" * 31,
        "00" * 33,
        "AB" * 32,
        "zz" * 32,
        " " + "00" * 31 + "0",
        "0" * 63,
        None,
        32,
        ["00"] * 32,
    ],
)
def test_malformed_nonce_is_refused(nonce: object) -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    with pytest.raises(RemoteProtocolError, match="nonce"):
        channel.receive_data(challenge(nonce=nonce))


@pytest.mark.parametrize("mac", ["00" * 31, "AB" * 32, None, 7])
def test_malformed_proof_is_refused(mac: object) -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    channel.receive_data(challenge(nonce=NONCE_I.hex()))
    with pytest.raises(RemoteProtocolError, match="proof"):
        channel.receive_data(handshake_frame({"type": "proof", "mac": mac}))


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        json.dumps({"type": "challenge"}).encode("utf-16"),
        b"[1, 2]",
        b'"challenge"',
        b"[" * 2000 + b"]" * 2000,
        b'{"type": "proof", "mac": "' + b"00" * 32 + b'"}',
        b'{"type": "hello"}',
        b'{"type": ["challenge"]}',
        b'{"versions": [1]}',
    ],
)
def test_unexpected_handshake_message_is_refused(payload: bytes) -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    with pytest.raises(RemoteProtocolError):
        channel.receive_data(encode_frame(FrameKind.CONTROL, payload))


def test_second_challenge_is_refused() -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    channel.receive_data(challenge(nonce=NONCE_I.hex()))
    with pytest.raises(RemoteProtocolError, match="unexpected"):
        channel.receive_data(challenge(nonce=NONCE_I.hex()))


@pytest.mark.parametrize("defer_data", [False, True])
def test_data_frame_during_the_handshake_is_refused(defer_data: bool) -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R, defer_data=defer_data)
    with pytest.raises(RemoteProtocolError, match="data frame"):
        channel.receive_data(encode_frame(FrameKind.DATA, b"{}"))


@pytest.mark.parametrize("versions", [[2], [0, 2, 3], []])
def test_no_common_version_is_refused_with_our_versions(versions: list[int]) -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    channel.data_to_send()
    with pytest.raises(RemoteProtocolError, match="version"):
        channel.receive_data(challenge(versions=versions))
    refusal = channel.data_to_send()
    assert refusal[:8] == encode_header(FrameKind.CONTROL, len(refusal) - 8)
    assert json.loads(refusal[8:]) == {"type": "refuse", "reason": "version", "versions": [1]}


@pytest.mark.parametrize("versions", [None, "1", [1, "2"], [True], {"1": 1}])
def test_malformed_version_list_is_refused(versions: object) -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    with pytest.raises(RemoteProtocolError, match="version"):
        channel.receive_data(challenge(versions=versions))


def test_a_newer_peer_that_also_speaks_1_is_accepted() -> None:
    initiator = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    responder = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    newer_challenge = challenge(versions=[3, 2, 1])
    responder.data_to_send()
    initiator.receive_data(newer_challenge)
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    assert initiator.authenticated
    assert responder.authenticated


def test_peer_receiving_a_refusal_fails_with_the_reason() -> None:
    initiator, responder = make_pair()
    initiator.data_to_send()
    with pytest.raises(RemoteProtocolError, match="version"):
        initiator.receive_data(challenge(versions=[7]))
    with pytest.raises(RemoteProtocolError, match="refused the handshake: version"):
        responder.receive_data(initiator.data_to_send())


def test_oversized_handshake_frame_is_refused_from_its_header() -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        channel.receive_data(encode_header(FrameKind.CONTROL, HANDSHAKE_MAX_PAYLOAD + 1))


def test_handshake_frame_at_the_limit_is_read_whole() -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R)
    channel.receive_data(encode_header(FrameKind.CONTROL, HANDSHAKE_MAX_PAYLOAD))
    with pytest.raises(RemoteProtocolError, match="JSON"):
        channel.receive_data(b" " * HANDSHAKE_MAX_PAYLOAD)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    # A valid header start lets garbage reach the length check and the JSON parser.
    prefix=st.sampled_from([b"", b"SB\x01\x00\x00\x00", b"SB\x01\x00\x00\x00\x00"]),
    garbage=st.binary(max_size=200),
    initiator=st.booleans(),
    rnd=st.randoms(use_true_random=False),
)
def test_garbage_only_ever_raises_remote_protocol_error(
    prefix: bytes, garbage: bytes, initiator: bool, rnd: random.Random
) -> None:
    channel = SecureChannel(SECRET, initiator=initiator, nonce=NONCE_I)
    with contextlib.suppress(RemoteProtocolError):
        feed(channel, *random_chunker(rnd, 20)(prefix + garbage), None)
    assert not channel.authenticated
    assert list(channel.events()) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
handshake_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["challenge", "proof", "refuse", "other"])},
    optional={
        "versions": st.lists(st.integers(-1, 3), max_size=3) | json_values,
        "nonce": st.binary(min_size=30, max_size=34).map(bytes.hex) | json_values,
        "mac": st.binary(min_size=31, max_size=33).map(bytes.hex) | json_values,
        "reason": json_values,
    },
)


@given(
    messages=st.lists(handshake_like | json_values, min_size=1, max_size=3),
    initiator=st.booleans(),
)
def test_hostile_handshake_messages_only_ever_raise_remote_protocol_error(
    messages: list[object], initiator: bool
) -> None:
    channel = SecureChannel(SECRET, initiator=initiator, nonce=NONCE_I)
    with contextlib.suppress(RemoteProtocolError):
        feed(channel, *(handshake_frame(message) for message in messages))
    assert not channel.authenticated


# --- after the handshake -------------------------------------------------------

payload_frames = st.lists(
    st.tuples(st.sampled_from(FrameKind), st.binary(max_size=4096)), max_size=10
)


def send(channel: SecureChannel, kind: FrameKind, payload: bytes) -> None:
    if kind is FrameKind.CONTROL:
        channel.send_control(payload)
    else:
        channel.send_data(payload)


def as_event(kind: FrameKind, payload: bytes) -> ChannelEvent:
    if kind is FrameKind.CONTROL:
        return ControlReceived(payload=payload)
    return DataReceived(payload=payload)


@given(
    to_responder=payload_frames,
    to_initiator=payload_frames,
    rnd=st.randoms(use_true_random=False),
)
def test_frames_round_trip_both_ways_in_any_split(
    to_responder: list[tuple[FrameKind, bytes]],
    to_initiator: list[tuple[FrameKind, bytes]],
    rnd: random.Random,
) -> None:
    initiator, responder = open_pair()
    chunker = random_chunker(rnd, rnd.choice([1, 7, 100, 10_000]))
    for kind, payload in to_responder:
        send(initiator, kind, payload)
    for kind, payload in to_initiator:
        send(responder, kind, payload)
    assert deliver(initiator, responder, chunker) == [as_event(*f) for f in to_responder]
    assert deliver(responder, initiator, chunker) == [as_event(*f) for f in to_initiator]


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_one_mib_data_frame_round_trips(seed: int) -> None:
    # A seeded generator rather than st.randoms: a megabyte drawn from Hypothesis is too big.
    rnd = random.Random(seed)
    initiator, responder = open_pair(max_frame=1 << 20)
    payload = rnd.randbytes(1 << 20)
    initiator.send_data(payload)
    events = deliver(initiator, responder, random_chunker(rnd, 256 * 1024))
    assert events == [DataReceived(payload=payload)]


def test_frames_in_the_same_read_as_the_last_proof_are_opened_as_sealed() -> None:
    initiator, responder = make_pair()
    responder.receive_data(b"")
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    assert list(responder.events()) == [Authenticated()]
    responder.send_control(b'{"type":"hello"}')
    responder.send_data(b"chunk")
    # Proof and two sealed frames arrive as one read.
    initiator.receive_data(responder.data_to_send())
    assert list(initiator.events()) == [
        Authenticated(),
        ControlReceived(payload=b'{"type":"hello"}'),
        DataReceived(payload=b"chunk"),
    ]


def session_key(label: bytes) -> bytes:
    """A direction's key as docs/protocol.md derives it, independently of the code."""
    return hmac.new(SECRET, label + NONCE_I + NONCE_R, hashlib.sha256).digest()


@pytest.mark.parametrize(
    ("label", "from_initiator"), [(b"sbs/1 key i2r", True), (b"sbs/1 key r2i", False)]
)
def test_frames_open_with_an_independent_aesgcm_key_and_nonce(
    label: bytes, from_initiator: bool
) -> None:
    initiator, responder = open_pair()
    sender = initiator if from_initiator else responder
    aead = AESGCM(session_key(label))
    for sequence, payload in enumerate([b'{"type":"hello"}', b"", b"x" * 1000]):
        sender.send_data(payload)
        wire = sender.data_to_send()
        header, body = wire[:HEADER_SIZE], wire[HEADER_SIZE:]
        assert header == encode_header(FrameKind.DATA, len(payload) + TAG_SIZE)
        assert len(body) == len(payload) + TAG_SIZE
        nonce = bytes(4) + struct.pack(">Q", sequence)
        assert aead.decrypt(nonce, body, header) == payload


def test_a_frame_sealed_independently_is_accepted() -> None:
    _, responder = open_pair()
    aead = AESGCM(session_key(b"sbs/1 key i2r"))
    wire = b""
    for sequence, payload in enumerate([b'{"type":"hello"}', b"chunk"]):
        header = encode_header(FrameKind.CONTROL, len(payload) + TAG_SIZE)
        wire += header + aead.encrypt(bytes(4) + struct.pack(">Q", sequence), payload, header)
    responder.receive_data(wire)
    assert list(responder.events()) == [
        ControlReceived(payload=b'{"type":"hello"}'),
        ControlReceived(payload=b"chunk"),
    ]


@given(
    control=st.binary(min_size=16, max_size=2000),
    data=st.binary(min_size=16, max_size=2000),
)
def test_the_wire_never_carries_a_payload_in_the_clear(control: bytes, data: bytes) -> None:
    initiator, responder = open_pair()
    initiator.send_control(control)
    initiator.send_data(data)
    wire = initiator.data_to_send()
    assert control not in wire
    assert data not in wire
    responder.receive_data(wire)
    assert list(responder.events()) == [
        ControlReceived(payload=control),
        DataReceived(payload=data),
    ]


def test_the_same_payload_twice_looks_different_on_the_wire() -> None:
    initiator, _ = open_pair()
    initiator.send_data(b"the same chunk of a file")
    first = initiator.data_to_send()
    initiator.send_data(b"the same chunk of a file")
    assert initiator.data_to_send() != first


@settings(max_examples=300)
@given(data=st.data())
def test_any_modified_byte_is_detected(data: st.DataObject) -> None:
    initiator, responder = open_pair()
    initiator.send_control(b'{"type":"heartbeat"}')
    first = bytearray(initiator.data_to_send())
    initiator.send_data(b"a following frame")
    following = initiator.data_to_send()
    index = data.draw(st.integers(0, len(first) - 1), label="index")
    first[index] ^= data.draw(st.integers(1, 255), label="xor")
    # A lengthened frame waits for bytes; what follows or the close must expose it.
    with pytest.raises(RemoteProtocolError):
        feed(responder, bytes(first), following, None)
    assert list(responder.events()) == []


def test_replayed_frame_is_refused() -> None:
    initiator, responder = open_pair()
    initiator.send_control(b"{}")
    frame = initiator.data_to_send()
    responder.receive_data(frame)
    assert list(responder.events()) == [ControlReceived(payload=b"{}")]
    with pytest.raises(RemoteProtocolError, match="integrity"):
        responder.receive_data(frame)


def test_reordered_frames_are_refused() -> None:
    initiator, responder = open_pair()
    initiator.send_control(b"1")
    first = initiator.data_to_send()
    initiator.send_control(b"2")
    second = initiator.data_to_send()
    with pytest.raises(RemoteProtocolError, match="integrity"):
        responder.receive_data(second + first)
    assert list(responder.events()) == []


def test_dropped_frame_is_detected() -> None:
    initiator, responder = open_pair()
    initiator.send_control(b"1")
    initiator.data_to_send()
    initiator.send_control(b"2")
    with pytest.raises(RemoteProtocolError, match="integrity"):
        responder.receive_data(initiator.data_to_send())


def test_frame_reflected_to_its_sender_is_refused() -> None:
    initiator, _ = open_pair()
    initiator.send_control(b"{}")
    with pytest.raises(RemoteProtocolError, match="integrity"):
        initiator.receive_data(initiator.data_to_send())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"{}", "too short"), (b'{"type":"heartbeat","state":{}}', "integrity")],
)
def test_frame_in_the_clear_after_the_handshake_is_refused(payload: bytes, reason: str) -> None:
    _, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match=reason):
        responder.receive_data(encode_frame(FrameKind.CONTROL, payload) + b"\x00" * 32)


def test_oversized_frame_is_refused_before_its_payload() -> None:
    # The limit is on the payload: the sealed body may be a tag longer.
    _, responder = open_pair(max_frame=1024)
    responder.receive_data(encode_header(FrameKind.DATA, 1024 + TAG_SIZE))
    _, responder = open_pair(max_frame=1024)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        responder.receive_data(encode_header(FrameKind.DATA, 1025 + TAG_SIZE))


def test_frames_verified_before_a_fault_are_still_delivered() -> None:
    initiator, responder = open_pair()
    initiator.send_control(b"good")
    with pytest.raises(RemoteProtocolError, match="magic"):
        responder.receive_data(initiator.data_to_send() + b"XX" + bytes(6))
    assert list(responder.events()) == [ControlReceived(payload=b"good")]


def test_a_failed_channel_stays_failed() -> None:
    _, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match="magic"):
        responder.receive_data(b"XXXXXXXX")
    with pytest.raises(RemoteProtocolError, match="already failed: bad frame magic"):
        responder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="already failed"):
        responder.receive_data(None)
    with pytest.raises(LocalProtocolError, match="failed"):
        responder.send_control(b"{}")
    with pytest.raises(LocalProtocolError, match="failed"):
        responder.send_data(b"")


# --- end of stream ---------------------------------------------------------------


def test_clean_close_after_the_handshake_is_an_event() -> None:
    initiator, responder = open_pair()
    initiator.send_data(b"last")
    responder.receive_data(initiator.data_to_send())
    responder.receive_data(None)
    assert list(responder.events()) == [DataReceived(payload=b"last"), Closed()]


def test_close_in_the_middle_of_a_frame_is_an_error() -> None:
    initiator, responder = open_pair()
    initiator.send_data(b"last")
    responder.receive_data(initiator.data_to_send()[:-1])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        responder.receive_data(None)


def test_close_during_the_handshake_is_an_error() -> None:
    channel = SecureChannel(SECRET, initiator=True, nonce=NONCE_I)
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        channel.receive_data(None)


def test_receiving_after_the_close_is_a_local_error() -> None:
    _, responder = open_pair()
    responder.receive_data(None)
    with pytest.raises(LocalProtocolError):
        responder.receive_data(b"more")


# --- local misuse ------------------------------------------------------------------


def test_sending_before_authentication_is_a_local_error() -> None:
    initiator, responder = make_pair()
    for channel in (initiator, responder):
        with pytest.raises(LocalProtocolError, match="before the handshake"):
            channel.send_control(b"{}")
        with pytest.raises(LocalProtocolError, match="before the handshake"):
            channel.send_data(b"")


def test_sending_more_than_max_frame_is_a_local_error() -> None:
    initiator, _ = open_pair(max_frame=1024)
    initiator.send_data(b"x" * 1024)
    with pytest.raises(LocalProtocolError, match="max_frame"):
        initiator.send_data(b"x" * 1025)
    with pytest.raises(LocalProtocolError, match="max_frame"):
        initiator.send_control(b"x" * 1025)


def test_a_later_change_to_a_sent_buffer_does_not_change_the_frame() -> None:
    initiator, responder = open_pair()
    buffer = bytearray(b"original")
    initiator.send_data(bytes(buffer))
    buffer[:] = b"changed!"
    assert deliver(initiator, responder) == [DataReceived(payload=b"original")]


@pytest.mark.parametrize(
    ("secret", "nonce", "max_frame"),
    [
        (b"", NONCE_I, 1024),
        (SECRET, NONCE_I[:31], 1024),
        (SECRET, NONCE_I + b"x", 1024),
        (SECRET, NONCE_I, 0),
        (SECRET, NONCE_I, MAX_FRAME_LIMIT + 1),
        (SECRET, NONCE_I, 2**32),
    ],
)
def test_bad_construction_is_a_local_error(secret: bytes, nonce: bytes, max_frame: int) -> None:
    with pytest.raises(LocalProtocolError):
        SecureChannel(secret, initiator=True, nonce=nonce, max_frame=max_frame)


@given(garbage=st.binary(min_size=1, max_size=200), rnd=st.randoms(use_true_random=False))
def test_garbage_after_the_handshake_only_ever_raises_remote_protocol_error(
    garbage: bytes, rnd: random.Random
) -> None:
    initiator, responder = open_pair()
    initiator.send_control(b"{}")
    with pytest.raises(RemoteProtocolError):
        feed(responder, *random_chunker(rnd, 20)(bytes(initiator.data_to_send()) + garbage), None)
    assert list(responder.events()) == [ControlReceived(payload=b"{}")]


def test_properties_report_the_construction() -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=NONCE_R, max_frame=1234)
    assert not channel.initiator
    assert channel.max_frame == 1234
    largest = SecureChannel(SECRET, initiator=True, nonce=NONCE_I, max_frame=MAX_FRAME_LIMIT)
    assert largest.max_frame == MAX_FRAME_LIMIT


# --- data frames handed on sealed (defer_data) -----------------------------------


def opened(events: list[ChannelEvent]) -> list[ChannelEvent]:
    """The events with each sealed data frame opened, as the receiver's writer opens it."""
    return [
        DataReceived(payload=e.frame.open()) if isinstance(e, SealedDataReceived) else e
        for e in events
    ]


@given(frames=payload_frames, rnd=st.randoms(use_true_random=False))
def test_sealed_data_frames_open_to_their_payload_in_any_split(
    frames: list[tuple[FrameKind, bytes]], rnd: random.Random
) -> None:
    initiator, responder = open_pair(defer_data=True)
    for kind, payload in frames:
        send(initiator, kind, payload)
    events = deliver(initiator, responder, random_chunker(rnd, rnd.choice([1, 7, 100, 10_000])))
    # Control frames are opened by the channel; data frames come sealed, in their place.
    assert [type(e) for e in events] == [
        ControlReceived if kind is FrameKind.CONTROL else SealedDataReceived for kind, _ in frames
    ]
    assert opened(events) == [as_event(*f) for f in frames]


def test_a_sealed_frame_opens_into_a_buffer_of_its_size_only() -> None:
    initiator, responder = open_pair(1 << 20, defer_data=True)
    payload = random.Random(3).randbytes(1 << 20)
    initiator.send_data(payload)
    [event] = deliver(initiator, responder, random_chunker(random.Random(4), 256 * 1024))
    assert isinstance(event, SealedDataReceived)
    assert len(event.frame) == event.frame.size == len(payload)
    buffer = bytearray(len(payload) + 10)
    with pytest.raises(LocalProtocolError, match="buffer"):
        event.frame.open_into(memoryview(buffer)[: len(payload) - 1])
    event.frame.open_into(memoryview(buffer)[5 : 5 + len(payload)])
    assert buffer == bytes(5) + payload + bytes(5)


def test_sealed_frames_open_in_any_order_and_only_as_themselves() -> None:
    initiator, responder = open_pair(defer_data=True)
    for payload in (b"first", b"second"):
        initiator.send_data(payload)
    first, second = deliver(initiator, responder)
    assert isinstance(first, SealedDataReceived)
    assert isinstance(second, SealedDataReceived)
    assert second.frame.open() == b"second"
    assert first.frame.open() == b"first"
    assert first.frame.open() == b"first"  # opening does not consume anything


@settings(max_examples=100)
@given(data=st.data())
def test_a_changed_sealed_frame_fails_where_it_is_opened_and_the_next_frames_still_open(
    data: st.DataObject,
) -> None:
    initiator, responder = open_pair(defer_data=True)
    initiator.send_data(b"a chunk of a replicated file")
    wire = bytearray(initiator.data_to_send())
    initiator.send_control(b'{"type":"heartbeat"}')
    initiator.send_data(b"the next chunk")
    # The body only: a changed header is refused at once (or waited on), as before.
    index = data.draw(st.integers(HEADER_SIZE, len(wire) - 1), label="index")
    wire[index] ^= data.draw(st.integers(1, 255), label="xor")
    responder.receive_data(bytes(wire) + initiator.data_to_send())
    changed, heartbeat, following = responder.events()
    assert isinstance(changed, SealedDataReceived)
    with pytest.raises(ForgedFrameError, match="integrity"):
        changed.frame.open()
    buffer = bytearray(changed.frame.size)
    with pytest.raises(ForgedFrameError, match="integrity"):
        changed.frame.open_into(memoryview(buffer))
    assert heartbeat == ControlReceived(payload=b'{"type":"heartbeat"}')
    assert isinstance(following, SealedDataReceived)
    assert following.frame.open() == b"the next chunk"


def test_a_replayed_or_reflected_sealed_frame_fails_where_it_is_opened() -> None:
    initiator, responder = open_pair(defer_data=True)
    initiator.send_data(b"chunk")
    frame = initiator.data_to_send()
    responder.receive_data(frame)
    responder.receive_data(frame)  # again: the next sequence number
    genuine, replayed = responder.events()
    assert isinstance(genuine, SealedDataReceived)
    assert isinstance(replayed, SealedDataReceived)
    assert genuine.frame.open() == b"chunk"
    with pytest.raises(ForgedFrameError):
        replayed.frame.open()
    # A frame of the responder's own, sent back to it: the other direction's key.
    responder.send_data(b"own")
    responder.receive_data(responder.data_to_send())
    [reflected] = responder.events()
    assert isinstance(reflected, SealedDataReceived)
    with pytest.raises(ForgedFrameError):
        reflected.frame.open()
