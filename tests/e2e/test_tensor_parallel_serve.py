"""`p3 serve --nodes 2 --tp 2` and `--pp 2`: one replica of two node processes (tensor-parallel
ranks, or pipeline stages), driven over HTTP with the official openai SDK, answers with
transformers' greedy tokens."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest
from openai import AsyncOpenAI
from transformers import AutoTokenizer

from ..model.tiny import load_reference, make_tiny_chat_model, reference_greedy
from . import openai_cluster

pytestmark = pytest.mark.timeout(240)
NUM_NEW = 16


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, default_model_dir):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tp"), default_model_dir)


@pytest.fixture(scope="module", params=["--tp", "--pp"])
def tp_cluster(tiny_chat, request):
    args = ["--model", str(tiny_chat), "--nodes", "2", request.param, "2"]
    args += ["--dtype", "float32"]  # transformers' reference runs in fp32
    cluster = openai_cluster.serve(*args)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_client_leaving_mid_stream_frees_the_replica(tiny_chat, tp_cluster):
    """With pp the cancel arrives while the request is in flight in the pipeline: it must
    wait for its micro-batch, then free the KV (the greedy test below runs after it)."""
    body = {"model": tiny_chat.name, "prompt": "Tell me", "max_tokens": 400, "ignore_eos": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(tp_cluster.url + "/v1/completions", json={**body, "stream": True}) as r,
    ):
        for _ in range(5):
            await r.content.readline()
    deadline = time.monotonic() + 20
    while True:
        async with (
            aiohttp.ClientSession() as session,
            session.get(tp_cluster.url + "/cluster") as r,
        ):
            (leader,) = [n for n in (await r.json())["nodes"] if n["replica_rank"] == 0]
        load = leader["load"]
        if load["num_running"] == 0 and load["num_free_blocks"] == load["num_kv_blocks"]:
            break
        assert time.monotonic() < deadline, f"the replica kept the request: {load}"
        await asyncio.sleep(0.1)


async def test_completions_equal_transformers_greedy(tiny_chat, tp_cluster):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    rng = random.Random(0)
    prompts = [[rng.randrange(20, tokenizer.vocab_size) for _ in range(n)] for n in (3, 40, 17)]
    client = AsyncOpenAI(base_url=tp_cluster.url + "/v1", api_key="unused")

    async def complete(prompt: list[int]) -> str:
        out = await client.completions.create(
            model=tiny_chat.name, prompt=prompt, max_tokens=NUM_NEW, temperature=0
        )
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == NUM_NEW
        return out.choices[0].text

    got = await asyncio.gather(*(complete(p) for p in prompts))  # batched on the replica
    ref = load_reference(tiny_chat)
    want = [
        tokenizer.decode(reference_greedy(ref, p, NUM_NEW), skip_special_tokens=True)
        for p in prompts
    ]
    assert got == want


async def test_streams_equal_whole_answers_on_one_replica(tp_cluster, tiny_chat):
    client = AsyncOpenAI(base_url=tp_cluster.url + "/v1", api_key="unused")
    models = await client.models.list()
    assert [m.id for m in models.data] == [str(tiny_chat)]  # vLLM's id: --model as given
    async with aiohttp.ClientSession() as session, session.get(tp_cluster.url + "/cluster") as r:
        nodes = (await r.json())["nodes"]
    assert sorted((n["replica"], n["replica_rank"]) for n in nodes) == [(0, 0), (0, 1)]
    stream = await client.completions.create(
        model=tiny_chat.name, prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    text = "".join([chunk.choices[0].text async for chunk in stream])
    whole = await client.completions.create(
        model=tiny_chat.name, prompt="Hello", max_tokens=8, temperature=0
    )
    assert text == whole.choices[0].text
