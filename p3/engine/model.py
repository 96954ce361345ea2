"""The Llama family (Llama, Mistral, Qwen2) as one flat transformer over a packed token batch.

A step's tokens are packed into one sequence of T tokens: first the decode tokens (one per
decoding sequence), then the prefill chunks. Linears run over all T at once; attention is the
only place that knows where one sequence ends and the next begins (see AttentionContext).
Under tensor parallelism (p3.engine.parallel) every module is built with this rank's local sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from p3.config import ModelConfig, RopeScaling
from p3.engine.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
)
from p3.engine.stages import receive_activations, send_activations
from p3.kernels.attention import paged_decode_attention, prefill_attention
from p3.kernels.fused import fused_add_rms_norm, rms_norm, rope_store_kv, silu_mul

if TYPE_CHECKING:
    from p3.engine.layer_loop import LayerLoop


@dataclass
class AttentionContext:
    """Where each sequence's tokens sit in the packed batch and in the paged KV cache."""

    slot_mapping: Tensor  # [T] int64: cache slot of every new token
    num_decode: int  # the first num_decode tokens each belong to their own decoding sequence
    decode_block_tables: Tensor | None  # [num_decode, max_blocks] int32
    decode_context_lens: Tensor | None  # [num_decode] int32, including the new token
    prefill_cu_seqlens: list[int]  # offsets of the prefill chunks after the decode tokens
    prefill_cached_lens: list[int]  # tokens of each prefilling sequence already in the cache
    prefill_block_tables: Tensor | None  # [num_prefill_seqs, max_blocks] int32
    # Batch-invariant attention (CPU): every token, prefill included, attends as a decode
    # query over the cache through the one paged kernel, so a token's result does not depend
    # on how its prompt was chunked or what else is in the step. None: prefill by sdpa.
    token_block_tables: Tensor | None = None  # [T, max_blocks] int32
    token_context_lens: Tensor | None = None  # [T] int32: position + 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); given the residual stream, (norm(x + residual), x + residual) instead."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    return _llama3_scaled(inv_freq, cfg.rope_scaling) if cfg.rope_scaling else inv_freq


def _llama3_scaled(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, blend in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        q0, q1, kv0, kv1 = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, kv1 - kv0, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, shard)
        # [num_blocks, block_size, KVH, hd] each, allocated by the runner; for an int8 cache
        # also the scales, [num_blocks, block_size, KVH] fp32 each
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        T, H, KVH = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv(x)  # [T, (H + 2 KVH) hd]
        # RoPE on q and k (cos, sin: [T, 1, hd]); k and v stored into the cache
        qk = rope_store_kv(
            qkv, cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping, H, KVH,
            self.k_scale, self.v_scale,
        )  # fmt: skip
        q, k = qk[:, :H], qk[:, H:]  # [T, H, hd], [T, KVH, hd]
        v = qkv.view(T, H + 2 * KVH, self.head_dim)[:, H + KVH :]  # [T, KVH, hd]
        out = self._attend(q, k, v, ctx)  # [T, H, hd]
        return self.o_proj(out.reshape(T, self.q_size))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        nd = ctx.num_decode
        if nd == q.shape[0]:
            return self._decode(q, ctx)
        if ctx.token_block_tables is not None:
            return paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                ctx.token_block_tables,
                ctx.token_context_lens,
                self.scale,
                self.k_scale,
                self.v_scale,
            )
        prefill = prefill_attention(
            q[nd:],
            k[nd:],
            v[nd:],
            ctx.prefill_cu_seqlens,
            ctx.prefill_cached_lens,
            ctx.prefill_block_tables,
            self.k_cache,
            self.v_cache,
            self.scale,
            self.k_scale,
            self.v_scale,
        )
        return torch.cat([self._decode(q[:nd], ctx), prefill]) if nd else prefill

    def _decode(self, q: Tensor, ctx: AttentionContext) -> Tensor:
        return paged_decode_attention(
            q,
            self.k_cache,
            self.v_cache,
            ctx.decode_block_tables,
            ctx.decode_context_lens,
            self.scale,
            self.k_scale,
            self.v_scale,
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        start, end = shard.split(cfg.intermediate_size)
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * (end - start))
        self.down = RowParallelLinear(end - start, cfg.hidden_size, shard)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(silu_mul(self.gate_up(x)))  # gate_up: [T, 2 I]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, shard)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard)

    def forward(
        self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor, ctx: AttentionContext
    ) -> tuple[Tensor, Tensor]:
        """Returns (mlp output, residual stream): the layer's output is their sum, which the
        next norm computes (vLLM's layout; the same sums as h + mlp(norm(h)) after all)."""
        if residual is None:
            x, residual = self.attn_norm(x), x
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.attn(x, cos, sin, ctx)
        x, residual = self.mlp_norm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, shard: Shard | None = None):
        super().__init__()
        self.cfg = cfg
        self.shard = shard = shard or Shard()
        self.first_layer, end = shard.layers(cfg.num_layers)  # this pipeline stage's layers
        self.layers = nn.ModuleList(Block(cfg, shard) for _ in range(self.first_layer, end))
        self.embed = self.norm = self.lm_head = None
        if shard.is_first_stage:
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
        if shard.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, shard)
        self.max_len = max_len
        self.cos_sin = torch.empty(0)  # [2, max_len, hd], set by setup_rope
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # device and dtype
        self._loop: LayerLoop | bool | None = None  # built on the first step (after the cache)

    def setup_rope(self) -> None:
        """Precompute cos/sin (in fp32, like transformers) for every position, once."""
        device = self.anchor.device
        inv_freq = rope_inv_freq(self.cfg).to(device)
        t = torch.arange(self.max_len, device=device).float()
        freqs = torch.outer(t, inv_freq)  # [max_len, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, hd]
        sign = torch.ones(self.cfg.head_dim, device=device)
        sign[: self.cfg.head_dim // 2] = -1.0  # rotate_half's sign, folded into sin
        self.cos_sin = torch.stack([emb.cos(), emb.sin() * sign]).to(self.anchor.dtype)

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor | None:
        """The final hidden states [T, D]; None on a pipeline stage before the last (it sends
        its output on instead)."""
        if self.embed is not None:
            x, residual = self.embed(input_ids), None  # [T, D]
        else:
            dim, dtype, device = self.cfg.hidden_size, self.anchor.dtype, self.anchor.device
            x, residual = receive_activations(len(input_ids), dim, dtype, device, self.shard)
        cos, sin = self.cos_sin[:, positions].unsqueeze(2)  # [T, 1, hd] each
        if (fast := self._layer_loop(x, ctx)) is not None:
            x, residual = fast(x, residual, cos, sin, ctx)
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, ctx)
        if self.norm is None:
            send_activations(x, residual, self.shard)
            return None
        return self.norm(x, residual)[0]

    def _layer_loop(self, x: Tensor, ctx: AttentionContext) -> LayerLoop | None:
        """The C++ loop over the layers when this step's every op would take the C++ kernels
        anyway (one shard, interleaved blocks, attention through the paged kernel)."""
        if ctx.num_decode != x.shape[0] and ctx.token_block_tables is None:
            return None
        if self._loop is None:
            from p3.engine.layer_loop import LayerLoop

            self._loop = LayerLoop.build(self, x) or False
        return self._loop or None

    def compute_logits(self, hidden: Tensor) -> Tensor | None:
        """[N, V] float logits; under tensor parallelism on the stage's tp rank 0 only."""
        return self.lm_head.gather(self.lm_head(hidden).float())
