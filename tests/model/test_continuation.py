"""A request moved off a failed node continues on another engine exactly as it would have
gone on: same positions, same seeded draws, penalties that see the outputs so far, max_tokens
counting them."""

from __future__ import annotations

import pytest

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request
from p3.sampling_params import SamplingParams

from .tiny import make_tiny_model

PROMPT = [5, 17, 33, 64, 9, 100, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cont"), "llama-gqa-untied")


def run(engine: Engine, request: Request) -> tuple[list[int], str]:
    engine.add(request)
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason or reason
    return tokens, reason


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(
            max_tokens=24, temperature=0.8, seed=3, presence_penalty=1.5, ignore_eos=True
        ),
    ],
    ids=["greedy", "seeded", "penalised"],
)
def test_a_continuation_equals_the_uninterrupted_run(model_dir, params):
    config = EngineConfig(dtype="float32", kv_cache_bytes=8 << 20)
    whole, reason = run(Engine(model_dir, config), Request("a", PROMPT, params))
    assert len(whole) == 24 and reason == "length"
    for cut in (1, 10, 23):
        moved = Request("b", PROMPT, params, output_token_ids=tuple(whole[:cut]))
        rest, reason = run(Engine(model_dir, config), moved)
        assert whole[:cut] + rest == whole, cut  # only the tokens after the cut, and the same
        assert reason == "length"


def test_outputs_that_fill_the_context_are_refused(model_dir):
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=8 << 20))
    too_long = Request("c", PROMPT, SamplingParams(), output_token_ids=(3,) * 600)
    with pytest.raises(ValueError, match="outputs so far"):
        engine.add(too_long)
