"""A keyed cluster believes no stranger and lets no member speak for another: a real
coordinator and node (tiny model) on CurveZMQ sockets, and forgers holding a stranger's key,
no key, or another member's key."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import zmq

from p3.config import EngineConfig
from p3.nodes.coordinator.coordinator import Coordinator, CoordinatorConfig
from p3.nodes.coordinator.membership import NodeStatus
from p3.nodes.node.config import NodeConfig
from p3.nodes.node.node import Node
from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.security import COORDINATOR, Keyring, Member, generate, revoke_key
from tests.actors.harness import Peer, TestEdge, node_ids, route_of

pytestmark = pytest.mark.timeout(60)

LONG = m.WireSamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
COORD = Member(COORDINATOR, COORDINATOR)


@pytest.fixture
def keys(tmp_path):
    return generate(tmp_path / "keys", ["node-1", "node-2"], ["edge-0", "edge-1"])


@pytest.fixture
async def cluster(running, keys, tiny_model):
    """A keyed coordinator, node-1 serving, and edge-0 routed to it."""
    coordinator = await running.start(
        Coordinator(CoordinatorConfig(heartbeat_interval_s=0.1, keys=str(keys)))
    )
    node = Node(
        NodeConfig(
            coordinator=coordinator.address,
            node_id="node-1",
            model=str(tiny_model),
            engine=EngineConfig(dtype="float32", kv_cache_bytes=1 << 20, max_num_seqs=8),
            keys=str(keys),
        )
    )
    await running.start(node)
    edge = TestEdge(coordinator.address, "edge-0", Keyring(keys, "edge", "edge-0"))
    routes = await edge.routes_until(lambda r: "node-1" in node_ids(r))
    yield coordinator, node, edge, route_of(routes, "node-1")
    edge.close()


@pytest.fixture
def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def stream(peer: Peer, request_id: str) -> list[int]:
    tokens: list[int] = []
    while True:
        msg = await peer.recv()
        for delta in getattr(msg, "deltas", []):
            if delta.request_id == request_id:
                tokens += delta.token_ids
                if delta.finish_reason:
                    return tokens


async def test_members_serve_over_their_own_keys(cluster):
    coordinator, node, edge, route = cluster
    peer = edge.node(route.address, "node-1")
    peer.send(m.Submit("r", [1, 5, 9], LONG, 7, route.epoch))
    assert len(await stream(peer, "r")) == 60
    edges = [bytes(i).decode() for i in coordinator.edges]
    assert all(e.startswith("edge-0/") and len(e) > len("edge-0/") + 8 for e in edges)


async def test_a_stranger_key_and_no_key_never_get_in(cluster, ctx, tmp_path, keys):
    coordinator, node, edge, route = cluster
    other = generate(tmp_path / "other", [], ["edge-0"])
    shutil.copy(keys / "coordinator/coordinator.key", other / "coordinator/coordinator.key")
    stranger = Peer(ctx, coordinator.address, "edge-0", wire.edge_from_coordinator(),
                    Keyring(other, "edge", "edge-0"), COORD)  # fmt: skip
    stranger.send(m.EdgeHello(m.PROTOCOL_VERSION, "edge-0"))
    plain = Peer(ctx, coordinator.address, "edge-0", wire.edge_from_coordinator())
    plain.send(m.EdgeHello(m.PROTOCOL_VERSION, "edge-0"))
    await until(lambda: coordinator._gate.num_refused >= 1)
    known = len(coordinator.edges)
    edge.coordinator.send(m.EdgeHello(m.PROTOCOL_VERSION, "edge-0"))  # a member still gets in
    await edge.routes_until(lambda r: True)
    assert len(coordinator.edges) == known == 1
    for peer in (stranger, plain):
        assert await peer.sock.poll(0) == 0  # never a Routes table
    # a node takes work from edges only: a node's key cannot even connect to submit
    node_key = Peer(ctx, route.address, "node-2", wire.edge_from_node(),
                    Keyring(keys, "node", "node-2"), Member("node", "node-1"))  # fmt: skip
    node_key.send(m.Submit("x", [1, 2], LONG, 0, route.epoch))
    await until(lambda: node._gate.num_refused >= 1)
    assert "x" not in node.inflight


async def test_a_member_cannot_speak_for_another(cluster, ctx, keys):
    coordinator, node, edge, route = cluster
    forger = Keyring(keys, "node", "node-2")
    peer = Peer(ctx, coordinator.address, "node-2", wire.node_from_coordinator(), forger, COORD)
    epoch = route.epoch
    hello = m.Hello(m.PROTOCOL_VERSION, "node-1", "h", 1, "tcp://127.0.0.1:1", m.Capacity(),
                    model=route.model)  # fmt: skip
    peer.send(hello)
    peer.send(m.Heartbeat("node-1", epoch, draining=True))
    peer.send(m.Fatal("node-1", epoch, "forged"))
    taker = Peer(ctx, coordinator.address, "node-2", wire.node_from_coordinator(), forger, COORD,
                 routing_id=b"node-1")  # fmt: skip
    taker.send(m.Heartbeat("node-2", 1))
    await until(lambda: coordinator._door.num_refused >= 4)
    member = coordinator.membership.members["node-1"]
    assert (member.epoch, member.status) == (epoch, NodeStatus.READY)
    routes = await edge.routes_until(lambda r: True)
    assert route_of(routes, "node-1").epoch == epoch and not routes.dead


async def test_no_edge_can_take_over_or_cancel_another_edges_stream(cluster, ctx, keys):
    coordinator, node, edge, route = cluster
    victim = edge.node(route.address, "node-1")
    victim.send(m.Submit("v", [1, 5, 9], LONG, 7, route.epoch))
    first = await victim.recv()
    thief_keys = Keyring(keys, "edge", "edge-1")
    node_key = Member("node", "node-1")
    takers = [  # the victim's name as routing identity, with and without a guessed suffix
        Peer(ctx, route.address, "edge-1", wire.edge_from_node(), thief_keys, node_key,
             routing_id=rid)  # fmt: skip
        for rid in (b"edge-0", b"edge-0/0000000000000000")
    ]
    canceller = Peer(ctx, route.address, "edge-1", wire.edge_from_node(), thief_keys, node_key)
    for peer in takers:
        peer.send(m.Ping(1))
    canceller.send(m.Cancel("v"))
    rest = await stream(victim, "v")
    assert sum(len(d.token_ids) for d in first.deltas) + len(rest) == 60
    assert node._door.num_refused >= 2
    for peer in [*takers, canceller]:
        assert await peer.sock.poll(0) == 0  # none of the victim's tokens, no Pong


async def test_a_revoked_key_is_refused_within_seconds(cluster, ctx, keys):
    coordinator, node, edge, route = cluster
    member = Peer(ctx, route.address, "edge-1", wire.edge_from_node(),
                  Keyring(keys, "edge", "edge-1"), Member("node", "node-1"))  # fmt: skip
    member.send(m.Ping(5))
    assert isinstance(await member.recv(), m.Pong)
    revoke_key(keys, "edge-1")
    refused = node._door.num_refused

    async def pinged_in_vain() -> bool:
        member.send(m.Ping(6))
        return await member.sock.poll(200) == 0 and node._door.num_refused > refused

    async with asyncio.timeout(10):
        while not await pinged_in_vain():
            await member.recv()  # a Pong from before the node reread the directory
