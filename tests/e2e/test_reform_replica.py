"""`p3 serve --nodes 3 --tp 2`: one replica of two ranks and a spare. kill -9 one rank: the
coordinator marks the replica down and shuts its other rank, `p3 serve` starts both again,
and a replica is formed anew from the spare and a restarted node, serving the same answers.
Then the leader is paused (SIGSTOP) until its replica is down, and woken: it leaves as well,
and a replica is formed anew again."""

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


async def until(probe, done, what: str, timeout_s: float = 60.0):
    started = time.monotonic()
    while not done(now := await probe()):
        assert time.monotonic() - started < timeout_s, f"no {what}: {now}"
        await asyncio.sleep(0.1)
    return now


async def formed_anew(url: str, ranks: list[dict], fault: str) -> list[dict]:
    """Until a replica of two ranks other than `ranks` serves."""
    started = time.monotonic()
    old = {n["pid"] for n in ranks}
    now = await until(
        lambda: replica(url), lambda now: len(now) == 2 and {n["pid"] for n in now} != old,
        f"new replica after {fault}",
    )  # fmt: skip
    print(f"replica formed anew {time.monotonic() - started:.2f} s after the {fault}")
    return now


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
        ranks = await formed_anew(cluster.url, ranks, "kill -9")
        assert await answer() == before
        # the leader only paused: declared dead, its follower shut down; once it wakes it is
        # fenced and must go too (its shard cannot join a new replica, nor would it take the
        # new Place), or a replica formed with it waits for it at the rendezvous
        os.kill(ranks[0]["pid"], signal.SIGSTOP)
        try:
            await until(lambda: replica(cluster.url), lambda now: not now, "the replica down")
        finally:
            os.kill(ranks[0]["pid"], signal.SIGCONT)
        await formed_anew(cluster.url, ranks, "SIGSTOP")
        assert await answer() == before
    finally:
        cluster.stop()
