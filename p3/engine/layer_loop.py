"""All of a pipeline stage's layers in one C++ call, when every op of the step would take the
C++ kernels anyway (see Transformer._layer_loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from p3.engine.model import AttentionContext, Transformer


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
            model.shard.tp_size == 1
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
