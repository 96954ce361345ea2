"""A real node under faults: malformed frames, a hung step thread, fencing, a lost coordinator."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from p3.nodes.actor.base import Status
from p3.nodes.coordinator.coordinator import Coordinator
from p3.nodes.node.stepper import StepFaults
from p3.protocol import messages as m
from p3.protocol import wire
from tests.actors.harness import node_ids, route_of
from tests.actors.test_node import LONG, routed, submit

pytestmark = pytest.mark.timeout(30)

MALFORMED = [[b"\xc1"], [b"not msgpack"], [wire.encode(m.Welcome(9))], [b"a", b"b"], [b""]]


async def test_malformed_frames_on_the_node_router_leave_it_serving(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    for frames in MALFORMED:
        peer.send_raw(*frames)
    peer.send(m.Ping(11))
    assert await peer.recv() == m.Pong(11, node.name, route.epoch)
    peer.send(submit("r", route.epoch, m.WireSamplingParams(max_tokens=2, ignore_eos=True)))
    assert isinstance(await peer.recv(), m.Tokens)
    assert node._edge_decoder.num_dropped == len(MALFORMED)


async def test_malformed_frames_from_the_coordinator_leave_the_node_serving(make_node, tmp_path):
    ctx = zmq.asyncio.Context()
    fake = wire.make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0")
    try:
        node = await make_node(serving=False, coordinator=wire.bound_address(fake))
        decoder = wire.to_coordinator()
        async with asyncio.timeout(10):
            identity, hello = await wire.recv_routed(fake, decoder)
            assert isinstance(hello, m.Hello)
            for frames in MALFORMED[:2] + [[wire.encode(m.Ping())], [b"x", b"y"]]:
                await fake.send_multipart([identity, *frames])
            await fake.send_multipart([identity, wire.encode(m.Welcome(5))])
            while not isinstance(msg := (await wire.recv_routed(fake, decoder))[1], m.Ready):
                pass
        assert msg.epoch == 5 and node.is_running
        assert node._coordinator_decoder.num_dropped == 4
    finally:
        fake.close(linger=0)
        ctx.term()


async def test_a_hung_step_thread_is_declared_dead_for_lack_of_progress(make_node, edge):
    faults = StepFaults()
    node = await make_node(faults=faults)
    route = await routed(edge, node)
    faults.hang()
    edge.node(route.address).send(submit("r", route.epoch))
    routes = await edge.routes_until(lambda r: node.name in r.dead, timeout_s=5)
    assert node.name not in node_ids(routes)
    faults.release()


async def test_a_fenced_node_aborts_and_registers_again_under_a_new_epoch(
    make_node, edge, coordinator
):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("r", route.epoch))
    await peer.recv()
    coordinator._declare_dead(coordinator.membership.members[node.name], "test")
    again = await edge.routes_until(
        lambda r: (x := route_of(r, node.name)) is not None and x.epoch > route.epoch
    )
    assert route_of(again, node.name).epoch == node.epoch
    assert "r" not in node.inflight
    peer.send(submit("old", route.epoch))
    rejected = await peer.recv_until(lambda msg: isinstance(msg, m.Rejected))
    assert (rejected.request_id, rejected.code) == ("old", "stale_epoch")


async def test_streams_survive_a_coordinator_restart_and_the_node_registers_again(
    make_node, edge, coordinator, running
):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("r", route.epoch, LONG))
    await peer.recv()
    await running.finish(coordinator, "abort")
    reborn = await running.start(Coordinator(coordinator.config.__class__(
        bind=coordinator.address, heartbeat_interval_s=coordinator.config.heartbeat_interval_s,
    )))  # fmt: skip
    async with asyncio.timeout(5):
        while node.epoch == route.epoch or not node.registered:
            await asyncio.sleep(0.01)
    assert node.epoch > route.epoch and reborn.membership.members[node.name].epoch == node.epoch
    tokens = await peer.recv_until(lambda msg: isinstance(msg, m.Tokens))
    assert tokens.epoch == route.epoch and tokens.deltas[0].request_id == "r"


async def test_an_error_inside_a_step_sends_fatal_and_fails_the_node(
    make_node, edge, running, coordinator
):
    node = await make_node(faults=StepFaults(raise_at_step=1))
    route = await routed(edge, node)
    edge.node(route.address).send(submit("r", route.epoch))
    routes = await edge.routes_until(lambda r: node.name in r.dead)
    assert node.name not in node_ids(routes)
    assert coordinator.membership.members[node.name].cause.startswith("fatal")
    with pytest.raises(ExceptionGroup):
        async with asyncio.timeout(5):
            await running.tasks.pop(node)
    assert node.status is Status.FAILED


async def test_a_node_fenced_mid_step_rejoins_once_the_step_is_over_not_in_a_loop(
    make_node, edge, coordinator
):
    """The death loop: a step longer than hung_after_s got the node declared dead, it
    registered again at once with the step still running, and died again every interval."""
    faults = StepFaults()
    node = await make_node(faults=faults)
    route = await routed(edge, node)
    faults.hang()  # the next step takes as long as this test says
    edge.node(route.address).send(submit("r", route.epoch))
    await edge.routes_until(lambda r: node.name in r.dead, timeout_s=5)
    async with asyncio.timeout(5):
        while node.registered:  # its next heartbeat is answered with Fence
            await asyncio.sleep(0.01)
    member = coordinator.membership.members[node.name]
    deadline = asyncio.get_running_loop().time() + 1.5  # 5x hung_after_s of a stuck step
    while asyncio.get_running_loop().time() < deadline:
        assert member.epoch == route.epoch and not node.registered  # waits, does not re-join
        await asyncio.sleep(0.05)
    faults.release()
    again = await edge.routes_until(lambda r: node.name in node_ids(r), timeout_s=10)
    assert route_of(again, node.name).epoch == route.epoch + 1  # one death, one new epoch


async def test_a_step_slow_by_the_nodes_own_measure_is_not_a_hang():
    """hung_after_s is a floor: a heartbeat whose step allowance covers its step's age is alive."""
    from p3.nodes.coordinator.membership import Membership

    members = Membership(0.1, 3, hung_after_s=0.5)
    member = members.register(b"n", m.Hello(m.PROTOCOL_VERSION, "n"))
    members.mark_ready(member, m.Ready("n", member.epoch))
    slow = m.Heartbeat("n", member.epoch, busy=True, last_step_age_s=4.0, step_allowance_s=5.0)
    members.record_heartbeat(member, slow)
    assert members.find_dead() == []
    stuck = m.Heartbeat("n", member.epoch, busy=True, last_step_age_s=6.0, step_allowance_s=5.0)
    members.record_heartbeat(member, stuck)
    assert [mb.node_id for mb, _ in members.find_dead()] == ["n"]
