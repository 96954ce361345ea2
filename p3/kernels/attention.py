"""Attention over a paged KV cache: store, decode and varlen causal prefill.

Cache layout, one pair per layer: k_cache, v_cache [num_blocks, block_size, kv_heads,
head_dim]. The token at position p of a sequence lives in block block_table[p // block_size]
at offset p % block_size; its flat slot is block * block_size + offset.

An int8 cache (--kv-cache-dtype int8) holds k_cache, v_cache as int8 plus one fp32 scale per
token and kv head, k_scale, v_scale [num_blocks, block_size, kv_heads]: symmetric,
scale = amax / 127 over the head's head_dim values and q = round-half-even(x / scale), so
x ~ scale * q (quantize_kv). Readers dequantize: the decode kernel inside its dot products,
prefill when it gathers a cached prefix. Before a key is quantized, rope_store_kv turns it,
and the queries, by an orthonormal Hadamard transform (hadamard_heads): the scores q . k stay
what they were, but a key's outlier channels spread over the head and its one scale fits
better. Values are stored as they are (their int8 error moves the output far less).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from p3.kernels import build, cpu

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
INT8_MAX = 127


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] -> (int8 [..., hd], fp32 scale [...]): one symmetric scale per row,
    amax / 127, and q = round-half-even(x / scale); an all-zero row gets scale 0, q 0.
    The fused C++ store repeats this arithmetic, so the two give the same bits."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / INT8_MAX
    divided = torch.where(scale[..., None] > 0, x / scale[..., None], 0.0)
    return divided.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def hadamard_heads(x: torch.Tensor) -> torch.Tensor:
    """x [..., hd] turned by an orthonormal Hadamard transform along hd, on each stretch of n
    values (n the largest power of two dividing hd, at most 1024): log2(n) rounds of fp32
    butterflies, then times 1 / sqrt(n), rounded to x's dtype. csrc/fused.cpp repeats it."""
    hd = x.shape[-1]
    n = min(hd & -hd, 1024)
    y = x.float().reshape(*x.shape[:-1], hd // n, n)
    h = 1
    while h < n:
        pairs = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(y.shape)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale * q in fp32, rounded to dtype: q [..., hd] int8, scale [...]."""
    return (q.float() * scale[..., None]).to(dtype)


def store_kv(
    k: torch.Tensor,  # [T, kvh, hd]
    v: torch.Tensor,  # [T, kvh, hd]
    k_cache: torch.Tensor,  # [blocks, block_size, kvh, hd]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]
    k_scale: torch.Tensor | None = None,  # [blocks, block_size, kvh] fp32, for an int8 cache
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's key and value into its flat slot of the cache, in place (an int8
    cache gets them quantized, and their scales)."""
    slot_mapping = slot_mapping.long()
    if k_cache.dtype == torch.int8:
        _check_scales(k_cache, k_scale, v_scale)
        for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
            q, scale = quantize_kv(x)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, q)
            scales.view(-1, scales.shape[2]).index_copy_(0, slot_mapping, scale)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,  # [blocks, block_size, kvh, hd]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    context_lens: torch.Tensor,  # int32 [B]
    scale: float,
    k_scale: torch.Tensor | None = None,  # [blocks, block_size, kvh] fp32, for an int8 cache
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [B, H, hd]
    """One query per sequence attending to positions [0, context_len) of its sequence, or to
    the last `window` of them (a sliding window); scores soft-capped by softcap * tanh(s /
    softcap) when softcap > 0.

    On CPU this runs the C++ kernel, reading K/V through the block table in place (an int8
    cache dequantized in its dot products); elsewhere, or if the kernel cannot be built, the
    torch implementation.
    """
    if cpu_decode_kernel_applies(q, k_cache):
        kernels = build.load()
        if kernels is not None:
            return kernels.paged_decode(
                q,
                k_cache,
                v_cache,
                _int32(block_tables),
                _int32(context_lens),
                float(scale),
                k_scale=k_scale,
                v_scale=v_scale,
                isa=decode_isa_cap(),
                float_avx2=True,  # 3-5x the portable loops; batch-invariant all the same
                window=window,
                softcap=float(softcap or 0.0),
            )
    return paged_decode_attention_torch(
        q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, window, softcap
    )


def paged_decode_attention_torch(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [B, H, hd]
    """Pure-torch paged decode: gather each sequence's blocks (dequantized from an int8
    cache), then masked attention."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    max_context = int(context_lens.max()) if context_lens.numel() else 0
    num_blocks = max(1, -(-max_context // block_size))
    tables = block_tables[:, :num_blocks].long().clamp(min=0)  # [B, nb]
    positions = torch.arange(num_blocks * block_size, device=q.device)
    lens = context_lens.to(q.device).long()
    visible = positions[None, :] < lens.clamp(min=1)[:, None]  # [B, L]; no empty rows
    if window:
        visible &= positions[None, :] >= (lens.clamp(min=1) - window)[:, None]
    # Slots past a context may hold anything, NaN included, and 0 * NaN poisons the sum.
    hidden = ~visible[:, :, None, None]
    k, v = k_cache[tables], v_cache[tables]  # [B, nb, block_size, kvh, hd]
    queries = q
    if k_cache.dtype == torch.int8:  # in fp32, as the kernel computes it, whatever q's dtype
        _check_scales(k_cache, k_scale, v_scale)
        k = dequantize_kv(k, k_scale[tables], torch.float32)
        v = dequantize_kv(v, v_scale[tables], torch.float32)
        queries = q.float()
    k = k.flatten(1, 2).masked_fill(hidden, 0).transpose(1, 2)  # [B, kvh, L, hd]
    v = v.flatten(1, 2).masked_fill(hidden, 0).transpose(1, 2)
    out = attend(
        queries[:, :, None, :],  # [B, H, 1, hd]
        k,
        v,
        visible[:, None, None, :],
        scale,
        softcap,
    )[:, :, 0, :]
    return out.masked_fill((lens == 0)[:, None, None], 0.0).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, kvh, hd]
    v: torch.Tensor,  # [T, kvh, hd]
    cu_seqlens: Sequence[int],  # [S + 1] query offsets of each sequence in the flat batch
    cached_lens: Sequence[int],  # [S] tokens of each sequence already cached before this chunk
    block_tables: torch.Tensor,  # int32 [S, max_blocks]
    k_cache: torch.Tensor,  # [blocks, block_size, kvh, hd], the chunk already stored
    v_cache: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [blocks, block_size, kvh] fp32, for an int8 cache
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [T, H, hd]
    """Varlen causal prefill: query j of sequence i sits at position cached_lens[i] + j and
    attends to every position up to its own (the last `window` of them, with a sliding
    window). The cached prefix comes from the cache (dequantized if int8); the chunk's own
    keys and values from k and v, as computed."""
    out = torch.empty_like(q)
    for i, cached in enumerate(cached_lens):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        if end == start:
            continue
        if cached == 0:
            seq_k, seq_v = k[start:end], v[start:end]
        else:
            prefix_k = _gather(k_cache, block_tables[i], cached, k_scale, k.dtype)
            prefix_v = _gather(v_cache, block_tables[i], cached, v_scale, v.dtype)
            seq_k = torch.cat([prefix_k, k[start:end]])
            seq_v = torch.cat([prefix_v, v[start:end]])
        mask = None  # causal from the top left
        if cached or window or softcap:
            mask = _bottom_right_causal_mask(end - start, cached + end - start, q.device, window)
        out[start:end] = attend(
            q[start:end].transpose(0, 1),  # [H, len, hd]
            seq_k.transpose(0, 1),  # [kvh, total, hd]
            seq_v.transpose(0, 1),
            mask,
            scale,
            softcap,
        ).transpose(0, 1)
    return out


def attend(
    q: torch.Tensor,  # [..., H, Lq, hd]
    k: torch.Tensor,  # [..., kvh, Lk, hd]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool, True where a query may look; None: causal
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention (grouped queries); soft-capped scores, when softcap, computed as
    transformers does (scores in q's dtype, softmax in fp32)."""
    if not softcap:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def cpu_decode_kernel_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether paged_decode_attention would try the C++ kernel for these tensors: a cache in
    q's dtype or int8."""
    return (
        q.device.type == "cpu"
        and q.dtype in CPU_KERNEL_DTYPES
        and k_cache.dtype in (q.dtype, torch.int8)
    )


@functools.cache
def decode_isa_cap() -> str:
    """The ISA level the decode kernel may use: this machine's, under P3_CPU_ISA (read once)."""
    return cpu.isa()


def decode_kernel_choice(head_dim: int = 64) -> str:
    """What paged_decode_attention runs on the CPU here, for a cache in the model dtype and
    an int8 one: cpp-avx512, cpp-avx2 (head_dim a multiple of 8), cpp-portable, or torch
    without the kernels."""
    kernels = build.load()
    if kernels is None:
        return "torch"
    cap = decode_isa_cap()
    same = kernels.decode_isa(head_dim, cap, int8_cache=False)
    int8 = kernels.decode_isa(head_dim, cap, int8_cache=True)
    return f"cpp-{same}" if same == int8 else f"cpp-{same} (int8 cache: cpp-{int8})"


def cpu_decode_kernel_available() -> bool:
    """Whether the C++ decode kernel is built and loadable (builds it if needed)."""
    return build.load() is not None


def _gather(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    num_tokens: int,
    scales: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Positions [0, num_tokens) of one sequence: [num_tokens, kvh, hd] in dtype (a copy)."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-num_tokens // block_size)].long()
    rows = cache[blocks].flatten(0, 1)[:num_tokens]
    if cache.dtype != torch.int8:
        return rows.to(dtype)
    if scales is None:
        raise ValueError("an int8 KV cache needs its scales")
    return dequantize_kv(rows, scales[blocks].flatten(0, 1)[:num_tokens], dtype)


def _check_scales(
    cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> None:
    expected = cache.shape[:3]
    for name, scales in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scales is None or scales.shape != expected or scales.dtype != torch.float32:
            got = None if scales is None else (tuple(scales.shape), scales.dtype)
            raise ValueError(
                f"an int8 KV cache needs {name} fp32 {tuple(expected)} (one per token and kv "
                f"head), got {got}"
            )


def _bottom_right_causal_mask(
    q_len: int, kv_len: int, device: torch.device, window: int = 0
) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query j (at position kv_len - q_len + j) may look: at
    itself and before it, within `window` positions of it when window > 0."""
    q_positions = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv_positions = torch.arange(kv_len, device=device)[None, :]
    visible = kv_positions <= q_positions
    return visible & (kv_positions > q_positions - window) if window else visible


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)
