"""Building a Transformer from a checkpoint: where every tensor goes on this rank
(weight_slots), which weights are held as quantized blocks (quantization_plan), and the fill."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from p3.config import ModelConfig
from p3.engine.checkpoint import canonical_tensors
from p3.engine.layers import Linear, can_pack_linears
from p3.engine.model import Transformer
from p3.engine.parallel import Shard
from p3.kernels.quant import BLOCK, GROUP, QuantWeight, mode_kind, quantize_weight

# (HF name, p3 parameter, row start, row end, slice of the checkpoint tensor: (dim, start, end))
Slot = tuple[str, str, int, int, tuple[int, int, int] | None]


def weight_slots(cfg: ModelConfig, shard: Shard | None = None) -> Iterator[Slot]:
    """Where every (canonical, p3.engine.checkpoint) checkpoint tensor p3 reads goes, for
    this rank: the rows of a parameter it fills and, under tensor parallelism, the slice of
    the tensor this rank keeps."""
    shard = shard or Shard()
    hd = cfg.head_dim
    q0, q1, kv0, kv1 = shard.heads(cfg.num_heads, cfg.num_kv_heads)
    v0, v1 = shard.vocab_range(cfg.vocab_size)
    v1 = min(v1, cfg.vocab_size)
    qs, kvs = (q1 - q0) * hd, (kv1 - kv0) * hd

    def rows(start: int, end: int) -> tuple[int, int, int] | None:
        return None if shard.tp_size == 1 else (0, start, end)

    def cols(start: int, end: int) -> tuple[int, int, int] | None:
        return None if shard.tp_size == 1 else (1, start, end)

    def norm(hf: str, p3: str, size: int, part=None) -> Iterator[Slot]:
        if cfg.norm_weight:
            yield f"{hf}.weight", f"{p3}.weight", 0, size, part
        if cfg.norm_bias:
            yield f"{hf}.bias", f"{p3}.bias", 0, size, part

    def mlp(hf: str, p3: str, inter: int, gated: bool, bias: bool) -> Iterator[Slot]:
        i0, i1 = shard.split(inter)
        il = i1 - i0
        for suffix in ("weight", "bias") if bias else ("weight",):
            if gated:
                yield f"{hf}.gate_proj.{suffix}", f"{p3}.gate_up.{suffix}", 0, il, rows(i0, i1)
                yield f"{hf}.up_proj.{suffix}", f"{p3}.gate_up.{suffix}", il, 2 * il, rows(i0, i1)
            else:
                yield f"{hf}.up_proj.{suffix}", f"{p3}.up.{suffix}", 0, il, rows(i0, i1)
        d = cfg.hidden_size
        yield f"{hf}.down_proj.weight", f"{p3}.down.weight", 0, d, cols(i0, i1)
        if bias:
            yield f"{hf}.down_proj.bias", f"{p3}.down.bias", 0, d, None

    if shard.is_first_stage:
        yield "model.embed_tokens.weight", "embed.weight", 0, v1 - v0, rows(v0, v1)
        if cfg.learned_positions:
            n = cfg.max_position_embeddings
            yield "model.embed_positions.weight", "positions.weight", 0, n, None
    if shard.is_last_stage:
        yield from norm("model.norm", "norm", cfg.hidden_size)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        if not (cfg.tie_word_embeddings and shard.is_first_stage):  # else shared with embed
            yield head, "lm_head.weight", 0, v1 - v0, rows(v0, v1)
        if cfg.lm_head_bias:
            yield "lm_head.bias", "lm_head.bias", 0, v1 - v0, rows(v0, v1)
    first, end = shard.layers(cfg.num_layers)
    norms = LAYER_NORMS[cfg.layout]
    if cfg.layout == "parallel" and cfg.shared_norm:
        norms = norms[:1]
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
        o_proj = p3 + "attn.o_proj."
        yield (
            hf + "self_attn.o_proj.weight",
            o_proj + "weight",
            0,
            cfg.hidden_size,
            cols(q0 * hd, q1 * hd),
        )
        if cfg.o_bias:
            yield hf + "self_attn.o_proj.bias", o_proj + "bias", 0, cfg.hidden_size, None
        if cfg.qk_norm == "head":
            yield hf + "self_attn.q_norm.weight", p3 + "attn.q_norm.weight", 0, hd, None
            yield hf + "self_attn.k_norm.weight", p3 + "attn.k_norm.weight", 0, hd, None
        elif cfg.qk_norm == "full":
            q_part, kv_part = rows(q0 * hd, q1 * hd), rows(kv0 * hd, kv1 * hd)
            yield hf + "self_attn.q_norm.weight", p3 + "attn.q_norm.weight", 0, qs, q_part
            yield hf + "self_attn.k_norm.weight", p3 + "attn.k_norm.weight", 0, kvs, kv_part
        if cfg.is_moe_layer(i):
            moe = cfg.moe
            yield hf + "mlp.gate.weight", p3 + "mlp.router.weight", 0, moe.num_experts, None
            for e in range(moe.num_experts):
                yield from mlp(
                    hf + f"mlp.experts.{e}", p3 + f"mlp.experts.{e}", moe.intermediate_size,
                    True, False,
                )  # fmt: skip
            if moe.shared_intermediate_size:
                yield from mlp(
                    hf + "mlp.shared_expert", p3 + "mlp.shared", moe.shared_intermediate_size,
                    True, False,
                )  # fmt: skip
            if moe.shared_gate:
                yield (
                    hf + "mlp.shared_expert_gate.weight",
                    p3 + "mlp.shared_gate.weight",
                    0,
                    1,
                    None,
                )
        else:
            yield from mlp(
                hf + "mlp", p3 + "mlp", cfg.intermediate_size, cfg.gated_mlp, cfg.mlp_bias
            )
        for hf_norm, p3_norm in norms:
            yield from norm(hf + hf_norm, p3 + p3_norm, cfg.hidden_size)


# (checkpoint norm, p3 norm) of a layer, per layout; a parallel layout with one shared norm
# keeps the first
LAYER_NORMS = {
    "pre": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
    "parallel": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
    "sandwich": (
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attn_norm"),
        ("pre_feedforward_layernorm", "mlp_norm"),
        ("post_feedforward_layernorm", "post_mlp_norm"),
    ),
    "post": (
        ("post_attention_layernorm", "post_attn_norm"),
        ("post_feedforward_layernorm", "post_mlp_norm"),
    ),
}


Weight = Tensor | QuantWeight
# the linears that may be held as quantized blocks (experts' too; routers stay float)
BLOCK_WEIGHTS = (
    "attn.qkv.weight",
    "attn.o_proj.weight",
    "gate_up.weight",
    "up.weight",
    "down.weight",
)


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
    tensors = canonical_tensors(model.cfg, tensors)
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
