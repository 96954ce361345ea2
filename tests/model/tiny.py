"""Tiny random models of each supported architecture, built from transformers configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.2,  # peaked logits: greedy never hinges on a near tie
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama-gqa-untied": lambda: LlamaConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0
    ),
    "llama3-rope-scaling": lambda: LlamaConfig(
        **COMMON,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2-bias-tied": lambda: Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0
    ),
    # SmolLM2-like odd sizes: 3 KV heads, an odd FFN width and vocabulary, so that tensor
    # parallelism over 2 ranks splits heads 2:1, the FFN 68:67 and pads the vocabulary
    "llama-uneven": lambda: LlamaConfig(
        **{
            **COMMON,
            "hidden_size": 96,
            "intermediate_size": 135,
            "num_attention_heads": 6,
            "vocab_size": VOCAB - 1,
        },
        # vocab_size 255 (COMMON's 256 less one): prompts draw ids below VOCAB - 1
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "mistral": lambda: MistralConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None
    ),
}


def make_tiny_model(root: Path, name: str, tokenizer_dir: Path | None = None) -> Path:
    """Save a seeded random model (fp32 safetensors) to root/name; returns the directory."""
    out = root / name
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32)
    if name.startswith("qwen2"):  # random biases: transformers initialises them to zero
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_dir / f).exists():
                shutil.copy(tokenizer_dir / f, out / f)
    return out


def make_tiny_chat_model(root: Path, tokenizer_dir: Path, name: str = "llama-gqa-untied") -> Path:
    """A tiny random model whose vocabulary is a real tokenizer's, with that tokenizer (and
    chat template): servable over HTTP like any model. Saved as fp32 safetensors."""
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = CONFIGS[name]()
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = root / f"{name}-chat"
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


def load_reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, one prompt at a time (no padding), EOS ignored."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(num_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
    return tokens


def tiny_llama_bin(root: Path, tied: bool, num_shards: int = 1) -> tuple[Path, dict]:
    """A random LlamaForCausalLM saved the old way: pytorch_model*.bin (+ index when sharded)."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = root / f"tiny-{'tied' if tied else 'untied'}-{num_shards}"
    model.config.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    state = model.state_dict()
    if num_shards == 1:
        torch.save(state, out / "pytorch_model.bin")  # keeps tied tensors' shared storage
    else:
        save_bin_shards(state, out, num_shards)
    return out, {name: t.clone() for name, t in state.items()}


def save_bin_shards(state: dict, out: Path, num_shards: int) -> None:
    names = list(state)
    weight_map = {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = names[i::num_shards]
        torch.save({name: state[name] for name in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
