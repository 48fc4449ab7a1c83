"""How the sender groups small files: bounded data, file count and Put size."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from sbs_core.messages import Put, PutFile, encode_message
from sbs_core.sync import engine
from sbs_core.sync.scan import FileStat
from sbs_core.wire.frames import DEFAULT_MAX_FRAME

Candidate = tuple[str, FileStat, str | None]


def candidates(lengths: list[int], size: int) -> list[Candidate]:
    out: list[Candidate] = []
    for i, length in enumerate(lengths):
        stem = f"{i:06d}"
        path = stem + "x" * max(0, length - len(stem))
        out.append((path, FileStat(path=path, size=size, mtime_ns=0, ino=i), None))
    return out


def batches_of(files: list[Candidate]) -> list[list[Candidate]]:
    """``files`` as the sender groups them, one candidate after the other."""
    batcher = engine._Batcher()
    batches = [batch for item in files if (batch := batcher.add(item)) is not None]
    if (rest := batcher.rest()) is not None:
        batches.append(rest)
    return batches


def put_of(batch: list[Candidate]) -> bytes:
    return encode_message(
        Put(
            session=1,
            files=tuple(
                PutFile(root="folder:" + "r" * 500, path=p, size=st_.size, mtime_ns=2**62)
                for p, st_, _ in batch
            ),
        )
    )


def test_the_longest_paths_still_give_puts_that_fit_one_frame() -> None:
    files = candidates([4096] * 5000, size=1)
    batches = batches_of(files)

    assert [c for b in batches for c in b] == files  # every file once, in order
    assert max(len(put_of(b)) for b in batches) < DEFAULT_MAX_FRAME
    assert len(batches) > 1


def test_small_files_with_short_names_fill_a_batch_up_to_its_file_count() -> None:
    # The first batches ramp up (the receiver starts early), then stay at the cap.
    ramp = []
    most = engine.FIRST_BATCH_FILES
    while most < engine.BATCH_FILES:
        ramp.append(most)
        most *= 2
    files = candidates([20] * (sum(ramp) + 2 * engine.BATCH_FILES + 1), size=100)
    batches = batches_of(files)

    assert ramp[0] < engine.BATCH_FILES
    assert [len(b) for b in batches] == [*ramp, engine.BATCH_FILES, engine.BATCH_FILES, 1]
    assert [c for b in batches for c in b] == files


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 4096), min_size=1, max_size=300),
    size=st.integers(0, engine.SMALL),
)
def test_every_batch_respects_every_bound(lengths: list[int], size: int) -> None:
    batches = batches_of(candidates(lengths, size))

    assert sum(len(b) for b in batches) == len(lengths)
    for batch in batches:
        names = sum(len(p) + engine.PUT_FILE_OVERHEAD for p, _, _ in batch)
        data = sum(s.size for _, s, _ in batch)
        if len(batch) > 1:  # a lone file may exceed a bound: it has to go somehow
            assert len(batch) <= engine.BATCH_FILES
            assert names <= engine.BATCH_NAMES
            assert data <= engine.BATCH_BYTES


# --- the receiver's side: a held batch cut into its files


@settings(max_examples=300)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=120_000), max_size=10),
)
def test_held_frames_are_cut_into_each_files_exact_bytes(sizes: list[int], cuts: list[int]) -> None:
    # Frames as the wire splits the batch's data: anywhere, empty ones included.
    data = bytes(i % 251 for i in range(sum(sizes)))
    edges = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    frames = [data[a:b] for a, b in itertools.pairwise(edges)]
    frames[len(frames) // 2 : len(frames) // 2] = [b""]

    pieces = [bytes(p) for p in engine._cut(frames, sizes)]

    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert pieces == [data[a : a + n] for a, n in zip(starts, sizes, strict=True)]


@settings(max_examples=300)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=120_000), max_size=10),
)
def test_held_frames_opened_one_after_the_other_into_one_buffer_cut_the_same(
    sizes: list[int], cuts: list[int]
) -> None:
    # As the receiver opens a held batch: every frame into the same buffer,
    # each overwriting the one before as soon as the next piece is asked for.
    data = bytes(i % 251 for i in range(sum(sizes)))
    edges = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    frames = [data[a:b] for a, b in itertools.pairwise(edges)]
    buffer = bytearray(max(map(len, frames), default=0))

    def opened() -> Iterator[memoryview]:
        for frame in frames:
            buffer[:] = bytes(len(buffer))  # what the frame before left is gone
            payload = memoryview(buffer)[: len(frame)]
            payload[:] = frame
            yield payload

    pieces = [bytes(p) for p in engine._cut(opened(), sizes)]

    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert pieces == [data[a : a + n] for a, n in zip(starts, sizes, strict=True)]
