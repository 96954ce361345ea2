"""`p3 serve --nodes 3 --tp 2`: one replica of two ranks and a spare. kill -9 one rank: the
coordinator marks the replica down and shuts its other rank, `p3 serve` starts both again,
and a replica is formed anew from the spare and a restarted node, serving the same answers."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from openai import AsyncOpenAI

from ..model.tiny import make_tiny_chat_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(240)


async def replica(url: str) -> list[dict]:
    """The ranks of the routed replica (empty while there is none)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/cluster") as r:
        nodes = (await r.json())["nodes"]
    return sorted((n for n in nodes if "replica_rank" in n), key=lambda n: n["replica_rank"])


async def test_a_killed_rank_is_replaced_and_the_replica_serves_again(tmp_path, default_model_dir):
    model = make_tiny_chat_model(tmp_path, default_model_dir)
    args = ["--model", str(model), "--nodes", "3", "--tp", "2", "--threads", "1"]
    cluster = openai_cluster.serve(*args)
    try:
        client = AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)

        async def answer() -> str:
            out = await client.completions.create(
                model=model.name, prompt=[300, 400, 500], max_tokens=8, temperature=0
            )
            return out.choices[0].text

        before = await answer()
        ranks = await replica(cluster.url)
        assert len(ranks) == 2
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        started = time.monotonic()
        while True:
            now = await replica(cluster.url)
            if len(now) == 2 and {n["pid"] for n in now} != {n["pid"] for n in ranks}:
                break
            assert time.monotonic() - started < 60, f"no new replica: {now}"
            await asyncio.sleep(0.1)
        print(f"replica formed anew {time.monotonic() - started:.2f} s after the kill")
        assert await answer() == before
    finally:
        cluster.stop()
