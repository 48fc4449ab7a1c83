"""The frame format: header layout, reassembly from any split, and sealing."""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from sbs_core.errors import LocalProtocolError, RemoteProtocolError
from sbs_core.wire import (
    HEADER_SIZE,
    KEY_SIZE,
    MAX_FRAME_LIMIT,
    MAX_PAYLOAD_LIMIT,
    TAG_SIZE,
    Frame,
    FrameCipher,
    FrameKind,
    FrameReader,
    decode_header,
    encode_frame,
    encode_header,
)

KEY = b"k" * 32
frames_strategy = st.lists(
    st.builds(Frame, kind=st.sampled_from(FrameKind), payload=st.binary(max_size=300)),
    max_size=8,
)


def chunks(data: bytes, rnd: random.Random, max_chunk: int = 64) -> list[bytes]:
    out = []
    position = 0
    while position < len(data):
        size = rnd.randint(1, max_chunk)
        out.append(data[position : position + size])
        position += size
    return out


def read_all(reader: FrameReader, *, max_payload: int, cipher: FrameCipher | None) -> list[Frame]:
    out = []
    while (frame := reader.next_frame(max_payload=max_payload, cipher=cipher)) is not None:
        out.append(frame)
    return out


def gcm_nonce(sequence: int) -> bytes:
    """The nonce as docs/protocol.md spells it out, built independently of the code."""
    return b"\x00\x00\x00\x00" + struct.pack(">Q", sequence)


def test_header_layout() -> None:
    assert encode_header(FrameKind.CONTROL, 5) == b"SB\x01\x00\x00\x00\x00\x05"
    assert encode_header(FrameKind.DATA, 0x01020304) == b"SB\x01\x01\x01\x02\x03\x04"
    assert HEADER_SIZE == 8
    assert TAG_SIZE == 16
    assert KEY_SIZE == 32
    assert MAX_FRAME_LIMIT == 2**31 - 17


@given(kind=st.sampled_from(FrameKind), length=st.integers(0, MAX_PAYLOAD_LIMIT))
def test_header_round_trip(kind: FrameKind, length: int) -> None:
    assert decode_header(encode_header(kind, length)) == (kind, length)


@pytest.mark.parametrize("length", [-1, MAX_PAYLOAD_LIMIT + 1])
def test_header_refuses_unencodable_length(length: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_header(FrameKind.DATA, length)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (struct.pack(">2sBBI", b"SX", 1, 0, 0), "magic"),
        (struct.pack(">2sBBI", b"HT", 1, 0, 0), "magic"),
        (struct.pack(">2sBBI", b"SB", 0, 0, 0), "version"),
        (struct.pack(">2sBBI", b"SB", 2, 0, 0), "version"),
        (struct.pack(">2sBBI", b"SB", 1, 2, 0), "kind"),
        (struct.pack(">2sBBI", b"SB", 1, 255, 0), "kind"),
    ],
)
def test_bad_header_is_the_peers_fault(header: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_header(header)
    reader = FrameReader()
    reader.feed(header)
    with pytest.raises(RemoteProtocolError, match=reason):
        reader.next_frame(max_payload=100, cipher=None)


@given(frames=frames_strategy, rnd=st.randoms(use_true_random=False))
def test_frames_in_the_clear_survive_any_split(frames: list[Frame], rnd: random.Random) -> None:
    wire = b"".join(encode_frame(frame.kind, frame.payload) for frame in frames)
    reader = FrameReader()
    received: list[Frame] = []
    for chunk in chunks(wire, rnd):
        reader.feed(chunk)
        received += read_all(reader, max_payload=300, cipher=None)
    assert received == frames
    assert len(reader) == 0


@given(frames=frames_strategy, rnd=st.randoms(use_true_random=False))
def test_sealed_frames_survive_any_split(frames: list[Frame], rnd: random.Random) -> None:
    sender = FrameCipher(KEY)
    wire = b"".join(encode_frame(frame.kind, frame.payload, sender) for frame in frames)
    reader = FrameReader()
    receiver = FrameCipher(KEY)
    received: list[Frame] = []
    for chunk in chunks(wire, rnd):
        reader.feed(chunk)
        received += read_all(reader, max_payload=300, cipher=receiver)
    assert received == frames
    assert receiver.sequence == sender.sequence == len(frames)
    assert len(reader) == 0


def test_reader_waits_for_a_whole_frame() -> None:
    wire = encode_frame(FrameKind.DATA, b"hello", FrameCipher(KEY))
    reader = FrameReader()
    cipher = FrameCipher(KEY)
    reader.feed(wire[:-1])
    assert reader.next_frame(max_payload=10, cipher=cipher) is None
    assert len(reader) == len(wire) - 1
    # Waiting must not consume a sequence number.
    assert cipher.sequence == 0
    reader.feed(wire[-1:])
    assert reader.next_frame(max_payload=10, cipher=cipher) == Frame(
        kind=FrameKind.DATA, payload=b"hello"
    )
    assert len(reader) == 0


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 101))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_frame(max_payload=100, cipher=None)


def test_frame_at_the_limit_is_accepted() -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 100))
    assert reader.next_frame(max_payload=100, cipher=None) is None
    reader.feed(b"x" * 100)
    assert reader.next_frame(max_payload=100, cipher=None) == Frame(
        kind=FrameKind.DATA, payload=b"x" * 100
    )


def test_the_limit_of_a_sealed_frame_is_its_payload_not_its_body() -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 100 + TAG_SIZE))
    assert reader.next_frame(max_payload=100, cipher=FrameCipher(KEY)) is None
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 101 + TAG_SIZE))
    with pytest.raises(RemoteProtocolError, match="frame of 101 bytes exceeds"):
        reader.next_frame(max_payload=100, cipher=FrameCipher(KEY))


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE - 1])
def test_sealed_frame_too_short_for_its_tag_is_refused_from_its_header(length: int) -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.CONTROL, length))
    with pytest.raises(RemoteProtocolError, match="too short"):
        reader.next_frame(max_payload=100, cipher=FrameCipher(KEY))


def test_empty_payload_is_sealed_as_a_lone_tag() -> None:
    wire = encode_frame(FrameKind.DATA, b"", FrameCipher(KEY))
    assert wire[:HEADER_SIZE] == encode_header(FrameKind.DATA, TAG_SIZE)
    assert len(wire) == HEADER_SIZE + TAG_SIZE
    reader = FrameReader()
    reader.feed(wire)
    assert reader.next_frame(max_payload=0, cipher=FrameCipher(KEY)) == Frame(
        kind=FrameKind.DATA, payload=b""
    )


def test_sealed_body_opens_with_an_independent_aesgcm_and_nonce() -> None:
    cipher = FrameCipher(KEY)
    for sequence in range(3):
        frame = cipher.seal(FrameKind.CONTROL, b"abc")
        header, body = bytes(frame[:HEADER_SIZE]), bytes(frame[HEADER_SIZE:])
        # The length counts the ciphertext and its tag; the header is the associated data.
        assert header == encode_header(FrameKind.CONTROL, 3 + TAG_SIZE)
        assert len(body) == 3 + TAG_SIZE
        assert AESGCM(KEY).decrypt(gcm_nonce(sequence), body, header) == b"abc"
    assert cipher.sequence == 3


def test_a_frame_sealed_independently_is_opened() -> None:
    header = encode_header(FrameKind.DATA, 5 + TAG_SIZE)
    wire = b"".join(
        header + AESGCM(KEY).encrypt(gcm_nonce(sequence), payload, header)
        for sequence, payload in enumerate([b"first", b"secnd"])
    )
    reader = FrameReader()
    reader.feed(wire)
    assert read_all(reader, max_payload=5, cipher=FrameCipher(KEY)) == [
        Frame(kind=FrameKind.DATA, payload=b"first"),
        Frame(kind=FrameKind.DATA, payload=b"secnd"),
    ]


def test_the_ciphertext_never_contains_the_plaintext() -> None:
    cipher = FrameCipher(KEY)
    payload = b"a confidential file, " * 50
    first = encode_frame(FrameKind.DATA, payload, cipher)
    second = encode_frame(FrameKind.DATA, payload, cipher)
    for wire in (first, second):
        assert b"confidential" not in wire
        assert payload[:16] not in wire
    # Each frame has its own nonce: the same payload twice looks unrelated.
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]


def test_frame_sealed_for_another_sequence_number_is_refused() -> None:
    sender = FrameCipher(KEY)
    first = encode_frame(FrameKind.CONTROL, b"one", sender)
    second = encode_frame(FrameKind.CONTROL, b"two", sender)
    reader = FrameReader()
    reader.feed(second + first)
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=10, cipher=FrameCipher(KEY))


def test_frame_sealed_under_another_key_is_refused() -> None:
    reader = FrameReader()
    reader.feed(encode_frame(FrameKind.DATA, b"x", FrameCipher(b"o" * KEY_SIZE)))
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=10, cipher=FrameCipher(KEY))


def test_a_changed_kind_is_refused_since_the_header_is_authenticated() -> None:
    wire = bytearray(encode_frame(FrameKind.CONTROL, b"{}", FrameCipher(KEY)))
    wire[3] = FrameKind.DATA
    reader = FrameReader()
    reader.feed(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=10, cipher=FrameCipher(KEY))


def test_frame_in_the_clear_read_as_sealed_is_refused() -> None:
    reader = FrameReader()
    reader.feed(encode_frame(FrameKind.DATA, b"x"))
    with pytest.raises(RemoteProtocolError, match="too short"):
        reader.next_frame(max_payload=10, cipher=FrameCipher(KEY))
    reader = FrameReader()
    reader.feed(encode_frame(FrameKind.DATA, b"long enough to pass for a tag"))
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=100, cipher=FrameCipher(KEY))


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_a_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        FrameCipher(b"k" * size)


def test_sequence_numbers_run_out_after_the_last_8_byte_value() -> None:
    sender, receiver = FrameCipher(KEY), FrameCipher(KEY)
    # Counting there takes 2**64 frames; start both sides at the last number instead.
    sender._sequence = receiver._sequence = 2**64 - 1
    frame = sender.seal(FrameKind.DATA, b"last")
    header, body = bytes(frame[:HEADER_SIZE]), bytes(frame[HEADER_SIZE:])
    assert AESGCM(KEY).decrypt(b"\x00" * 4 + b"\xff" * 8, body, header) == b"last"
    with pytest.raises(LocalProtocolError, match="exhausted"):
        sender.seal(FrameKind.DATA, b"one too many")
    reader = FrameReader()
    reader.feed(header + body + header + body)
    assert reader.next_frame(max_payload=10, cipher=receiver) == Frame(
        kind=FrameKind.DATA, payload=b"last"
    )
    with pytest.raises(RemoteProtocolError, match="last sequence number"):
        reader.next_frame(max_payload=10, cipher=receiver)


@pytest.mark.parametrize("sealed", [False, True])
def test_many_frames_across_large_uneven_reads(sealed: bool) -> None:
    rnd = random.Random(1)
    payloads = [rnd.randbytes(rnd.randint(0, 5000)) for _ in range(200)]
    sender = FrameCipher(KEY) if sealed else None
    wire = b"".join(encode_frame(FrameKind.DATA, payload, sender) for payload in payloads)
    reader = FrameReader()
    receiver = FrameCipher(KEY) if sealed else None
    received: list[bytes] = []
    # Reads that end mid-header, mid-payload and exactly at frame boundaries.
    for chunk in chunks(wire, rnd, max_chunk=100_000):
        reader.feed(chunk)
        received += [f.payload for f in read_all(reader, max_payload=5000, cipher=receiver)]
    assert received == payloads
    assert all(type(payload) is bytes for payload in received)
    assert len(reader) == 0
