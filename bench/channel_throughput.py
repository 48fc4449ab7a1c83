"""Channel throughput: how fast a pair of ``SecureChannel``s moves data frames in memory.

Two channels complete their handshake, then the initiator sends ``--total-mib``
of data frames of ``--frame-kib`` each and the responder receives them; no
socket is involved, so the figures are the cost of the framing and the frame
protection alone, on one core. Send time covers ``send_data`` and
``data_to_send``; receive time covers ``receive_data`` and ``events``. With
``--read-kib`` the wire bytes of each frame reach the receiver in reads of that
size, as a socket would return them (the slicing, like a socket's reads, is
counted in the receive time); by default each frame arrives in one read.

Usage: ``python bench/channel_throughput.py [--total-mib 512] [--frame-kib 1024]
[--read-kib 0] [--runs 3]``. The best run is reported, as the one least
disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sbs_core.wire import NONCE_SIZE, Authenticated, DataReceived, SecureChannel

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    """The timings of one pass of every frame through the pair."""

    payload_bytes: int
    send_time: float
    receive_time: float

    def rate(self, seconds: float) -> float:
        """Payload GiB per second over ``seconds``."""
        return self.payload_bytes / GIB / seconds

    @property
    def both_time(self) -> float:
        return self.send_time + self.receive_time


def open_pair(secret: bytes, max_frame: int) -> tuple[SecureChannel, SecureChannel]:
    initiator = SecureChannel(
        secret, initiator=True, nonce=os.urandom(NONCE_SIZE), max_frame=max_frame
    )
    responder = SecureChannel(
        secret, initiator=False, nonce=os.urandom(NONCE_SIZE), max_frame=max_frame
    )
    # Three exchanges cover challenge, initiator proof and responder proof.
    for _ in range(3):
        responder.receive_data(initiator.data_to_send())
        initiator.receive_data(responder.data_to_send())
    for channel in (initiator, responder):
        if list(channel.events()) != [Authenticated()]:
            raise RuntimeError("the handshake did not complete")
    return initiator, responder


def one_run(frames: int, payload: bytes, read_size: int) -> Run:
    sender, receiver = open_pair(os.urandom(32), len(payload))
    send_time = receive_time = 0.0
    received = 0
    clock = time.perf_counter
    for _ in range(frames):
        began = clock()
        sender.send_data(payload)
        wire = sender.data_to_send()
        sent = clock()
        if read_size:
            for start in range(0, len(wire), read_size):
                receiver.receive_data(wire[start : start + read_size])
        else:
            receiver.receive_data(wire)
        for event in receiver.events():
            if isinstance(event, DataReceived):
                received += len(event.payload)
        done = clock()
        send_time += sent - began
        receive_time += done - sent
    if received != frames * len(payload):
        raise RuntimeError(f"received {received} payload bytes of {frames * len(payload)}")
    return Run(payload_bytes=received, send_time=send_time, receive_time=receive_time)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--total-mib", type=int, default=512, help="payload sent per run")
    parser.add_argument("--frame-kib", type=int, default=1024, help="payload per data frame")
    parser.add_argument(
        "--read-kib", type=int, default=0, help="size of the receiver's reads (0: a frame a read)"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.total_mib, args.frame_kib, args.runs) < 1 or args.read_kib < 0:
        parser.error("sizes and --runs must be positive (--read-kib may be 0)")
    frame_size = args.frame_kib * 1024
    frames = args.total_mib * 1024 * 1024 // frame_size
    # One payload for every frame: the protection's cost does not depend on the content.
    payload = os.urandom(frame_size)
    print(
        f"{frames} data frames of {args.frame_kib} KiB"
        f" ({frames * frame_size / GIB:.2f} GiB) per run, reads of"
        f" {f'{args.read_kib} KiB' if args.read_kib else 'one frame'};"
        f" Python {platform.python_version()} on {platform.machine()}"
    )
    runs = []
    for number in range(1, args.runs + 1):
        run = one_run(frames, payload, args.read_kib * 1024)
        runs.append(run)
        print(
            f"run {number}: send {run.rate(run.send_time):.2f} GiB/s,"
            f" receive {run.rate(run.receive_time):.2f} GiB/s,"
            f" send+receive {run.rate(run.both_time):.2f} GiB/s"
        )
    best = min(runs, key=lambda run: run.both_time)
    print(
        f"best: send+receive {best.rate(best.both_time):.2f} GiB/s"
        f" (send {best.rate(best.send_time):.2f}, receive {best.rate(best.receive_time):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
