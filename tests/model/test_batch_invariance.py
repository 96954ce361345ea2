"""Batch invariance of the default mode (the default model as stored, quantized linears,
every token's attention through the paged kernel): a sequence's greedy tokens are the same
alone, in a batch, with its prompt chunked, and continued from its own tokens (a move)."""

from __future__ import annotations

import pytest

from p3 import LLM, SamplingParams

TEXT = (
    "Once upon a time, in a small village, there lived a girl who loved to read books about "
    "the stars and the moon."
)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
OTHERS = [f"Question {i}: what is {i} plus {i}?" for i in range(7)]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", kv_cache_bytes=128 * 2**20)


@pytest.fixture(scope="module")
def alone(llm) -> list[int]:
    return list(llm.generate(TEXT, GREEDY)[0].outputs[0].token_ids)


def test_in_a_batch_of_eight(llm, alone):
    outs = llm.generate([*OTHERS[:3], TEXT, *OTHERS[3:]], GREEDY)
    assert list(outs[3].outputs[0].token_ids) == alone


def test_with_the_prompt_chunked(default_model_dir, alone):
    chunked = LLM(
        default_model_dir, dtype="float32", kv_cache_bytes=64 * 2**20, max_num_batched_tokens=7
    )
    assert list(chunked.generate(TEXT, GREEDY)[0].outputs[0].token_ids) == alone


def test_continued_from_its_own_tokens(llm, alone):
    """What a move does: the prompt and the tokens so far prefilled in one go, then on."""
    ids = llm.tokenizer.encode(TEXT, False) + alone[:17]
    rest = SamplingParams(max_tokens=len(alone) - 17, temperature=0.0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": ids}, rest)[0].outputs[0].token_ids
    assert list(out) == alone[17:]


def test_the_cpp_layer_loop_gives_the_modules_bits(default_model_dir):
    """The default model's steps go through one C++ call for all layers (LayerLoop); the
    Python modules, calling the same kernels one by one, give the same tokens and logprobs."""
    from p3.engine.layer_loop import LayerLoop

    llm = LLM(default_model_dir, dtype="float32", kv_cache_bytes=64 * 2**20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [TEXT, *OTHERS[:3]]
    looped = llm.generate(prompts, params)
    assert isinstance(llm.engine.runner.model._loop, LayerLoop)
    llm.engine.runner.model._loop = False  # the modules from here on
    plain = llm.generate(prompts, params)
    for a, b in zip(looped, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
