"""The chaos fault proxy on real loopback sockets: an asyncio echo server, and a ZeroMQ
DEALER/ROUTER pair, behind it."""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq
import zmq.asyncio

from chaos.proxy import FaultProxy

pytestmark = pytest.mark.timeout(30)


class EchoServer:
    """Echoes every byte back; on EOF half-closes back. Counts connections it accepted."""

    def __init__(self):
        self.accepted = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.accepted += 1
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def close(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()


@pytest.fixture
async def echo():
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(echo):
    proxy = FaultProxy("127.0.0.1", echo.port, seed=7, name="test")
    await proxy.start()
    yield proxy
    await proxy.close()


async def connect(proxy: FaultProxy):
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(reader, writer, payload: bytes, timeout: float = 5.0) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)


def proxy_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("proxy")]


async def test_start_returns_the_bound_port(proxy):
    assert proxy.port > 0
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"hello") == b"hello"
    assert proxy.num_connections == 1
    writer.close()


async def test_bytes_round_trip_exactly_in_order_under_latency_jitter_and_loss(proxy):
    proxy.set_latency(0.005, jitter_s=0.01)
    proxy.set_loss(0.2, stall_s=0.02)
    payload = random.Random(1).randbytes(1 << 20)
    reader, writer = await connect(proxy)

    async def send():
        rng = random.Random(2)
        at = 0
        while at < len(payload):
            size = rng.randint(1, 16384)
            writer.write(payload[at : at + size])
            await writer.drain()
            at += size
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    await sender
    assert received == payload
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the half-close made it back
    writer.close()


async def test_latency_applies_to_both_directions(proxy):
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"warm") == b"warm"  # connected through
    proxy.set_latency(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await round_trip(reader, writer, b"ping") == b"ping"
    elapsed = loop.time() - started
    assert 0.4 - 1e-3 <= elapsed < 1.5  # 1 ms for the event loop's timer tolerance
    proxy.heal()
    started = loop.time()
    assert await round_trip(reader, writer, b"pong") == b"pong"
    assert loop.time() - started < 0.2
    writer.close()


async def test_heal_releases_chunks_still_waiting_out_a_delay(proxy):
    reader, writer = await connect(proxy)
    proxy.set_latency(5.0)
    proxy.set_loss(1.0, stall_s=5.0)
    writer.write(b"slow")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(4), 0.1)
    proxy.heal()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"slow"
    assert await round_trip(reader, writer, b"fast") == b"fast"
    assert loop.time() - started < 1.0
    writer.close()


async def test_partition_holds_bytes_and_heal_lets_them_flow(proxy, echo):
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"warm") == b"warm"
    assert echo.accepted == 1
    proxy.partition()
    writer.write(b"held")
    await writer.drain()
    late_reader, late_writer = await connect(proxy)  # accepted, not connected through yet
    late_writer.write(b"late")
    await late_writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(4), 0.3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.read(4), 0.01)
    assert echo.accepted == 1
    assert proxy.num_connections == 2
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    assert await asyncio.wait_for(late_reader.readexactly(4), 5) == b"late"
    assert echo.accepted == 2
    writer.close()
    late_writer.close()


async def closed_or_reset(reader: asyncio.StreamReader) -> bool:
    """The peer's end is gone: EOF or a reset, within 5 s."""
    try:
        return await asyncio.wait_for(reader.read(100), 5) == b""
    except ConnectionResetError:
        return True


async def test_reset_kills_current_connections_and_new_ones_work(proxy):
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"warm") == b"warm"
    assert proxy.num_connections == 1
    proxy.reset()
    assert proxy.num_connections == 0
    assert await closed_or_reset(reader)
    writer.close()

    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"again") == b"again"
    assert proxy.num_connections == 1
    writer.close()


async def test_reset_during_a_partition_aborts_held_connections(proxy):
    proxy.partition()
    reader, writer = await connect(proxy)
    writer.write(b"held")
    await writer.drain()
    while proxy.num_connections < 1:  # the accept callback runs on the proxy's side
        await asyncio.sleep(0)
    proxy.reset()
    assert await closed_or_reset(reader)
    writer.close()
    proxy.heal()
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"fresh") == b"fresh"
    writer.close()


async def test_upstream_refusing_resets_the_client():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    proxy = FaultProxy("127.0.0.1", dead_port)
    await proxy.start()
    try:
        reader, writer = await connect(proxy)
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:
            data = b""
        assert data == b""
        writer.close()
    finally:
        await proxy.close()
    assert not proxy_tasks()


async def test_close_leaves_no_connections_or_tasks(echo):
    proxy = FaultProxy("127.0.0.1", echo.port, name="closing")
    await proxy.start()
    idle_reader, idle_writer = await connect(proxy)
    assert await round_trip(idle_reader, idle_writer, b"warm") == b"warm"
    proxy.set_latency(5.0)
    busy_reader, busy_writer = await connect(proxy)
    busy_writer.write(b"in flight")
    await busy_writer.drain()
    proxy.partition()
    held_reader, held_writer = await connect(proxy)
    while proxy.num_connections < 3:
        await asyncio.sleep(0)
    assert proxy_tasks()

    await proxy.close()
    assert proxy.num_connections == 0
    assert not proxy._tasks
    assert not proxy_tasks()
    for reader in (idle_reader, busy_reader, held_reader):
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:
            data = b""
        assert data == b""
    for writer in (idle_writer, busy_writer, held_writer):
        writer.close()
    with pytest.raises(OSError):
        await connect(proxy)
    await proxy.close()  # idempotent


async def recv(sock: zmq.asyncio.Socket, timeout_s: float) -> list[bytes] | None:
    if await sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        return await sock.recv_multipart()
    return None


async def test_zeromq_dealer_router_through_the_proxy_survive_a_reset():
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    router_port = router.bind_to_random_port("tcp://127.0.0.1")
    proxy = FaultProxy("127.0.0.1", router_port, seed=3, name="zmq")
    try:
        await proxy.start()
        proxy.set_latency(0.002, jitter_s=0.003)
        proxy.set_loss(0.1, stall_s=0.01)
        dealer.setsockopt(zmq.RECONNECT_IVL, 50)
        dealer.connect(f"tcp://127.0.0.1:{proxy.port}")

        for i in range(20):
            await dealer.send_multipart([b"req", str(i).encode()])
        for i in range(20):
            identity, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
            assert frames == [b"req", str(i).encode()]
            await router.send_multipart([identity, b"rep", str(i).encode()])
        for i in range(20):
            assert await asyncio.wait_for(dealer.recv_multipart(), 5) == [b"rep", str(i).encode()]
        assert proxy.num_connections == 1

        proxy.reset()
        assert proxy.num_connections == 0
        # ZeroMQ reconnects by itself; probe until one gets through, bounded.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        got = None
        probe = 0
        while got is None:
            assert loop.time() < deadline, "no message through the proxy after the reset"
            await dealer.send_multipart([b"probe", str(probe).encode()])
            probe += 1
            got = await recv(router, 0.1)
        assert got[1] == b"probe"
        assert proxy.num_connections == 1
        while await recv(router, 0.0) is not None:  # drop queued probes
            pass

        for i in range(10):
            await dealer.send_multipart([b"after", str(i).encode()])
        identity = None
        for i in range(10):
            identity, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
            while frames[0] == b"probe":  # stragglers from the probing loop
                identity, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
            assert frames == [b"after", str(i).encode()]
        await router.send_multipart([identity, b"back"])
        assert await asyncio.wait_for(dealer.recv_multipart(), 5) == [b"back"]
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()
        await proxy.close()
