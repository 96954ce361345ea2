"""Embeddings in the engine: the last token's final hidden state, L2-normalized, equal to
transformers' (its last hidden state, after the final norm) on tiny random models; the same
alone, batched with generations, chunked or from the prefix cache; and nothing left behind."""

from __future__ import annotations

import pytest
import torch

from p3 import SamplingParams
from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request

from .tiny import load_reference, make_tiny_model

PROMPTS = [[5, 17, 33, 64, 9, 100, 7], [3, 4, 5], list(range(10, 90))]


@pytest.fixture(scope="module", params=["llama-gqa-untied", "qwen2-bias-tied"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("embed"), request.param)


@torch.inference_mode()
def reference(model_dir, prompt: list[int]) -> torch.Tensor:
    model = load_reference(model_dir)
    out = model(torch.tensor([prompt]), output_hidden_states=True)
    return torch.nn.functional.normalize(out.hidden_states[-1][0, -1], dim=-1)


def embed_all(engine: Engine, requests: list[Request]) -> dict[str, list[float]]:
    for request in requests:
        engine.add(request)
    got: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.embedding is not None:
                assert out.finish_reason == "stop" and out.new_token_ids == []
                got[out.request_id] = out.embedding
    return got


def test_embeddings_equal_transformers_last_hidden_state(model_dir):
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=8 << 20))
    requests = [Request(f"e{i}", p, embed=True) for i, p in enumerate(PROMPTS)]
    got = embed_all(engine, requests)
    for i, prompt in enumerate(PROMPTS):
        vector = torch.tensor(got[f"e{i}"])
        assert abs(float(vector.norm()) - 1.0) < 1e-5
        assert torch.allclose(vector, reference(model_dir, prompt), atol=2e-5)
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.num_kv_blocks


def test_the_same_batched_with_generations_chunked_or_cached(model_dir):
    config = EngineConfig(dtype="float32", kv_cache_bytes=8 << 20)
    alone = embed_all(Engine(model_dir, config), [Request("e", PROMPTS[2], embed=True)])["e"]
    engine = Engine(model_dir, config)
    generate = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    mixed = [Request("g0", PROMPTS[0], generate), Request("e", PROMPTS[2], embed=True),
             Request("g1", PROMPTS[1], generate)]  # fmt: skip
    assert torch.allclose(
        torch.tensor(embed_all(engine, mixed)["e"]), torch.tensor(alone), atol=1e-6
    )
    cached = embed_all(engine, [Request("again", PROMPTS[2], embed=True)])["again"]  # prefix hit
    assert torch.allclose(torch.tensor(cached), torch.tensor(alone), atol=1e-6)
    chunked = Engine(
        model_dir, EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=16)
    )
    got = embed_all(chunked, [Request("c", PROMPTS[2], embed=True)])["c"]
    assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-6)
    assert engine.num_free_blocks == engine.num_kv_blocks


def test_an_embedding_request_with_outputs_is_refused(model_dir):
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=8 << 20))
    with pytest.raises(ValueError, match="no outputs"):
        engine.add(Request("x", PROMPTS[0], embed=True, output_token_ids=(3,)))
