"""Bytes on cluster sockets: one Encoder, one typed Decoder per direction, the socket factory.

A frame that does not decode to its socket's union is logged and dropped: a peer's bad bytes
never kill a process.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zmq
import zmq.asyncio

from p3.log import get_logger
from p3.protocol import messages as m
from p3.protocol.security import ClusterKeys

log = get_logger(__name__)

_encoder = msgspec.msgpack.Encoder()


def encode(msg: m.Msg) -> bytes:
    return _encoder.encode(msg)


class Decoder:
    """Decodes one socket direction's union; bad frames are logged, counted and dropped."""

    def __init__(self, union: Any, socket_name: str):
        self._decoder = msgspec.msgpack.Decoder(union)
        self.socket_name = socket_name
        self.num_dropped = 0

    def decode(self, frame: bytes | memoryview, peer: bytes | None = None) -> Any | None:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.num_dropped += 1
            log.warning(
                "wire.frame_dropped",
                socket=self.socket_name,
                error=str(exc)[:200],
                peer=peer.hex() if peer else None,
                size=len(frame),
            )
            return None


def to_coordinator() -> Decoder:
    return Decoder(m.ToCoordinator, "coordinator")


def node_from_coordinator() -> Decoder:
    return Decoder(m.ToNodeFromCoordinator, "node<-coordinator")


def node_from_edge() -> Decoder:
    return Decoder(m.ToNodeFromEdge, "node<-edge")


def edge_from_coordinator() -> Decoder:
    return Decoder(m.ToEdgeFromCoordinator, "edge<-coordinator")


def edge_from_node() -> Decoder:
    return Decoder(m.ToEdgeFromNode, "edge<-node")


def make_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: str | None = None,
    immediate: bool = False,
    keys: ClusterKeys | None = None,
) -> zmq.asyncio.Socket:
    """A ROUTER/DEALER socket that never blocks shutdown (linger 0) and keeps TCP alive.

    immediate: queue nothing while the peer is not connected (a Hello retried while the
    coordinator is down must not pile up and arrive as a burst).
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer that reconnects takes its identity back
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if keys is not None:  # CurveZMQ: a server where it binds, a client where it connects
        keys.secure(sock, serving=bind is not None)
    if bind is not None:
        sock.bind(bind)
    if connect is not None:
        sock.connect(connect)
    return sock


def bound_address(sock: zmq.asyncio.Socket) -> str:
    """The address a socket bound to, with the port the OS picked for tcp://host:0."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def send(sock: zmq.asyncio.Socket, msg: m.Msg, identity: bytes | None = None) -> bool:
    """Send without ever waiting: False (logged) if the peer is gone or its queue is full."""
    frames = [encode(msg)] if identity is None else [identity, encode(msg)]
    sent = sock.send_multipart(frames, flags=zmq.NOBLOCK)  # with NOBLOCK: resolved at once
    if not sent.done():
        sent.cancel()
        return False
    exc = sent.exception()
    if exc is not None:  # zmq.Again, or EHOSTUNREACH (ROUTER_MANDATORY)
        log.debug(
            "wire.send_failed",
            msg=type(msg).__name__,
            peer=identity.decode(errors="replace") if identity else None,
            error=str(exc),
        )
        return False
    return True


async def recv_routed(sock: zmq.asyncio.Socket, decoder: Decoder) -> tuple[bytes, Any | None]:
    """One message on a ROUTER socket: (sender identity, message or None if malformed)."""
    frames = await sock.recv_multipart(copy=True)
    if len(frames) != 2:
        decoder.num_dropped += 1
        log.warning("wire.frame_dropped", socket=decoder.socket_name, num_frames=len(frames))
        return frames[0], None
    return frames[0], decoder.decode(frames[1], peer=frames[0])


async def recv_dealt(sock: zmq.asyncio.Socket, decoder: Decoder) -> Any | None:
    """One message on a DEALER socket, or None if malformed."""
    frames = await sock.recv_multipart(copy=True)
    if len(frames) != 1:
        decoder.num_dropped += 1
        log.warning("wire.frame_dropped", socket=decoder.socket_name, num_frames=len(frames))
        return None
    return decoder.decode(frames[0])
