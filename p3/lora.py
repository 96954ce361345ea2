"""LoRA adapters in vLLM's shape (torch-free: the edge and the coordinator read them too).

`LoRARequest(lora_name, lora_int_id, lora_path)` names a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors); `read_adapter_config` checks what p3 runs:
LoRA (not DoRA) on the attention and MLP projections, without biases or saved modules.
p3.engine.lora loads the weights and applies them, unmerged, per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: an adapter by name, a positive integer id unique among adapters, and its
    directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    rslora: bool
    target_modules: tuple[str, ...] | str  # names, or a regex over module paths
    weights: Path

    @property
    def scaling(self) -> float:
        """What B A is multiplied by: alpha / r, or alpha / sqrt(r) under rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """A PEFT LoRA adapter's settings, or ValueError naming the file and what p3 cannot run."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"{path} is not a LoRA adapter: no {ADAPTER_CONFIG}")
    try:
        raw: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_file} is unreadable: {exc}") from None
    weights = next((path / f for f in ADAPTER_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise ValueError(f"{path} has no {' or '.join(ADAPTER_WEIGHTS)}")
    kind = raw.get("peft_type", "LORA")
    refusals = [
        (kind != "LORA", f"peft_type {kind!r} (only LORA)"),
        (bool(raw.get("use_dora")), "use_dora (DoRA)"),
        (raw.get("bias", "none") != "none", f"bias {raw.get('bias')!r} (only 'none')"),
        (bool(raw.get("modules_to_save")), "modules_to_save"),
        (bool(raw.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D targets)"),
        (bool(raw.get("alpha_pattern")), "alpha_pattern"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"{config_file}: p3 does not run adapters with {what}")
    try:
        rank, alpha = int(raw["r"]), float(raw.get("lora_alpha", raw["r"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{config_file}: needs an integer r (and a number lora_alpha)") from None
    targets = raw.get("target_modules") or ()
    return AdapterConfig(
        rank=rank,
        alpha=alpha,
        rslora=bool(raw.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        weights=weights,
    )
