"""Quantized models end to end: safetensors quantized at load, `p3 quantize` checkpoints, the
mixed case (a linear whose input size is not whole blocks stays float), tensor parallelism."""

from __future__ import annotations

import random

import pytest

from p3 import LLM, SamplingParams
from p3.kernels.quant import QuantWeight
from p3.weights.quantize import quantize_checkpoint

from .test_tensor_parallel import run_ranks
from .tiny import VOCAB, make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3, 200], list(range(10, 60))]


def top20(llm: LLM, prompt: list[int]) -> dict[int, float]:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    return {token: lp.logprob for token, lp in out.logprobs[0].items()}


def blocks_of(llm: LLM) -> dict[str, str]:
    return {
        name: module.quant.kind
        for name, module in llm.engine.runner.model.named_modules()
        if isinstance(getattr(module, "quant", None), QuantWeight)
    }


@pytest.mark.parametrize("mode", ["int8", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("config", ["llama-gqa-untied", "qwen2-bias-tied", "llama-uneven"])
def test_quantized_at_load_runs_the_quantized_weights(tmp_path, default_model_dir, config, mode):
    """Against the same weights dequantized (quantization none of a `p3 quantize` copy), only
    the int8 rounding of the activations differs: the next token's top 20 (of 256) and their
    logprobs stay. A weight in the wrong place would share about 2 of them."""
    model_dir = make_tiny_model(tmp_path, config, default_model_dir)
    quant = LLM(model_dir, dtype="float32", quantization=mode, kv_cache_bytes=8 * 2**20)
    saved = quantize_checkpoint(model_dir, tmp_path / "q", mode)
    floats = LLM(saved, dtype="float32", quantization="none", kv_cache_bytes=8 * 2**20)
    kinds = blocks_of(quant)
    assert kinds["layers.0.attn.qkv"] == ("q8_0" if mode == "int8" else mode)
    assert kinds["embed"] == "q8_0" and not blocks_of(floats)
    if config == "llama-uneven":  # FFN width 135: down's input is not whole blocks
        assert "layers.0.mlp.down" not in kinds
    for prompt in PROMPTS:
        a, b = top20(floats, prompt), top20(quant, prompt)
        both = a.keys() & b.keys()
        assert len(both) >= 16
        assert max(abs(a[t] - b[t]) for t in both) < 0.5


def test_a_quantized_checkpoint_loads_as_it_was_quantized(tmp_path, default_model_dir):
    model_dir = make_tiny_model(tmp_path, "qwen2-bias-tied", default_model_dir)
    saved = quantize_checkpoint(model_dir, tmp_path / "q4", "q4_1")
    at_load = LLM(model_dir, dtype="float32", quantization="q4_1", kv_cache_bytes=8 * 2**20)
    stored = LLM(saved, dtype="float32", kv_cache_bytes=8 * 2**20)  # auto: as stored
    assert blocks_of(stored) == blocks_of(at_load)
    for prompt in PROMPTS:
        want = at_load.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
        got = stored.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
        assert got == want
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(model_dir, tmp_path / "q4", "q4_1")


def test_quantization_none_dequantizes_a_quantized_checkpoint(tmp_path, default_model_dir):
    saved = quantize_checkpoint(
        make_tiny_model(tmp_path, "llama-gqa-untied", default_model_dir), tmp_path / "q", "q8_0"
    )
    assert not blocks_of(LLM(saved, dtype="float32", quantization="none", kv_cache_bytes=2**22))


def test_a_quantized_checkpoint_splits_over_ranks(tmp_path, default_model_dir):
    """Blocks slice by rows (column parallel) and by whole blocks of inputs (row parallel):
    the ranks' greedy tokens are the single process's, over 2 tp ranks and over 2 stages."""
    saved = quantize_checkpoint(
        make_tiny_model(tmp_path, "llama-gqa-untied", default_model_dir), tmp_path / "q", "q8_0"
    )
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in (5, 33)]
    single = run_ranks([saved], 1, 1, prompts)
    assert run_ranks([saved], 2, 1, prompts) == single
    assert run_ranks([saved], 1, 2, prompts) == single


def test_placement_counts_the_bytes_held(tmp_path, default_model_dir):
    """A node's fit check weighs the weights as they will be held, not as fp32."""
    from p3.nodes.coordinator.placement import model_bytes

    as_stored = model_bytes(str(default_model_dir), 4)
    files = sum(f.stat().st_size for f in default_model_dir.glob("*.safetensors"))
    assert as_stored == files < model_bytes(str(default_model_dir), 4, "none") / 5
    model_dir = make_tiny_model(tmp_path, "llama-gqa-untied", default_model_dir)
    floats = model_bytes(str(model_dir), 4)
    assert model_bytes(str(model_dir), 4, "q4_0") == floats // 4 * 18 // 32
