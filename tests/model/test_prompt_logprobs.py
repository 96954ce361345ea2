"""prompt_logprobs: every prompt token's logprob (and top k) as transformers computes it, also
when the prompt is prefilled in chunks and when its blocks sit in the prefix cache already."""

from __future__ import annotations

import pytest
import torch

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request
from p3.sampling_params import SamplingParams

from .tiny import load_reference, make_tiny_model

PROMPT = [(7 * i + 3) % 250 + 3 for i in range(45)]  # three blocks of 16, less one token
PARAMS = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("plp"), "qwen2-bias-tied")
    return model_dir, load_reference(model_dir)


def prompt_logprobs(engine: Engine, request_id: str, params=PARAMS):
    engine.add(Request(request_id, PROMPT, params))
    found = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert found is None, "delivered twice"
                found = out.prompt_logprobs
    return found


@pytest.mark.parametrize("budget", [2048, 7], ids=["whole", "chunks-of-7"])
def test_prompt_logprobs_match_transformers(tiny, budget):
    model_dir, ref = tiny
    config = EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=budget)
    engine = Engine(model_dir, config)
    with torch.inference_mode():
        want = ref(torch.tensor([PROMPT])).logits[0].log_softmax(-1)
    for request_id in ("first", "cached"):  # the second finds the prompt's blocks cached
        got = prompt_logprobs(engine, request_id)
        assert [t for t, _, _ in got] == PROMPT[1:]
        lps = torch.tensor([lp for _, lp, _ in got])
        torch.testing.assert_close(
            lps, want[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
        )
        tops = [[t for t, _ in top] for _, _, top in got]
        assert tops == want[:-1].topk(3, dim=-1).indices.tolist()
    assert engine.num_free_blocks == engine.num_kv_blocks


def test_no_prompt_logprobs_unless_asked(tiny):
    engine = Engine(tiny[0], EngineConfig(dtype="float32", kv_cache_bytes=8 << 20))
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    assert prompt_logprobs(engine, "plain", plain) is None
