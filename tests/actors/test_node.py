"""A real node (tiny random model, real engine) with a real coordinator and a test edge."""

from __future__ import annotations

import asyncio

import pytest

from p3.nodes.node.node import NodeState
from p3.protocol import messages as m
from tests.actors.harness import node_ids, route_of

pytestmark = pytest.mark.timeout(30)

LONG = m.WireSamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def submit(request_id: str, epoch: int, params: m.WireSamplingParams = LONG) -> m.Submit:
    return m.Submit(request_id, [1, 5, 9, 13], params, seed=7, epoch=epoch)


async def routed(edge, node) -> m.Route:
    routes = await edge.routes_until(lambda r: node.name in node_ids(r))
    return route_of(routes, node.name)


async def collect(peer, request_ids: set[str]) -> list[m.Tokens]:
    """Tokens messages until every request in request_ids has finished."""
    messages, open_ids = [], set(request_ids)
    while open_ids:
        msg = await peer.recv()
        assert isinstance(msg, m.Tokens), msg
        messages.append(msg)
        open_ids -= {d.request_id for d in msg.deltas if d.finish_reason}
    return messages


async def until(condition, timeout_s: float = 5.0) -> None:
    """Wait for a state the actors reach on their own threads (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_node_registers_and_is_routed_with_what_it_learned(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    assert route.epoch == node.epoch >= 1 and route.address == node.address
    assert route.num_kv_blocks == node.engine.num_kv_blocks > 0
    assert route.max_model_len == node.engine.max_model_len
    assert node.state is NodeState.SERVING and node.ready_info()["state"] == "serving"


async def test_tokens_come_one_message_per_step_with_contiguous_indices(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    params = m.WireSamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for rid in ("a", "b"):
        peer.send(submit(rid, route.epoch, params))
    messages = await collect(peer, {"a", "b"})
    steps = [msg.step for msg in messages]
    assert steps == sorted(set(steps)), "one Tokens per step"
    for rid in ("a", "b"):
        deltas = [d for msg in messages for d in msg.deltas if d.request_id == rid]
        assert [d.index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i])
                                            for i in range(len(deltas))]  # fmt: skip
        assert sum(len(d.token_ids) for d in deltas) == 12
        assert [d.finish_reason for d in deltas][-1] == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[0].num_prompt_tokens == 4
    assert all(msg.node_id == node.name and msg.epoch == route.epoch for msg in messages)


async def test_cancel_frees_the_kv_blocks(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("long", route.epoch))
    first = await peer.recv()
    assert isinstance(first, m.Tokens)
    assert node.engine.num_free_blocks < node.engine.num_kv_blocks
    peer.send(m.Cancel("long"))
    await until(lambda: node.engine.num_free_blocks == node.engine.num_kv_blocks)
    assert len(node.inflight) == 0 and not node.engine.has_unfinished()


async def test_a_submit_that_cannot_run_is_rejected_with_its_code(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("stale", route.epoch + 1))
    stale = await peer.recv()
    assert (stale.request_id, stale.code) == ("stale", "stale_epoch")
    peer.send(m.Submit("bad", [1, 10_000], LONG, 0, route.epoch))
    bad = await peer.recv()
    assert bad.code == "bad_request" and "token ids" in bad.reason
    peer.send(m.Submit("hot", [1], m.WireSamplingParams(temperature=-1.0), 0, route.epoch))
    assert (await peer.recv()).code == "bad_request"
    garbled = m.WireSamplingParams(grammar='{"grammars": [{"lark_grammar": "start: (("}]}')
    peer.send(m.Submit("grammar", [1], garbled, 0, route.epoch))  # a peer's bug, refused
    refused = await peer.recv()
    assert (refused.request_id, refused.code) == ("grammar", "bad_request")
    dropped = node._edge_decoder.num_dropped
    for huge in (m.WireSamplingParams(top_k=2**64 - 1), m.WireSamplingParams(top_k=-2)):
        peer.send(m.Submit("huge", [1], huge, 2**64 - 1, route.epoch))  # dropped as malformed
    await until(lambda: node._edge_decoder.num_dropped == dropped + 2)
    assert "huge" not in node.inflight
    peer.send(submit("fine", route.epoch, m.WireSamplingParams(max_tokens=2)))  # still serving
    assert (await peer.recv_until(lambda msg: isinstance(msg, m.Tokens))).deltas


async def test_drain_stop_finishes_the_request_in_flight_then_says_goodbye(
    make_node, edge, running, coordinator
):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    params = m.WireSamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    peer.send(submit("r", route.epoch, params))
    first = await peer.recv()
    assert first.deltas[-1].finish_reason is None
    node.stop("drain")
    rest = await collect(peer, {"r"})
    ours = [d for msg in [first, *rest] for d in msg.deltas]
    assert ours[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in ours) == 200
    await running.finish(node)
    await edge.routes_until(lambda r: node.name not in node_ids(r) and node.name not in r.dead)
    assert node.name not in coordinator.membership.members


async def test_drain_rejects_new_submits_as_draining(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("r", route.epoch))
    await peer.recv()
    node.stop("drain")
    await until(lambda: node.state is NodeState.DRAINING)
    peer.send(submit("late", route.epoch))
    rejected = await peer.recv_until(lambda msg: isinstance(msg, m.Rejected))
    assert (rejected.request_id, rejected.code) == ("late", "draining")
    peer.send(m.Cancel("r"))


async def test_abort_stop_ends_the_request_in_flight_with_abort(
    make_node, edge, running, coordinator
):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    peer.send(submit("r", route.epoch))
    await peer.recv()
    node.stop("abort")
    last = await peer.recv_until(lambda msg: any(d.finish_reason for d in msg.deltas))
    delta = next(d for d in last.deltas if d.request_id == "r")
    assert delta.finish_reason == "abort" and delta.index < 400
    await running.finish(node)
    await edge.routes_until(lambda r: node.name not in node_ids(r))
    assert node.name not in coordinator.membership.members
