"""Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_1) and the linears and embeddings over them.

A weight of N rows and K inputs is kept as `blocks`, uint8 [N, K / 32 * block bytes], in
GGUF's own block layout (llama.cpp ggml-common.h):

    q8_0  fp16 d, 32 x int8 q             w = q d               8.5 bits a weight
    q4_0  fp16 d, 16 bytes of nibbles     w = (q - 8) d         4.5
    q4_1  fp16 d, fp16 m, 16 bytes        w = q d + m           5.0

(nibble byte j holds weight j in its low half and weight j + 16 in its high half). So a GGUF
file's tensors are served as they are, and `quantize_weight` makes the same blocks from float
weights. `quant_linear` quantizes the activations per block of 32 to int8 and sums integer
dot products (csrc/quant.cpp, variant chosen per machine); `quant_linear_torch` is the same
arithmetic in torch, the reference that runs anywhere (and the path off the CPU, through a
dequantized weight).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from p3.kernels import build, cpu

BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
KIND_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
KINDS = tuple(BLOCK_BYTES)
# --quantization: auto = as stored (a GGUF's blocks stay blocks, float stays float); none =
# every weight in float; a kind = every linear in that kind, embedding and head in q8_0
# (int8 is q8_0: symmetric int8 per block of 32 with a fp16 scale)
QUANTIZATION_MODES = ("auto", "none", "int8", *KINDS)


def mode_kind(mode: str) -> str | None:
    """The block kind a --quantization mode puts the linears in (None: auto or none)."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_MODES)}, got {mode!r}")
    return "q8_0" if mode == "int8" else mode if mode in KINDS else None


# the C++ variants by ISA level (csrc/quant.cpp); AVX-512 machines run the AVX2 one for now
KERNEL_LEVELS = {"portable": 0, "avx2": 1, "avx512": 1, "neon": 0}


GROUP = 8  # rows of an interleaved group (see interleave)


@dataclass
class QuantWeight:
    """One [N, K] weight as GGUF blocks, row by row, or interleaved in groups of 8 rows."""

    kind: str
    blocks: Tensor  # uint8 [N, K // 32 * BLOCK_BYTES[kind]] (interleaved: [N / 8, 8 x that])
    interleaved: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        group = GROUP if self.interleaved else 1
        rows, row_bytes = self.blocks.shape
        return rows * group, row_bytes // group // BLOCK_BYTES[self.kind] * BLOCK

    def interleave(self) -> QuantWeight:
        """The layout the linears run on: for every 8 rows and block, the 8 scales (and mins)
        then the quants in 4-byte chunks, chunk-major and row-minor (csrc/quant.cpp), so one
        vector load feeds 8 outputs. The same bytes, moved; rows must be a multiple of 8."""
        if self.interleaved:
            return self
        rows, _ = self.shape
        if rows % GROUP:
            raise ValueError(f"interleaving needs rows in multiples of {GROUP}, got {rows}")
        size, head = BLOCK_BYTES[self.kind], _head_bytes(self.kind)
        b = self.blocks.view(rows // GROUP, GROUP, -1, size)  # [G, 8, nb, bytes]
        scales = b[..., :head].view(*b.shape[:3], head // 2, 2).permute(0, 2, 3, 1, 4)
        quants = b[..., head:].reshape(*b.shape[:3], -1, 4).permute(0, 2, 3, 1, 4)
        parts = [scales.flatten(2), quants.flatten(2)]  # [G, nb, ...] each
        return QuantWeight(self.kind, torch.cat(parts, -1).reshape(rows // GROUP, -1), True)

    def rows_layout(self) -> QuantWeight:
        """Back to GGUF's row-by-row blocks."""
        if not self.interleaved:
            return self
        rows, cols = self.shape
        size, head, nb = BLOCK_BYTES[self.kind], _head_bytes(self.kind), cols // BLOCK
        g = self.blocks.view(rows // GROUP, nb, GROUP * size)
        scales = g[..., : GROUP * head].reshape(rows // GROUP, nb, head // 2, GROUP, 2)
        quants = g[..., GROUP * head :].reshape(rows // GROUP, nb, -1, GROUP, 4)
        scales = scales.permute(0, 3, 1, 2, 4).reshape(rows // GROUP, GROUP, nb, head)
        quants = quants.permute(0, 3, 1, 2, 4).reshape(rows // GROUP, GROUP, nb, size - head)
        blocks = torch.cat([scales, quants], -1).reshape(rows, -1)
        return QuantWeight(self.kind, blocks.contiguous())

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @classmethod
    def empty(cls, kind: str, rows: int, cols: int, device: torch.device | None = None):
        check_quantizable(kind, cols)
        row_bytes = cols // BLOCK * BLOCK_BYTES[kind]
        return cls(kind, torch.empty(rows, row_bytes, dtype=torch.uint8, device=device))

    def narrow(self, dim: int, start: int, length: int) -> QuantWeight:
        """Rows [start, start + length) (dim 0), or inputs (dim 1, on block boundaries)."""
        if self.interleaved:
            return self.rows_layout().narrow(dim, start, length)
        if dim == 0:
            return QuantWeight(self.kind, self.blocks.narrow(0, start, length))
        if start % BLOCK or length % BLOCK:
            raise ValueError(f"a {self.kind} weight splits its inputs only at multiples of 32")
        size = BLOCK_BYTES[self.kind]
        return QuantWeight(
            self.kind, self.blocks.narrow(1, start // BLOCK * size, length // BLOCK * size)
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.rows_layout().blocks, self.kind).to(dtype)


def _head_bytes(kind: str) -> int:
    """Bytes of fp16 scale (and min) at the head of a block."""
    return 4 if kind == "q4_1" else 2


def check_quantizable(kind: str, cols: int) -> None:
    if kind not in BLOCK_BYTES:
        raise ValueError(f"unknown quantization {kind!r}; p3 knows {', '.join(KINDS)}")
    if cols % BLOCK:
        raise ValueError(f"{kind} needs the input size to be a multiple of {BLOCK}, got {cols}")


# -- the layout: quantize and dequantize (torch, any device) ----------------------------------


def quantize_weight(weight: Tensor, kind: str) -> QuantWeight:
    """Float [N, K] -> blocks, as llama.cpp's reference quantizers round (round half away
    from zero for q8_0/q4_0 as `roundf`; q4_1's nibbles likewise, clamped to 0..15)."""
    rows, cols = weight.shape
    check_quantizable(kind, cols)
    w = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    if kind == "q8_0":
        d = w.abs().amax(-1) / 127
        q = _round_away(w * _inverse(d)[..., None]).clamp(-127, 127).to(torch.int8)
        parts = [_half_bytes(d), q.view(torch.uint8)]
    elif kind == "q4_0":  # the value of largest magnitude maps to -8 (llama.cpp's choice)
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = extreme / -8
        q = (_trunc_half(w * _inverse(d)[..., None] + 8.5)).clamp(0, 15).to(torch.uint8)
        parts = [_half_bytes(d), _pack_nibbles(q)]
    else:
        low, high = w.amin(-1), w.amax(-1)
        d = (high - low) / 15
        q = (_trunc_half((w - low[..., None]) * _inverse(d)[..., None] + 0.5)).clamp(0, 15)
        parts = [_half_bytes(d), _half_bytes(low), _pack_nibbles(q.to(torch.uint8))]
    blocks = torch.cat(parts, dim=-1)  # [N, nb, bytes]
    return QuantWeight(kind, blocks.reshape(rows, -1).contiguous())


def dequantize_weight(blocks: Tensor, kind: str) -> Tensor:
    """Blocks -> float32 [N, K], exactly GGUF's w = q d (+ m)."""
    size = BLOCK_BYTES[kind]
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, size)
    d = _half_values(b[..., 0:2])
    if kind == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d[..., None]).reshape(rows, -1)
    offset = 4 if kind == "q4_1" else 2
    q = _unpack_nibbles(b[..., offset:]).float()
    if kind == "q4_0":
        return ((q - 8) * d[..., None]).reshape(rows, -1)
    m = _half_values(b[..., 2:4])
    return (q * d[..., None] + m[..., None]).reshape(rows, -1)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d != 0, 1 / torch.where(d != 0, d, 1), 0)


def _round_away(x: Tensor) -> Tensor:
    return x.sign() * (x.abs() + 0.5).floor()


def _trunc_half(x: Tensor) -> Tensor:
    return x.trunc()


def _half_bytes(values: Tensor) -> Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _half_values(two_bytes: Tensor) -> Tensor:
    return two_bytes.contiguous().view(torch.float16).squeeze(-1).float()


def _pack_nibbles(q: Tensor) -> Tensor:  # [..., 32] values 0..15 -> [..., 16] bytes
    return q[..., :16] | (q[..., 16:] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:  # [..., 16] bytes -> [..., 32] values
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


# -- the arithmetic: activations to int8, integer dots, fp32 sums -----------------------------


def quantize_activations_torch(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> (q int8 [M, K], d [M, K/32], d * sum(q) [M, K/32]); d = max|x| / 127,
    q = round-half-even(x * (1 / d)): the kernels' own rounding, so these match exactly."""
    rows, cols = x.shape
    blocks = x.float().reshape(rows, cols // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    q = torch.round(blocks * _inverse(d)[..., None])
    sums = d * q.sum(-1)
    return q.to(torch.int8).reshape(rows, cols), d, sums


def quant_linear_torch(x: Tensor, weight: QuantWeight, bias: Tensor | None = None) -> Tensor:
    """The kernels' arithmetic in torch: int8 activations times the blocks' integers, scaled
    per block pair and summed in float64 (the kernels sum in fp32: they agree within fp32
    rounding, see tests/unit/test_quant.py)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, d, sums = quantize_activations_torch(x2)
    rows, cols = weight.shape
    size = BLOCK_BYTES[weight.kind]
    b = weight.rows_layout().blocks.reshape(rows, -1, size)
    dw = _half_values(b[..., 0:2])  # [N, nb]
    if weight.kind == "q8_0":
        wq = b[..., 2:].contiguous().view(torch.int8).double()
    else:
        wq = _unpack_nibbles(b[..., 4 if weight.kind == "q4_1" else 2 :]).double()
        wq = wq - 8 if weight.kind == "q4_0" else wq
    qa = q.reshape(q.shape[0], -1, BLOCK).double()  # [M, nb, 32]
    isums = torch.einsum("mbk,nbk->mnb", qa, wq)  # exact: integers below 2^53
    scales = (dw[None] * d[:, None]).double()  # fp32 products, as the kernels form them
    y = (isums * scales).sum(-1)
    if weight.kind == "q4_1":
        y = y + (_half_values(b[..., 2:4])[None].double() * sums[:, None].double()).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype if x.dtype != torch.float64 else torch.float64).reshape(*shape[:-1], rows)


# -- which path ----------------------------------------------------------------------------


def kernel_level(level: str | None = None) -> int | None:
    """The C++ variant to call at an ISA level (default: this machine's, under P3_CPU_ISA);
    None when the kernels are not built."""
    module = build.load()
    if module is None:
        return None
    chosen = KERNEL_LEVELS[level or cpu.isa()]
    return chosen if module.quant_level_available(chosen) else 0


@functools.cache
def _default_level() -> int | None:
    return kernel_level()


def quant_linear(
    x: Tensor, weight: QuantWeight, bias: Tensor | None = None, level: str | None = None
) -> Tensor:
    """y = x W^T + b over the blocks; x fp32 or bf16 [..., K] -> [..., N] in x's dtype."""
    chosen = _default_level() if level is None else kernel_level(level)
    if x.is_cpu and weight.blocks.is_cpu and chosen is not None:
        kernels = build.load()
        kind = KIND_IDS[weight.kind]
        return kernels.quant_linear(x, weight.blocks, kind, bias, chosen, weight.interleaved)
    if not x.is_cpu:  # off the CPU: the dequantized weight in x's dtype (no integer kernel)
        return F.linear(x, weight.dequantize(x.dtype), bias)
    return quant_linear_torch(x, weight, bias)


def quant_embedding(ids: Tensor, weight: QuantWeight, dtype: torch.dtype) -> Tensor:
    """Rows `ids` of the blocks, dequantized to dtype."""
    module = build.load() if ids.is_cpu and weight.blocks.is_cpu else None
    if module is not None:
        kind = KIND_IDS[weight.kind]
        return module.quant_embedding(ids, weight.blocks, kind, dtype, weight.interleaved)
    rows = weight.rows_layout().blocks[ids.reshape(-1)]
    return dequantize_weight(rows, weight.kind).to(dtype).reshape(*ids.shape, -1)


def kernel_choice() -> dict[str, str]:
    """What runs each quantized op here (for the engine.kernels log and `p3 info`)."""
    chosen = _default_level()
    names = {0: "portable", 1: "avx2"}
    linear = "torch-reference" if chosen is None else f"cpp-{names[chosen]}"
    return {"quant_linear": linear, "quant_embedding": "torch" if chosen is None else "cpp"}
