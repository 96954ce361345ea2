"""LoRA adapters applied unmerged, several in one batch: each adapted linear adds, for the
tokens of each adapter in the step, x A^T B^T (B scaled by alpha / r) to its base output.

The step's tokens are grouped by adapter (LoRAStep, set by the runner from the plan's
segments); tokens of the bare base take no delta. Each row's delta is its own pair of small
matmuls (bmm), so it does not depend on the other rows of the step or on the thread count:
a moved stream recomputed elsewhere gets the same bits. This is vLLM's CPU path in spirit: a
gather of each adapter's rows and two small matmuls, rather than a merged copy of the weights
per adapter, so one step mixes any adapters with the base.

Adapter tensors map onto p3's fused linears: q/k/v onto rows of qkv, gate/up onto gate_up, and
a fused checkpoint projection (Phi-3's qkv_proj, gate_up_proj) has its B split by rows the
same way its weight is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from p3.config import ModelConfig
from p3.engine.checkpoint import COMPILED, _halves_first
from p3.lora import LoRARequest, read_adapter_config

Part = tuple[int, Tensor, Tensor]  # (first output row, A [r, in], B [rows, r] times scaling)
PREFIX = "base_model.model."
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(\.default)?\.weight$")
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


@dataclass
class LoRAStep:
    """This step's tokens by adapter: (adapter key, rows or None for all rows)."""

    groups: list[tuple[int, Tensor | None]] = field(default_factory=list)


class LinearLoRA:
    """One linear's adapters: key -> the parts it adds to."""

    def __init__(self, step: LoRAStep):
        self.step = step
        self.adapters: dict[int, list[Part]] = {}

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        for key, rows in self.step.groups:
            parts = self.adapters.get(key)
            if not parts:
                continue
            xr = (x if rows is None else x.index_select(0, rows)).unsqueeze(1)  # [n, 1, in]
            n = xr.shape[0]
            for start, a, b in parts:
                # one small matmul per row (bmm): a row's delta does not depend on the other
                # rows of the step, so adapters keep the batch invariance failover relies on
                delta = torch.bmm(torch.bmm(xr, a.t().expand(n, -1, -1)), b.t().expand(n, -1, -1))
                delta = delta.squeeze(1)
                end = start + b.shape[0]
                if rows is None:
                    y[:, start:end] += delta
                else:
                    y[rows, start:end] += delta
        return y


class LoRAManager:
    """The adapters one engine holds (at most max_loras, the least recently used unused one
    evicted for a new one), attached to every linear an adapter may target."""

    def __init__(self, model, cfg: ModelConfig, max_loras: int, max_rank: int):
        if model.shard.world_size > 1:
            raise ValueError("LoRA adapters run on a replica of one rank (no tp/pp) for now")
        self.model, self.cfg = model, cfg
        self.max_loras, self.max_rank = max_loras, max_rank
        self.step = model.lora_step = LoRAStep()
        self.linears: dict[str, LinearLoRA] = {}
        for name, module in model.named_modules():
            if name.endswith(("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.up", "mlp.down")):
                if ".experts." in name or ".shared." in name:
                    continue
                module.lora = self.linears[name] = LinearLoRA(self.step)
        self.loaded: dict[int, LoRARequest] = {}  # key (lora_int_id) -> request, LRU order
        self.refs: dict[int, int] = {}
        self.retired: set[int] = set()  # unloaded when their last request ends

    def acquire(self, lora: LoRARequest) -> int:
        """The adapter's key, loading it first if needed; ValueError if it cannot run here."""
        key = lora.lora_int_id
        self.retired.discard(key)
        held = self.loaded.get(key)
        if held is not None:
            if held.lora_path != lora.lora_path or held.lora_name != lora.lora_name:
                raise ValueError(
                    f"lora_int_id {key} is adapter {held.lora_name!r} ({held.lora_path}) here"
                )
            self.loaded[key] = self.loaded.pop(key)  # most recently used
        else:
            if len(self.loaded) >= self.max_loras:
                self._evict()
            self._load(key, Path(lora.lora_path))
            self.loaded[key] = lora
        self.refs[key] = self.refs.get(key, 0) + 1
        return key

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key] and key in self.retired:
            self.unload(key)

    def retire(self, key: int) -> None:
        """Unload now if unused, else when its last request ends."""
        if self.refs.get(key):
            self.retired.add(key)
        else:
            self.unload(key)

    def unload(self, key: int) -> None:
        if self.refs.get(key):
            raise ValueError(f"adapter {key} is in use by {self.refs[key]} requests")
        self.loaded.pop(key, None)
        self.refs.pop(key, None)
        self.retired.discard(key)
        for linear in self.linears.values():
            linear.adapters.pop(key, None)

    def _evict(self) -> None:
        for key in self.loaded:  # least recently used first
            if not self.refs.get(key):
                self.unload(key)
                return
        raise ValueError(
            f"all max_loras={self.max_loras} adapters are in use by running requests: "
            "raise max_loras or wait for them"
        )

    def _load(self, key: int, path: Path) -> None:
        parts = adapter_parts(self.cfg, path, self.max_rank, self.model.first_layer)
        anchor = self.model.anchor
        for name in parts:
            if name not in self.linears:
                raise ValueError(
                    f"{path}: p3 does not adapt {name} (this stage has no such linear)"
                )
        for name, linear_parts in parts.items():
            self.linears[name].adapters[key] = [
                (start, a.to(anchor.device, anchor.dtype), b.to(anchor.device, anchor.dtype))
                for start, a, b in linear_parts
            ]


def adapter_parts(
    cfg: ModelConfig, path: Path, max_rank: int, first_layer: int = 0
) -> dict[str, list[Part]]:
    """{p3 linear name: parts} of a PEFT adapter directory, B times the adapter's scaling."""
    config = read_adapter_config(path)
    tensors = _read_tensors(config.weights)
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        match = LORA_TENSOR.match(name.removeprefix(PREFIX))
        if match is None:
            raise ValueError(f"{config.weights}: unexpected tensor {name!r}")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor.float()
    out: dict[str, list[Part]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{config.weights}: {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"] * config.scaling
        if a.shape[0] > max_rank:
            raise ValueError(
                f"{path}: rank {a.shape[0]} exceeds max_lora_rank {max_rank} ({module})"
            )
        for linear, start, rows in _targets(cfg, module, b.shape[0]):
            layer, rest = linear.split(".", 1)
            local = int(layer) - first_layer
            part_b = b.narrow(0, rows[0], rows[1])
            if cfg.rope_interleaved and rest == "attn.qkv" and start < _kv_end(cfg):
                part_b = _halves_first(part_b, cfg.head_dim, cfg.rope_dim)
            out.setdefault(f"layers.{local}.{rest}", []).append((start, a, part_b))
    return out


def _kv_end(cfg: ModelConfig) -> int:
    return (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim


def _targets(cfg: ModelConfig, module: str, rows: int) -> list[tuple[str, int, tuple[int, int]]]:
    """Where a (checkpoint) module's B rows land: [(layer.p3 linear, first output row there,
    (first row of B, number of rows))]."""
    name = module + ".weight"
    for pattern, repl in COMPILED.get(cfg.architecture, []):
        name = pattern.sub(repl, name)
    match = LAYER_MODULE.match(name.removesuffix(".weight"))
    if match is None:
        raise ValueError(f"p3 does not adapt {module!r} (only attention and MLP projections)")
    layer, proj = match[1], match[3]
    qs, kvs = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    gated = cfg.gated_mlp
    places = {
        "q_proj": [("attn.qkv", 0, (0, qs))],
        "k_proj": [("attn.qkv", qs, (0, kvs))],
        "v_proj": [("attn.qkv", qs + kvs, (0, kvs))],
        "qkv_proj": [("attn.qkv", 0, (0, qs + 2 * kvs))],
        "o_proj": [("attn.o_proj", 0, (0, cfg.hidden_size))],
        "gate_proj": [("mlp.gate_up", 0, (0, inter))],
        "up_proj": [("mlp.gate_up", inter, (0, inter))] if gated else [("mlp.up", 0, (0, inter))],
        "gate_up_proj": [("mlp.gate_up", 0, (0, 2 * inter))],
        "down_proj": [("mlp.down", 0, (0, cfg.hidden_size))],
    }
    if (
        proj not in places
        or cfg.is_moe_layer(int(layer))
        and proj.endswith(("gate_proj", "up_proj", "down_proj"))
    ):
        raise ValueError(f"p3 does not adapt {module!r}")
    found = places[proj]
    if found[0][2][1] != rows:
        raise ValueError(
            f"{module}: lora_B has {rows} rows, the model's projection {found[0][2][1]}"
        )
    return [(f"{layer}.{linear}", start, span) for linear, start, span in found]


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
