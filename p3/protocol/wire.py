"""Bytes on cluster sockets: one Encoder, one typed Decoder per direction, the socket factory.

A frame that does not decode to its socket's union is logged and dropped: a peer's bad bytes
never kill a process.
"""

from __future__ import annotations

import secrets
import time
import weakref
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from p3.log import get_logger
from p3.protocol import messages as m
from p3.protocol.security import Door, Keyring, Member

log = get_logger(__name__)

_encoder = msgspec.msgpack.Encoder()


def encode(msg: m.Msg) -> bytes:
    return _encoder.encode(msg)


DROP_LOG_EVERY_S = 1.0


class Decoder:
    """Decodes one socket direction's union; bad frames are counted and dropped, and logged
    at most once a second (with how many were dropped since): a flood of garbage must not
    become a flood of log."""

    def __init__(self, union: Any, socket_name: str):
        self._decoder = msgspec.msgpack.Decoder(union)
        self.socket_name = socket_name
        self.num_dropped = 0
        self.num_fenced = 0  # decoded, but from an epoch not live: ignored (fenced())
        self._logged_at = float("-inf")
        self._unlogged = 0
        DECODERS.add(self)

    def decode(self, frame: bytes | memoryview, peer: bytes | None = None) -> Any | None:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.dropped(error=str(exc)[:200], peer=peer.hex() if peer else None, size=len(frame))
            return None

    def dropped(self, **why: Any) -> None:
        self.num_dropped += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_EVERY_S:
            log.warning("wire.frame_dropped", socket=self.socket_name, num=self._unlogged, **why)
            self._logged_at, self._unlogged = now, 0

    def fenced(self) -> None:
        """A frame that decoded but speaks for an epoch that is not live (declared dead, or
        older than the one its sender registered since): ignored, counted."""
        self.num_fenced += 1


DECODERS: weakref.WeakSet[Decoder] = weakref.WeakSet()  # this process's, for its metrics


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
    keyring: Keyring | None = None,
    server: Member | None = None,
) -> zmq.asyncio.Socket:
    """A ROUTER/DEALER socket that never blocks shutdown (linger 0) and keeps TCP alive.

    identity: the member name this socket speaks for; its routing identity is "name/random",
    unguessable, so no other peer can take it over on a ROUTER (ROUTER_HANDOVER gives a
    reconnecting socket its own identity back). immediate: queue nothing while the peer is
    not connected (a Hello retried while the coordinator is down must not pile up and arrive
    as a burst). keyring: CurveZMQ, a server where it binds, a client of `server` (whose
    public key is pinned) where it connects.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, f"{identity}/{secrets.token_hex(8)}".encode())
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise instead of vanishing
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer that reconnects takes its identity back
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    try:
        if keyring is not None and bind is not None:
            keyring.secure_server(sock)
        elif keyring is not None:
            if server is None:
                raise ValueError("a keyed socket that connects names the member it dials")
            keyring.secure_client(sock, server)
    except ValueError:
        sock.close(linger=0)
        raise
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


async def recv_routed(
    sock: zmq.asyncio.Socket, decoder: Decoder, door: Door | None = None
) -> tuple[bytes, Any | None]:
    """One message on a ROUTER socket: (sender identity, message or None if malformed or,
    with a door, not believed from the member whose connection it came on)."""
    if door is None:
        frames = await sock.recv_multipart(copy=True)
    else:
        frames = await sock.recv_multipart(copy=False)
    identity = bytes(frames[0])
    if len(frames) != 2:
        decoder.dropped(num_frames=len(frames))
        return identity, None
    if door is None:
        return identity, decoder.decode(frames[1], peer=identity)
    msg = decoder.decode(frames[1].buffer, peer=identity)
    if msg is None or not door.admit(frames[1].get("User-Id"), identity, msg):
        return identity, None
    return identity, msg


async def recv_dealt(sock: zmq.asyncio.Socket, decoder: Decoder) -> Any | None:
    """One message on a DEALER socket, or None if malformed."""
    frames = await sock.recv_multipart(copy=True)
    if len(frames) != 1:
        decoder.dropped(num_frames=len(frames))
        return None
    return decoder.decode(frames[0])
