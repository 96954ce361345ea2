"""The one layer every other module builds on: a Linear that holds float weights (which it can
repack for oneDNN) or GGUF-style quantized blocks (p3.kernels.quant)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p3.config import onednn_bf16_supported
from p3.kernels.quant import QuantWeight, quant_linear


class Linear(nn.Module):
    """y = x W^T + b, with parameters left uninitialised: weights always come from a checkpoint.

    On CPU in bf16 the weight can be repacked once into oneDNN's blocked layout (pack_for_cpu):
    the same results to the bit, 1.3-1.7x faster than F.linear at the batch sizes of decoding.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: Tensor | None = None
        self.quant: QuantWeight | None = None
        self.lora = None  # a p3.engine.lora.LinearLoRA when adapters may target it

    def forward(self, x: Tensor) -> Tensor:
        y = self.apply_to(x, self.bias)
        if self.lora is not None and self.lora.step.groups:
            y = self.lora(x, y)
        return y

    def apply_to(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x W^T + bias, whichever form the weight is held in."""
        if self.quant is not None:
            return quant_linear(x, self.quant, bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def use_blocks(self, kind: str) -> QuantWeight:
        """Hold the weight as `kind` blocks from now on (filled by the loader)."""
        rows, cols = self.weight.shape
        self.quant = QuantWeight.empty(kind, rows, cols, self.weight.device)
        self.weight = None  # never touched, so never resident
        return self.quant

    def pack_for_cpu(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        self.weight = None  # the packed copy is all forward reads: do not hold both


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed bf16 linear: bit-identical to F.linear here; fp32 packing is not. It
    needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (on an AVX2-only CPU the reorder raises)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and onednn_bf16_supported()
    )
