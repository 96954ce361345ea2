"""QLoRA's frozen base: a linear whose weight is held as p3's blocks (q8_0, q4_0, q4_1).

Forward runs p3's quantized kernel (int8 activations times the blocks' integers,
p3.kernels.quant.quant_linear; off the CPU, the dequantized weight). Backward gives only the
input's gradient, grad_out @ W with W dequantized from the blocks for that one product (by the
embedding kernel, which reads the interleaved blocks in place): the weight is frozen, and the
activations' rounding in the forward is passed straight through.
peft's LoRA A and B sit on top in fp32 (the base layer of each peft LoRA layer is swapped
for one of these), so the base costs its blocks' bytes, not 4 bytes a weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from p3.kernels.quant import GROUP, QuantWeight, quant_embedding, quant_linear, quantize_weight


class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, module: QuantLinear) -> Tensor:
        ctx.module = module
        shape = x.shape
        y = quant_linear(x.reshape(-1, shape[-1]), module.weight_blocks, module.bias)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.module.dequantized(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear over blocks; in_features / out_features as nn.Linear's."""

    def __init__(self, weight: QuantWeight, bias: Tensor | None):
        super().__init__()
        self.kind, self.interleaved = weight.kind, weight.interleaved
        self.out_features, self.in_features = weight.shape
        self.register_buffer("blocks", weight.blocks, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kind: str, stored: QuantWeight | None = None
    ) -> QuantLinear:
        """linear's weight in blocks of kind (stored: the checkpoint's own blocks of that
        weight, used as they are when of that kind: no second rounding)."""
        if stored is not None and stored.kind == kind:
            weight = stored.rows_layout()
        else:
            weight = quantize_weight(linear.weight.detach().float(), kind)
        on_cpu = linear.weight.device.type == "cpu"
        if on_cpu and weight.shape[0] % GROUP == 0:
            weight = weight.interleave()  # the layout the CPU kernels run fastest on
        blocks = weight.blocks.to(linear.weight.device)
        return cls(QuantWeight(weight.kind, blocks, weight.interleaved), linear.bias)

    @property
    def weight_blocks(self) -> QuantWeight:
        return QuantWeight(self.kind, self.blocks, self.interleaved)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight [out, in] as float, for one product: every row through the embedding
        kernel (it reads the interleaved layout in place, ~7x faster than torch's unpacking)."""
        rows = torch.arange(self.out_features, device=self.blocks.device)
        return quant_embedding(rows, self.weight_blocks, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantLinearFunction.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def quantize_lora_bases(
    model: nn.Module, kind: str, stored: dict[str, QuantWeight] | None = None
) -> int:
    """Swap the nn.Linear under each of model's peft LoRA layers for a QuantLinear of kind;
    returns how many. stored: checkpoint blocks by Hugging Face weight name."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, nn.Linear):
            key = name.removeprefix("base_model.model.") + ".weight"
            block = (stored or {}).get(key)
            module.base_layer = QuantLinear.from_linear(module.base_layer, kind, block)
            count += 1
    return count
