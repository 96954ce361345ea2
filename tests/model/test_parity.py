"""p3 against transformers on the same weights: logits within 1e-4, greedy tokens identical."""

from __future__ import annotations

import random

import pytest
import torch

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request
from p3.sampling_params import SamplingParams

from .tiny import CONFIGS, VOCAB, load_reference, make_tiny_model, reference_greedy

NUM_NEW = 32
GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny"), request.param)
    return model_dir, load_reference(model_dir)


def prompts(seed: int = 0, lengths=(5, 17, 33, 64, 1, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in lengths]


def fp32_engine(model_dir, **options) -> Engine:
    return Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=8 * 2**20, **options))


def run_to_end(engine: Engine, requests: list[Request], join_after: dict[int, list[Request]] = ()):
    """Step until done; join_after[k] are added after step k. Returns tokens per request."""
    join_after = dict(join_after or {})
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for batch in join_after.values():
        tokens.update({r.request_id: [] for r in batch})
    for r in requests:
        engine.add(r)
    step = 0
    while engine.has_unfinished() or join_after:
        for r in join_after.pop(step, []):
            engine.add(r)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    assert engine.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return tokens


def expected(ref, prompt_list):
    return {str(i): reference_greedy(ref, p, NUM_NEW) for i, p in enumerate(prompt_list)}


def requests_for(prompt_list, params=GREEDY):
    return [Request(str(i), p, params) for i, p in enumerate(prompt_list)]


def test_prefill_logits_match_transformers(tiny):
    model_dir, ref = tiny
    engine = fp32_engine(model_dir)
    batch_prompts = prompts()
    for i, p in enumerate(batch_prompts):
        engine.add(Request(str(i), p, GREEDY))
    engine._drain_inbox()
    batch = engine.scheduler.schedule()
    prepared = engine.runner.prepare(batch)
    with torch.inference_mode():
        hidden = engine.runner.model(prepared.input_ids, prepared.positions, prepared.ctx)
        logits = engine.runner.model.compute_logits(hidden)
        offsets = _offsets(batch)
        for seq, start in zip(batch.seqs, offsets, strict=True):
            want = ref(torch.tensor([seq.token_ids])).logits[0]
            got = logits[start : start + len(seq)]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _offsets(batch) -> list[int]:
    """Where each sequence starts in the packed batch (decode tokens first, then prefill)."""
    order = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
    order += [i for i, n in enumerate(batch.num_new_tokens) if n > 1]
    offsets, pos = [0] * len(order), 0
    for i in order:
        offsets[i], pos = pos, pos + batch.num_new_tokens[i]
    return offsets


def test_decode_logits_match_transformers(tiny, monkeypatch):
    model_dir, ref = tiny
    engine = fp32_engine(model_dir)
    prompt = prompts(lengths=(21,))[0]
    seen: list[torch.Tensor] = []
    original = engine.runner.model.compute_logits
    monkeypatch.setattr(
        engine.runner.model, "compute_logits", lambda h: seen.append(original(h)) or seen[-1]
    )
    tokens = run_to_end(engine, [Request("0", prompt, GREEDY)])["0"]
    with torch.inference_mode():
        want = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(torch.cat(seen), want, atol=1e-4, rtol=0)


def test_greedy_batch_of_different_lengths(tiny):
    model_dir, ref = tiny
    batch_prompts = prompts()
    got = run_to_end(fp32_engine(model_dir), requests_for(batch_prompts))
    assert got == expected(ref, batch_prompts)


# the scheduling cases are about the scheduler, not the architecture: two configs suffice
SCHEDULING = ("llama-uneven", "qwen2-bias-tied")


def scheduling_only(model_dir) -> None:
    if model_dir.name not in SCHEDULING:
        pytest.skip("scheduling cases run on " + ", ".join(SCHEDULING))


def test_greedy_with_requests_joining_mid_flight(tiny):
    model_dir, ref = tiny
    scheduling_only(model_dir)
    batch_prompts = prompts()
    reqs = requests_for(batch_prompts)
    got = run_to_end(fp32_engine(model_dir), reqs[:2], join_after={3: reqs[2:4], 9: reqs[4:]})
    assert got == expected(ref, batch_prompts)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_with_shared_prefixes(tiny, prefix_caching):
    model_dir, ref = tiny
    scheduling_only(model_dir)
    common = prompts(seed=1, lengths=(37,))[0]
    batch_prompts = [common + tail for tail in prompts(seed=2, lengths=(3, 20, 1))] + [common]
    engine = fp32_engine(model_dir, enable_prefix_caching=prefix_caching)
    first = run_to_end(engine, requests_for(batch_prompts[:1]))
    rest = run_to_end(engine, requests_for(batch_prompts)[1:])
    assert first | rest == expected(ref, batch_prompts)
    assert (engine.block_manager.hash_to_block != {}) == prefix_caching


def test_greedy_with_small_chunked_prefill(tiny):
    model_dir, ref = tiny
    scheduling_only(model_dir)
    batch_prompts = prompts()
    engine = fp32_engine(model_dir, max_num_batched_tokens=7)
    assert run_to_end(engine, requests_for(batch_prompts)) == expected(ref, batch_prompts)


def test_greedy_under_preemption_by_tiny_kv_budget(tiny):
    model_dir, ref = tiny
    scheduling_only(model_dir)
    batch_prompts = prompts()
    per_block = 2 * 2 * 16 * engine_kv_width(model_dir) * 4
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=12 * per_block))
    got = run_to_end(engine, requests_for(batch_prompts))
    assert engine.scheduler.num_preemptions > 0
    assert got == expected(ref, batch_prompts)


def engine_kv_width(model_dir) -> int:
    cfg = CONFIGS[model_dir.name]()
    heads = cfg.num_key_value_heads
    return heads * (cfg.hidden_size // cfg.num_attention_heads)
