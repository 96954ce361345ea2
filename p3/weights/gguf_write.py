"""`p3 convert MODEL_DIR OUT.gguf`: a Hugging Face directory -> one GGUF file llama.cpp runs.

What goes where follows llama.cpp's own converter (convert_hf_to_gguf.py and its per-family
modules) and what llama.cpp's loaders read: one `Family` per Hugging Face architecture names
llama.cpp's architecture, its tensor names (checked against gguf.TensorNameMap), the
hyperparameters under `<arch>.*` and the transforms the converter applies on the way:

    q/k rows permuted    llama.cpp's "llama", "granite", "smollm3" and "olmo" rotate pairs
                         (2i, 2i+1), Hugging Face halves: rows of q and k (weights, biases)
                         are permuted per head (p3.weights.convert.rope_permutation)
    norms + 1            Gemma 1/2/3: HF multiplies by (1 + w), llama.cpp by w
    fused q/k/v          GPT-NeoX's per-head [q k v] and Falcon's kv groups reordered to all
                         q rows, then k, then v; Phi-3's qkv_proj and gate_up_proj kept fused
    transposed           GPT-2's Conv1D weights ([in, out]) as [out, in]
    experts stacked      Mixtral's and Qwen-MoE's per-expert MLPs as 3-D ffn_*_exps tensors
    made here            Llama-3 RoPE scaling as rope_freqs, Phi-3 LongRoPE as
                         rope_factors_long / rope_factors_short

Every transform is a row permutation, a transpose or a constant added, so reading a file back
(p3 convert X.gguf DIR, p3.weights.convert) undoes it exactly (Gemma's norms up to the
rounding of w + 1). What llama.cpp would run differently is refused by name (a Gemma 2
query_pre_attn_scalar llama.cpp ignores, a Qwen-MoE with dense layers, SmolLM3 without RoPE
on other than every 4th layer, Falcon biases, ...); a sliding window that llama.cpp's
architecture ignores is written (p3 reads it back) with a warning.

Types (--outtype): f32 everything; f16 the 2-D and 3-D weights, norms, biases and the
routers f32 (as llama.cpp's converter keeps them); q8_0 / q4_0 those weights (embedding and
head included) in that kind, a row whose width is not whole blocks of 32 in f16. A directory
whose quantization.json lists blocks of the kind asked for (p3 converted a Q8_0 / Q4_0 GGUF,
or `p3 quantize` wrote it) has them copied as they are where the transform only moves rows:
p3's blocks are GGML's bytes (p3.kernels.quant). Other blocks are dequantized and converted.

Tensors are written one at a time: a first pass over the checkpoint plans every tensor's type
and shape (the header), a second converts and writes each as soon as its sources (one tensor,
or a layer's experts) have been read. The file is written beside OUT and renamed into place
when complete. The tokenizer must be byte-level BPE (written as "gpt2").
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p3.architectures import SUPPORTED_ARCHITECTURES
from p3.config import ModelConfig
from p3.kernels.quant import BLOCK, QuantWeight
from p3.log import get_logger
from p3.tokenizer import Tokenizer, read_tokenizer_files
from p3.weights.convert import rope_permutation
from p3.weights.files import load_config, resolve_model
from p3.weights.read import iter_state_dict

log = get_logger(__name__)

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
DEFAULT_OUTTYPE = "f16"

Hf = dict[str, Any]
Meta = dict[str, Any]  # a GGUF file's "<arch>.*" metadata, keys without the "<arch>."
Table = Mapping[str, str]  # Hugging Face module -> GGUF tensor (without .weight / .bias)

SKIPPED_TENSORS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # buffers
ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
F32_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd")  # never quantized

# --- tensor names -------------------------------------------------------------------------------

NORMS: Table = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
ATTENTION: Table = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
}
MLP: Table = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QK_NORM: Table = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
SANDWICH: Table = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
LLAMA_LAYER: Table = {**NORMS, **ATTENTION, **MLP}
LLAMA_GLOBAL: Table = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
TIED_GLOBAL: Table = {k: v for k, v in LLAMA_GLOBAL.items() if k != "lm_head"}
ROUTER: Table = {"mlp.gate": "ffn_gate_inp"}
QWEN_EXPERTS: Table = {
    "mlp.experts.{xid}.gate_proj": "ffn_gate_exps",
    "mlp.experts.{xid}.up_proj": "ffn_up_exps",
    "mlp.experts.{xid}.down_proj": "ffn_down_exps",
}
SHARED_EXPERT: Table = {
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
MIXTRAL_LAYER: Table = {**NORMS, **ATTENTION, "block_sparse_moe.gate": "ffn_gate_inp"}
MIXTRAL_EXPERTS: Table = {
    "block_sparse_moe.experts.{xid}.w1": "ffn_gate_exps",
    "block_sparse_moe.experts.{xid}.w2": "ffn_down_exps",
    "block_sparse_moe.experts.{xid}.w3": "ffn_up_exps",
}
PHI3_LAYER: Table = {
    **NORMS,
    "self_attn.qkv_proj": "attn_qkv",  # q, k, v rows, as llama.cpp's phi3 wants them
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",  # gate then up: llama.cpp's fused SwiGLU
    "mlp.down_proj": "ffn_down",
}
PHI2_LAYER: Table = {
    "input_layernorm": "attn_norm",
    **{k: v for k, v in ATTENTION.items() if k != "self_attn.o_proj"},
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
PHI2_GLOBAL: Table = {
    "model.embed_tokens": "token_embd",
    "model.final_layernorm": "output_norm",
    "lm_head": "output",
}
OLMO2_LAYER: Table = {
    **ATTENTION,
    **QK_NORM,
    **MLP,
    "post_attention_layernorm": "post_attention_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
STARCODER2_LAYER: Table = {
    **NORMS,
    **ATTENTION,
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
NEOX_LAYER: Table = {
    **NORMS,
    "attention.query_key_value": "attn_qkv",
    "attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
NEOX_GLOBAL: Table = {
    "gpt_neox.embed_in": "token_embd",
    "gpt_neox.final_layer_norm": "output_norm",
    "embed_out": "output",
}
GPT2_LAYER: Table = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
GPT2_GLOBAL: Table = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
}
FALCON_LAYER: Table = {
    "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
FALCON_GLOBAL: Table = {
    "transformer.word_embeddings": "token_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
}


@dataclass(frozen=True, eq=False)
class Transform:
    """What one Hugging Face tensor becomes in the file: transposed (GPT-2), its rows
    reordered (out row i = in row rows[i]), a constant added (Gemma's norms)."""

    transpose: bool = False
    rows: np.ndarray | None = None
    offset: float = 0.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.transpose:
            x = x.T
        if self.rows is not None:
            x = x[self.rows]
        if self.offset:
            x = x + np.float32(self.offset)
        return np.ascontiguousarray(x)

    def undo(self, x: np.ndarray) -> np.ndarray:
        if self.offset:
            x = x - np.float32(self.offset)
        if self.rows is not None:
            x = x[np.argsort(self.rows)]
        if self.transpose:
            x = x.T
        return np.ascontiguousarray(x)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1] if self.transpose else shape

    @property
    def moves_rows_only(self) -> bool:
        """Blocks of whole rows survive it (GGML blocks run along a row)."""
        return not self.transpose and not self.offset


IDENTITY = Transform()


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture is written as one llama.cpp architecture, and read
    back from it."""

    hf_architecture: str  # config.json's architectures[0]
    name: str  # llama.cpp's general.architecture
    layer_tensors: Table = field(default_factory=lambda: LLAMA_LAYER)
    global_tensors: Table = field(default_factory=lambda: LLAMA_GLOBAL)
    expert_tensors: Table = field(default_factory=dict)  # "{xid}": stacked over experts
    layer_prefix: str = "model.layers."
    permute_qk: bool = False  # llama.cpp rotates pairs (2i, 2i+1): q/k rows permuted
    norm_offset: float = 0.0  # added to every *norm.weight (Gemma)
    fused_qkv: str | None = None  # the module whose q/k/v rows are reordered (NeoX, Falcon)
    transposed: tuple[str, ...] = ()  # Conv1D modules stored [in, out] (GPT-2)
    output: str = "optional"  # "required": a tied head written as a copy; "tied": never
    rope_freqs: bool = False  # takes Llama-3 RoPE scaling as a rope_freqs tensor
    default_swa_period: int = 0  # llama.cpp's sliding pattern when the file names none
    check: Callable[[ModelConfig, Hf], None] = lambda cfg, hf: None
    metadata: Callable[[ModelConfig, Hf], list[tuple[str, Any]]] = lambda cfg, hf: []
    read_config: Callable[[Meta, set[str]], Hf] = lambda meta, names: {}
    layer_variant: Callable[[Hf], Table] | None = None  # more layer tensors, by config

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.hf_architecture]

    def layer_table(self, hf: Hf) -> Table:
        extra = self.layer_variant(hf) if self.layer_variant is not None else {}
        return {**self.layer_tensors, **extra}

    def gguf_tensor(self, hf_name: str, hf: Hf) -> tuple[str, int | None]:
        """'model.layers.3.self_attn.q_proj.weight' -> ('blk.3.attn_q.weight', None); an
        expert's -> its stacked tensor and the expert's index."""
        module, suffix = hf_name.rsplit(".", 1)
        if module in self.global_tensors:
            return f"{self.global_tensors[module]}.{suffix}", None
        if module.startswith(self.layer_prefix):
            layer, _, leaf = module[len(self.layer_prefix) :].partition(".")
            table = self.layer_table(hf)
            if layer.isdigit() and leaf in table:
                return f"blk.{layer}.{table[leaf]}.{suffix}", None
            for pattern, name in self.expert_tensors.items():
                head, _, tail = pattern.partition("{xid}")
                found = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail), leaf)
                if layer.isdigit() and found:
                    return f"blk.{layer}.{name}.{suffix}", int(found[1])
        raise ValueError(f"tensor {hf_name!r} has no GGUF name in llama.cpp's {self.name!r}")

    def hf_tensors(self, gguf_name: str, hf: Hf, num_experts: int) -> list[str]:
        """The Hugging Face tensor(s) a GGUF tensor holds (a stacked one: one per expert)."""
        base, suffix = gguf_name.rsplit(".", 1)
        for module, name in self.global_tensors.items():
            if name == base:
                return [f"{module}.{suffix}"]
        layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if layer:
            prefix = f"{self.layer_prefix}{layer[1]}."
            for leaf, name in self.layer_table(hf).items():
                if name == layer[2]:
                    return [f"{prefix}{leaf}.{suffix}"]
            for pattern, name in self.expert_tensors.items():
                if name == layer[2]:
                    return [f"{prefix}{pattern.format(xid=x)}.{suffix}" for x in range(num_experts)]
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")

    def transform(self, hf_name: str, cfg: ModelConfig) -> Transform:
        module, suffix = hf_name.rsplit(".", 1)
        leaf = module
        if module.startswith(self.layer_prefix):
            leaf = module[len(self.layer_prefix) :].partition(".")[2]
        rows = None
        if self.permute_qk and leaf in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_heads if leaf.endswith("q_proj") else cfg.num_kv_heads
            rows = rope_permutation(np.arange(heads * cfg.head_dim), heads)
        if leaf == self.fused_qkv:
            rows = qkv_order(cfg)
        offset = self.norm_offset if hf_name.endswith("norm.weight") else 0.0
        return Transform(suffix == "weight" and leaf in self.transposed, rows, offset)


def qkv_order(cfg: ModelConfig) -> np.ndarray:
    """Rows of a fused q/k/v tensor in the order llama.cpp reads them (all q, all k, all v)
    from GPT-NeoX's per-head [q k v] or Falcon's kv groups [q.. k v]; out row i = in row
    order[i]."""
    H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    index = np.arange((H + 2 * KVH) * hd)
    if cfg.falcon_qkv in (None, "interleaved"):  # [H, 3, hd] (GPT-NeoX, Falcon-7B style)
        per_head = index.reshape(H, 3, hd)
        return np.concatenate([per_head[:, j].ravel() for j in range(3)])
    group = H // KVH  # [KVH, group + 2, hd]: a group's queries, then its k and v
    groups = index.reshape(KVH, group + 2, hd)
    return np.concatenate(
        [groups[:, :group].ravel(), groups[:, group].ravel(), groups[:, group + 1].ravel()]
    )


# --- what llama.cpp cannot run as p3 does: refused ----------------------------------------------


def _refuse(family: str, what: str) -> None:
    raise ValueError(f"cannot write {family} as GGUF: {what}")


def _check_moe(renormalize: bool, shared: bool | None = None):
    def check(cfg: ModelConfig, hf: Hf) -> None:
        moe, family = cfg.moe, cfg.architecture
        if moe is None:
            return
        if moe.dense_layers:
            dense = list(moe.dense_layers)
            _refuse(
                family,
                f"layers {dense} are dense (mlp_only_layers, decoder_sparse_step): "
                "llama.cpp's MoE architectures have experts in every layer",
            )
        if moe.renormalize != renormalize:
            always = "always" if renormalize else "never"
            _refuse(
                family,
                f"norm_topk_prob {moe.renormalize}: llama.cpp's {family} {always} "
                "renormalizes the top-k weights",
            )
        if shared is not None and bool(moe.shared_intermediate_size) != shared:
            _refuse(family, "llama.cpp's qwen2moe needs a shared expert in every layer")

    return check


def _check_gemma(layers_27b: int, softcaps: bool):
    """llama.cpp's Gemma 2/3 scale queries by head_dim ** -0.5 (the 27B: (hidden / heads)
    ** -0.5), whatever query_pre_attn_scalar says; Gemma 2 always soft-caps (50 and 30 by
    default), Gemma 3 never."""

    def check(cfg: ModelConfig, hf: Hf) -> None:
        sizes = cfg.num_layers, layers_27b, cfg.hidden_size, cfg.num_heads, cfg.head_dim
        expected = _gemma_query_scalar(*sizes) ** -0.5
        if not math.isclose(cfg.scale, expected, rel_tol=1e-9):
            scalar = hf.get("query_pre_attn_scalar")
            _refuse(
                cfg.architecture,
                f"query_pre_attn_scalar {scalar}: llama.cpp scales "
                f"queries by {expected:g} for {cfg.num_layers} layers, whatever it says",
            )
        capped = cfg.attn_softcap is not None, cfg.final_softcap is not None
        if softcaps and not all(capped):
            _refuse(cfg.architecture, "llama.cpp's gemma2 soft-caps scores and logits always")
        if not softcaps and any(capped):
            _refuse(cfg.architecture, "llama.cpp's gemma3 does not soft-cap")

    return check


def _gemma_query_scalar(layers: int, layers_27b: int, hidden: int, heads: int, hd: int) -> int:
    return hidden // heads if layers == layers_27b else hd


def _check_tied(cfg: ModelConfig, hf: Hf) -> None:
    if not cfg.tie_word_embeddings:
        _refuse(cfg.architecture, f"an untied head (llama.cpp's {cfg.architecture} reads none)")


def _check_falcon(cfg: ModelConfig, hf: Hf) -> None:
    if cfg.qkv_bias or cfg.mlp_bias:
        _refuse("falcon", "biases (llama.cpp's falcon has none)")
    if cfg.layout != "parallel":
        _refuse("falcon", "parallel_attn false (llama.cpp's falcon is always parallel)")


def _check_neox(cfg: ModelConfig, hf: Hf) -> None:
    if not (cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias):
        _refuse("gpt_neox", "no biases (llama.cpp's gptneox needs them)")


def _check_gpt2(cfg: ModelConfig, hf: Hf) -> None:
    if not math.isclose(cfg.scale, cfg.head_dim**-0.5):
        _refuse("gpt2", "scale_attn_weights false (llama.cpp scales by head_dim ** -0.5)")


def _check_smollm3(cfg: ModelConfig, hf: Hf) -> None:
    every_4th = tuple(i for i in range(cfg.num_layers) if (i + 1) % 4 == 0)
    if cfg.nope_layers != every_4th:
        nope = list(cfg.nope_layers)
        _refuse(
            "smollm3",
            f"layers {nope} without RoPE: llama.cpp's smollm3 skips RoPE on "
            f"every 4th layer ({list(every_4th)}), and no key says otherwise",
        )


def _check_phi(cfg: ModelConfig, hf: Hf) -> None:
    if not cfg.lm_head_bias:
        _refuse("phi", "no lm_head bias (llama.cpp's phi2 needs it)")


# --- metadata ------------------------------------------------------------------------------------


def _common_metadata(family: Family, cfg: ModelConfig) -> list[tuple[str, Any]]:
    """GGUFWriter method and value, for what every architecture reads."""
    import gguf

    items: list[tuple[str, Any]] = [
        ("add_context_length", cfg.max_position_embeddings),
        ("add_embedding_length", cfg.hidden_size),
        ("add_block_count", cfg.num_layers),
        ("add_feed_forward_length", cfg.intermediate_size),
        ("add_head_count", cfg.num_heads),
        ("add_head_count_kv", cfg.num_kv_heads),
        ("add_vocab_size", cfg.vocab_size),
        ("add_layer_norm_rms_eps" if cfg.norm == "rms" else "add_layer_norm_eps", cfg.rms_norm_eps),
    ]
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        items += [("add_key_length", cfg.head_dim), ("add_value_length", cfg.head_dim)]
    if cfg.rope_dim:
        items += [
            ("add_rope_freq_base", cfg.rope_theta),
            ("add_rope_dimension_count", cfg.rope_dim),
        ]
    s = cfg.rope_scaling
    if s is not None and s.kind == "linear":
        items += [
            ("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
            ("add_rope_scaling_factor", s.factor),
        ]
    if s is not None and s.kind == "longrope":
        items += [
            ("add_rope_scaling_type", gguf.RopeScalingType.LONGROPE),
            ("add_rope_scaling_orig_ctx_len", s.original_max_position_embeddings),
            ("add_rope_scaling_attn_factors", s.attention_factor),
        ]
    if any(cfg.windows):
        items.append(("add_sliding_window", max(cfg.windows)))
        pattern = swa_pattern([bool(w) for w in cfg.windows])
        if pattern != family.default_swa_period:  # what llama.cpp assumes without the key
            items.append(("add_sliding_window_pattern", pattern))
    if cfg.moe is not None:
        items += [
            ("add_expert_count", cfg.moe.num_experts),
            ("add_expert_used_count", cfg.moe.top_k),
        ]
    return items


def swa_pattern(sliding: list[bool]) -> int | list[bool]:
    """llama.cpp's sliding_window_pattern: a period n when layer i slides exactly when
    i % n < n - 1 (0: every layer), else one bool per layer."""
    for n in range(len(sliding) + 2):
        if all(s == (n == 0 or i % n < n - 1) for i, s in enumerate(sliding)):
            return n
    return sliding


def layer_slides(pattern: int | list[bool] | None, num_layers: int, default: int) -> list[bool]:
    """swa_pattern read back: which layers slide."""
    if isinstance(pattern, list):
        return [bool(p) for p in pattern]
    n = default if pattern is None else int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(num_layers)]


def _qwen2moe_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    moe = cfg.moe
    return [
        ("add_expert_feed_forward_length", moe.intermediate_size),
        ("add_expert_shared_feed_forward_length", moe.shared_intermediate_size),
    ]


def _qwen3moe_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [("add_expert_feed_forward_length", cfg.moe.intermediate_size)]


def _gemma2_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [
        ("add_attn_logit_softcapping", cfg.attn_softcap),
        ("add_final_logit_softcapping", cfg.final_softcap),
    ]


def _gemma3_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    local = cfg.local_rope_theta
    return [] if local is None else [("add_rope_freq_base_swa", local)]


def _olmo_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [] if cfg.clip_qkv is None else [("add_clamp_kqv", cfg.clip_qkv)]


def _granite_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [
        ("add_attention_scale", cfg.scale),
        ("add_embedding_scale", cfg.embed_scale),
        ("add_residual_scale", cfg.residual_scale),
        ("add_logit_scale", float(hf.get("logits_scaling", 1.0))),
    ]


def _parallel_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [("add_parallel_residual", cfg.layout == "parallel")]


def _falcon_metadata(cfg: ModelConfig, hf: Hf) -> list[tuple[str, Any]]:
    return [("add_tensor_data_layout", "jploski")]  # q/k/v rows reordered, as llama.cpp's


# --- reading a file's metadata back into config.json ---------------------------------------------


def _rope_parameters(meta: Meta, head_dim: int) -> Hf:
    theta = float(meta.get("rope.freq_base", 10000.0))
    rope: Hf = {"rope_type": "default", "rope_theta": theta}
    rope_dim = meta.get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        rope["partial_rotary_factor"] = rope_dim / head_dim
    kind = meta.get("rope.scaling.type", "none")
    if kind == "linear":
        rope.update(rope_type="linear", factor=shortest_float32(meta["rope.scaling.factor"]))
    elif kind not in ("none", "longrope"):
        raise ValueError(f"GGUF files with RoPE scaling {kind!r} are not read")
    return rope


def hf_config_from_gguf(family: Family, meta: Meta, names: set[str]) -> Hf:
    """config.json for a GGUF file of `family` (vocabulary, tie and special tokens aside).
    names: the file's tensors; meta also holds the LongRoPE factor tensors' values under
    "rope_factors_long" / "rope_factors_short" when the file has them."""
    hidden, heads = meta["embedding_length"], meta["attention.head_count"]
    head_dim = meta.get("attention.key_length", hidden // heads)
    rope = _rope_parameters(meta, head_dim)
    config: Hf = {
        "architectures": [family.hf_architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.get("feed_forward_length"),
        "num_hidden_layers": meta["block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("attention.head_count_kv", heads),
        "hidden_act": "silu",
        "max_position_embeddings": meta.get("context_length", 2048),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "torch_dtype": "float32",
    }
    if family.name != "falcon":  # FalconConfig computes its head_dim; others default to 128 or so
        config["head_dim"] = head_dim
    if isinstance(config["num_key_value_heads"], list):
        raise ValueError("GGUF files with a kv head count per layer are not read")
    if "attention.layer_norm_rms_epsilon" in meta:
        config["rms_norm_eps"] = shortest_float32(meta["attention.layer_norm_rms_epsilon"])
    if "attention.layer_norm_epsilon" in meta:
        config["layer_norm_eps"] = shortest_float32(meta["attention.layer_norm_epsilon"])
    if window := meta.get("attention.sliding_window"):
        config["sliding_window"] = window
        pattern = meta.get("attention.sliding_window_pattern")
        if pattern is not None or family.default_swa_period:
            slides = layer_slides(pattern, config["num_hidden_layers"], family.default_swa_period)
            config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in slides]
    extra = family.read_config(meta, names)
    nested = extra.pop("rope_parameters", None)
    config.update(extra)
    if nested is not None:  # a family's own: merged, or one set per layer type (Gemma 3)
        config["rope_parameters"] = nested if "full_attention" in nested else {**rope, **nested}
    return config


def _llama_config(meta: Meta, names: set[str]) -> Hf:
    return {
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
    }


def _mixtral_config(meta: Meta, names: set[str]) -> Hf:
    return {
        "num_local_experts": meta["expert_count"],
        "num_experts_per_tok": meta["expert_used_count"],
        "sliding_window": meta.get("attention.sliding_window"),
    }


def _qwen_config(meta: Meta, names: set[str]) -> Hf:
    windows = meta.get("attention.sliding_window") is not None
    return {"use_sliding_window": windows, "max_window_layers": 0} if windows else {}


def _qwen_moe_config(shared: bool, renormalize: bool):
    def read(meta: Meta, names: set[str]) -> Hf:
        config = {
            "num_experts": meta["expert_count"],
            "num_experts_per_tok": meta["expert_used_count"],
            "moe_intermediate_size": meta["expert_feed_forward_length"],
            "norm_topk_prob": renormalize,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            **_qwen_config(meta, names),
        }
        if shared:
            config["shared_expert_intermediate_size"] = meta["expert_shared_feed_forward_length"]
        return config

    return read


def _gemma_config(layers_27b: int):
    def read(meta: Meta, names: set[str]) -> Hf:
        hidden, heads = meta["embedding_length"], meta["attention.head_count"]
        head_dim = meta.get("attention.key_length", hidden // heads)
        config: Hf = {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh"}
        if layers_27b:
            scalar = _gemma_query_scalar(meta["block_count"], layers_27b, hidden, heads, head_dim)
            config["query_pre_attn_scalar"] = scalar
        if "attn_logit_softcapping" in meta:
            config["attn_logit_softcapping"] = shortest_float32(meta["attn_logit_softcapping"])
        if "final_logit_softcapping" in meta:
            config["final_logit_softcapping"] = shortest_float32(meta["final_logit_softcapping"])
        return config

    return read


def _gemma3_config(meta: Meta, names: set[str]) -> Hf:
    config = _gemma_config(62)(meta, names)
    hidden, heads = meta["embedding_length"], meta["attention.head_count"]
    full = _rope_parameters(meta, meta.get("attention.key_length", hidden // heads))
    full.pop("partial_rotary_factor", None)
    local = float(meta.get("rope.freq_base_swa", 10000.0))
    config["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    config.setdefault("final_logit_softcapping", None)
    config.setdefault("attn_logit_softcapping", None)
    return config


def _phi3_config(meta: Meta, names: set[str]) -> Hf:
    config: Hf = {"sliding_window": meta.get("attention.sliding_window") or None}
    if meta.get("rope.scaling.type", "none") == "longrope":
        if not set(ROPE_FACTORS) <= names:
            raise ValueError("a phi3 GGUF file with LongRoPE needs rope_factors_long/_short")
        original = meta["rope.scaling.original_context_length"]
        config["original_max_position_embeddings"] = original
        config["rope_parameters"] = {
            "rope_type": "longrope",
            "original_max_position_embeddings": original,
            "long_factor": [shortest_float32(f) for f in meta["rope_factors_long"]],
            "short_factor": [shortest_float32(f) for f in meta["rope_factors_short"]],
        }
        attention = meta.get("rope.scaling.attn_factor")
        factor = meta["context_length"] / original
        default = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        if attention is not None and abs(attention - default) > 1e-6:
            config["rope_parameters"]["attention_factor"] = shortest_float32(attention)
    return config


def _phi2_config(meta: Meta, names: set[str]) -> Hf:
    return {"hidden_act": "gelu_new", "qk_layernorm": False}


def _olmo_config(meta: Meta, names: set[str]) -> Hf:
    clip = meta.get("attention.clamp_kqv")
    return {"clip_qkv": None if clip is None else shortest_float32(clip)}


def _granite_config(meta: Meta, names: set[str]) -> Hf:
    config = {
        "embedding_multiplier": meta.get("embedding_scale", 1.0),
        "residual_multiplier": meta.get("residual_scale", 1.0),
        "logits_scaling": meta.get("logit_scale", 1.0),
    }
    if "attention.scale" in meta:
        config["attention_multiplier"] = meta["attention.scale"]
    return {key: shortest_float32(value) for key, value in config.items()}


def _stablelm_config(meta: Meta, names: set[str]) -> Hf:
    return {
        "use_qkv_bias": "blk.0.attn_q.bias" in names,
        "qk_layernorm": False,
        "use_parallel_residual": "blk.0.ffn_norm.weight" not in names,
    }


def _neox_config(meta: Meta, names: set[str]) -> Hf:
    return {
        "use_parallel_residual": bool(meta.get("use_parallel_residual", True)),
        "hidden_act": "gelu",
        "attention_bias": True,
    }


def _gpt2_config(meta: Meta, names: set[str]) -> Hf:
    hidden = meta["embedding_length"]
    return {
        "n_embd": hidden,
        "n_layer": meta["block_count"],
        "n_head": meta["attention.head_count"],
        "n_positions": meta.get("context_length", 1024),
        "n_inner": meta.get("feed_forward_length"),
        "layer_norm_epsilon": shortest_float32(meta["attention.layer_norm_epsilon"]),
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
    }


def _starcoder2_config(meta: Meta, names: set[str]) -> Hf:
    return {
        "use_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "gelu_pytorch_tanh",
        "norm_epsilon": shortest_float32(meta["attention.layer_norm_epsilon"]),
    }


def _falcon_config(meta: Meta, names: set[str]) -> Hf:
    kv_heads = meta.get("attention.head_count_kv", 1)
    two_norms = "blk.0.attn_norm_2.weight" in names
    new = two_norms or kv_heads > 1
    return {
        "new_decoder_architecture": new,
        "multi_query": kv_heads == 1,
        "num_kv_heads": kv_heads,
        "num_ln_in_parallel_attn": 2 if two_norms else 1 if new else None,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
        "ffn_hidden_size": meta.get("feed_forward_length"),
        "layer_norm_epsilon": shortest_float32(meta["attention.layer_norm_epsilon"]),
        "activation": "gelu",
    }


def _smollm3_config(meta: Meta, names: set[str]) -> Hf:
    layers = meta["block_count"]
    return {
        "no_rope_layer_interval": 4,
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)],
    }


def _falcon_norms(hf: Hf) -> Table:
    """Falcon-40B style (two norms) or one: ln_attn feeds attention, ln_mlp the MLP
    (llama.cpp's attn_norm_2 and attn_norm)."""
    if hf.get("new_decoder_architecture") and (hf.get("num_ln_in_parallel_attn") or 2) == 2:
        return {"ln_attn": "attn_norm_2", "ln_mlp": "attn_norm"}
    return {"input_layernorm": "attn_norm"}


_LLAMA_LIKE = dict(permute_qk=True, read_config=_llama_config)
FAMILIES: dict[str, Family] = {
    f.hf_architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", rope_freqs=True, **_LLAMA_LIKE),
        Family("MistralForCausalLM", "llama", rope_freqs=True, **_LLAMA_LIKE),
        Family(
            "MixtralForCausalLM",
            "llama",
            layer_tensors=MIXTRAL_LAYER,
            expert_tensors=MIXTRAL_EXPERTS,
            permute_qk=True,
            check=_check_moe(True),
            read_config=_mixtral_config,
        ),
        Family("Qwen2ForCausalLM", "qwen2", read_config=_qwen_config),
        Family(
            "Qwen3ForCausalLM",
            "qwen3",
            layer_tensors={**LLAMA_LAYER, **QK_NORM},
            read_config=_qwen_config,
        ),
        Family(
            "Qwen2MoeForCausalLM",
            "qwen2moe",
            layer_tensors={**NORMS, **ATTENTION, **ROUTER, **SHARED_EXPERT},
            expert_tensors=QWEN_EXPERTS,
            output="required",
            check=_check_moe(False, True),
            metadata=_qwen2moe_metadata,
            read_config=_qwen_moe_config(True, False),
        ),
        Family(
            "Qwen3MoeForCausalLM",
            "qwen3moe",
            layer_tensors={**NORMS, **ATTENTION, **QK_NORM, **ROUTER},
            expert_tensors=QWEN_EXPERTS,
            check=_check_moe(True),
            metadata=_qwen3moe_metadata,
            read_config=_qwen_moe_config(False, True),
        ),
        Family(
            "GemmaForCausalLM",
            "gemma",
            global_tensors=TIED_GLOBAL,
            norm_offset=1.0,
            output="tied",
            read_config=_gemma_config(0),
        ),
        Family(
            "Gemma2ForCausalLM",
            "gemma2",
            layer_tensors={**SANDWICH, **ATTENTION, **MLP},
            global_tensors=TIED_GLOBAL,
            norm_offset=1.0,
            output="tied",
            default_swa_period=2,
            check=_check_gemma(46, softcaps=True),
            metadata=_gemma2_metadata,
            read_config=_gemma_config(46),
        ),
        Family(
            "Gemma3ForCausalLM",
            "gemma3",
            layer_tensors={**SANDWICH, **ATTENTION, **QK_NORM, **MLP},
            norm_offset=1.0,
            default_swa_period=6,
            check=_check_gemma(62, softcaps=False),
            metadata=_gemma3_metadata,
            read_config=_gemma3_config,
        ),
        Family("Phi3ForCausalLM", "phi3", layer_tensors=PHI3_LAYER, read_config=_phi3_config),
        Family(
            "PhiForCausalLM",
            "phi2",
            layer_tensors=PHI2_LAYER,
            global_tensors=PHI2_GLOBAL,
            output="required",
            check=_check_phi,
            read_config=_phi2_config,
        ),
        Family(
            "OlmoForCausalLM",
            "olmo",
            layer_tensors={**ATTENTION, **MLP},
            global_tensors={"model.embed_tokens": "token_embd", "lm_head": "output"},
            permute_qk=True,
            metadata=_olmo_metadata,
            read_config=_olmo_config,
        ),
        Family("Olmo2ForCausalLM", "olmo2", layer_tensors=OLMO2_LAYER),
        Family(
            "GraniteForCausalLM",
            "granite",
            permute_qk=True,
            metadata=_granite_metadata,
            read_config=_granite_config,
        ),
        Family(
            "StableLmForCausalLM",
            "stablelm",
            output="required",
            metadata=_parallel_metadata,
            read_config=_stablelm_config,
        ),
        Family(
            "GPTNeoXForCausalLM",
            "gptneox",
            layer_tensors=NEOX_LAYER,
            global_tensors=NEOX_GLOBAL,
            layer_prefix="gpt_neox.layers.",
            fused_qkv="attention.query_key_value",
            check=_check_neox,
            metadata=_parallel_metadata,
            read_config=_neox_config,
        ),
        Family(
            "GPT2LMHeadModel",
            "gpt2",
            layer_tensors=GPT2_LAYER,
            global_tensors=GPT2_GLOBAL,
            layer_prefix="transformer.h.",
            transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
            output="tied",
            check=_check_gpt2,
            read_config=_gpt2_config,
        ),
        Family(
            "Starcoder2ForCausalLM",
            "starcoder2",
            layer_tensors=STARCODER2_LAYER,
            read_config=_starcoder2_config,
        ),
        Family(
            "FalconForCausalLM",
            "falcon",
            layer_tensors=FALCON_LAYER,
            global_tensors=FALCON_GLOBAL,
            layer_prefix="transformer.h.",
            layer_variant=_falcon_norms,
            fused_qkv="self_attention.query_key_value",
            check=_check_falcon,
            metadata=_falcon_metadata,
            read_config=_falcon_config,
        ),
        Family("SmolLM3ForCausalLM", "smollm3", check=_check_smollm3, **_LLAMA_LIKE),
    )
}
# Helium is the one family llama.cpp has no architecture for


def family_for(hf_config: Hf) -> Family:
    names = hf_config.get("architectures") or [hf_config.get("model_type")]
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    known = ", ".join(FAMILIES)
    raise ValueError(f"cannot write architecture {names[0]!r} as GGUF; known: {known}")


def gguf_family(name: str, meta: Meta) -> Family:
    """The Family a GGUF file's general.architecture names (for reading one back); llama.cpp's
    "llama" holds Llama, Mistral (a sliding window) and Mixtral (experts)."""
    if name == "llama":
        arch = "MixtralForCausalLM" if meta.get("expert_count") else "LlamaForCausalLM"
        if arch == "LlamaForCausalLM" and meta.get("attention.sliding_window"):
            arch = "MistralForCausalLM"
        return FAMILIES[arch]
    for family in FAMILIES.values():
        if family.name == name:
            return family
    known = sorted({family.name for family in FAMILIES.values()})
    raise ValueError(f"GGUF architecture {name!r} is not supported (only {', '.join(known)})")


# --- the file ---------------------------------------------------------------------------------


def export_gguf(
    src: str | os.PathLike | None, dst: Path, outtype: str = DEFAULT_OUTTYPE, progress: bool = True
) -> Path:
    """Write src (a model directory, a .gguf or the default model's name) as the GGUF dst."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir = resolve_model(src)
    hf_config = load_config(model_dir)
    family = family_for(hf_config)
    cfg = ModelConfig.from_hf(hf_config)
    _check(family, cfg, hf_config)
    tokenizer_files = read_tokenizer_files(model_dir)  # FileNotFoundError names tokenizer.json
    plan = _plan(model_dir, family, cfg, hf_config, outtype)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, family.name)
    try:
        _write_metadata(writer, family, cfg, hf_config, model_dir.name, outtype)
        _write_tokenizer(writer, tokenizer_files, model_dir, hf_config, cfg.vocab_size)
        for tensor in plan:
            writer.add_tensor_info(*tensor.info())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(plan, model_dir, progress):
            writer.write_tensor_data(data)
        writer.close()
        tmp.replace(dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log.info("model.exported", src=str(model_dir), dst=str(dst), outtype=outtype, tensors=len(plan))
    return dst


def _check(family: Family, cfg: ModelConfig, hf_config: Hf) -> None:
    """Refuse what llama.cpp would run differently; warn of what it ignores."""
    _check_rope_scaling(cfg, family)
    if family.permute_qk and cfg.rope_dim != cfg.head_dim:
        _refuse(
            cfg.architecture,
            f"partial rotary ({cfg.rope_dim} of {cfg.head_dim} dims): "
            f"llama.cpp's {family.name} rotates whole heads",
        )
    if family.output == "tied":
        _check_tied(cfg, hf_config)
    if len({w for w in cfg.windows if w}) > 1:
        _refuse(cfg.architecture, f"sliding windows of several sizes {sorted(set(cfg.windows))}")
    family.check(cfg, hf_config)
    if any(cfg.windows) and not family.default_swa_period:
        log.warning(
            "gguf.sliding_window_unused",
            window=max(cfg.windows),
            architecture=family.name,
            why="llama.cpp's architecture attends to the whole context: the file runs as p3 "
            "does up to the window, then differs (p3 reads the window back)",
        )
    if cfg.act == "gelu":
        log.warning(
            "gguf.gelu_approximated",
            architecture=family.name,
            why="llama.cpp computes GELU by its tanh approximation, not erf",
        )


def _check_rope_scaling(cfg: ModelConfig, family: Family) -> None:
    """Llama-3 scaling is written as llama.cpp's rope_freqs tensor ("llama" only), LongRoPE
    as Phi-3's factor tensors, linear scaling as rope.scaling.*; others are refused."""
    if cfg.rope_scaling is None:
        return
    kind = getattr(cfg.rope_scaling, "kind", "llama3")
    allowed = (
        kind == "linear"
        or (kind == "llama3" and family.rope_freqs)
        or (kind == "longrope" and family.name == "phi3")
    )
    if not allowed:
        raise ValueError(
            f"RoPE scaling {kind!r} is not written to GGUF for llama.cpp's {family.name!r} "
            "(Llama-3 scaling for llama, LongRoPE for phi3, linear for any)"
        )


def _write_metadata(
    writer: Any, family: Family, cfg: ModelConfig, hf: Hf, name: str, outtype: str
) -> None:
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in _common_metadata(family, cfg) + family.metadata(cfg, hf):
        getattr(writer, method)(value)


# --- tensors -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Planned:
    """One tensor of the file, before its bytes are made."""

    name: str  # GGUF name
    sources: tuple[str, ...]  # HF names (several: experts, stacked); () when made here
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # in the file, PyTorch order
    transform: Transform = IDENTITY
    made: np.ndarray | None = None  # rope_freqs, rope factors

    @property
    def blocks(self) -> bool:
        return self.qtype.name not in ("F32", "F16")

    @property
    def stacked(self) -> bool:
        return len(self.shape) == 3 and self.made is None

    def info(self) -> tuple[str, tuple[int, ...], np.dtype, int, Any]:
        """GGUFWriter.add_tensor_info's arguments (blocks: uint8 [..., rows, row bytes])."""
        from gguf import quant_shape_to_byte_shape

        floats = np.float32 if self.qtype.name == "F32" else np.float16
        dtype = np.dtype(np.uint8 if self.blocks else floats)
        shape = quant_shape_to_byte_shape(self.shape, self.qtype) if self.blocks else self.shape
        return self.name, shape, dtype, math.prod(shape) * dtype.itemsize, self.qtype


def _plan(model_dir: Path, family: Family, cfg: ModelConfig, hf: Hf, outtype: str) -> list[Planned]:
    """Every tensor of the file, in the order its sources complete in the checkpoint (so the
    second pass writes each as soon as it has read the last of them)."""
    from gguf import GGMLQuantizationType as T

    made = [Planned(name, (), T.F32, data.shape, made=data) for name, data in _made_tensors(cfg)]
    planned: list[tuple[int, Planned]] = []
    experts: dict[str, dict[int, tuple[int, str, tuple[int, ...]]]] = {}
    embedding = None
    for index, (hf_name, tensor) in enumerate(iter_state_dict(model_dir)):
        if hf_name.endswith(SKIPPED_TENSORS):
            continue
        if hf_name.startswith(_head_module(family)) and cfg.tie_word_embeddings:
            continue  # a missing output.weight is llama.cpp's tied head
        name, expert = family.gguf_tensor(hf_name, hf)
        transform = family.transform(hf_name, cfg)
        shape = transform.shape(tuple(tensor.shape))
        if expert is not None:
            experts.setdefault(name, {})[expert] = (index, hf_name, shape)
            continue
        qtype = _gguf_type(name, shape, outtype)
        planned.append((index, Planned(name, (hf_name,), qtype, shape, transform)))
        if name == "token_embd.weight":
            embedding = (index, hf_name, shape)
    for name, by_expert in experts.items():
        count = cfg.moe.num_experts if cfg.moe else 0
        if sorted(by_expert) != list(range(count)):
            raise ValueError(f"{name}: experts {sorted(by_expert)} stored, {count} expected")
        parts = [by_expert[x] for x in range(count)]
        shape = (count, *parts[0][2])
        sources = tuple(part[1] for part in parts)
        transform = family.transform(sources[0], cfg)
        tensor = Planned(name, sources, _gguf_type(name, shape, outtype), shape, transform)
        planned.append((max(part[0] for part in parts), tensor))
    if cfg.tie_word_embeddings and family.output == "required" and embedding is not None:
        index, hf_name, shape = embedding  # llama.cpp's architecture needs output: a copy
        qtype = _gguf_type("output.weight", shape, outtype)
        planned.append((index, Planned("output.weight", (hf_name,), qtype, shape)))
    planned.sort(key=lambda item: item[0])
    return made + [tensor for _, tensor in planned]


def _head_module(family: Family) -> str:
    head = next((hf for hf, gg in family.global_tensors.items() if gg == "output"), "lm_head")
    return head + ".weight"


def _made_tensors(cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    s = cfg.rope_scaling
    if s is not None and s.kind == "llama3":
        return [(ROPE_FREQS, llama3_rope_freqs(cfg))]
    if s is not None and s.kind == "longrope":
        if not len(s.long_factor) == len(s.short_factor) == cfg.rope_dim // 2:
            raise ValueError(f"LongRoPE factors must number {cfg.rope_dim // 2} (rope dims / 2)")
        factors = (s.long_factor, s.short_factor)
        pairs = zip(ROPE_FACTORS, factors, strict=True)
        return [(name, np.array(values, dtype=np.float32)) for name, values in pairs]
    return []


def _gguf_type(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    """1-D (norms, biases), routers and f32 files: F32; else F16, or the block kind when the
    rows are whole blocks."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or outtype == "f32" or name.split(".")[-2] in F32_TENSORS:
        return T.F32
    if outtype == "f16" or shape[-1] % BLOCK:
        return T.F16
    return T[outtype.upper()]


def _tensor_data(plan: list[Planned], model_dir: Path, progress: bool) -> Iterator[np.ndarray]:
    """The planned tensors' bytes, in the plan's order, reading the checkpoint once; a
    tensor's sources are held only until its last user is written."""
    from tqdm.auto import tqdm

    uses = Counter(source for tensor in plan for source in tensor.sources)
    held: dict[str, torch.Tensor | QuantWeight] = {}
    bar = tqdm(total=len(plan), desc="Writing GGUF tensors", disable=not progress)
    position = 0

    def ready() -> Iterator[np.ndarray]:
        nonlocal position
        while position < len(plan) and all(s in held for s in plan[position].sources):
            tensor = plan[position]
            data = tensor.made if tensor.made is not None else _converted(tensor, held)
            if data.nbytes != tensor.info()[3]:
                raise ValueError(f"{tensor.name}: made {data.nbytes} bytes, not as planned")
            for source in tensor.sources:
                uses[source] -= 1
                if not uses[source]:
                    del held[source]
            position += 1
            bar.update()
            yield data

    yield from ready()
    for name, stored in iter_state_dict(model_dir):
        if uses[name]:
            held[name] = stored
            yield from ready()
    bar.close()
    if position < len(plan):
        raise ValueError(f"{plan[position].name}: its sources were not all in the checkpoint")


def _converted(tensor: Planned, held: Mapping[str, torch.Tensor | QuantWeight]) -> np.ndarray:
    from gguf.quants import quantize

    parts = []
    for source in tensor.sources:
        stored = held[source]
        kind = tensor.qtype.name.lower()
        if (
            isinstance(stored, QuantWeight)
            and stored.kind == kind
            and tensor.transform.moves_rows_only
        ):
            parts.append(tensor.transform.apply(stored.rows_layout().blocks.numpy()))  # copied
            continue
        floats = stored.dequantize() if isinstance(stored, QuantWeight) else stored
        weights = tensor.transform.apply(floats.to(torch.float32).numpy())
        parts.append(quantize(weights, tensor.qtype))
    return np.ascontiguousarray(np.stack(parts) if tensor.stacked else parts[0])


def llama3_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs: what each rotary frequency is divided by under Llama-3 scaling
    (1 for short wavelengths, `factor` for long ones, a smooth blend between)."""
    s = cfg.rope_scaling
    if s is None:
        raise ValueError("rope_freqs is made for Llama-3 RoPE scaling only")
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    wavelen = 2 * math.pi * cfg.rope_theta**exponents
    context = s.original_max_position_embeddings
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1 / ((1 - smooth) / s.factor + smooth)
    long = np.where(wavelen > context / s.low_freq_factor, s.factor, blended)
    return np.where(wavelen < context / s.high_freq_factor, 1.0, long).astype(np.float32)


def shortest_float32(value: float) -> float:
    """GGUF stores float32: 9.999999747378752e-06 -> 1e-05, the same float32, as written in HF."""
    return float(str(np.float32(value)))


# --- tokenizer ---------------------------------------------------------------------------------

# llama.cpp tells pre-tokenizers apart by the token ids of this text (convert_hf_to_gguf.py's
# get_vocab_base_pre): sha256 of str(ids) -> tokenizer.ggml.pre, for the families p3 serves
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438"
    " ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer(tokenizer: Tokenizer, tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre as llama.cpp's converter picks it, by the hash of PRE_TOKENIZER_TEXT.
    An unknown hash (llama.cpp's converter refuses those) falls back to "gpt-2" when the
    pre-tokenizer is plain ByteLevel with its regex (exactly GPT-2's split), else to "default"
    (llama.cpp's generic BPE split), with a warning: such a file may split text differently."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    fallback = "gpt-2" if gpt2 else "default"
    log.warning("gguf.pre_tokenizer_unknown", hash=digest, using=fallback)
    return fallback


def _write_tokenizer(
    writer: Any,
    files: dict[str, bytes],
    model_dir: Path,
    hf_config: dict[str, Any],
    vocab_size: int,
) -> None:
    tokenizer = Tokenizer.from_files(files, model_dir)  # a malformed file: named, ValueError
    data = json.loads(files["tokenizer.json"])
    _check_byte_level_bpe(data, model_dir / "tokenizer.json")
    tokens, types = _token_list(data, vocab_size)
    _warn_of_phi3_name(model_dir.name, tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data["model"].get("merges") or []))
    special = {
        writer.add_bos_token_id: (tokenizer.bos_token_id, hf_config.get("bos_token_id")),
        writer.add_eos_token_id: (tokenizer.eos_token_id, _first(hf_config.get("eos_token_id"))),
        writer.add_pad_token_id: (tokenizer.pad_token_id, hf_config.get("pad_token_id")),
        writer.add_unk_token_id: (_token_id(tokenizer, "unk_token"), None),
    }
    for add, (from_tokenizer, from_config) in special.items():
        token_id = from_tokenizer if from_tokenizer is not None else from_config
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            add(token_id)
    with_special, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) > len(plain)
    writer.add_add_bos_token(extra and with_special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(extra and with_special[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _warn_of_phi3_name(name: str, tokens: list[str]) -> None:
    """llama.cpp marks Phi-3's SentencePiece tokens in any model whose general.name says
    phi3 or phi-3, and fails to load one whose vocabulary lacks them."""
    missing = [token for token in PHI3_TOKENS if token not in tokens]
    if re.search(r"phi-?3", name, re.IGNORECASE) and missing:
        log.warning("gguf.name_fails_llama_cpp", name=name, missing=missing,
                    why="llama.cpp will not load it: rename the directory")  # fmt: skip


def _token_id(tokenizer: Tokenizer, key: str) -> int | None:
    token = tokenizer.tokens.get(key)
    return None if token is None else tokenizer.backend.token_to_id(token)


def _check_byte_level_bpe(data: dict[str, Any], path: Path) -> None:
    """Only GPT-2 style byte-level BPE (SmolLM2, Llama 3, Qwen2) has a "gpt2" GGUF form."""
    parts = [data.get("pre_tokenizer") or {}, data.get("decoder") or {}]
    parts += parts[0].get("pretokenizers", []) + parts[1].get("decoders", [])
    if data.get("model", {}).get("type") != "BPE" or not any(
        p.get("type") == "ByteLevel" for p in parts
    ):
        raise ValueError(
            f"{path} is not a byte-level BPE (GPT-2 style) tokenizer: only those are written "
            "to GGUF for now (SentencePiece-style vocabularies are not)"
        )


def _token_list(data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size: its token text and llama.cpp token type (added tokens:
    control when special, user-defined when not; ids the tokenizer lacks: unused pads)."""
    from gguf import TokenType

    tokens: dict[int, tuple[str, int]] = {
        i: (text, TokenType.NORMAL) for text, i in data["model"]["vocab"].items()
    }
    for added in data.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= vocab_size:
        raise ValueError(
            f"tokenizer.json has token id {max(tokens)}, beyond the model's vocab_size {vocab_size}"
        )
    listed = [tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    return [text for text, _ in listed], [int(kind) for _, kind in listed]


def _merges(merges: list[str] | list[list[str]]) -> list[str]:
    """Merges as "a b" strings; a pair's own spaces as U+0120, as llama.cpp's converter does."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]


def _first(value: int | list[int] | None) -> int | None:
    """config.json's eos_token_id may list several ids; llama.cpp takes one."""
    return value[0] if isinstance(value, list) and value else value
