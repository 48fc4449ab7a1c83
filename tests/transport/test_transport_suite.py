"""One suite for every transport, then what only TCP or only the memory network has.

Every test of the first part runs once over real TCP on loopback and once over
a :class:`MemoryNetwork`: a driver tested on the memory network meets the same
behaviour on TCP.
"""

from __future__ import annotations

import errno
import math
import random
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import NamedTuple, Protocol

import anyio
import pytest
from anyio.abc import ByteStream, Listener, SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream

from sbs_core.transport import MemoryNetwork, TcpTransport, Transport
from sbs_core.transport.tcp import READ_AHEAD

pytestmark = pytest.mark.asyncio

# Linux answers on the whole of 127.0.0.0/8, so each role gets its own address.
SERVER = "127.0.0.1"
CLIENT = "127.0.0.2"
OTHER = "127.0.0.3"
TIMEOUT = 10.0


class Network(Protocol):
    def transport(self, host: str) -> Transport: ...


class TcpNetwork:
    """The machine's own TCP stack, which every loopback address shares."""

    def __init__(self, transport: TcpTransport | None = None) -> None:
        self._transport = transport or TcpTransport()

    def transport(self, host: str) -> Transport:
        return self._transport


@pytest.fixture(params=["tcp", "memory"])
def network(request: pytest.FixtureRequest) -> Network:
    if request.param == "tcp":
        return TcpNetwork()
    return MemoryNetwork()


class Pair(NamedTuple):
    client: ByteStream
    server: ByteStream
    port: int


def port_of(listener: Listener[ByteStream]) -> int:
    port: int = listener.extra(SocketAttribute.local_port)
    return port


async def listen(network: Network, host: str = SERVER, port: int = 0) -> Listener[ByteStream]:
    return await network.transport(host).listen(host, port)


async def connect(network: Network, port: int, host: str = SERVER) -> ByteStream:
    return await network.transport(CLIENT).connect(host, port, local_host=CLIENT)


@asynccontextmanager
async def accepting(
    listener: Listener[ByteStream],
) -> AsyncIterator[MemoryObjectReceiveStream[ByteStream]]:
    """Serve ``listener``, handing out each accepted stream; close them all at the end."""
    accepted: list[ByteStream] = []
    send, receive = anyio.create_memory_object_stream[ByteStream](math.inf)

    async def hand_out(stream: ByteStream) -> None:
        accepted.append(stream)
        send.send_nowait(stream)

    with send, receive:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, hand_out)
                yield receive
                tg.cancel_scope.cancel()
        finally:
            for stream in accepted:
                await anyio.aclose_forcefully(stream)


@asynccontextmanager
async def connection(network: Network) -> AsyncIterator[Pair]:
    """A stream from CLIENT to SERVER, with both of its ends."""
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(await listen(network))
        accepted = await stack.enter_async_context(accepting(listener))
        client = await connect(network, port_of(listener))
        stack.push_async_callback(anyio.aclose_forcefully, client)
        yield Pair(client, await accepted.receive(), port_of(listener))


async def echo(stream: ByteStream) -> None:
    async with stream:
        async for chunk in stream:
            await stream.send(chunk)
        await stream.send_eof()


async def receive_exactly(stream: ByteStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return bytes(data)


async def receive_until_eof(stream: ByteStream) -> bytes:
    data = bytearray()
    async for chunk in stream:
        data += chunk
    return bytes(data)


async def send_until_it_fails(stream: ByteStream) -> None:
    # TCP learns of the peer's close only when its first write draws a reset.
    while True:
        await stream.send(b"x" * 1024)
        await anyio.sleep(0.01)


# --- every transport ------------------------------------------------------------


async def test_connect_and_echo_both_ways(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.send(b"ping")
            assert await receive_exactly(pair.server, 4) == b"ping"
            await pair.server.send(b"pong!")
            assert await receive_exactly(pair.client, 5) == b"pong!"


async def test_both_ends_know_both_addresses(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            server_remote = pair.server.extra(SocketAttribute.remote_address)
            client_local = pair.client.extra(SocketAttribute.local_address)
            assert server_remote == client_local
            assert server_remote[0] == CLIENT
            assert pair.client.extra(SocketAttribute.remote_address) == (SERVER, pair.port)
            assert pair.server.extra(SocketAttribute.local_address) == (SERVER, pair.port)


async def test_port_zero_picks_a_free_port(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as first, await listen(network) as second:
            assert port_of(first) != 0
            assert port_of(second) not in (0, port_of(first))
            assert first.extra(SocketAttribute.local_address) == (SERVER, port_of(first))


async def test_ten_mebibytes_arrive_intact_while_echoed(network: Network) -> None:
    payload = random.Random(10).randbytes(10 * 2**20)
    with anyio.fail_after(30):
        async with await listen(network) as listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with await connect(network, port_of(listener)) as client:

                async def send_all() -> None:
                    await client.send(payload)
                    await client.send_eof()

                async with anyio.create_task_group() as sending:
                    sending.start_soon(send_all)
                    echoed = await receive_until_eof(client)
            tg.cancel_scope.cancel()
    assert len(echoed) == len(payload)
    assert echoed == payload


async def test_both_ends_send_a_lot_at_once_without_deadlock(network: Network) -> None:
    rng = random.Random(4)
    upstream, downstream = rng.randbytes(4 * 2**20), rng.randbytes(4 * 2**20)
    received: dict[str, bytes] = {}

    async def send_then_eof(stream: ByteStream, data: bytes) -> None:
        await stream.send(data)
        await stream.send_eof()

    async def collect(stream: ByteStream, key: str) -> None:
        received[key] = await receive_until_eof(stream)

    with anyio.fail_after(30):
        async with connection(network) as pair, anyio.create_task_group() as tg:
            tg.start_soon(send_then_eof, pair.client, upstream)
            tg.start_soon(send_then_eof, pair.server, downstream)
            tg.start_soon(collect, pair.server, "server")
            tg.start_soon(collect, pair.client, "client")
    assert received["server"] == upstream
    assert received["client"] == downstream


async def test_receive_never_returns_more_than_max_bytes(network: Network) -> None:
    rng = random.Random(7)
    payload = rng.randbytes(200_000)
    pieces: list[bytes] = []
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.send(payload)
            received = 0
            while received < len(payload):
                max_bytes = rng.choice([1, 7, 1000, 65536, 100_000])
                piece = await pair.server.receive(max_bytes)
                assert 0 < len(piece) <= max_bytes
                pieces.append(piece)
                received += len(piece)
    assert b"".join(pieces) == payload


async def test_send_eof_ends_the_peers_receive_but_not_its_send(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.send(b"last words")
            await pair.client.send_eof()
            assert await receive_until_eof(pair.server) == b"last words"
            with pytest.raises(anyio.EndOfStream):
                await pair.server.receive()
            await pair.server.send(b"reply")
            assert await receive_exactly(pair.client, 5) == b"reply"


async def test_close_ends_the_peers_receive_and_then_its_send(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.aclose()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await pair.server.receive()
            with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError)):
                await send_until_it_fails(pair.server)
            with pytest.raises(anyio.ClosedResourceError):
                await pair.client.receive()
            with pytest.raises(anyio.ClosedResourceError):
                await pair.client.send(b"too late")


async def test_a_stream_closed_with_data_unread_reads_no_more(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.send(b"never read")
            assert await pair.server.receive(5) == b"never"
            await pair.server.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await pair.server.receive()


async def test_connect_where_nobody_listens_is_refused(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as listener:
            # The same port on an address where nothing listens.
            with pytest.raises(ConnectionRefusedError):
                await connect(network, port_of(listener), host=OTHER)


async def test_listening_twice_on_one_address_fails(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as listener:
            with pytest.raises(OSError, match=r".") as info:
                await listen(network, port=port_of(listener))
            assert info.value.errno == errno.EADDRINUSE


async def test_one_port_on_two_addresses(network: Network) -> None:
    """Both nodes of a pair on one machine use the same port on their own address."""
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as first:
            port = port_of(first)
            async with (
                await listen(network, host=OTHER, port=port) as second,
                accepting(first) as on_first,
                accepting(second) as on_second,
                await connect(network, port) as to_first,
                await connect(network, port, host=OTHER) as to_second,
            ):
                at_first = await on_first.receive()
                at_second = await on_second.receive()
                assert at_first.extra(SocketAttribute.local_address) == (SERVER, port)
                assert at_second.extra(SocketAttribute.local_address) == (OTHER, port)
                await to_second.send(b"2")
                assert await receive_exactly(at_second, 1) == b"2"
                await to_first.send(b"1")
                assert await receive_exactly(at_first, 1) == b"1"


async def test_a_restarted_node_listens_again_on_its_port(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as listener:
            port = port_of(listener)
            async with accepting(listener) as accepted, await connect(network, port) as client:
                server = await accepted.receive()
                # Closing first leaves the listening side's port in TIME_WAIT.
                await server.aclose()
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await client.receive()
        async with (
            await listen(network, port=port) as listener,
            accepting(listener) as accepted,
            await connect(network, port) as client,
        ):
            await client.send(b"back")
            assert await receive_exactly(await accepted.receive(), 4) == b"back"


async def test_twenty_concurrent_connections_each_echo(network: Network) -> None:
    echoed: dict[int, bytes] = {}
    messages = {number: f"client {number};".encode() * 1000 for number in range(20)}

    async def talk(port: int, number: int) -> None:
        async with await connect(network, port) as stream:
            await stream.send(messages[number])
            await stream.send_eof()
            echoed[number] = await receive_until_eof(stream)

    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with anyio.create_task_group() as clients:
                for number in messages:
                    clients.start_soon(talk, port_of(listener), number)
            tg.cancel_scope.cancel()
    assert echoed == messages


async def test_a_closed_listener_refuses_but_its_streams_live_on(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = await listen(network)
        port = port_of(listener)
        async with accepting(listener) as accepted, await connect(network, port) as client:
            server = await accepted.receive()
            await listener.aclose()
            with pytest.raises(ConnectionRefusedError):
                await connect(network, port)
            await client.send(b"still here")
            assert await receive_exactly(server, 10) == b"still here"


async def test_serve_returns_once_the_listener_closes_and_handlers_finish(
    network: Network,
) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = await listen(network)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with await connect(network, port_of(listener)) as client:
                await client.send(b"a")
                assert await receive_exactly(client, 1) == b"a"
                await listener.aclose()
                await client.send(b"b")
                assert await receive_exactly(client, 1) == b"b"
                await client.send_eof()
                assert await receive_until_eof(client) == b""


async def test_serve_on_a_closed_listener_returns_at_once(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = await listen(network)
        await listener.aclose()
        await listener.serve(echo)


async def test_a_connection_nobody_accepted_is_reset_when_the_listener_closes(
    network: Network,
) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = await listen(network)
        async with await connect(network, port_of(listener)) as client:
            await listener.aclose()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await client.receive()


async def test_send_takes_a_bytearray_and_keeps_what_it_held(network: Network) -> None:
    # The channel seals frames into fresh bytearrays; what arrives is what the
    # buffer held when send() was called, whatever happens to it afterwards.
    buffer = bytearray(random.Random(5).randbytes(300_000))
    sent = bytes(buffer)
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            await pair.client.send(buffer)  # type: ignore[arg-type]  # anyio says bytes
            buffer[:] = bytes(len(buffer))
            assert await receive_exactly(pair.server, len(sent)) == sent


async def test_receive_refuses_a_max_bytes_below_one(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            with pytest.raises(ValueError, match="max_bytes"):
                await pair.server.receive(0)


async def test_a_stream_allows_one_reader_at_a_time(network: Network) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair, anyio.create_task_group() as tg:
            tg.start_soon(pair.server.receive)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await pair.server.receive()
            await pair.client.send(b"x")


# --- TCP only -------------------------------------------------------------------


async def test_tcp_sockets_send_at_once_and_keep_alive() -> None:
    transport = TcpTransport(keepalive_idle_time=7, keepalive_interval=1.5, keepalive_count=4)
    with anyio.fail_after(TIMEOUT):
        async with connection(TcpNetwork(transport)) as pair:
            for stream in (pair.client, pair.server):
                sock = stream.extra(SocketAttribute.raw_socket)
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                if hasattr(socket, "TCP_KEEPIDLE"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


async def test_tcp_refusal_by_host_name_is_a_refusal() -> None:
    # "localhost" may name ::1 as well; dialled from an IPv4 address, only its
    # IPv4 address is tried, so nobody listening is a refusal, not a mix of errors.
    with anyio.fail_after(TIMEOUT):
        listener = await listen(TcpNetwork())
        port = port_of(listener)
        await listener.aclose()
        with pytest.raises(ConnectionRefusedError):
            await TcpTransport().connect("localhost", port, local_host=CLIENT)


async def test_tcp_refuses_keepalive_timings_that_are_not_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TcpTransport(keepalive_interval=0)


async def test_tcp_reads_ahead_of_its_reader_only_so_far() -> None:
    # A stream keeps reading while its reader is busy, but not without end: once
    # READ_AHEAD bytes wait unread it leaves the rest in the kernel, and the sender
    # stops. Without that bound the whole payload would be buffered here.
    payload = random.Random(12).randbytes(64 * 2**20)
    sent = 0

    async def send_all(stream: ByteStream) -> None:
        nonlocal sent
        for start in range(0, len(payload), 2**20):
            await stream.send(payload[start : start + 2**20])
            sent = start + 2**20

    with anyio.fail_after(30):
        async with connection(TcpNetwork()) as pair, anyio.create_task_group() as tg:
            tg.start_soon(send_all, pair.client)
            stalled_at = -1
            while stalled_at != sent:
                stalled_at = sent
                await anyio.sleep(0.3)
            sock = pair.server.extra(SocketAttribute.raw_socket)
            kernel = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + pair.client.extra(
                SocketAttribute.raw_socket
            ).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert 0 < stalled_at <= READ_AHEAD + kernel + 2**20
            received = await receive_exactly(pair.server, len(payload))
    assert sent == len(payload)
    assert received == payload


# --- memory network only --------------------------------------------------------


async def test_memory_connections_come_from_the_transports_host() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with await listen(network) as listener, accepting(listener) as accepted:
            transport = network.transport(OTHER)
            async with await transport.connect(SERVER, port_of(listener)) as client:
                server = await accepted.receive()
                assert server.extra(SocketAttribute.remote_address)[0] == OTHER
                assert client.extra(SocketAttribute.local_address)[0] == OTHER


async def test_memory_transport_uses_only_its_own_address() -> None:
    transport = MemoryNetwork().transport(CLIENT)
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(OSError, match=r".") as listening:
            await transport.listen(SERVER, 0)
        assert listening.value.errno == errno.EADDRNOTAVAIL
        with pytest.raises(OSError, match=r".") as connecting:
            await transport.connect(SERVER, 4445, local_host=OTHER)
        assert connecting.value.errno == errno.EADDRNOTAVAIL


async def test_partition_makes_the_peer_unreachable_and_holds_traffic() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            network.partition(SERVER, CLIENT)
            assert network.is_partitioned(CLIENT, SERVER)
            with pytest.raises(OSError, match=r".") as info:
                await connect(network, pair.port)
            assert info.value.errno == errno.EHOSTUNREACH
            assert not isinstance(info.value, ConnectionRefusedError)

            await pair.client.send(b"held")
            with anyio.move_on_after(0.1) as waiting:
                await pair.server.receive()
            assert waiting.cancelled_caught

            network.heal(CLIENT, SERVER)
            assert await receive_exactly(pair.server, 4) == b"held"
            async with await connect(network, pair.port) as again:
                await again.send(b"ok")


async def test_partition_leaves_other_hosts_alone() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            network.partition(CLIENT, OTHER)
            await pair.client.send(b"fine")
            assert await receive_exactly(pair.server, 4) == b"fine"
            async with await network.transport(OTHER).connect(SERVER, pair.port) as other:
                await other.send(b"fine too")


async def test_partition_holds_a_close_until_healed() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            network.partition(SERVER, CLIENT)
            await pair.client.aclose()
            with anyio.move_on_after(0.1) as waiting:
                await pair.server.receive()
            assert waiting.cancelled_caught
            with anyio.move_on_after(0.1) as waiting:
                await send_until_it_fails(pair.server)
            assert waiting.cancelled_caught

            network.heal(SERVER, CLIENT)
            with pytest.raises(anyio.EndOfStream):
                await pair.server.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await pair.server.send(b"gone")


async def test_a_receive_waiting_out_a_partition_sees_its_own_close() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            network.partition(SERVER, CLIENT)
            await pair.client.send(b"held")

            async def receive_after_close() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await pair.server.receive()

            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_after_close)
                await anyio.wait_all_tasks_blocked()
                await pair.server.aclose()


async def test_break_connections_resets_every_stream_of_the_host() -> None:
    network = MemoryNetwork()

    async def expect_reset(stream: ByteStream) -> None:
        with pytest.raises(anyio.BrokenResourceError):
            await stream.receive()

    with anyio.fail_after(TIMEOUT):
        async with (
            connection(network) as pair,
            await network.transport(OTHER).connect(SERVER, pair.port) as bystander,
        ):
            async with anyio.create_task_group() as tg:
                tg.start_soon(expect_reset, pair.server)
                tg.start_soon(expect_reset, pair.client)
                await anyio.wait_all_tasks_blocked()
                network.break_connections(CLIENT)
            for stream in (pair.client, pair.server):
                with pytest.raises(anyio.BrokenResourceError):
                    await stream.send(b"x")
                with pytest.raises(anyio.BrokenResourceError):
                    await stream.receive()

            await bystander.send(b"unharmed")
            async with await connect(network, pair.port) as again:
                await again.send(b"listeners stay open")


async def test_break_connections_wakes_a_blocked_sender() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:

            async def send_too_much() -> None:
                with pytest.raises(anyio.BrokenResourceError):
                    await pair.client.send(bytes(4 * 2**20))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send_too_much)
                await anyio.wait_all_tasks_blocked()
                network.break_connections(SERVER)


async def test_break_connections_acts_through_a_partition() -> None:
    network = MemoryNetwork()
    with anyio.fail_after(TIMEOUT):
        async with connection(network) as pair:
            network.partition(SERVER, CLIENT)
            await pair.client.send(b"held")

            async def expect_reset() -> None:
                with pytest.raises(anyio.BrokenResourceError):
                    await pair.server.receive()

            async with anyio.create_task_group() as tg:
                tg.start_soon(expect_reset)
                await anyio.wait_all_tasks_blocked()
                network.break_connections(CLIENT)


async def test_a_host_cannot_be_partitioned_from_itself() -> None:
    with pytest.raises(ValueError, match="itself"):
        MemoryNetwork().partition(SERVER, SERVER)
