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
) -> zmq.asyncio.Socket:
    """A ROUTER/DEALER socket that never blocks shutdown (linger 0) and keeps TCP alive."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
    if bind is not None:
        sock.bind(bind)
    if connect is not None:
        sock.connect(connect)
    return sock


def bound_address(sock: zmq.asyncio.Socket) -> str:
    """The address a socket bound to, with the port the OS picked for tcp://host:0."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
