"""`p3 quantize SRC DST`: a checkpoint whose linears are stored as blocks of one kind (and the
embedding and an untied head as q8_0), with quantization.json recording what is what: it loads
as fast as the converted cache and serves with --quantization auto (the default)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from p3.kernels.quant import BLOCK, QuantWeight, mode_kind, quantize_weight
from p3.log import get_logger
from p3.weights.convert import (
    QUANTIZATION_FILE,
    SAFETENSORS_WEIGHTS,
    save_sharded,
    write_json,
    write_quantization,
)
from p3.weights.files import resolve_model
from p3.weights.read import iter_state_dict

log = get_logger(__name__)

LINEAR_SUFFIXES = tuple(
    f"{p}.weight"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def quantize_checkpoint(src: str | Path | None, dst: Path, mode: str) -> Path:
    """Write src (a model dir, a .gguf or the default model's name) quantized into dst."""
    kind = mode_kind(mode)
    if kind is None:
        raise ValueError(f"p3 quantize needs a kind (int8, q8_0, q4_0, q4_1), got {mode!r}")
    source = resolve_model(src)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    save_sharded(_quantized(iter_state_dict(source), kind, kinds), dst)
    write_quantization(dst, kinds, source=f"p3 quantize --quantization {mode}")
    _copy_side_files(source, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "p3-blocks", "mode": mode}
    write_json(dst / "config.json", config)
    log.info("model.quantized", src=str(source), dst=str(dst), mode=mode, tensors=len(kinds))
    return dst


def _quantized(
    tensors: Iterator[tuple[str, torch.Tensor | QuantWeight]], kind: str, kinds: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        wanted = _kind_for(name, tensor, kind)
        if wanted is None:
            yield name, tensor.dequantize() if isinstance(tensor, QuantWeight) else tensor
            continue
        if not (isinstance(tensor, QuantWeight) and tensor.kind == wanted):
            floats = tensor.dequantize() if isinstance(tensor, QuantWeight) else tensor
            tensor = quantize_weight(floats, wanted)
        kinds[name] = wanted
        yield name, tensor.blocks


def _kind_for(name: str, tensor: torch.Tensor | QuantWeight, kind: str) -> str | None:
    cols = tensor.shape[1] if len(tensor.shape) == 2 else 0
    if cols == 0 or cols % BLOCK:
        return None
    if name.endswith(LINEAR_SUFFIXES):
        return kind
    return "q8_0" if name in VOCAB_TENSORS else None


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        weights = SAFETENSORS_WEIGHTS.fullmatch(path.name) or path.name == QUANTIZATION_FILE
        if path.is_file() and not weights and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
