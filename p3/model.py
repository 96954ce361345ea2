"""The Llama family (Llama, Mistral, Qwen2) as one flat transformer over a packed token batch.

A step's tokens are packed into one sequence of T tokens: first the decode tokens (one per
decoding sequence), then the prefill chunks. Linears run over all T at once; attention is the
only place that knows where one sequence ends and the next begins (see AttentionContext).
Under tensor parallelism (p3.parallel) every module is built with this rank's local sizes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p3.config import ModelConfig, RopeScaling
from p3.kernels.attention import paged_decode_attention, prefill_attention
from p3.kernels.fused import fused_add_rms_norm, rms_norm, rope_store_kv, silu_mul
from p3.kernels.quant import BLOCK, GROUP, QuantWeight, mode_kind, quantize_weight
from p3.layers import Linear, can_pack_linears
from p3.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    receive_activations,
    send_activations,
)


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
            self._loop = LayerLoop.build(self, x) or False
        return self._loop or None

    def compute_logits(self, hidden: Tensor) -> Tensor | None:
        """[N, V] float logits; under tensor parallelism on the stage's tp rank 0 only."""
        return self.lm_head.gather(self.lm_head(hidden).float())


class LayerLoop:
    """All of a stage's layers in one C++ call (csrc/layers.cpp): the kernels the modules call,
    in their order, with their arguments, so the same bits, minus ~10 Python calls a layer."""

    def __init__(self, model: Transformer, kernels, layers, level: int):
        self.kernels, self.layers, self.level = kernels, layers, level
        attn = model.layers[0].attn
        self.num_heads, self.num_kv_heads, self.scale = (
            attn.num_heads,
            attn.num_kv_heads,
            attn.scale,
        )
        self.eps = model.cfg.rms_norm_eps

    @classmethod
    def build(cls, model: Transformer, x: Tensor) -> LayerLoop | None:
        from p3.kernels import build as kernel_build
        from p3.kernels.fused import cpu_kernels
        from p3.kernels.quant import KIND_IDS, _default_level

        kernels, level = kernel_build.load(), _default_level()
        usable = (
            model.shard.size == 1
            and x.is_cpu
            and x.dtype in (torch.float32, torch.bfloat16)
            and kernels is not None
            and hasattr(kernels, "forward_layers")
            and cpu_kernels() is not None
            and level is not None
            and len(model.layers) > 0
        )
        linears = [(b.attn.qkv, b.attn.o_proj, b.mlp.gate_up, b.mlp.down) for b in model.layers]
        if not usable or not all(
            lin.quant is not None and lin.quant.interleaved for four in linears for lin in four
        ):
            return None
        attn0 = model.layers[0].attn
        if attn0.k_cache.dtype not in (x.dtype, torch.int8):
            return None
        layers = kernels.Layers()
        empty = torch.empty(0)
        layers.attn_norm = [b.attn_norm.weight for b in model.layers]
        layers.mlp_norm = [b.mlp_norm.weight for b in model.layers]
        layers.qkv = [b.attn.qkv.quant.blocks for b in model.layers]
        layers.qkv_bias = [
            b.attn.qkv.bias if b.attn.qkv.bias is not None else empty for b in model.layers
        ]
        layers.o_proj = [b.attn.o_proj.quant.blocks for b in model.layers]
        layers.gate_up = [b.mlp.gate_up.quant.blocks for b in model.layers]
        layers.down = [b.mlp.down.quant.blocks for b in model.layers]
        layers.kinds = [KIND_IDS[lin.quant.kind] for four in linears for lin in four]
        layers.k_cache = [b.attn.k_cache for b in model.layers]
        layers.v_cache = [b.attn.v_cache for b in model.layers]
        layers.k_scale = [
            b.attn.k_scale if b.attn.k_scale is not None else empty for b in model.layers
        ]
        layers.v_scale = [
            b.attn.v_scale if b.attn.v_scale is not None else empty for b in model.layers
        ]
        return cls(model, kernels, layers, level)

    def __call__(
        self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor, ctx: AttentionContext
    ) -> tuple[Tensor, Tensor]:
        from p3.kernels.attention import _int32, decode_isa_cap

        if ctx.num_decode == x.shape[0]:
            tables, lens = ctx.decode_block_tables, ctx.decode_context_lens
        else:
            tables, lens = ctx.token_block_tables, ctx.token_context_lens
        return self.kernels.forward_layers(
            x, residual, self.layers, cos, sin, ctx.slot_mapping, _int32(tables), _int32(lens),
            self.num_heads, self.num_kv_heads, self.scale, self.eps, self.level, decode_isa_cap(),
        )  # fmt: skip


# (HF name, p3 parameter, row start, row end, slice of the checkpoint tensor: (dim, start, end))
Slot = tuple[str, str, int, int, tuple[int, int, int] | None]


def weight_slots(cfg: ModelConfig, shard: Shard | None = None) -> Iterator[Slot]:
    """Where every checkpoint tensor p3 reads goes, for this rank: the rows of a parameter it
    fills and, under tensor parallelism, the slice of the tensor this rank keeps."""
    shard = shard or Shard()
    hd = cfg.head_dim
    q0, q1, kv0, kv1 = shard.heads(cfg.num_heads, cfg.num_kv_heads)
    i0, i1 = shard.split(cfg.intermediate_size)
    v0, v1 = shard.vocab_range(cfg.vocab_size)
    v1 = min(v1, cfg.vocab_size)
    qs, kvs, il = (q1 - q0) * hd, (kv1 - kv0) * hd, i1 - i0

    def rows(start: int, end: int) -> tuple[int, int, int] | None:
        return None if shard.size == 1 else (0, start, end)

    def cols(start: int, end: int) -> tuple[int, int, int] | None:
        return None if shard.size == 1 else (1, start, end)

    if shard.is_first_stage:
        yield "model.embed_tokens.weight", "embed.weight", 0, v1 - v0, rows(v0, v1)
    if shard.is_last_stage:
        yield "model.norm.weight", "norm.weight", 0, cfg.hidden_size, None
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        if not (cfg.tie_word_embeddings and shard.is_first_stage):  # else shared with embed
            yield head, "lm_head.weight", 0, v1 - v0, rows(v0, v1)
    first, end = shard.layers(cfg.num_layers)
    for i in range(first, end):
        hf, p3 = f"model.layers.{i}.", f"layers.{i - first}."
        for suffix in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            qkv = p3 + f"attn.qkv.{suffix}"
            yield hf + f"self_attn.q_proj.{suffix}", qkv, 0, qs, rows(q0 * hd, q1 * hd)
            yield hf + f"self_attn.k_proj.{suffix}", qkv, qs, qs + kvs, rows(kv0 * hd, kv1 * hd)
            yield (
                hf + f"self_attn.v_proj.{suffix}",
                qkv,
                qs + kvs,
                qs + 2 * kvs,
                rows(kv0 * hd, kv1 * hd),
            )
        o_proj = p3 + "attn.o_proj.weight"
        yield hf + "self_attn.o_proj.weight", o_proj, 0, cfg.hidden_size, cols(q0 * hd, q1 * hd)
        yield hf + "mlp.gate_proj.weight", p3 + "mlp.gate_up.weight", 0, il, rows(i0, i1)
        yield hf + "mlp.up_proj.weight", p3 + "mlp.gate_up.weight", il, 2 * il, rows(i0, i1)
        yield hf + "mlp.down_proj.weight", p3 + "mlp.down.weight", 0, cfg.hidden_size, cols(i0, i1)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = "attn_norm" if norm == "input_layernorm" else "mlp_norm"
            yield hf + f"{norm}.weight", p3 + f"{name}.weight", 0, cfg.hidden_size, None


Weight = Tensor | QuantWeight
BLOCK_WEIGHTS = ("attn.qkv.weight", "attn.o_proj.weight", "mlp.gate_up.weight", "mlp.down.weight")


def quantization_plan(
    cfg: ModelConfig, shard: Shard, stored: dict[str, str], mode: str, device: torch.device
) -> dict[str, str]:
    """{p3 parameter: block kind} for the weights held as blocks. `stored`: the checkpoint's
    quantized tensors (HF name -> kind). auto keeps a parameter in blocks when all its parts
    are stored in one kind (and this rank's slice falls on block boundaries); a kind puts
    every linear in it and the embedding/head in q8_0; none, or a device other than the CPU
    under auto, keeps floats."""
    kind = mode_kind(mode)
    if mode == "none" or (kind is None and device.type != "cpu"):
        return {}
    kinds: dict[str, set[str | None]] = {}
    for hf_name, name, _, _, part in weight_slots(cfg, shard):
        if not name.endswith(BLOCK_WEIGHTS + ("embed.weight", "lm_head.weight")):
            continue
        wanted = stored.get(hf_name) if kind is None else kind
        if wanted is not None and kind is not None and not name.endswith(BLOCK_WEIGHTS):
            wanted = "q8_0"
        if part is not None and part[0] == 1 and (part[1] % BLOCK or part[2] % BLOCK):
            wanted = None
        kinds.setdefault(name, set()).add(wanted)
    return {name: k for name, ks in kinds.items() if len(ks) == 1 and (k := ks.pop()) is not None}


def load_weights(model: Transformer, tensors: Iterable[tuple[str, Weight]]) -> None:
    """Copy checkpoint tensors (this rank's slices) into the parameters, or into the blocks
    of the weights held quantized (quantizing or dequantizing where the checkpoint's form
    differs); every slot filled."""
    targets: dict[str, Weight] = {
        name: param.data for name, param in model.named_parameters(remove_duplicate=False)
    }
    targets.update(_block_targets(model))
    slots: dict[str, list[tuple[str, int, int, tuple[int, int, int] | None]]] = {}
    for hf_name, name, start, end, part in weight_slots(model.cfg, model.shard):
        slots.setdefault(hf_name, []).append((name, start, end, part))
    missing = {(n, s) for targets_ in slots.values() for n, s, _, _ in targets_}
    for hf_name, tensor in tensors:
        for name, start, end, part in slots.get(hf_name, ()):
            _fill(targets[name], start, end, _slice(tensor, part))
            missing.discard((name, start))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _block_targets(model: Transformer) -> dict[str, QuantWeight]:
    return {
        f"{name}.weight": module.quant
        for name, module in model.named_modules(remove_duplicate=False)
        if getattr(module, "quant", None) is not None
    }


def _slice(tensor: Weight, part: tuple[int, int, int] | None) -> Weight:
    if part is None:
        return tensor
    dim, lo, hi = part
    if isinstance(tensor, QuantWeight) and dim == 1 and (lo % BLOCK or hi % BLOCK):
        tensor = tensor.dequantize()  # a split inside a block: this rank keeps floats
    return tensor.narrow(dim, lo, hi - lo)


def _fill(target: Weight, start: int, end: int, source: Weight) -> None:
    if isinstance(target, QuantWeight):
        if not isinstance(source, QuantWeight) or source.kind != target.kind:
            floats = source.dequantize() if isinstance(source, QuantWeight) else source
            source = quantize_weight(floats, target.kind)
        target.blocks[start:end].copy_(source.blocks)
    elif isinstance(source, QuantWeight):
        target[start:end].copy_(source.dequantize(target.dtype))
    else:
        target[start:end].copy_(source)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Weight]],
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    shard: Shard | None = None,
    blocks: dict[str, str] | None = None,
) -> Transformer:
    """Allocate uninitialised on the device, in the dtype, then fill from the checkpoint.
    blocks: {parameter: kind} of the weights to hold quantized (see quantization_plan); their
    float storage is allocated but never touched, so it never becomes resident.
    (Not meta + to_empty: that path imports sympy, half a second of start-up.)"""
    with torch.device(device), _default_dtype(dtype):
        model = Transformer(cfg, max_len, shard)
    for name, kind in (blocks or {}).items():
        module = model.get_submodule(name.removesuffix(".weight"))
        tied_head = cfg.tie_word_embeddings and name == "lm_head.weight" and model.embed
        if not tied_head and module.weight.shape[1] % BLOCK == 0:  # else it stays float
            module.use_blocks(kind)
    if cfg.tie_word_embeddings and model.embed is not None and model.lm_head is not None:
        model.lm_head.weight = model.embed.weight
        if model.embed.quant is not None:
            model.lm_head.quant, model.lm_head.weight = model.embed.quant, None
    for vocab_rows in (model.embed, model.lm_head):
        if vocab_rows is not None:  # the last rank's padding rows past the vocabulary stay 0
            _zero(vocab_rows)
    load_weights(model, tensors)
    model.setup_rope()
    if can_pack_linears(device, dtype):
        for module in model.modules():
            if isinstance(module, Linear) and module.quant is None:
                module.pack_for_cpu()
    if device.type == "cpu":
        _interleave_blocks(model)
    return model.eval().requires_grad_(False)


def _interleave_blocks(model: Transformer) -> None:
    """Blocks into the layout the CPU kernels run on (8 rows a group); a weight shared by the
    embedding and the tied head is moved once and stays shared."""
    moved: dict[int, QuantWeight] = {}
    for module in model.modules():
        weight = getattr(module, "quant", None)
        if weight is not None and weight.shape[0] % GROUP == 0:
            if id(weight) not in moved:
                moved[id(weight)] = weight.interleave()
            module.quant = moved[id(weight)]


def _zero(module: nn.Module) -> None:
    if module.quant is not None:
        module.quant.blocks.zero_()  # d = 0 (and m = 0): every weight 0
    else:
        module.weight.data.zero_()
