"""The coordinator against scripted nodes on real sockets: handshake, death, fencing."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from p3.nodes.coordinator.coordinator import Coordinator, CoordinatorConfig
from p3.protocol import messages as m
from p3.protocol import wire
from tests.actors.conftest import HEARTBEAT_INTERVAL_S
from tests.actors.harness import Peer, node_ids, route_of

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def fake_node(coordinator, edge):
    peers = []

    def make(node_id: str = "n1") -> Peer:
        peer = Peer(edge.ctx, coordinator.address, node_id, wire.node_from_coordinator())
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


async def join(peer: Peer, model: str = "tiny", epoch: int = 0) -> m.Welcome:
    peer.send(m.Hello(m.PROTOCOL_VERSION, peer.identity, "h", 7, "tcp://h:1", m.Capacity(),
                      model, epoch))  # fmt: skip
    welcome = await peer.recv()
    assert isinstance(welcome, m.Welcome)
    peer.send(m.Ready(peer.identity, welcome.epoch, model, 100, 16, 512, 0.1))
    return welcome


async def test_hello_welcome_ready_puts_the_node_in_the_routes(fake_node, edge):
    peer = fake_node("n1")
    welcome = await join(peer)
    assert welcome.epoch >= 1 and welcome.model == "tiny"
    assert welcome.heartbeat_interval_s == HEARTBEAT_INTERVAL_S
    routes = await edge.routes_until(lambda r: "n1" in node_ids(r))
    route = route_of(routes, "n1")
    assert (route.epoch, route.address, route.model) == (welcome.epoch, "tcp://h:1", "tiny")
    assert (route.max_model_len, route.num_kv_blocks, route.host, route.pid) == (512, 100, "h", 7)


async def test_heartbeat_load_reaches_the_edges(fake_node, edge):
    peer = fake_node("n1")
    welcome = await join(peer)
    peer.send(m.Heartbeat("n1", welcome.epoch, 5, 0.01, True, load=m.Load(42, 3, 2, 77)))
    routes = await edge.routes_until(lambda r: (x := route_of(r, "n1")) and x.load.num_waiting == 3)
    route = route_of(routes, "n1")
    load = route.load
    assert (load.num_free_blocks, load.num_running, load.num_tokens_in_flight) == (42, 2, 77)


async def test_another_protocol_version_is_refused(fake_node, coordinator):
    peer = fake_node("old")
    peer.send(m.Hello(m.PROTOCOL_VERSION + 1, "old"))
    assert isinstance(await peer.recv(), m.Refused)
    assert "old" not in coordinator.membership.members


async def test_a_silent_node_is_declared_dead_in_time_and_listed_once(fake_node, edge):
    peer = fake_node("n1")
    await join(peer)
    await edge.routes_until(lambda r: "n1" in node_ids(r))
    silent_since = time.monotonic()
    routes = await edge.routes_until(lambda r: "n1" in r.dead)
    detection_s = time.monotonic() - silent_since
    assert "n1" not in node_ids(routes)
    assert detection_s < 3 * HEARTBEAT_INTERVAL_S + 0.2, detection_s
    following = await edge.routes_until(lambda r: True)
    assert "n1" not in following.dead and following.version > routes.version


async def test_a_fenced_epoch_gets_fence_and_a_new_hello_gets_a_higher_epoch(fake_node, edge):
    peer = fake_node("n1")
    old = await join(peer)
    await edge.routes_until(lambda r: "n1" in r.dead)
    peer.send(m.Heartbeat("n1", old.epoch))
    fence = await peer.recv()
    assert isinstance(fence, m.Fence) and fence.epoch == old.epoch
    new = await join(peer, epoch=old.epoch)
    assert new.epoch > old.epoch
    await edge.routes_until(lambda r: (x := route_of(r, "n1")) and x.epoch == new.epoch)
    peer.send(m.Ready("n1", old.epoch, "tiny", 100, 16, 512))  # the old epoch, again
    assert isinstance(await peer.recv(), m.Fence)
    routes = await edge.routes_until(lambda r: True)
    assert route_of(routes, "n1").epoch == new.epoch


async def test_an_unknown_node_is_asked_to_register_again(fake_node):
    peer = fake_node("stranger")
    peer.send(m.Heartbeat("stranger", 41))
    again = await peer.recv()
    assert isinstance(again, m.Reregister) and again.epoch == 41
    welcome = await join(peer, epoch=41)
    assert welcome.epoch > 41


async def test_a_new_coordinator_sends_edges_no_table_until_it_has_a_route(
    fake_node, edge, coordinator
):
    """After a restart, edges route on the old coordinator's table until the nodes have
    registered again: an empty table first would leave them nothing to route to."""
    async with asyncio.timeout(5):
        while not coordinator.edges:
            await asyncio.sleep(0.01)
    peer = fake_node("n1")
    peer.send(m.Heartbeat("n1", 41))  # a node of the cluster its predecessor ran
    assert isinstance(await peer.recv(), m.Reregister)
    await join(peer, epoch=41)
    first = await edge.coordinator.recv()
    assert isinstance(first, m.Routes) and node_ids(first) == {"n1"}


async def test_goodbye_removes_the_node_from_the_routes(fake_node, edge, coordinator):
    peer = fake_node("n1")
    welcome = await join(peer)
    await edge.routes_until(lambda r: "n1" in node_ids(r))
    peer.send(m.Goodbye("n1", welcome.epoch))
    routes = await edge.routes_until(lambda r: "n1" not in node_ids(r))
    assert "n1" not in routes.dead and "n1" not in coordinator.membership.members


@pytest.mark.parametrize(
    "frames",
    [[b"\xc1"], [b"not msgpack"], [wire.encode(m.Submit("r", [1]))], [b"a", b"b"], [b""]],
    ids=["invalid", "text", "wrong-direction", "two-frames", "empty"],
)
async def test_a_malformed_frame_leaves_the_coordinator_serving(fake_node, coordinator, frames):
    peer = fake_node("n1")
    peer.send_raw(*frames)
    welcome = await join(peer)
    assert welcome.epoch >= 1
    assert coordinator.is_running


async def test_a_rank_of_a_replica_gone_down_is_shut_down_not_kept_as_a_spare(running, edge):
    """A rank whose replica was declared down (it was only slow) may still say Hello with
    its old place: its shard is joined to peers that are gone, so it cannot take a new
    Place; the coordinator shuts it down (to come back fresh) rather than make it a spare
    that a new replica would wait for."""
    config = CoordinatorConfig(heartbeat_interval_s=HEARTBEAT_INTERVAL_S, tp_size=2)
    coordinator = await running.start(Coordinator(config))
    peers = [Peer(edge.ctx, coordinator.address, n, wire.node_from_coordinator()) for n in "xy"]
    try:
        hello = m.Hello(m.PROTOCOL_VERSION, "x", "h", 7, "tcp://h:1", m.Capacity(), "tiny")
        epochs = []
        for peer in peers:
            peer.send(msgspec.structs.replace(hello, node_id=peer.identity))
            epochs.append((await peer.recv()).epoch)
        place = await peers[0].recv()  # x is rank 0
        assert isinstance(place, m.Place) and place.replica_rank == 0
        for rank, peer in enumerate(peers):  # both ready, then silent: the replica is down
            peer.send(m.Ready(peer.identity, epochs[rank], "tiny", 100, 16, 512, 0.1,
                              replica_rank=rank, replica_size=2))  # fmt: skip
        async with asyncio.timeout(5):
            while coordinator.membership.members["x"].is_live:
                await asyncio.sleep(0.01)
        peers[0].send(msgspec.structs.replace(
            hello, epoch=place.epoch, replica=place.replica, replica_rank=0, replica_size=2
        ))  # fmt: skip
        while not isinstance(answer := await peers[0].recv(), m.Shutdown):
            assert not isinstance(answer, m.Welcome), answer
        assert answer.mode == "abort"
        assert not coordinator.membership.members["x"].is_live  # and nothing is formed with it
        assert coordinator.membership.form_groups() == []
    finally:
        for peer in peers:
            peer.close()
