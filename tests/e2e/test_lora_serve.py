"""`p3 serve --lora a=DIR --lora b=DIR --nodes 2` on the default model: adapters listed in
/v1/models with their parent, chosen by the request's model, each answering as p3's offline
LLM does with it; loaded and unloaded at run time (vLLM's routes, behind the API key); and
streams under an adapter moved with it when their node is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest
import torch
from openai import AsyncOpenAI, NotFoundError
from safetensors.torch import save_file

from p3 import LLM, LoRARequest, SamplingParams
from p3.weights.files import load_config

from . import openai_cluster

pytestmark = pytest.mark.timeout(300)
MODEL = "SmolLM2-135M-Instruct"
KEY = "lora-test-key"
PROMPT = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47]
NUM_NEW = 12


def write_adapter(model_dir, out, seed: int, rank: int = 4):
    """A PEFT-format LoRA adapter on q_proj and v_proj, random A and B, big enough to move
    the greedy tokens (tests/model/test_lora.py checks the format against peft itself)."""
    hf = load_config(model_dir)
    d, layers = hf["hidden_size"], hf["num_hidden_layers"]
    kv = hf["num_key_value_heads"] * (hf.get("head_dim") or d // hf["num_attention_heads"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj, rows in (("q_proj", d), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.3
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(default_model_dir, root / name, seed) for name, seed in
            (("a", 1), ("b", 2), ("c", 3))}  # fmt: skip


@pytest.fixture(scope="module")
def offline(adapters, default_model_dir):
    """p3's own greedy answers, in-process: the base and each adapter."""
    llm = LLM(default_model_dir, dtype="float32", kv_cache_bytes=64 * 2**20, enable_lora=True)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    answers = {}
    for i, name in enumerate((None, "a", "b", "c")):
        lora = LoRARequest(name, i, str(adapters[name])) if name else None
        out = llm.generate([{"prompt_token_ids": PROMPT}], params, lora_request=lora)[0]
        answers[name] = list(out.outputs[0].token_ids)
    assert len({tuple(a) for a in answers.values()}) == 4  # each adapter changes the answer
    return answers


@pytest.fixture(scope="module")
def cluster(adapters, default_model_dir):
    args = ["--nodes", "2", "--dtype", "float32", "--api-key", KEY]
    args += ["--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}"]
    served = openai_cluster.serve(*args)
    yield served
    served.stop()


def client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


async def greedy(api: AsyncOpenAI, model: str) -> list[int]:
    out = await api.completions.create(
        model=model, prompt=PROMPT, max_tokens=NUM_NEW, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    return out.choices[0].model_extra["token_ids"]


async def post(url: str, route: str, body: dict, key: str = KEY) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s, s.post(url + route, json=body, headers=headers) as r:
        return r.status, await r.text()


async def test_adapters_listed_with_their_parent_and_answer_as_offline(cluster, offline):
    api = client(cluster.url)
    listed = {m.id: m.model_extra.get("parent") for m in (await api.models.list()).data}
    assert listed == {MODEL: None, "a": MODEL, "b": MODEL}
    got = await asyncio.gather(*(greedy(api, name) for name in (MODEL, "a", "b")))
    assert got == [offline[None], offline["a"], offline["b"]]


async def test_load_and_unload_at_run_time(cluster, adapters, offline, tmp_path):
    api, url = client(cluster.url), cluster.url
    body = {"lora_name": "c", "lora_path": str(adapters["c"])}
    assert (await post(url, "/v1/load_lora_adapter", body, key="wrong"))[0] == 401
    status, text = await post(url, "/v1/load_lora_adapter", body)
    assert (status, text) == (200, "Success: LoRA adapter 'c' added successfully.")
    assert await greedy(api, "c") == offline["c"]  # routed as soon as the call returns
    assert "c" in {m.id for m in (await api.models.list()).data}
    not_adapter = {"lora_name": "d", "lora_path": str(tmp_path)}
    status, text = await post(url, "/v1/load_lora_adapter", not_adapter)
    assert status == 400 and "adapter_config.json" in text, text
    status, _ = await post(url, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 200
    with pytest.raises(NotFoundError):
        await greedy(api, "c")
    assert (await post(url, "/v1/unload_lora_adapter", {"lora_name": "c"}))[0] == 404
    assert await greedy(api, "a") == offline["a"]  # the others stay


async def test_streams_under_an_adapter_survive_their_node_killed(cluster):
    api, url = client(cluster.url), cluster.url
    stream = openai_cluster.MixedStreams("a", "Story {i}: once upon a time,", 40, 300)
    reference = await asyncio.gather(*(stream(api, i) for i in range(4)))
    started = asyncio.Event()
    runs = [asyncio.create_task(stream(api, i, started)) for i in range(4)]
    await asyncio.wait_for(started.wait(), 60)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s, s.get(url + "/cluster", headers=headers) as r:
        nodes = [n for n in (await r.json())["nodes"] if "load" in n]
    victim = max(nodes, key=lambda n: n["load"]["num_running"] + n["load"]["num_tokens_to_do"])
    assert victim["load"]["num_running"] > 0, victim  # it holds streams in mid-flight
    assert "a" in victim["adapters"]
    os.kill(victim["pid"], signal.SIGKILL)
    results = await asyncio.gather(*runs)
    for i, ((text, finish, usage), (want, _, _)) in enumerate(zip(results, reference, strict=True)):
        assert (text, finish, usage.completion_tokens) == (want, "length", 40), i
