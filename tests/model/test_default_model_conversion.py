"""The cached SmolLM2-135M-Instruct conversion equals transformers' own GGUF load."""

from __future__ import annotations

import math
import time

import pytest
import torch

from p3.kernels.quant import QuantWeight
from p3.tokenizer import Tokenizer
from p3.weights.files import DEFAULT_MODEL, default_gguf_path, load_config, resolve_model
from p3.weights.read import iter_state_dict


@pytest.fixture(scope="module")
def transformers_gguf_state() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.state_dict()


def test_tensors_equal_transformers_gguf_load(default_model_dir, transformers_gguf_state):
    """Dequantized, the stored blocks are exactly what transformers reads from the GGUF."""
    ours = dict(iter_state_dict(default_model_dir))
    assert set(transformers_gguf_state) - set(ours) == {"lm_head.weight"}  # tied to embeddings
    for name, tensor in ours.items():
        floats = tensor.dequantize() if isinstance(tensor, QuantWeight) else tensor
        assert floats.dtype == torch.float32
        assert torch.equal(floats, transformers_gguf_state[name]), name


def test_blocks_are_the_gguf_bytes(default_model_dir):
    """Q4_1 linears and the Q8_0 embedding stay blocks: the cache holds the file's bytes."""
    kinds = {
        name: tensor.kind
        for name, tensor in iter_state_dict(default_model_dir)
        if isinstance(tensor, QuantWeight)
    }
    assert kinds["model.embed_tokens.weight"] == "q8_0"
    linears = {k for n, k in kinds.items() if n.startswith("model.layers.")}
    assert linears == {"q4_1"} and len(kinds) == 1 + 30 * 7
    cached = sum(f.stat().st_size for f in default_model_dir.glob("*.safetensors"))
    assert abs(cached - default_gguf_path().stat().st_size) < 3 * 2**20  # + f32 norms, headers


def test_config_facts(default_model_dir):
    config = load_config(default_model_dir)
    expected = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {key: config[key] for key in expected} == expected


def test_parameter_count(default_model_dir):
    sizes = [math.prod(t.shape) for _, t in iter_state_dict(default_model_dir)]
    assert sum(sizes) == 134_515_008


def test_cached_model_resolves_fast(default_model_dir):
    start = time.perf_counter()
    assert resolve_model(None) == resolve_model(DEFAULT_MODEL) == default_model_dir
    assert time.perf_counter() - start < 0.05


def test_tokenizer_round_trips(default_model_dir):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    text = "The quick brown fox 🦊 jumps over 13 lazy dogs. 日本語も。"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.id_to_token(i) for i in (0, 1, 2)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token_ids == {2} and tokenizer.vocab_size == 49152
    assert tokenizer.encode("Hi")[0] != tokenizer.bos_token_id  # no BOS added
