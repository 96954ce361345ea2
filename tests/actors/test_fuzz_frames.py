"""Random msgpack at every listening socket: frames shaped like p3's messages (a real tag,
fields of random types and lengths) and plain garbage. Each is dropped, counted and logged;
the process keeps serving the real peers that come after."""

from __future__ import annotations

import random

import msgspec
import pytest

from p3.protocol import messages as m
from tests.actors.test_coordinator import fake_node, join  # noqa: F401  (fixture)
from tests.actors.test_node import routed, submit

pytestmark = pytest.mark.timeout(60)
TAGS = [t.__struct_config__.tag for t in (*m.ToCoordinator.__args__, *m.ToNodeFromEdge.__args__)]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return rng.randrange(-(2**63), 2**63)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 20)
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return rng.randbytes(rng.randrange(8))
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 6:
        return {
            str(rng.randrange(9)): random_value(rng, depth + 1) for _ in range(rng.randrange(3))
        }
    return [rng.choice(TAGS), *(random_value(rng, depth + 1) for _ in range(rng.randrange(12)))]


def fuzzed_frames(seed: int, count: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    frames = []
    for _ in range(count):
        if rng.random() < 0.7:  # a real tag, random fields
            body = [rng.choice(TAGS), *(random_value(rng) for _ in range(rng.randrange(14)))]
            frames.append([msgspec.msgpack.encode(body)])
        elif rng.random() < 0.5:
            frames.append([rng.randbytes(rng.randrange(1, 64))])
        else:
            frames.append(
                [msgspec.msgpack.encode(random_value(rng)) for _ in range(rng.randrange(3))]
            )
    return frames


async def test_fuzzed_frames_leave_the_coordinator_serving(fake_node, coordinator):  # noqa: F811
    noise = fake_node("noise")
    for frames in fuzzed_frames(1, 300):
        noise.send_raw(*frames)
    welcome = await join(fake_node("n1"))  # a real node still joins, after all of it
    assert welcome.epoch >= 1 and coordinator.is_running
    assert coordinator._decoder.num_dropped > 0


async def test_fuzzed_frames_leave_the_node_serving(make_node, edge):
    node = await make_node()
    route = await routed(edge, node)
    peer = edge.node(route.address)
    for frames in fuzzed_frames(2, 300):
        peer.send_raw(*frames)
    peer.send(m.Ping(11))
    while (answer := await peer.recv()) != m.Pong(11, node.name, route.epoch):
        pass  # a fuzzed frame may happen to be a valid Ping or Submit: it gets its answer
    peer.send(submit("after-fuzz", route.epoch, m.WireSamplingParams(max_tokens=2)))
    while not (
        isinstance(answer, m.Tokens) and "after-fuzz" in {d.request_id for d in answer.deltas}
    ):
        answer = await peer.recv()
    assert node.is_running and node._edge_decoder.num_dropped > 0
