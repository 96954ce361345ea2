"""Real processes: `p3 coordinator` and two `p3 node`s; SIGSTOP one, then SIGCONT it."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from p3.nodes.actor.launch import Child, python_m_p3, stop_all, wait_ready
from p3.protocol import messages as m
from tests.actors.harness import TestEdge, node_ids, route_of

pytestmark = pytest.mark.timeout(60)

INTERVAL_S = 0.1


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    stop_all(list(reversed(started)), timeout_s=5)  # kills what does not stop: no leaks
    assert all(child.proc.poll() is not None for child in started)


async def start_cluster(children: list[Child], tiny_model) -> str:
    coordinator = Child(
        "coordinator",
        python_m_p3("--log-level", "info", "coordinator", "--bind", "tcp://127.0.0.1:0",
                    "--heartbeat-interval", str(INTERVAL_S), "--heartbeat-misses", "3",
                    "--insecure"),
    )  # fmt: skip
    children.append(coordinator)
    await asyncio.to_thread(wait_ready, [coordinator], 30)
    address = coordinator.info["address"]
    nodes = [
        Child(
            f"pn-{i}",
            python_m_p3(
                "--log-level",
                "info",
                "node",
                "--coordinator",
                address,
                "--node-id",
                f"pn-{i}",
                "--model",
                str(tiny_model),
                "--dtype",
                "float32",
                "--kv-cache-memory",
                "1MiB",
                "--threads",
                "1",
                "--insecure",
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    children.extend(nodes)
    await asyncio.to_thread(wait_ready, nodes, 45)
    return address


async def test_a_paused_node_is_declared_dead_in_time_then_fenced_and_back_under_a_new_epoch(
    children, tiny_model
):
    address = await start_cluster(children, tiny_model)
    edge = TestEdge(address)
    try:
        routes = await edge.routes_until(lambda r: node_ids(r) == {"pn-0", "pn-1"}, 10)
        old = route_of(routes, "pn-1")
        paused = children[2]
        assert paused.name == "pn-1"

        paused.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        dead = await edge.routes_until(lambda r: "pn-1" in r.dead, 5)
        detection_s = time.monotonic() - stopped_at
        print(f"\ndetection time: {detection_s * 1000:.0f} ms")
        assert detection_s < 1.0
        assert node_ids(dead) == {"pn-0"}

        paused.signal(signal.SIGCONT)
        seen: list[m.Routes] = []

        def back(r: m.Routes) -> bool:
            seen.append(r)
            return (x := route_of(r, "pn-1")) is not None and x.epoch > old.epoch

        await edge.routes_until(back, 10)
        assert all(
            route.epoch != old.epoch for r in seen for route in r.routes if route.node_id == "pn-1"
        ), "never routed under the old epoch again"
        peer = edge.node(old.address)
        peer.send(m.Submit("late", [1, 2], m.WireSamplingParams(max_tokens=2), 0, old.epoch))
        rejected = await peer.recv()
        assert (rejected.request_id, rejected.code) == ("late", "stale_epoch")
    finally:
        edge.close()
