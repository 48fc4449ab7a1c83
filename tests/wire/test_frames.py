"""The frame format: header layout, reassembly from any split, and tags."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbs_core.errors import LocalProtocolError, RemoteProtocolError
from sbs_core.wire import (
    HEADER_SIZE,
    MAX_PAYLOAD_LIMIT,
    TAG_SIZE,
    Frame,
    FrameKind,
    FrameReader,
    FrameTagger,
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


def read_all(reader: FrameReader, *, max_payload: int, tagger: FrameTagger | None) -> list[Frame]:
    out = []
    while (frame := reader.next_frame(max_payload=max_payload, tagger=tagger)) is not None:
        out.append(frame)
    return out


def test_header_layout() -> None:
    assert encode_header(FrameKind.CONTROL, 5) == b"SB\x01\x00\x00\x00\x00\x05"
    assert encode_header(FrameKind.DATA, 0x01020304) == b"SB\x01\x01\x01\x02\x03\x04"
    assert HEADER_SIZE == 8
    assert TAG_SIZE == 32


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
        reader.next_frame(max_payload=100, tagger=None)


@given(frames=frames_strategy, rnd=st.randoms(use_true_random=False))
def test_untagged_frames_survive_any_split(frames: list[Frame], rnd: random.Random) -> None:
    wire = b"".join(encode_frame(frame.kind, frame.payload) for frame in frames)
    reader = FrameReader()
    received: list[Frame] = []
    for chunk in chunks(wire, rnd):
        reader.feed(chunk)
        received += read_all(reader, max_payload=300, tagger=None)
    assert received == frames
    assert len(reader) == 0


@given(frames=frames_strategy, rnd=st.randoms(use_true_random=False))
def test_tagged_frames_survive_any_split(frames: list[Frame], rnd: random.Random) -> None:
    sender = FrameTagger(KEY)
    wire = b"".join(encode_frame(frame.kind, frame.payload, sender) for frame in frames)
    reader = FrameReader()
    receiver = FrameTagger(KEY)
    received: list[Frame] = []
    for chunk in chunks(wire, rnd):
        reader.feed(chunk)
        received += read_all(reader, max_payload=300, tagger=receiver)
    assert received == frames
    assert receiver.sequence == sender.sequence == len(frames)


def test_reader_waits_for_a_whole_frame() -> None:
    wire = encode_frame(FrameKind.DATA, b"hello", FrameTagger(KEY))
    reader = FrameReader()
    tagger = FrameTagger(KEY)
    reader.feed(wire[:-1])
    assert reader.next_frame(max_payload=10, tagger=tagger) is None
    assert len(reader) == len(wire) - 1
    # Waiting must not consume a sequence number.
    assert tagger.sequence == 0
    reader.feed(wire[-1:])
    assert reader.next_frame(max_payload=10, tagger=tagger) == Frame(
        kind=FrameKind.DATA, payload=b"hello"
    )
    assert len(reader) == 0


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 101))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_frame(max_payload=100, tagger=None)


def test_frame_at_the_limit_is_accepted() -> None:
    reader = FrameReader()
    reader.feed(encode_header(FrameKind.DATA, 100))
    assert reader.next_frame(max_payload=100, tagger=None) is None
    reader.feed(b"x" * 100)
    assert reader.next_frame(max_payload=100, tagger=None) == Frame(
        kind=FrameKind.DATA, payload=b"x" * 100
    )


def test_tag_is_hmac_over_sequence_header_and_payload() -> None:
    tagger = FrameTagger(KEY)
    header = encode_header(FrameKind.CONTROL, 3)
    for sequence in range(3):
        expected = hmac.new(
            KEY, sequence.to_bytes(8, "big") + header + b"abc", hashlib.sha256
        ).digest()
        assert tagger.tag(header, b"abc") == expected
    assert tagger.sequence == 3


def test_tag_for_the_wrong_sequence_number_is_refused() -> None:
    sender = FrameTagger(KEY)
    first = encode_frame(FrameKind.CONTROL, b"one", sender)
    second = encode_frame(FrameKind.CONTROL, b"two", sender)
    reader = FrameReader()
    reader.feed(second + first)
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=10, tagger=FrameTagger(KEY))


def test_tag_under_another_key_is_refused() -> None:
    reader = FrameReader()
    reader.feed(encode_frame(FrameKind.DATA, b"x", FrameTagger(b"other key")))
    with pytest.raises(RemoteProtocolError, match="integrity"):
        reader.next_frame(max_payload=10, tagger=FrameTagger(KEY))


def test_untagged_frame_read_as_tagged_waits_for_its_missing_tag() -> None:
    reader = FrameReader()
    reader.feed(encode_frame(FrameKind.DATA, b"x"))
    assert reader.next_frame(max_payload=10, tagger=FrameTagger(KEY)) is None


def test_many_frames_across_large_uneven_reads() -> None:
    rnd = random.Random(1)
    payloads = [rnd.randbytes(rnd.randint(0, 5000)) for _ in range(200)]
    wire = b"".join(encode_frame(FrameKind.DATA, payload) for payload in payloads)
    reader = FrameReader()
    received: list[bytes] = []
    # Reads that end mid-header, mid-payload and exactly at frame boundaries.
    for chunk in chunks(wire, rnd, max_chunk=100_000):
        reader.feed(chunk)
        received += [f.payload for f in read_all(reader, max_payload=5000, tagger=None)]
    assert received == payloads
    assert len(reader) == 0
