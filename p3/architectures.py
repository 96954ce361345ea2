"""Reading a Hugging Face config.json into p3's ModelConfig: which families p3 runs and the
switches each one sets (torch-free: the CLI and the coordinator read configs too).

Every family is the one transformer of p3.engine.model with some of its switches set:

    norm         RMSNorm, or LayerNorm (with or without bias, or without parameters: OLMo)
    norm_offset  the norm multiplies by (1 + weight) (Gemma)
    layout       pre: h += attn(norm(h)); h += mlp(norm(h))                     (Llama)
                 parallel: h += attn(norm1(h)) + mlp(norm2(h)), norm2 may be norm1 (GPT-NeoX)
                 sandwich: h += norm(attn(norm(h))); h += norm(mlp(norm(h)))     (Gemma 2/3)
                 post: h += norm(attn(h)); h += norm(mlp(h))                     (OLMo 2)
    qk_norm      an RMSNorm on each q and k head (Qwen3, Gemma 3), or over the whole q and k
                 projections (OLMo 2)
    rotary_dim   RoPE on the first rotary_dim dims of a head (StableLM, GPT-NeoX, Phi); 0: none;
                 rope_interleaved: RoPE on pairs (2i, 2i + 1), not halves (Helium)
    nope_layers  layers without RoPE (SmolLM3); local_rope_theta: sliding layers' own base
    windows      a sliding window per layer (Mistral, Gemma 2/3, Starcoder2, Phi-3, Qwen)
    softcaps     tanh soft-capping of attention scores and of the logits (Gemma 2)
    multipliers  embedding, residual, attention and logit scales (Gemma, Granite)
    moe          a router picking top-k experts per token, and a shared expert (Mixtral, Qwen-MoE)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Hf = dict[str, Any]

# Hugging Face class name -> p3 family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "PhiForCausalLM": "phi",
    "OlmoForCausalLM": "olmo",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "StableLmForCausalLM": "stablelm",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPT2LMHeadModel": "gpt2",
    "Starcoder2ForCausalLM": "starcoder2",
    "FalconForCausalLM": "falcon",
    "SmolLM3ForCausalLM": "smollm3",
    "HeliumForCausalLM": "helium",
}
FAMILIES = tuple(dict.fromkeys(SUPPORTED_ARCHITECTURES.values()))


def family_of(hf: Hf) -> str:
    """The p3 family of a config, by its architectures list, else its model_type; an unknown
    one is refused with the list of those p3 runs."""
    for name in hf.get("architectures") or []:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if hf.get("model_type") in FAMILIES:
        return hf["model_type"]
    named = hf.get("architectures") or hf.get("model_type")
    raise ValueError(
        f"unsupported architecture {named!r}; p3 runs {len(FAMILIES)} families: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def read(hf: Hf) -> dict[str, Any]:
    """The ModelConfig fields of a config.json."""
    family = family_of(hf)
    fields = _common(hf, family)
    fields.update(READERS.get(family, _no_switches)(hf, fields))
    if fields.get("windows") is None:
        fields["windows"] = _windows(hf, fields["num_layers"])
    return fields


def _get(hf: Hf, *names: str, default: Any = None) -> Any:
    """The first of names the config sets (families spell the same setting differently)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _common(hf: Hf, family: str) -> dict[str, Any]:
    hidden = _get(hf, "hidden_size", "n_embd", "d_model")
    heads = _get(hf, "num_attention_heads", "n_head")
    head_dim = hf.get("head_dim") or hidden // heads
    rope = rope_parameters(hf)
    fraction = float(
        _get(
            rope,
            "partial_rotary_factor",
            default=_get(hf, "partial_rotary_factor", "rotary_pct", default=1.0),
        )
    )
    return dict(
        architecture=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden,
        num_layers=_get(hf, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=head_dim,
        rope_theta=float(
            _get(rope, "rope_theta", default=_get(hf, "rotary_emb_base", default=10000.0))
        ),
        rms_norm_eps=float(
            _get(
                hf,
                "rms_norm_eps",
                "layer_norm_eps",
                "layer_norm_epsilon",
                "norm_epsilon",
                "norm_eps",
                default=1e-6,
            )
        ),
        max_position_embeddings=_get(hf, "max_position_embeddings", "n_positions", default=2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(_get(hf, "attention_bias", "qkv_bias", default=False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rotary_dim=_even(int(head_dim * fraction)),
        rope_scaling=rope_scaling(rope, hf),
    )


def _even(n: int) -> int:
    return n - n % 2


def _no_switches(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {}


def _qwen2(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": True, "o_bias": False}


def _qwen3(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": "head"}


def _qwen_moe(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    from p3.config import MoEConfig

    num_layers, step = fields["num_layers"], hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    dense |= {i for i in range(num_layers) if (i + 1) % step}
    family = fields["architecture"]
    shared = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    moe = MoEConfig(
        num_experts=_get(hf, "num_experts", "num_local_experts"),
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf["moe_intermediate_size"],
        renormalize=bool(hf.get("norm_topk_prob", family == "qwen3_moe")),
        shared_intermediate_size=shared or 0,
        shared_gate=bool(shared),
        dense_layers=tuple(sorted(dense)),
    )
    out: dict[str, Any] = {"moe": moe}
    out.update(_qwen2(hf, fields) if family == "qwen2_moe" else _qwen3(hf, fields))
    return out


def _mixtral(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    from p3.config import MoEConfig

    moe = MoEConfig(
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        intermediate_size=fields["intermediate_size"],
        renormalize=True,
    )
    return {"moe": moe}


def _gemma(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    act = _get(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    return {
        "norm_offset": 1.0,
        "act": _act(act),
        "embed_scale": math.sqrt(fields["hidden_size"]),
        "embed_scale_in_dtype": True,
    }


def _gemma2(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    out = _gemma(hf, fields)
    out.update(
        layout="sandwich",
        attn_scale=float(hf.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
    )
    if "layer_types" not in hf:  # older configs: every other layer slides, the first one too
        window = hf.get("sliding_window")
        out["windows"] = tuple(window if i % 2 == 0 else 0 for i in range(fields["num_layers"]))
    return out


def _gemma3(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    out = _gemma2(hf, fields)
    out["qk_norm"] = "head"
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one set per layer type
        global_rope = rope["full_attention"]
        out["rope_theta"] = float(global_rope.get("rope_theta", 1e6))
        out["rope_scaling"] = rope_scaling(global_rope, hf)
        out["local_rope_theta"] = float(rope.get("sliding_attention", {}).get("rope_theta", 1e4))
    else:
        out["local_rope_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
    if "layer_types" not in hf:  # older configs: every pattern-th layer attends globally
        pattern = _get(hf, "sliding_window_pattern", "_sliding_window_pattern", default=6)
        window = hf.get("sliding_window")
        layers = range(fields["num_layers"])
        out["windows"] = tuple(0 if (i + 1) % pattern == 0 else window for i in layers)
    else:
        out["windows"] = None  # from layer_types
    return out


def _phi(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ValueError("Phi with qk_layernorm is not supported")
    return {
        "norm": "layer",
        "norm_bias": True,
        "layout": "parallel",
        "shared_norm": True,
        "act": _act(hf.get("hidden_act", "gelu_new")),
        "gated_mlp": False,
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "lm_head_bias": True,
    }


def _olmo(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "norm": "layer",
        "norm_weight": False,
        "clip_qkv": hf.get("clip_qkv"),
        "rms_norm_eps": 1e-5,
    }


def _olmo2(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {"layout": "post", "qk_norm": "full"}


def _granite(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "embed_scale": float(hf.get("embedding_multiplier", 1.0)),
        "residual_scale": float(hf.get("residual_multiplier", 1.0)),
        "attn_scale": float(hf.get("attention_multiplier", fields["head_dim"] ** -0.5)),
        "logits_scale": 1.0 / float(hf.get("logits_scaling", 1.0)),
    }


def _stablelm(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ValueError("StableLM with qk_layernorm (per-head LayerNorm) is not supported")
    parallel = bool(hf.get("use_parallel_residual", False))
    return {
        "norm": "layer",
        "norm_bias": True,
        "qkv_bias": bool(hf.get("use_qkv_bias", False)),
        "o_bias": False,
        "layout": "parallel" if parallel else "pre",
        "shared_norm": parallel,
    }


def _gpt_neox(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    parallel = bool(hf.get("use_parallel_residual", True))
    bias = bool(hf.get("attention_bias", True))
    return {
        "norm": "layer",
        "norm_bias": True,
        "layout": "parallel" if parallel else "pre",
        "act": _act(hf.get("hidden_act", "gelu")),
        "gated_mlp": False,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": True,
    }


def _gpt2(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
        raise ValueError(
            "GPT-2 with scale_attn_by_inverse_layer_idx or cross-attention is not supported"
        )
    return {
        "norm": "layer",
        "norm_bias": True,
        "act": _act(hf.get("activation_function", "gelu_new")),
        "gated_mlp": False,
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "rotary_dim": 0,
        "learned_positions": True,
        "tie_word_embeddings": True,
        "attn_scale": fields["head_dim"] ** -0.5 if hf.get("scale_attn_weights", True) else 1.0,
    }


def _starcoder2(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("use_bias", True))
    return {
        "norm": "layer",
        "norm_bias": True,
        "act": _act(hf.get("hidden_act", "gelu_pytorch_tanh")),
        "gated_mlp": False,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _falcon(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    if hf.get("alibi"):
        raise ValueError("Falcon with alibi positions is not supported (only rotary)")
    new = bool(hf.get("new_decoder_architecture"))
    heads = fields["num_heads"]
    kv_heads = hf.get("num_kv_heads") or heads if new or not hf.get("multi_query", True) else 1
    parallel = bool(hf.get("parallel_attn", True)) or new
    two_norms = new and (hf.get("num_ln_in_parallel_attn") or 2) == 2
    bias = bool(hf.get("bias", False))
    return {
        "num_kv_heads": kv_heads,
        "norm": "layer",
        "norm_bias": True,
        "layout": "parallel" if parallel else "pre",
        "shared_norm": parallel and not two_norms,
        "act": _act(hf.get("activation", "gelu")),
        "gated_mlp": False,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bias,
        "intermediate_size": hf.get("ffn_hidden_size") or 4 * fields["hidden_size"],
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "falcon_qkv": "grouped" if new else "mqa" if kv_heads == 1 else "interleaved",
    }


def _helium(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    return {"o_bias": False, "rope_interleaved": True}


def _smollm3(hf: Hf, fields: dict[str, Any]) -> dict[str, Any]:
    uses_rope = hf.get("no_rope_layers")
    if uses_rope is None:
        interval = hf.get("no_rope_layer_interval", 4)
        uses_rope = [int((i + 1) % interval != 0) for i in range(fields["num_layers"])]
    return {"nope_layers": tuple(i for i, use in enumerate(uses_rope) if not use)}


READERS: dict[str, Callable[[Hf, dict[str, Any]], dict[str, Any]]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "mixtral": _mixtral,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "phi": _phi,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "granite": _granite,
    "stablelm": _stablelm,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "starcoder2": _starcoder2,
    "falcon": _falcon,
    "smollm3": _smollm3,
    "helium": _helium,
}

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}


def _act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; p3 supports {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _windows(hf: Hf, num_layers: int) -> tuple[int, ...]:
    """The sliding window of every layer (0: attends to the whole context). transformers 5
    lists each layer's type; older configs set one window for all layers (Mistral, Phi-3,
    Starcoder2), or gate it with use_sliding_window and max_window_layers (Qwen)."""
    window = hf.get("sliding_window") or 0
    if not window:
        return (0,) * num_layers
    if types := hf.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else 0 for kind in types)
    if "use_sliding_window" in hf:
        if not hf["use_sliding_window"]:
            return (0,) * num_layers
        first = hf.get("max_window_layers", 0)
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (window,) * num_layers


def rope_parameters(hf: Hf) -> Hf:
    """transformers 5 nests rope settings in rope_parameters; 4.x keeps them top level
    (rope_theta, rope_scaling)."""
    params = dict(hf.get("rope_scaling") or {})
    nested = hf.get("rope_parameters") or {}
    if "full_attention" not in nested:
        params.update(nested)
    if "rope_theta" in hf:
        params.setdefault("rope_theta", hf["rope_theta"])
    return params


def rope_scaling(params: Hf, hf: Hf):
    """The RopeScaling of a rope parameter set, or None for plain RoPE."""
    from p3.config import RopeScaling

    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind in ("longrope", "su"):
        original = int(
            _get(params, "original_max_position_embeddings")
            or _get(hf, "original_max_position_embeddings")
        )
        factor = float(params.get("factor") or hf["max_position_embeddings"] / original)
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling(
            kind="longrope",
            factor=factor,
            original_max_position_embeddings=original,
            short_factor=tuple(float(f) for f in params["short_factor"]),
            long_factor=tuple(float(f) for f in params["long_factor"]),
            attention_factor=float(attention),
        )
    raise ValueError(
        f"unsupported rope scaling {kind!r}; p3 supports default, llama3, linear and longrope"
    )
