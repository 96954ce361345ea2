"""Every family against transformers on the same random weights, fp32: prefill logits within
1e-4 (through the batch-invariant paged kernel and through the varlen prefill), and a batch
of prompts of different lengths, some longer than any sliding window, decoding the same
greedy tokens with the same top logprobs."""

from __future__ import annotations

import random

import pytest
import torch

from p3.config import EngineConfig, ModelConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request
from p3.sampling_params import SamplingParams
from p3.weights.files import load_config

from .families import FAMILIES, VOCAB, make_family_model
from .test_parity import _offsets
from .tiny import load_reference

NUM_NEW = 8
TOP = 3
LENGTHS = (5, 41, 1, 30)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_dir = make_family_model(tmp_path_factory.mktemp("family"), request.param)
    return model_dir, load_reference(model_dir)


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]


def test_config_reads_the_family(family):
    model_dir, ref = family
    cfg = ModelConfig.from_hf(load_config(model_dir))
    windows = getattr(ref.config, "layer_types", None)
    if windows is not None and getattr(ref.config, "sliding_window", None):
        want = tuple(ref.config.sliding_window if t == "sliding_attention" else 0 for t in windows)
        assert cfg.windows == want


def test_prefill_logits_match_transformers(family):
    model_dir, ref = family
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=4 * 2**20))
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    for i, p in enumerate(prompts()):
        engine.add(Request(str(i), p, greedy))
    engine._drain_inbox()
    batch = engine.scheduler.schedule()
    runner = engine.runner
    paths = [True, False] if runner.invariant_attention else [False]
    with torch.inference_mode():
        wants = [ref(torch.tensor([seq.token_ids])).logits[0] for seq in batch.seqs]
        for invariant in paths:  # every token through the paged kernel; varlen prefill
            runner.invariant_attention = invariant
            prepared = runner.prepare(batch)
            hidden = runner.model(prepared.input_ids, prepared.positions, prepared.ctx)
            logits = runner.model.compute_logits(hidden)
            for seq, start, want in zip(batch.seqs, _offsets(batch), wants, strict=True):
                got = logits[start : start + len(seq)]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], num_tokens: int):
    """transformers' greedy tokens (one prompt, its KV cache) and each step's log-softmax."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, logprobs = [], []
    for _ in range(num_tokens):
        row = out.logits[0, -1].float().log_softmax(-1)
        tokens.append(int(row.argmax()))
        logprobs.append(row)
        out = model(torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
    return tokens, logprobs


def test_batched_greedy_tokens_and_top_logprobs_match_transformers(family):
    model_dir, ref = family
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=4 * 2**20))
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=TOP)
    batch = prompts()
    tokens = {str(i): [] for i in range(len(batch))}
    tops = {str(i): [] for i in range(len(batch))}
    for i, p in enumerate(batch):
        engine.add(Request(str(i), p, params))
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            tops[out.request_id] += out.top_logprobs or []
    assert engine.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    for i, p in enumerate(batch):
        want_tokens, want_rows = reference_greedy(ref, p, NUM_NEW)
        assert tokens[str(i)] == want_tokens, f"prompt {i} ({len(p)} tokens)"
        for step, (top, row) in enumerate(zip(tops[str(i)], want_rows, strict=True)):
            ids = [t for t, _ in top]
            got = torch.tensor([lp for _, lp in top])
            torch.testing.assert_close(got, row[ids], atol=1e-4, rtol=0, msg=f"step {step}")
            assert set(ids) == set(row.topk(TOP).indices.tolist())


def test_q8_0_prefill_tracks_fp32(family):
    """Every family's linears (experts' too) held as q8_0 blocks: logits stay near fp32's,
    about as near as rounding the weights to q8_0 alone leaves them (a mis-wired block
    layout gives an error near 1)."""
    model_dir, ref = family
    config = EngineConfig(dtype="float32", kv_cache_bytes=4 * 2**20, quantization="q8_0")
    engine = Engine(model_dir, config)
    held = [m for m in engine.runner.model.modules() if getattr(m, "quant", None) is not None]
    assert len(held) >= 2 * len(engine.runner.model.layers) + 1
    for i, p in enumerate(prompts()):
        engine.add(Request(str(i), p, SamplingParams(max_tokens=1)))
    engine._drain_inbox()
    batch = engine.scheduler.schedule()
    prepared = engine.runner.prepare(batch)
    with torch.inference_mode():
        hidden = engine.runner.model(prepared.input_ids, prepared.positions, prepared.ctx)
        logits = engine.runner.model.compute_logits(hidden)
        want = torch.cat([ref(torch.tensor([seq.token_ids])).logits[0] for seq in batch.seqs])
    starts = zip(batch.seqs, _offsets(batch), strict=True)
    got = torch.cat([logits[s : s + len(seq)] for seq, s in starts])
    assert ((got - want).norm() / want.norm()).item() < 0.2
