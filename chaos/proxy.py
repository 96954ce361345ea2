"""An asyncio TCP fault proxy for chaos runs: sits on one cluster link (a ZeroMQ TCP connection
between processes on loopback) and adds latency, jitter, segment loss, partitions and resets.

Faults never corrupt or drop bytes of a live connection, so ZeroMQ framing survives everything
except `reset()`, which kills connections outright (as a crashed peer or a middlebox would):

- latency/jitter: each chunk is forwarded `delay + uniform(0, jitter)` after it was read, and
  never before an earlier chunk of the same direction (TCP keeps order; so does this proxy);
- loss: with some probability a chunk is held an extra `stall_s`, what a lost segment costs a
  TCP connection (a retransmission timeout), and everything behind it waits too;
- partition: no bytes pass either way; they are held (as TCP keeps retransmitting them) and
  flow again on `heal()`. New connections are accepted but reach the target only after heal;
- reset: every current connection is aborted on both sides with an RST (SO_LINGER 0).

`heal()` makes the link clean at once: no partition, latency or loss, and chunks still waiting
out a delay or stall from before the heal go out immediately (in order).

Each direction of each connection is a pump task (reads chunks, stamps each with its due time)
and a delivery task (sleeps until due and while partitioned, then writes and drains). EOF from
one side is forwarded as a half-close after the pending chunks; when both directions are done
the pair closes. An error on either side aborts the pair quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct

from p3.log import get_logger

log = get_logger(__name__)

CHUNK = 65536
QUEUE_CHUNKS = 256  # per direction; past this the pump stops reading and TCP pushes back


def _abort(writer: asyncio.StreamWriter | None, rst: bool = True) -> None:
    """Close a connection at once; with `rst`, SO_LINGER 0 makes the close send an RST."""
    if writer is None:
        return
    transport = writer.transport
    if rst and not transport.is_closing():
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Link:
    """One accepted client connection and, once connected, its upstream connection."""

    def __init__(
        self,
        proxy: FaultProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ):
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        peer = client_writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def abort(self) -> None:
        _abort(self.client_writer)
        _abort(self.upstream_writer)

    async def run(self) -> None:
        proxy = self.proxy
        try:
            await proxy._clear.wait()  # partitioned: accepted, but not connected until heal
            try:
                up_reader, self.upstream_writer = await asyncio.open_connection(
                    proxy.target_host, proxy.target_port
                )
            except OSError as exc:
                log.info("proxy.connect_failed", proxy=proxy.name, peer=self.peer, error=repr(exc))
                self.abort()
                return
            await self._relay(up_reader, self.upstream_writer)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:  # never out of the proxy's tasks
            log.info("proxy.link_error", proxy=proxy.name, peer=self.peer, error=repr(exc))
            self.abort()
        finally:
            proxy._links.discard(self)

    async def _relay(self, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter):
        proxy = self.proxy
        tag = f"proxy{':' + proxy.name if proxy.name else ''}:{self.peer}"
        tasks = []
        for src, dst, way in (
            (self.client_reader, up_writer, "up"),
            (up_reader, self.client_writer, "down"),
        ):
            queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
            tasks.append(asyncio.create_task(proxy._pump(src, queue), name=f"{tag}:{way}:pump"))
            tasks.append(asyncio.create_task(proxy._deliver(queue, dst), name=f"{tag}:{way}:out"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((t.exception() for t in done if t.exception() is not None), None)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failed is not None:  # one side broke: the other side sees a reset too
            log.info("proxy.link_broken", proxy=proxy.name, peer=self.peer, error=repr(failed))
            self.abort()
            return
        for writer in (self.client_writer, up_writer):  # both directions saw EOF: close cleanly
            writer.close()
        for writer in (self.client_writer, up_writer):
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class FaultProxy:
    """Listens on `listen_host:listen_port` (0: ephemeral) and relays each connection to the
    target, applying the current faults. `seed` makes jitter and loss reproducible."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
        name: str = "",
    ):
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self.name = name
        self.rng = random.Random(seed)
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.loss = 0.0
        self.stall_s = 0.2
        self._clear = asyncio.Event()  # set while not partitioned
        self._clear.set()
        self._epoch = 0  # bumped by heal(): chunks stamped before it go out at once
        self._healed: asyncio.Future | None = None  # resolved by heal(), wakes waiting chunks
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # ---- lifecycle

    async def start(self) -> int:
        if self._server is not None or self._closed:
            raise RuntimeError("FaultProxy.start() called twice or after close()")
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._healed = asyncio.get_running_loop().create_future()
        log.info(
            "proxy.start",
            proxy=self.name,
            port=self.port,
            target=f"{self.target_host}:{self.target_port}",
        )
        return self.port

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        log.info("proxy.close", proxy=self.name, port=self.port)

    # ---- faults

    def set_latency(self, delay_s: float, jitter_s: float = 0.0) -> None:
        self.delay_s = max(0.0, delay_s)
        self.jitter_s = max(0.0, jitter_s)
        log.info("proxy.latency", proxy=self.name, delay_s=delay_s, jitter_s=jitter_s)

    def set_loss(self, probability: float, stall_s: float = 0.2) -> None:
        self.loss = min(1.0, max(0.0, probability))
        self.stall_s = max(0.0, stall_s)
        log.info("proxy.loss", proxy=self.name, probability=probability, stall_s=stall_s)

    def partition(self) -> None:
        self._clear.clear()
        log.info("proxy.partition", proxy=self.name, connections=len(self._links))

    def heal(self) -> None:
        self.delay_s = self.jitter_s = self.loss = 0.0
        self._epoch += 1
        if self._healed is not None:
            if not self._healed.done():
                self._healed.set_result(None)
            self._healed = self._healed.get_loop().create_future()
        self._clear.set()
        log.info("proxy.heal", proxy=self.name, connections=len(self._links))

    def reset(self) -> None:
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        log.info("proxy.reset", proxy=self.name, connections=len(links))

    @property
    def partitioned(self) -> bool:
        return not self._clear.is_set()

    @property
    def num_connections(self) -> int:
        return len(self._links)

    # ---- relaying

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            _abort(writer)
            return
        link = _Link(self, reader, writer)
        self._links.add(link)
        task = asyncio.create_task(link.run(), name=f"proxy:{self.name}:{link.peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _due(self, previous: float, lossy: bool = True) -> float:
        """When a chunk read now goes out: after the delay, and never before the previous one."""
        extra = self.delay_s
        if self.jitter_s > 0:
            extra += self.rng.uniform(0.0, self.jitter_s)
        if lossy and self.loss > 0 and self.rng.random() < self.loss:
            extra += self.stall_s
        return max(previous, asyncio.get_running_loop().time() + extra)

    async def _pump(self, reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        due, epoch = 0.0, self._epoch
        while True:
            data = await reader.read(CHUNK)
            if epoch != self._epoch:  # healed since the last chunk: no old schedule to keep to
                due, epoch = 0.0, self._epoch
            due = self._due(due, lossy=bool(data))
            await queue.put((epoch, due, data))
            if not data:
                return

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            epoch, due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0 and epoch == self._epoch and self._healed is not None:
                await asyncio.wait([self._healed], timeout=wait)  # heal() cuts the wait short
            await self._clear.wait()
            if not data:  # EOF: forward the half-close after everything before it
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
