"""config.json as transformers 5 saves it and as older Hub checkpoints spell it read the same;
an architecture p3 does not run is refused by name, with the list of those it runs."""

from __future__ import annotations

import pytest
import transformers as tf

from p3.architectures import SUPPORTED_ARCHITECTURES
from p3.config import ModelConfig

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def read(config) -> ModelConfig:
    hf = config.to_dict() if hasattr(config, "to_dict") else config
    return ModelConfig.from_hf(hf)


def old_style(config, drop: tuple[str, ...], **old) -> dict:
    hf = {k: v for k, v in config.to_dict().items() if k not in drop}
    return {**hf, **old}


def test_gemma3_older_spelling():
    new = tf.Gemma3TextConfig(
        **SIZES, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    old = old_style(
        new, ("layer_types", "rope_parameters"), sliding_window_pattern=2,
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"type": "linear", "factor": 8.0},
    )  # fmt: skip
    cfg = read(new)
    assert cfg.windows == (8, 0, 8, 0) and cfg.local_rope_theta == 1e4
    assert cfg.rope_scaling.kind == "linear" and cfg.rope_scaling.factor == 8.0
    assert read(old) == cfg


def test_gpt_neox_rotary_pct_and_rope_scaling_top_level():
    new = tf.GPTNeoXConfig(**{k: v for k, v in SIZES.items() if k != "num_key_value_heads"},
                           rotary_pct=0.25)  # fmt: skip
    old = old_style(new, ("rope_parameters",), rotary_pct=0.25, rotary_emb_base=10000)
    assert read(new).rotary_dim == 4 and read(old) == read(new)


def test_llama3_rope_scaling_and_qwen_window_gates():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    new = tf.LlamaConfig(**SIZES, rope_parameters={**scaling, "rope_theta": 5e5})
    old = old_style(new, ("rope_parameters",), rope_theta=5e5, rope_scaling=scaling)
    assert read(old) == read(new) and read(new).rope_scaling.factor == 8.0
    qwen = tf.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    old_qwen = old_style(qwen, ("layer_types",))
    assert read(qwen).windows == (0, 0, 16, 16)
    assert read(old_qwen).windows == (0, 0, 16, 16)


def test_mistral_window_applies_to_every_layer():
    assert read(tf.MistralConfig(**SIZES, sliding_window=8)).windows == (8,) * 4
    assert read(tf.MistralConfig(**SIZES, sliding_window=None)).windows == (0,) * 4


def test_unknown_architecture_is_refused_by_name_with_the_known_ones():
    hf = {**tf.LlamaConfig(**SIZES).to_dict(), "architectures": ["MambaForCausalLM"],
          "model_type": "mamba"}  # fmt: skip
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(hf)
    message = str(err.value)
    assert "MambaForCausalLM" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)
    assert len(set(SUPPORTED_ARCHITECTURES.values())) >= 20
