"""`p3 serve --nodes 2`: load spreads over both replicas; a paused node is routed around,
declared dead in time, and comes back only under a new epoch."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from openai import AsyncOpenAI

from . import openai_cluster

pytestmark = pytest.mark.timeout(240)
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def two_nodes(default_model_dir):
    served = openai_cluster.start(num_nodes=2)
    yield served
    served.stop()


async def cluster_nodes(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.get(url + "/cluster") as r:
        return (await r.json())["nodes"]


async def poll(url: str, condition, timeout_s: float) -> tuple[list[dict], float]:
    """The /cluster nodes once condition(nodes) holds, and how long that took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        nodes = await cluster_nodes(url)
        if condition(nodes):
            return nodes, time.monotonic() - started
        await asyncio.sleep(0.02)
    raise TimeoutError(f"/cluster never satisfied the condition: {nodes}")


def ready(nodes: list[dict]) -> dict[str, dict]:
    return {n["id"]: n for n in nodes if n["status"] == "ready"}


async def long_stream(client: AsyncOpenAI, started: asyncio.Event) -> str:
    stream = await client.completions.create(
        model=MODEL,
        prompt="Tell a long story.",
        max_tokens=48,
        stream=True,
        extra_body={"ignore_eos": True},
        temperature=0.0,
    )
    text = ""
    async for chunk in stream:
        started.set()
        text += chunk.choices[0].text if chunk.choices else ""
    return text


async def test_requests_spread_over_both_replicas(two_nodes):
    client = AsyncOpenAI(base_url=two_nodes.url + "/v1", api_key="unused")
    events = [asyncio.Event() for _ in range(8)]
    tasks = [asyncio.create_task(long_stream(client, e)) for e in events]
    await asyncio.gather(*(e.wait() for e in events))
    both_busy = lambda nodes: sum(n["load"]["num_running"] > 0 for n in ready(nodes).values()) == 2
    await poll(two_nodes.url, both_busy, timeout_s=10)
    texts = await asyncio.gather(*tasks)
    assert len(set(texts)) == 1  # greedy: the same text whichever replica served it


async def test_a_paused_node_is_routed_around_and_returns_under_a_new_epoch(two_nodes):
    url = two_nodes.url
    before = ready(await cluster_nodes(url))
    victim = sorted(before.values(), key=lambda n: n["id"])[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        _, detected_s = await poll(url, lambda nodes: victim["id"] not in ready(nodes), 5)
        assert detected_s < 1.0  # heartbeat 0.1 s x 3 misses, plus the routes' way to the edge
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        outs = await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt=f"{i} + {i} =", max_tokens=8)
                for i in range(4)
            )
        )
        assert all(o.choices[0].finish_reason in ("stop", "length") for o in outs)
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    back = lambda nodes: ready(nodes).get(victim["id"], {}).get("epoch", 0) > victim["epoch"]
    nodes, _ = await poll(url, back, timeout_s=20)
    assert ready(nodes)[victim["id"]]["pid"] == victim["pid"]  # the same process, re-registered
