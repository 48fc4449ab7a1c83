"""A data frame changed on the way is caught where it is opened: nothing of it is used.

The receiver opens data frames in the thread that writes them (see
test_loop_stays_free), after the channel has moved on to later frames. A frame
that fails its check there must still cost the connection, as one the channel
opens itself does, and the replication must recover on the next one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, Listener, TaskGroup
from memorypair import A_HOST, B_HOST, make_node, start_pair, tree

from sbs_core.sync.direct import MIN_SIZE
from sbs_core.transport import MemoryNetwork
from sbs_core.transport.base import Transport

LARGE_SEND = 100_000  # larger than any control frame here: a send this large is a data frame
FIRST_FILES = 64  # a cycle's first batch (sync.engine.FIRST_BATCH_FILES)


class Tamperer:
    """Flips one byte in the middle of the first large send after ``skip`` others."""

    def __init__(self, skip: int = 0) -> None:
        self.done = False
        self.skip = skip

    def change(self, item: bytes) -> bytes:
        if self.done or len(item) < LARGE_SEND:
            return item
        if self.skip:
            self.skip -= 1
            return item
        self.done = True
        changed = bytearray(item)
        changed[len(changed) // 2] ^= 0x5A
        return bytes(changed)


class TamperedStream(ByteStream):
    def __init__(self, inner: ByteStream, tamperer: Tamperer) -> None:
        self._inner = inner
        self._tamperer = tamperer

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._inner.send(self._tamperer.change(item))

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


class TamperedListener(Listener[ByteStream]):
    def __init__(self, inner: Listener[ByteStream], tamperer: Tamperer) -> None:
        self._inner = inner
        self._tamperer = tamperer

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        async def tampered(stream: ByteStream) -> None:
            await handler(TamperedStream(stream, self._tamperer))

        await self._inner.serve(tampered, task_group)

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


class TamperingTransport:
    """A node's transport whose outgoing bytes pass a :class:`Tamperer` first."""

    def __init__(self, inner: Transport, tamperer: Tamperer) -> None:
        self._inner = inner
        self._tamperer = tamperer

    async def connect(self, host: str, port: int, *, local_host: str | None = None) -> ByteStream:
        stream = await self._inner.connect(host, port, local_host=local_host)
        return TamperedStream(stream, self._tamperer)

    async def listen(self, host: str, port: int) -> Listener[ByteStream]:
        return TamperedListener(await self._inner.listen(host, port), self._tamperer)


async def replicate_through(
    tmp_path: Path, tamperer: Tamperer, originals: dict[str, bytes]
) -> list[str]:
    """Replicate ``originals`` from a, whose sends pass ``tamperer``, until b holds them.

    Returns the files b ever showed with other bytes than their original's.
    """
    src = tmp_path / "a" / "data"
    dst = tmp_path / "b" / "data"
    src.mkdir(parents=True)
    for name, data in originals.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    network = MemoryNetwork()
    a = make_node(
        tmp_path,
        network,
        "a",
        A_HOST,
        B_HOST,
        transport=TamperingTransport(network.transport(A_HOST), tamperer),
    )
    b = make_node(tmp_path, network, "b", B_HOST, A_HOST)
    wrong: list[str] = []
    async with anyio.create_task_group() as tg:
        await start_pair(tg, a, b)
        with anyio.fail_after(20):
            while not (dst.exists() and tree(dst) == originals == tree(src)):
                wrong += [p for p, data in tree(dst).items() if originals[p] != data]
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    return wrong


def assert_one_frame_changed_and_caught(
    tamperer: Tamperer, wrong: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The frame was changed, b never showed a wrong byte, and it dropped the connection once."""
    assert tamperer.done
    assert wrong == []
    broke = [r.getMessage() for r in caplog.records if "broke the protocol" in r.getMessage()]
    assert broke == [f"peer {A_HOST} broke the protocol: frame failed its integrity check"]


@pytest.mark.anyio
async def test_a_data_frame_changed_on_the_way_costs_the_connection_and_the_next_one_carries_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    originals = {f"big{i}.bin": os.urandom(MIN_SIZE * 3 + i) for i in range(2)}
    tamperer = Tamperer()
    caplog.set_level(logging.WARNING, logger="sbs")

    wrong = await replicate_through(tmp_path, tamperer, originals)

    assert_one_frame_changed_and_caught(tamperer, wrong, caplog)
    # The secondary takes a connection it dropped for a lost primary, as it does
    # when the channel itself finds a forged frame: it takes over, and the pair
    # settles it as a split brain. Nothing is lost either way.
    assert any("protocol error: frame failed" in r.getMessage() for r in caplog.records)
    assert tree(tmp_path / "a" / "data") == originals


@pytest.mark.anyio
async def test_a_changed_frame_inside_a_held_batch_of_small_files_costs_the_connection_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The first batch (64 files of 20-30 KB, in new folders) comes in two data
    # frames, held until its Seal and then opened one at a time while its files
    # are written: the second is changed on the way, so files cut from the
    # first are written before the change is found. The connection goes, no
    # file ever shows a wrong byte, and nothing of the first try is left.
    originals = {f"d{i % 4}/f{i:03}.lab": os.urandom(20_000 + 157 * i) for i in range(FIRST_FILES)}
    tamperer = Tamperer(skip=1)
    caplog.set_level(logging.WARNING, logger="sbs")

    wrong = await replicate_through(tmp_path, tamperer, originals)

    assert_one_frame_changed_and_caught(tamperer, wrong, caplog)
    # Nothing of the first try is left behind: no temporary file, no hidden folder.
    dst = tmp_path / "b" / "data"
    assert sorted(p.name for p in dst.rglob("*") if p.is_file()) == sorted(
        Path(n).name for n in originals
    )
    assert not list(dst.rglob(".*"))
