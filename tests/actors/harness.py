"""Test peers on real sockets: an edge (or a fake node) that speaks the wire to the actors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
import zmq.asyncio

from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.security import COORDINATOR, Keyring, Member

TIMEOUT_S = 5.0


class Peer:
    """A DEALER with an identity, connected to one actor's ROUTER; with a keyring, a CURVE
    client of `server`; routing_id: the exact routing identity to claim (a forger's)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        identity: str,
        decoder,
        keyring: Keyring | None = None,
        server: Member | None = None,
        routing_id: bytes | None = None,
    ):
        self.identity = identity
        self.sock = wire.make_socket(
            ctx, zmq.DEALER, identity=identity, keyring=keyring, server=server
        )
        if routing_id is not None:
            self.sock.setsockopt(zmq.IDENTITY, routing_id)
        self.sock.connect(address)
        self.decoder = decoder

    def send(self, msg: m.Msg) -> None:
        self.sock.send(wire.encode(msg))

    def send_raw(self, *frames: bytes) -> None:
        if frames:  # ZeroMQ has no message of no frames
            self.sock.send_multipart(list(frames))

    async def recv(self, timeout_s: float = TIMEOUT_S):
        async with asyncio.timeout(timeout_s):
            while True:
                msg = self.decoder.decode(await self.sock.recv())
                if msg is not None:
                    return msg

    async def recv_until(self, match: Callable[[object], bool], timeout_s: float = TIMEOUT_S):
        """The first message that matches; the others are skipped."""
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await self.recv(timeout_s)
                if match(msg):
                    return msg

    def close(self) -> None:
        self.sock.close(linger=0)


class TestEdge:
    """An edge: EdgeHello to the coordinator, Routes back; one DEALER per node it talks to."""

    __test__ = False

    def __init__(
        self, coordinator_address: str, edge_id: str = "edge-test", keyring: Keyring | None = None
    ):
        self.ctx = zmq.asyncio.Context()
        self.edge_id = edge_id
        self.keyring = keyring
        self.coordinator = Peer(
            self.ctx,
            coordinator_address,
            edge_id,
            wire.edge_from_coordinator(),
            keyring,
            Member(COORDINATOR, COORDINATOR),
        )
        self.coordinator.send(m.EdgeHello(m.PROTOCOL_VERSION, edge_id))
        self.nodes: dict[str, Peer] = {}

    async def routes_until(self, match: Callable[[m.Routes], bool], timeout_s: float = TIMEOUT_S):
        return await self.coordinator.recv_until(
            lambda msg: isinstance(msg, m.Routes) and match(msg), timeout_s
        )

    def node(self, address: str, node_id: str | None = None) -> Peer:
        """A link to the node at address (with keys: node_id's, whose key is pinned)."""
        if address not in self.nodes:
            server = Member("node", node_id) if node_id else None
            self.nodes[address] = Peer(
                self.ctx, address, self.edge_id, wire.edge_from_node(), self.keyring, server
            )
        return self.nodes[address]

    def close(self) -> None:
        for peer in [self.coordinator, *self.nodes.values()]:
            peer.close()
        self.ctx.term()


def node_ids(routes: m.Routes) -> set[str]:
    return {r.node_id for r in routes.routes}


def route_of(routes: m.Routes, node_id: str) -> m.Route | None:
    return next((r for r in routes.routes if r.node_id == node_id), None)
