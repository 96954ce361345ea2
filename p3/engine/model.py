"""Every family p3 runs (p3.architectures) as one flat transformer over a packed token batch,
its switches read from config.json.

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
import torch.nn.functional as F
from torch import Tensor, nn

from p3.config import ModelConfig, RopeScaling
from p3.engine.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    all_reduce,
)
from p3.engine.stages import receive_activations, send_activations
from p3.kernels.attention import paged_decode_attention, prefill_attention
from p3.kernels.fused import (
    activation,
    fused_add_rms_norm,
    partial_rope_store_kv,
    rms_norm,
    rope_store_kv,
    silu_mul,
)

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


Ropes = dict[str, tuple[Tensor, Tensor]]  # rope table name -> (cos, sin) of this step's tokens


class Norm(nn.Module):
    """RMSNorm (times weight, or times 1 + weight: Gemma) or LayerNorm (with or without bias,
    or without parameters: OLMo), each with the residual add fused in."""

    def __init__(self, dim: int, cfg: ModelConfig, kind: str | None = None):
        super().__init__()
        self.kind, self.eps, self.offset = kind or cfg.norm, cfg.rms_norm_eps, cfg.norm_offset
        self.weight = nn.Parameter(torch.empty(dim)) if cfg.norm_weight else None
        self.bias = (
            nn.Parameter(torch.empty(dim)) if cfg.norm_bias and self.kind == "layer" else None
        )

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); given the residual stream, (norm(x + residual), x + residual) instead."""
        if residual is None:
            return self.normed(x)
        if self.kind == "rms" and not self.offset and self.weight is not None:
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self.normed(summed), summed

    def normed(self, x: Tensor) -> Tensor:
        dim = (x.shape[-1],)
        if self.kind == "layer":
            if self.weight is None:  # in fp32, as OLMo does
                return F.layer_norm(x.float(), dim, None, None, self.eps).to(x.dtype)
            return F.layer_norm(x, dim, self.weight, self.bias, self.eps)
        if self.offset:  # Gemma: in fp32, times (1 + weight), then rounded
            normed = F.rms_norm(x.float(), dim, None, self.eps)
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(theta: float, dim: int, scaling: RopeScaling | None) -> Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"rope scaling {scaling.kind!r} has no single set of frequencies")


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


def rope_table(
    theta: float, dim: int, scaling: RopeScaling | None, max_len: int, device, dtype
) -> Tensor:
    """[2, max_len, dim]: cos and sin (rotate_half's sign folded into sin) of every position,
    computed in fp32 like transformers. LongRoPE (Phi-3) divides the frequencies by
    short_factor before original_max_position_embeddings and by long_factor from there on
    (what transformers does as a sequence grows past it), and scales cos and sin."""
    t = torch.arange(max_len, device=device).float()
    if scaling is not None and scaling.kind == "longrope":
        base = rope_inv_freq(theta, dim, None).to(device)
        short = base / torch.tensor(scaling.short_factor, device=device)
        long = base / torch.tensor(scaling.long_factor, device=device)
        is_long = (t >= scaling.original_max_position_embeddings)[:, None]
        freqs = torch.where(is_long, torch.outer(t, long), torch.outer(t, short))
        attention = scaling.attention_factor
    else:
        freqs = torch.outer(t, rope_inv_freq(theta, dim, scaling).to(device))  # [max_len, dim/2]
        attention = 1.0
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, dim]
    sign = torch.ones(dim, device=device)
    sign[: dim // 2] = -1.0
    return torch.stack([emb.cos() * attention, emb.sin() * attention * sign]).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, layer: int):
        super().__init__()
        q0, q1, kv0, kv1 = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.shard = shard
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, kv1 - kv0, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.scale
        self.window = cfg.window(layer)
        self.softcap = cfg.attn_softcap or 0.0
        self.clip = cfg.clip_qkv
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, shard, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:  # over each head, or over this rank's part of q and k
            head = cfg.qk_norm == "head"
            self.q_norm = Norm(cfg.head_dim if head else self.q_size, cfg, "rms")
            self.k_norm = Norm(cfg.head_dim if head else self.kv_size, cfg, "rms")
            # the full q and k widths, and how many ranks hold each kv head
            self.qk_widths = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
            self.kv_copies = max(1, shard.tp_size // cfg.num_kv_heads)
        self.rope = _rope_name(cfg, layer)  # None: no RoPE in this layer
        self.fused_rope = self.rope is not None and cfg.rope_dim == cfg.head_dim
        # [num_blocks, block_size, KVH, hd] each, allocated by the runner; for an int8 cache
        # also the scales, [num_blocks, block_size, KVH] fp32 each
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None

    def forward(self, x: Tensor, ropes: Ropes, ctx: AttentionContext) -> Tensor:
        T, H, KVH = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv(x)  # [T, (H + 2 KVH) hd]
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        if self.qk_norm is not None:
            qkv = self._norm_qk(qkv)
        # RoPE on q and k; k and v stored into the cache
        cos, sin = ropes[self.rope] if self.rope is not None else (None, None)
        if self.fused_rope:
            qk = rope_store_kv(
                qkv, cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping, H, KVH,
                self.k_scale, self.v_scale,
            )  # fmt: skip
        else:
            qk = partial_rope_store_kv(
                qkv, cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping, H, KVH,
                self.head_dim, self.k_scale, self.v_scale,
            )  # fmt: skip
        q, k = qk[:, :H], qk[:, H:]  # [T, H, hd], [T, KVH, hd]
        v = qkv.view(T, H + 2 * KVH, self.head_dim)[:, H + KVH :]  # [T, KVH, hd]
        out = self._attend(q, k, v, ctx)  # [T, H, hd]
        return self.o_proj(out.reshape(T, self.q_size))

    def _norm_qk(self, qkv: Tensor) -> Tensor:
        T, qs, kvs = qkv.shape[0], self.q_size, self.kv_size
        q, k, v = qkv.split([qs, kvs, kvs], dim=-1)
        if self.qk_norm == "head":
            q = self.q_norm(q.reshape(T, -1, self.head_dim)).reshape(T, qs)
            k = self.k_norm(k.reshape(T, -1, self.head_dim)).reshape(T, kvs)
        elif self.shard.tp_size == 1:
            q, k = self.q_norm(q), self.k_norm(k)
        else:  # the mean square over all ranks' parts (a replicated kv head counted once)
            q = self._spread_rms(q, self.q_norm, self.qk_widths[0], 1)
            k = self._spread_rms(k, self.k_norm, self.qk_widths[1], self.kv_copies)
        return torch.cat([q, k, v], dim=-1)

    def _spread_rms(self, x: Tensor, norm: Norm, width: int, copies: int) -> Tensor:
        squares = all_reduce(x.float().pow(2).sum(-1, keepdim=True), self.shard) / copies
        normed = x.float() * torch.rsqrt(squares / width + norm.eps)
        return norm.weight * normed.to(x.dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        nd = ctx.num_decode
        if nd == q.shape[0]:
            return self._decode(q, ctx)
        if ctx.token_block_tables is not None:
            return self._paged(q, ctx.token_block_tables, ctx.token_context_lens)
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
            self.window,
            self.softcap,
        )
        return torch.cat([self._decode(q[:nd], ctx), prefill]) if nd else prefill

    def _decode(self, q: Tensor, ctx: AttentionContext) -> Tensor:
        return self._paged(q, ctx.decode_block_tables, ctx.decode_context_lens)

    def _paged(self, q: Tensor, tables: Tensor, lens: Tensor) -> Tensor:
        return paged_decode_attention(
            q, self.k_cache, self.v_cache, tables, lens, self.scale, self.k_scale,
            self.v_scale, self.window, self.softcap,
        )  # fmt: skip


def _rope_name(cfg: ModelConfig, layer: int) -> str | None:
    if cfg.rope_dim == 0 or layer in cfg.nope_layers:
        return None
    return "local" if cfg.local_rope_theta is not None and cfg.window(layer) else "global"


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), or down(act(up(x))) when not gated; reduce=False leaves
    down's partial sums under tensor parallelism (MoE adds its experts up first)."""

    def __init__(
        self, cfg: ModelConfig, shard: Shard, intermediate: int, gated: bool = True,
        bias: bool = False, reduce: bool = True,
    ):  # fmt: skip
        super().__init__()
        start, end = shard.split(intermediate)
        self.gated, self.silu = gated, cfg.act == "silu"
        self.act = activation(cfg.act)
        if gated:
            self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * (end - start), bias=bias)
        else:
            self.up = ColumnParallelLinear(cfg.hidden_size, end - start, bias=bias)
        self.down = RowParallelLinear(end - start, cfg.hidden_size, shard, bias, reduce)

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:
            return self.down(self.act(self.up(x)))
        gate_up = self.gate_up(x)  # [T, 2 I]
        if self.silu:
            return self.down(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MoE(nn.Module):
    """A mixture of experts: the router's softmax (in fp32) picks each token's top_k experts,
    whose outputs add up weighted by their probabilities (renormalized over the top_k when
    the family does); a shared expert, if any, adds to every token, through a sigmoid gate.
    Under tensor parallelism every expert splits like an MLP, and one all-reduce ends it."""

    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        moe, d = cfg.moe, cfg.hidden_size
        self.shard, self.top_k, self.renormalize = shard, moe.top_k, moe.renormalize
        self.router = ColumnParallelLinear(d, moe.num_experts)
        self.experts = nn.ModuleList(
            MLP(cfg, shard, moe.intermediate_size, reduce=False) for _ in range(moe.num_experts)
        )
        self.shared = None
        if moe.shared_intermediate_size:
            self.shared = MLP(cfg, shard, moe.shared_intermediate_size, reduce=False)
        self.shared_gate = ColumnParallelLinear(d, 1) if moe.shared_gate else None

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [T, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](x[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return all_reduce(out, self.shard)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, layer: int):
        super().__init__()
        self.layout, self.residual_scale = cfg.layout, cfg.residual_scale
        d = cfg.hidden_size
        if cfg.layout != "post":
            self.attn_norm = Norm(d, cfg)
        self.attn = Attention(cfg, shard, layer)
        if cfg.layout in ("sandwich", "post"):
            self.post_attn_norm = Norm(d, cfg)
            self.post_mlp_norm = Norm(d, cfg)
        self.shared_norm = cfg.layout == "parallel" and cfg.shared_norm
        if cfg.layout in ("pre", "sandwich") or (cfg.layout == "parallel" and not cfg.shared_norm):
            self.mlp_norm = Norm(d, cfg)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, shard)
        else:
            self.mlp = MLP(cfg, shard, cfg.intermediate_size, cfg.gated_mlp, cfg.mlp_bias)

    def forward(
        self, x: Tensor, residual: Tensor | None, ropes: Ropes, ctx: AttentionContext
    ) -> tuple[Tensor, Tensor]:
        """Returns (branch output, residual stream): the layer's output is their sum, which the
        next norm computes (vLLM's layout; the same sums as h + mlp(norm(h)) after all)."""
        if self.layout in ("parallel", "post"):
            h = x if residual is None else x + residual
            if self.layout == "post":  # h += norm(attn(h)); h += norm(mlp(h))
                h = h + self.post_attn_norm(self.attn(h, ropes, ctx))
                return self.post_mlp_norm(self.mlp(h)), h
            normed = self.attn_norm(h)  # h += attn(norm(h)) + mlp(norm'(h))
            attn = self.attn(normed, ropes, ctx)
            return attn + self.mlp(normed if self.shared_norm else self.mlp_norm(h)), h
        if residual is None:
            x, residual = self.attn_norm(x), x
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.attn(x, ropes, ctx)
        if self.layout == "sandwich":
            x = self.post_attn_norm(x)
        elif self.residual_scale != 1.0:
            x = x * self.residual_scale
        x, residual = self.mlp_norm(x, residual)
        x = self.mlp(x)
        if self.layout == "sandwich":
            x = self.post_mlp_norm(x)
        elif self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x, residual


class Positions(nn.Module):
    """Learned absolute position embeddings (GPT-2), replicated on every rank."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, dim))

    def forward(self, positions: Tensor) -> Tensor:
        return F.embedding(positions, self.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, shard: Shard | None = None):
        super().__init__()
        self.cfg = cfg
        self.shard = shard = shard or Shard()
        self.first_layer, end = shard.layers(cfg.num_layers)  # this pipeline stage's layers
        self.layers = nn.ModuleList(Block(cfg, shard, i) for i in range(self.first_layer, end))
        self.embed = self.norm = self.lm_head = self.positions = None
        if shard.is_first_stage:
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
            if cfg.learned_positions:
                self.positions = Positions(cfg.max_position_embeddings, cfg.hidden_size)
        if shard.is_last_stage:
            self.norm = Norm(cfg.hidden_size, cfg)
            self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, shard, cfg.lm_head_bias)
        self.max_len = max_len
        # rope table name -> [2, max_len, rotary_dim], set by setup_rope
        self.rope_tables: dict[str, Tensor] = {}
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # device and dtype
        self._loop: LayerLoop | bool | None = None  # built on the first step (after the cache)
        self.lora_step = None  # p3.engine.lora.LoRAStep when LoRA adapters are enabled

    def setup_rope(self) -> None:
        """Precompute cos/sin for every position, once: the model's RoPE, and the sliding
        layers' own where they have one (Gemma 3)."""
        cfg, device, dtype = self.cfg, self.anchor.device, self.anchor.dtype
        names = {layer.attn.rope for layer in self.layers} - {None}
        self.rope_tables = {}
        if "global" in names:
            self.rope_tables["global"] = rope_table(
                cfg.rope_theta, cfg.rope_dim, cfg.rope_scaling, self.max_len, device, dtype
            )
        if "local" in names:
            self.rope_tables["local"] = rope_table(
                cfg.local_rope_theta, cfg.rope_dim, None, self.max_len, device, dtype
            )

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor | None:
        """The final hidden states [T, D]; None on a pipeline stage before the last (it sends
        its output on instead)."""
        if self.embed is not None:
            x, residual = self._embed(input_ids, positions), None  # [T, D]
        else:
            dim, dtype, device = self.cfg.hidden_size, self.anchor.dtype, self.anchor.device
            x, residual = receive_activations(len(input_ids), dim, dtype, device, self.shard)
        ropes = {  # [T, 1, rotary_dim] each
            name: tuple(table[:, positions].unsqueeze(2))
            for name, table in self.rope_tables.items()
        }
        if (fast := self._layer_loop(x, ctx)) is not None:
            x, residual = fast(x, residual, *ropes["global"], ctx)
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, ropes, ctx)
        if self.norm is None:
            send_activations(x, residual, self.shard)
            return None
        return self.norm(x, residual)[0]

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(input_ids)
        cfg = self.cfg
        if cfg.embed_scale != 1.0:  # Gemma rounds its scale to the model dtype first
            scale = (
                torch.tensor(cfg.embed_scale, dtype=x.dtype)
                if cfg.embed_scale_in_dtype
                else cfg.embed_scale
            )
            x = x * scale
        if self.positions is not None:
            x = x + self.positions(positions)
        return x

    def _layer_loop(self, x: Tensor, ctx: AttentionContext) -> LayerLoop | None:
        """The C++ loop over the layers when this step's every op would take the C++ kernels
        anyway (one shard, interleaved blocks, attention through the paged kernel, every
        layer Llama's)."""
        if ctx.num_decode != x.shape[0] and ctx.token_block_tables is None:
            return None
        if not self.cfg.llama_shaped or (self.lora_step is not None and self.lora_step.groups):
            return None
        if self._loop is None:
            from p3.engine.layer_loop import LayerLoop

            self._loop = LayerLoop.build(self, x) or False
        return self._loop or None

    def compute_logits(self, hidden: Tensor) -> Tensor | None:
        """[N, V] float logits (scaled, soft-capped where the family does); under tensor
        parallelism on the stage's tp rank 0 only."""
        logits = self.lm_head.gather(self.lm_head(hidden).float())
        if logits is None:
            return None
        if self.cfg.logits_scale != 1.0:
            logits = logits * self.cfg.logits_scale
        if (cap := self.cfg.final_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
