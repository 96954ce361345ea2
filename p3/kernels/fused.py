"""The elementwise ops of a decoder layer, fused: residual add + RMSNorm, RoPE + KV store,
SiLU-and-mul.

An int8 KV cache is written by the same RoPE + KV store kernel, which quantizes each token's
k and v heads as attention.quantize_kv does (the same bits).

On CPU, in float32 or bfloat16, each runs one C++ kernel (csrc/fused.cpp, csrc/rms_norm.cpp)
that gives the same bits as the chain of torch ops below it, which transformers also runs;
elsewhere, or if the kernels cannot be built, those torch ops run instead. The kernels repeat
the arithmetic of torch's vectorised code, so they are used only when built for the vector ISA
torch itself dispatches to here (which ATEN_CPU_CAPABILITY may lower).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from p3.kernels import build
from p3.kernels.attention import hadamard_heads, store_kv

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * rms_norm(x in fp32).to(x.dtype), over the last dim."""
    kernels = _kernels_for(x)
    if kernels is None:
        return rms_norm_torch(x, weight, eps)
    return kernels.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): a layer's input and its new residual stream."""
    kernels = _kernels_for(x)
    if kernels is None:
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    return kernels.fused_add_rms_norm(x, residual, weight, eps)


def rope_store_kv(
    qkv: Tensor,  # [T, (H + 2 KVH) * hd], the fused q, k, v projections
    cos: Tensor,  # [T, 1, hd]
    sin_signed: Tensor,  # [T, 1, hd]
    k_cache: Tensor,  # [blocks, block_size, KVH, hd]
    v_cache: Tensor,
    slot_mapping: Tensor,  # int64 [T]
    num_heads: int,
    num_kv_heads: int,
    k_scale: Tensor | None = None,  # [blocks, block_size, KVH] fp32, for an int8 cache
    v_scale: Tensor | None = None,
) -> Tensor:  # [T, H + KVH, hd]: roped q heads, then roped k heads
    """RoPE on the q and k heads; roped k and raw v written into each token's cache slot. For
    an int8 cache the roped q and k heads are also turned (attention.hadamard_heads) and k and
    v go in quantized, with their scales."""
    kernels = _kernels_for(qkv)
    if (
        kernels is None
        or k_cache.dtype not in (qkv.dtype, torch.int8)
        or slot_mapping.dtype != torch.int64
    ):
        return rope_store_kv_torch(
            qkv, cos, sin_signed, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
            k_scale, v_scale,
        )  # fmt: skip
    return kernels.rope_store_kv(
        qkv, cos, sin_signed, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
        k_scale, v_scale,
    )  # fmt: skip


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, where gate_up = cat(gate, up) along the last dim."""
    kernels = _kernels_for(gate_up)
    if kernels is None:
        return silu_mul_torch(gate_up)
    return kernels.silu_mul(gate_up)


# -- the torch references: what the kernels reproduce bit for bit -----------------------------


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # normalised in fp32, rounded, then scaled: transformers' numerics, in 4 ops instead of 8
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_torch(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    summed = x + residual
    return rms_norm_torch(summed, weight, eps), summed


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) = roll(x) * sign
    and the sign is folded into sin_signed: the same values, in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def rope_store_kv_torch(
    qkv: Tensor,
    cos: Tensor,
    sin_signed: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    return partial_rope_store_kv(
        qkv, cos, sin_signed, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
        cos.shape[-1], k_scale, v_scale,
    )  # fmt: skip


def partial_rope_store_kv(
    qkv: Tensor,
    cos: Tensor | None,  # [T, 1, rotary_dim], or None: no RoPE
    sin_signed: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """rope_store_kv with RoPE on the first rotary_dim dims of each head only (the rest pass
    through: StableLM, GPT-NeoX, Phi), or on none of them (GPT-2, SmolLM3's NoPE layers)."""
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    qk = heads[:, : num_heads + num_kv_heads]
    if cos is not None:
        rot = cos.shape[-1]
        turned = apply_rope(qk[..., :rot], cos, sin_signed)
        qk = turned if rot == head_dim else torch.cat([turned, qk[..., rot:]], dim=-1)
    if k_cache.dtype == torch.int8:
        qk = hadamard_heads(qk)
    v = heads[:, num_heads + num_kv_heads :]
    store_kv(qk[:, num_heads:], v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return qk


def silu_mul_torch(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def activation(name: str):
    """x -> act(x) for the MLP activations p3 knows (p3.architectures.ACTIVATIONS)."""
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


# -- which path ---------------------------------------------------------------------------------


def _kernels_for(x: Tensor) -> ModuleType | None:
    return cpu_kernels() if x.is_cpu and x.dtype in KERNEL_DTYPES else None


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The built kernels if they match torch's vector ISA here (checked once), else None."""
    module = build.load()
    if module is None:
        return None
    return module if module.fused_capability() == torch.backends.cpu.get_cpu_capability() else None
