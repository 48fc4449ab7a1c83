"""A slow disk at the moment the primary saves its state: does its peer take it for dead?

Each change of role, epoch or active sentinels is saved with an ``fsync``. On a
disk busy with another program's writes, one fsync can wait seconds. Every
round starts a fresh pair of ``sbs run`` processes (``lab.Pair``: a on
127.0.0.1, b on 127.0.0.2, heartbeat 0.2 s, dead_time 1 s), lets another
process write ``--gigabytes`` to the same file system and ``fsync`` it, and,
while that fsync runs, stops a sentinel on the primary with ``sbs sentinels
stop``. For 10 s after, both nodes' status is read every 0.2 s. Printed per
round: how long the command took, the primary's longest event-loop stall
(``loop_longest_stall``), every (role, epoch) pair the two nodes showed (one
line means no takeover), and whether the sentinel is stopped and b knows it.

Usage: ``python bench/slow_disk.py [--rounds N] [--gigabytes G] [--workdir DIR]``.
Needs ``G`` GB free in ``DIR`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import load_line, machine_line, revision

from sbs_core.lab import NodeProcess, Pair

WATCH = 10.0  # seconds the pair is watched after the command
POLL = 0.2
START_TIMEOUT = 20.0

# Writes through the page cache, says "fsync" and syncs: the other program.
_WRITER = """
import os, sys
block = os.urandom(1 << 20)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(block)
    print("fsync", flush=True)
    os.fsync(f.fileno())
"""


def role_of(node: NodeProcess) -> tuple[str, int] | None:
    st = node.status(timeout=3)
    return None if st is None else (st["role"], st["epoch"])


def one_round(workdir: Path, index: int, megabytes: int) -> str:
    with Pair(Path(tempfile.mkdtemp(prefix=f"slow-disk-{index}-", dir=workdir))) as pair:
        a, b = pair.a, pair.b
        a.start()
        a.wait_for("primary", lambda st: st["role"] == "primary", timeout=START_TIMEOUT)
        b.start()
        b.wait_for(
            "a connected secondary",
            lambda st: st["role"] == "secondary" and st["peer_connected"],
            timeout=START_TIMEOUT,
        )
        big = pair.root / "other-program.bin"
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(big), str(megabytes)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            if writer.stdout.readline().strip() != "fsync":
                raise SystemExit("the writer failed")
            began = time.monotonic()
            done = a.sbs("sentinels", "stop", "spooler")
            took = time.monotonic() - began
            seen: set[tuple[object, ...]] = set()
            end = time.monotonic() + WATCH
            while time.monotonic() < end:
                ra, rb = role_of(a), role_of(b)
                if ra is not None and rb is not None:
                    seen.add((*ra, *rb))
                time.sleep(POLL)
            writer.wait(timeout=300)
            synced = time.monotonic() - began
        finally:
            writer.kill()
            writer.wait()
            big.unlink(missing_ok=True)
        sa, sb = a.status(), b.status()
        assert sa is not None
        assert sb is not None
        shown = ", ".join(f"a {r} {e} / b {r2} {e2}" for r, e, r2, e2 in sorted(seen))
        return (
            f"round {index}: `sbs sentinels stop` exit {done.returncode} in {took:.2f} s; "
            f"the other program's fsync ended {synced:.1f} s after it began; "
            f"a's longest loop stall {sa['loop_longest_stall']:.3f} s; "
            f"roles seen: {shown} ({'no takeover' if len(seen) == 1 else 'TAKEOVER'}); "
            f"a runs {sa['active_sentinels']}, b's list {sb['sentinels']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gigabytes", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sbs-slow-disk-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{machine_line()}; {revision()}; {load_line()}")
    for index in range(1, args.rounds + 1):
        print(one_round(workdir, index, int(args.gigabytes * 1024)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
