"""Every family's checkpoint names onto one set: Llama's Hugging Face names, plus the few
tensors other families add (biases, extra norms, q/k norms, experts, learned positions).

Fused tensors are split into their parts here (views, no copy): Phi-3's qkv_proj and
gate_up_proj, GPT-NeoX's and Falcon's query_key_value (with their head orders), GPT-2's
Conv1D c_attn (which is also stored transposed). model_loader.weight_slots then places the
canonical names, under tensor parallelism too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from p3.config import ModelConfig
from p3.kernels.quant import QuantWeight

Weight = Tensor | QuantWeight
L = "model.layers."

# (pattern, replacement) per family, tried in order; names no pattern matches pass unchanged
RENAMES: dict[str, list[tuple[str, str]]] = {
    "mixtral": [
        (r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
    ],
    "phi": [
        (r"^model\.final_layernorm\.", "model.norm."),
        (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.fc1\.", ".mlp.up_proj."),
        (r"\.mlp\.fc2\.", ".mlp.down_proj."),
    ],
    "starcoder2": [
        (r"\.mlp\.c_fc\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ],
    "gpt_neox": [
        (r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
        (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
        (r"^embed_out\.", "lm_head."),
        (r"^gpt_neox\.layers\.", L),
        (r"\.attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
    ],
    "falcon": [
        (r"^transformer\.word_embeddings\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", L),
        (r"\.ln_attn\.", ".input_layernorm."),
        (r"\.ln_mlp\.", ".post_attention_layernorm."),
        (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
    ],
    "gpt2": [
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.wpe\.", "model.embed_positions."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", L),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
        (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ],
}
# GPT-2 keeps its linears as Conv1D, [in, out]: canonical weights are [out, in]
TRANSPOSED = {"gpt2": re.compile(r"\.(self_attn\.(qkv|o)_proj|mlp\.(up|down)_proj)\.weight$")}
INTERLEAVED = re.compile(r"\.self_attn\.[qk]_proj\.(weight|bias)$")
COMPILED = {
    family: [(re.compile(pattern), repl) for pattern, repl in rules]
    for family, rules in RENAMES.items()
}


def canonical_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, Weight]]
) -> Iterator[tuple[str, Weight]]:
    """(canonical name, tensor) for every checkpoint tensor p3 may read."""
    rules = COMPILED.get(cfg.architecture, [])
    transposed = TRANSPOSED.get(cfg.architecture)
    for name, tensor in tensors:  # names nothing places (buffers, extras) load_weights ignores
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        if transposed is not None and transposed.search(name):
            tensor = tensor.t()
        if cfg.rope_interleaved and INTERLEAVED.search(name):
            tensor = _halves_first(tensor, cfg.head_dim, cfg.rope_dim)
        if ".self_attn.qkv_proj." in name:
            yield from _split_qkv(cfg, name, tensor)
        elif ".mlp.gate_up_proj." in name:
            half = tensor.shape[0] // 2
            yield name.replace("gate_up_proj", "gate_proj"), tensor.narrow(0, 0, half)
            yield name.replace("gate_up_proj", "up_proj"), tensor.narrow(0, half, half)
        else:
            yield name, tensor


def _split_qkv(cfg: ModelConfig, name: str, tensor: Weight) -> Iterator[tuple[str, Weight]]:
    """A fused q/k/v tensor (rows first) into q_proj, k_proj and v_proj rows."""
    H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rest = tensor.shape[1:]
    if cfg.architecture == "gpt_neox" or cfg.falcon_qkv == "interleaved":  # [H, 3, hd]
        heads = tensor.reshape(H, 3, hd, *rest)
        parts = [heads[:, j].reshape(H * hd, *rest) for j in range(3)]
    elif cfg.falcon_qkv == "grouped":  # [KVH, H / KVH + 2, hd]: each kv head's queries, k, v
        group = H // KVH
        heads = tensor.reshape(KVH, group + 2, hd, *rest)
        parts = [
            heads[:, :group].reshape(H * hd, *rest),
            heads[:, group].reshape(KVH * hd, *rest),
            heads[:, group + 1].reshape(KVH * hd, *rest),
        ]
    else:  # q heads, then k heads, then v heads (Phi-3, GPT-2, Falcon multi-query)
        q, kv = H * hd, KVH * hd
        parts = [tensor.narrow(0, 0, q), tensor.narrow(0, q, kv), tensor.narrow(0, q + kv, kv)]
    for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
        yield name.replace("qkv_proj", proj), part


def _halves_first(tensor: Weight, head_dim: int, rotary_dim: int) -> Weight:
    """q or k rows of every head reordered so RoPE on pairs (2i, 2i + 1) becomes RoPE on
    halves: the rotary dims' even ones first, then their odd ones, the rest after. Queries and
    keys move alike, so every score q . k stays what it was."""
    order = list(range(0, rotary_dim, 2)) + list(range(1, rotary_dim, 2))
    order += list(range(rotary_dim, head_dim))
    heads = tensor.shape[0] // head_dim
    index = torch.tensor([h * head_dim + i for h in range(heads) for i in order])
    return tensor.index_select(0, index)
