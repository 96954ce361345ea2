"""A tiny random model of every family p3 runs, from transformers' own config classes.

Weights are scaled so logits are sharp (greedy never hinges on a near tie), and biases and
norm weights are random: transformers initialises them to 0 and 1, which hides bugs (a bias
loaded into the wrong rows, a norm that never multiplies). Sliding windows are 8 or 12, so
prompts of 40 and more tokens outgrow them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 256
WINDOW = 8
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def _sizes(**overrides):
    return {**SIZES, **overrides}


# family name (as the test ids show it) -> a transformers config
FAMILIES = {
    "llama-bias": lambda: tf.LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True),
    "mistral-window": lambda: tf.MistralConfig(**SIZES, sliding_window=WINDOW),
    "mixtral": lambda: tf.MixtralConfig(
        **SIZES, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    "qwen2-window": lambda: tf.Qwen2Config(
        **_sizes(num_hidden_layers=3),
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "qwen3": lambda: tf.Qwen3Config(**SIZES, head_dim=16),
    "qwen2-moe": lambda: tf.Qwen2MoeConfig(
        **_sizes(num_hidden_layers=3),
        **MOE,
        num_experts=4,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
    ),
    "qwen3-moe": lambda: tf.Qwen3MoeConfig(**SIZES, **MOE, num_experts=4, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**SIZES, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(
        **SIZES,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=8.0,
    ),  # fmt: skip
    "gemma3": lambda: tf.Gemma3TextConfig(
        **_sizes(num_hidden_layers=3),
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "phi3-longrope": lambda: tf.Phi3Config(
        **_sizes(pad_token_id=0),
        sliding_window=12,
        original_max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "original_max_position_embeddings": 128,
            "partial_rotary_factor": 1.0,
        },
    ),
    "phi": lambda: tf.PhiConfig(**SIZES, partial_rotary_factor=0.5),
    "olmo": lambda: tf.OlmoConfig(**SIZES, clip_qkv=3.0),
    "olmo2": lambda: tf.Olmo2Config(**SIZES),
    "granite": lambda: tf.GraniteConfig(
        **SIZES,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
    ),  # fmt: skip
    "stablelm": lambda: tf.StableLmConfig(**SIZES, partial_rotary_factor=0.5, use_qkv_bias=True),
    "gpt-neox": lambda: tf.GPTNeoXConfig(
        **{k: v for k, v in SIZES.items() if k != "num_key_value_heads"}, rotary_pct=0.5
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    ),  # fmt: skip
    "starcoder2": lambda: tf.Starcoder2Config(**SIZES, sliding_window=WINDOW),
    "falcon": lambda: tf.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),  # fmt: skip
    "falcon-new": lambda: tf.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),  # fmt: skip
    "smollm3": lambda: tf.SmolLM3Config(**_sizes(num_hidden_layers=4), no_rope_layer_interval=2),
    "helium": lambda: tf.HeliumConfig(**SIZES, head_dim=16),
}
OFFSET_NORMS = ("gemma",)  # their norms multiply by (1 + weight): random around 0


def make_family_model(root: Path, name: str) -> Path:
    """Save a seeded random model (fp32 safetensors) of family `name` to root/name."""
    out = root / name
    torch.manual_seed(0)
    config = FAMILIES[name]()
    config.initializer_range = 0.25
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    offset = name.startswith(OFFSET_NORMS)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            noise = torch.randn(param.shape, generator=gen) * 0.2
            is_bias = param_name.endswith("bias")
            param.copy_(noise if is_bias or offset else 1.0 + noise)
    model.save_pretrained(out, safe_serialization=True)
    return out
