"""Coverage-guided fuzzing (atheris, libFuzzer) of what a peer's bytes meet first.

Not a pytest module: it runs until stopped or for ``-runs=N`` inputs, e.g.
``.venv/bin/python tests/fuzz/atheris_wire.py -runs=200000 -max_len=4096``.
Each input is, by its first byte, either a byte stream fed (in pieces) to the
responder of a handshake, a stream of sealed frames after genuine ones, or a
control payload offered as a message. The only exception allowed is
:class:`~sbs_core.errors.RemoteProtocolError`, with a short reason; anything
else is a crash, which libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

# Only our own code: instrumenting pydantic and cryptography too costs seconds at start-up.
with atheris.instrument_imports(include=["sbs_core"]):
    from sbs_core.errors import RemoteProtocolError
    from sbs_core.messages import decode_message, encode_message
    from sbs_core.wire import (
        NONCE_SIZE,
        FrameCipher,
        FrameKind,
        FrameReader,
        SecureChannel,
        encode_frame,
    )

SECRET = b"atheris secret"
KEY = bytes(range(32))
MAX_REASON = 250


def pieces(data: bytes, cuts: bytes) -> list[bytes]:
    out, at = [], 0
    for cut in cuts or b"\xff":
        step = cut % 64 + 1
        out.append(data[at : at + step])
        at += step
        if at >= len(data):
            break
    if at < len(data):
        out.append(data[at:])
    return out


def handshake_stream(data: bytes, cuts: bytes) -> None:
    channel = SecureChannel(SECRET, initiator=False, nonce=b"r" * NONCE_SIZE)
    for piece in pieces(data, cuts):
        channel.receive_data(piece)
    channel.receive_data(None)
    if channel.authenticated:
        raise AssertionError("a stranger passed the handshake")


def sealed_stream(data: bytes, cuts: bytes) -> None:
    sender, receiver = FrameCipher(KEY), FrameCipher(KEY)
    genuine = encode_frame(FrameKind.CONTROL, b'{"type":"x"}', sender)
    reader = FrameReader()
    got = []
    for piece in [genuine, *pieces(data, cuts)]:
        reader.feed(piece)
        while frame := reader.next_frame(max_payload=1 << 16, cipher=receiver):
            got.append(frame)
    if len(got) != 1:
        raise AssertionError(f"{len(got) - 1} forged frames were opened")


def message(data: bytes) -> None:
    decoded = decode_message(data)
    if decode_message(encode_message(decoded)) != decoded:
        raise AssertionError(f"{decoded!r} does not survive its round trip")


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    mode = provider.ConsumeIntInRange(0, 2)
    cuts = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 16))
    body = provider.ConsumeBytes(len(data))
    try:
        if mode == 0:
            handshake_stream(body, cuts)
        elif mode == 1:
            sealed_stream(body, cuts)
        else:
            message(body)
    except RemoteProtocolError as exc:
        if len(str(exc)) > MAX_REASON:
            raise AssertionError(f"a reason of {len(str(exc))} characters") from None


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
