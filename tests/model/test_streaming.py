"""--sliding-window W --attention-sinks S (StreamingLLM): sequences generate past the model's
context with bounded KV, each token the transformers greedy choice over the view
(p3.engine.sequence.window_view) of the tokens before it, a batch at a time."""

from __future__ import annotations

import random

import pytest
import torch

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request, window_view
from p3.sampling_params import SamplingParams

from .tiny import VOCAB, load_reference, make_tiny_model

SINKS, WINDOW, CONTEXT = 4, 24, 48  # the engine's context is 48: the streams go far past it
NUM_NEW = 90


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("stream"), "llama-gqa-untied")
    return model_dir, load_reference(model_dir)


@torch.inference_mode()
def reference(model, prompt: list[int], num_new: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_new):
        view = window_view(len(tokens), SINKS, WINDOW)
        seen = tokens if view is None else tokens[: view[0]] + tokens[view[1] :]
        tokens.append(int(model(torch.tensor([seen])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_window_view_is_a_function_of_the_length():
    assert window_view(27, 4, 24) is None
    assert window_view(28, 4, 24) == (4, 16)  # full: back to sinks + 12
    assert window_view(39, 4, 24) == (4, 16)  # growing again: 12 .. 23 latest
    assert window_view(40, 4, 24) == (4, 28)


def test_greedy_streams_past_the_context_with_bounded_kv(tiny):
    model_dir, ref = tiny
    config = EngineConfig(dtype="float32", kv_cache_bytes=2**20, max_model_len=CONTEXT,
                          sliding_window=WINDOW, attention_sinks=SINKS)  # fmt: skip
    engine = Engine(model_dir, config)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in (5, 20, 70)]
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    tokens = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):  # the last prompt is longer than the context itself
        engine.add(Request(str(i), p, params))
    most_blocks = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        most_blocks = max(most_blocks, engine.num_kv_blocks - engine.num_free_blocks)
    assert most_blocks <= len(prompts) * -(-(SINKS + WINDOW) // 16)
    assert engine.num_free_blocks == engine.num_kv_blocks
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == reference(ref, p, NUM_NEW), i


def test_without_a_window_the_context_still_ends_the_stream(tiny):
    model_dir, _ = tiny
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=2**20,
                                            max_model_len=CONTEXT))  # fmt: skip
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    engine.add(Request("0", [5, 6, 7], params))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) < 48
