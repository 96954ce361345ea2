"""Attention over a paged KV cache: store, decode and varlen causal prefill.

Cache layout, one pair per layer: k_cache, v_cache [num_blocks, block_size, kv_heads,
head_dim]. The token at position p of a sequence lives in block block_table[p // block_size]
at offset p % block_size; its flat slot is block * block_size + offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from p3.kernels import build

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def store_kv(
    k: torch.Tensor,  # [T, kvh, hd]
    v: torch.Tensor,  # [T, kvh, hd]
    k_cache: torch.Tensor,  # [blocks, block_size, kvh, hd]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]
) -> None:
    """Write each token's key and value into its flat slot of the cache, in place."""
    slot_mapping = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,  # [blocks, block_size, kvh, hd]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    context_lens: torch.Tensor,  # int32 [B]
    scale: float,
) -> torch.Tensor:  # [B, H, hd]
    """One query per sequence attending to positions [0, context_len) of its sequence.

    On CPU this runs the C++ kernel, reading K/V through the block table in place; elsewhere,
    or if the kernel cannot be built, the torch implementation.
    """
    if cpu_decode_kernel_applies(q, k_cache):
        kernels = build.load()
        if kernels is not None:
            return kernels.paged_decode(
                q, k_cache, v_cache, _int32(block_tables), _int32(context_lens), float(scale)
            )
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_torch(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [B, H, hd]
    """Pure-torch paged decode: gather each sequence's blocks, then masked attention."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    max_context = int(context_lens.max()) if context_lens.numel() else 0
    num_blocks = max(1, -(-max_context // block_size))
    tables = block_tables[:, :num_blocks].long().clamp(min=0)  # [B, nb]
    positions = torch.arange(num_blocks * block_size, device=q.device)
    lens = context_lens.to(q.device).long()
    visible = positions[None, :] < lens.clamp(min=1)[:, None]  # [B, L]; no empty rows
    # Slots past a context may hold anything, NaN included, and 0 * NaN poisons the sum.
    hidden = ~visible[:, :, None, None]
    k = k_cache[tables].flatten(1, 2).masked_fill(hidden, 0).transpose(1, 2)  # [B, kvh, L, hd]
    v = v_cache[tables].flatten(1, 2).masked_fill(hidden, 0).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, H, 1, hd]
        k,
        v,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )[:, :, 0, :]
    return out.masked_fill((lens == 0)[:, None, None], 0.0)


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
) -> torch.Tensor:  # [T, H, hd]
    """Varlen causal prefill: query j of sequence i sits at position cached_lens[i] + j and
    attends to every position up to its own."""
    out = torch.empty_like(q)
    for i, cached in enumerate(cached_lens):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        if end == start:
            continue
        if cached == 0:
            seq_k, seq_v, mask = k[start:end], v[start:end], None
        else:
            total = cached + end - start
            seq_k = _gather(k_cache, block_tables[i], total)
            seq_v = _gather(v_cache, block_tables[i], total)
            mask = _bottom_right_causal_mask(end - start, total, q.device)
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # [H, len, hd]
            seq_k.transpose(0, 1),  # [kvh, total, hd]
            seq_v.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def cpu_decode_kernel_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether paged_decode_attention would try the C++ kernel for these tensors."""
    return q.device.type == "cpu" and q.dtype in CPU_KERNEL_DTYPES and q.dtype == k_cache.dtype


def cpu_decode_kernel_available() -> bool:
    """Whether the C++ decode kernel is built and loadable (builds it if needed)."""
    return build.load() is not None


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions [0, num_tokens) of one sequence: [num_tokens, kvh, hd] (a copy)."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-num_tokens // block_size)].long()
    return cache[blocks].flatten(0, 1)[:num_tokens]


def _bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query j (at position kv_len - q_len + j) may look."""
    q_positions = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_positions[:, None]


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)
