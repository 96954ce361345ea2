"""`p3 serve --model A --model B --model C --nodes 3`: three models placed at once, listed by
/v1/models, each request answered by the model it names (its transformers greedy tokens)."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI, NotFoundError
from transformers import AutoTokenizer

from ..model.tiny import load_reference, make_tiny_chat_model, reference_greedy
from . import openai_cluster

pytestmark = pytest.mark.timeout(240)
CONFIGS = ("llama-gqa-untied", "qwen2-bias-tied", "llama3-rope-scaling")
NUM_NEW = 12


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("models")
    return [make_tiny_chat_model(root, default_model_dir, name) for name in CONFIGS]


@pytest.fixture(scope="module")
def cluster(three_models):
    args = ["--nodes", "3", "--dtype", "float32"]
    args += [a for model in three_models for a in ("--model", str(model))]
    served = openai_cluster.serve(*args)
    try:
        for model in three_models:  # every model routed, not just the first
            openai_cluster.wait_model(served.url, str(model))
        yield served
    finally:
        served.stop()


async def test_three_models_listed_and_each_answers_as_itself(three_models, cluster):
    client = AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused")
    listed = sorted(m.id for m in (await client.models.list()).data)
    assert listed == sorted(str(m) for m in three_models)
    prompt = [400, 500, 600, 700]

    async def complete(model) -> str:
        out = await client.completions.create(
            model=model.name, prompt=prompt, max_tokens=NUM_NEW, temperature=0
        )
        return out.choices[0].text

    got = await asyncio.gather(*(complete(m) for m in three_models))
    tokenizer = AutoTokenizer.from_pretrained(three_models[0])
    want = [
        tokenizer.decode(
            reference_greedy(load_reference(m), prompt, NUM_NEW), skip_special_tokens=True
        )
        for m in three_models
    ]
    assert got == want
    assert len(set(got)) == 3  # three different models, three different answers


async def test_an_unknown_model_is_a_404(cluster):
    client = AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused")
    with pytest.raises(NotFoundError):
        await client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
