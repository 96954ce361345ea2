"""The engine on an int8 KV cache: greedy tokens against the fp32 cache's, its block count,
and the paths that re-read or rebuild the cache (chunked prefill, prefix caching, preemption,
a moved stream's re-prefill), with every block back in the pool at the end.

Int8 K/V move the logits a little (here up to ~0.08 in logprob), so a greedy run follows the
fp32 run until a step where the top two tokens are nearly tied, then goes its own way: tokens
are compared up to each run's first divergence. Among int8 runs the tokens are exact: on the
CPU every token, prefill included, attends through the paged kernel over the (int8) cache
(batch-invariant attention), so chunking, preemption, prefix hits and moves change nothing.
"""

from __future__ import annotations

import random

import pytest
import torch

from p3 import LLM, SamplingParams
from p3.config import EngineConfig, ModelConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request
from p3.weights.files import load_config

from .tiny import VOCAB, make_tiny_model

NUM_NEW = 32
GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
LENGTHS = (5, 17, 33, 64, 1, 40, 150, 300)  # within one block, across blocks, long
# Tokens before the first divergence, over all of them, at least (measured here: 0.86-1.0;
# the margin is for other ISAs' kernels, which round differently).
MIN_AGREEMENT = 0.6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    """A tiny random Llama (GQA, head_dim 16) with the default model's tokenizer."""
    root = tmp_path_factory.mktemp("kv-int8")
    return make_tiny_model(root, "llama-gqa-untied", tokenizer_dir=default_model_dir)


@pytest.fixture(scope="module")
def fp32_tokens(tiny_dir) -> list[list[int]]:
    return greedy(LLM(tiny_dir, dtype="float32", kv_cache_bytes=4 << 20), prompts())


def prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in lengths]


def greedy(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], GREEDY)
    engine = llm.engine
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outputs]


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    """The share of tokens produced before each run's first divergence from expected."""
    same = 0
    for a, b in zip(expected, got, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return same / sum(map(len, expected))


def run_to_end(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert engine.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return tokens


def int8_engine(tiny_dir, **options) -> Engine:
    options.setdefault("kv_cache_bytes", 4 << 20)
    return Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_dtype="int8", **options))


@pytest.fixture(scope="module")
def int8_tokens(tiny_dir) -> list[list[int]]:
    llm = LLM(tiny_dir, dtype="float32", kv_cache_dtype="int8", kv_cache_bytes=4 << 20)
    return greedy(llm, prompts())


def test_int8_greedy_mostly_agrees_with_the_fp32_cache_and_frees_every_block(
    tiny_dir, fp32_tokens, int8_tokens
):
    llm = LLM(tiny_dir, dtype="float32", kv_cache_dtype="int8", kv_cache_bytes=4 << 20)
    attn = llm.engine.runner.model.layers[0].attn
    assert attn.k_cache.dtype == attn.v_cache.dtype == torch.int8
    assert attn.k_scale.dtype == torch.float32 and attn.k_scale.shape == attn.k_cache.shape[:3]
    assert agreement(fp32_tokens, int8_tokens) >= MIN_AGREEMENT
    assert greedy(llm, prompts()) == int8_tokens  # another engine, the same tokens
    assert greedy(llm, prompts()) == int8_tokens  # and again: nothing left behind


def test_int8_blocks_fill_the_same_memory_about_four_times_over(tiny_dir):
    budget = 4 << 20
    fp32 = Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_bytes=budget))
    int8 = int8_engine(tiny_dir, kv_cache_bytes=budget)
    head_dim = fp32.model_config.head_dim  # 16: a scale is 4 bytes per 16 int8 values
    ratio = int8.num_kv_blocks / fp32.num_kv_blocks
    assert ratio == pytest.approx(4 * head_dim / (head_dim + 4), rel=0.01)
    for engine in (fp32, int8):  # the allocated tensors are the bytes the count assumed
        layers = engine.runner.model.layers
        caches = [(a.k_cache, a.v_cache, a.k_scale, a.v_scale) for a in (x.attn for x in layers)]
        allocated = sum(t.nbytes for group in caches for t in group if t is not None)
        block_bytes = engine.config.kv_block_bytes(engine.model_config)
        assert allocated == engine.num_kv_blocks * block_bytes
        assert budget - block_bytes < allocated <= budget


def test_int8_tokens_do_not_depend_on_chunking_preemption_or_company(tiny_dir, int8_tokens):
    assert int8_engine(tiny_dir).runner.invariant_attention
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(prompts())]
    # chunks of 7 tokens: every chunk after the first reads an int8 prefix
    chunked = run_to_end(int8_engine(tiny_dir, max_num_batched_tokens=7), requests)
    assert [chunked[str(i)] for i in range(len(LENGTHS))] == int8_tokens
    # twelve blocks for six sequences: preempted ones are recomputed, partly from int8 blocks
    # still in the prefix cache
    model = ModelConfig.from_hf(load_config(tiny_dir))
    block_bytes = EngineConfig(kv_cache_dtype="int8").kv_block_bytes(model)
    engine = int8_engine(tiny_dir, kv_cache_bytes=12 * block_bytes)
    tight = run_to_end(engine, requests[:6])
    assert engine.scheduler.num_preemptions > 0
    assert [tight[str(i)] for i in range(6)] == int8_tokens[:6]
    alone = run_to_end(int8_engine(tiny_dir), requests[3:4])
    assert alone["3"] == int8_tokens[3]


def test_int8_prefix_cache_hits_read_the_quantized_prefix(tiny_dir, int8_tokens):
    engine = int8_engine(tiny_dir)
    prompt = prompts()[6]  # 150 tokens: 9 full blocks to share
    first = run_to_end(engine, [Request("a", prompt, GREEDY)])["a"]
    engine.add(Request("b", prompt, GREEDY))
    second, cached = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            second += out.new_token_ids
            cached = max(cached, out.num_cached_tokens)
    assert cached == 144 and engine.num_free_blocks == engine.num_kv_blocks
    assert second == first == int8_tokens[6]


def test_a_moved_stream_re_prefills_into_int8_and_goes_on_exactly(tiny_dir, int8_tokens):
    prompt, whole = prompts()[3], int8_tokens[3]
    for cut in (1, 10, 31):
        moved = Request("b", prompt, GREEDY, output_token_ids=tuple(whole[:cut]))
        rest = run_to_end(int8_engine(tiny_dir), [moved])["b"]
        assert rest == whole[cut:], cut
