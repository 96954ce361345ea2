"""Quantized linears and embeddings: every variant this machine can run against the torch
reference of the same arithmetic, the variants against each other, batch invariance, and the
block layout against the gguf package's own quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p3.kernels import build, cpu
from p3.kernels import quant as q

LEVELS = cpu.allowed_isas()  # every cap this machine allows: portable, avx2, avx512 ...
KINDS = q.KINDS


@pytest.fixture(scope="module")
def kernels():
    module = build.load()
    assert module is not None, build.build_error()
    return module


def _weight(kind: str, rows: int, cols: int, seed: int, interleaved=False) -> q.QuantWeight:
    gen = torch.Generator().manual_seed(seed)
    weight = q.quantize_weight(torch.randn(rows, cols, generator=gen), kind)
    return weight.interleave() if interleaved else weight


def _x(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen) * 3).to(dtype)


SHAPES = [(1, 32, False), (37, 96, False), (130, 576, False), (67, 1536, False)]
SHAPES += [(8, 32, True), (40, 96, True), (136, 576, True), (64, 1536, True)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("rows", "cols", "interleaved"), SHAPES)
@pytest.mark.parametrize("batch", [1, 5, 17, 67])
def test_kernel_matches_the_torch_reference(level, kind, rows, cols, interleaved, batch):
    """Within fp32 rounding of the sum: the integer block products are exact, the fp32
    accumulation of nb terms errs by at most ~nb ulp of the sum of their magnitudes."""
    w, x = _weight(kind, rows, cols, rows + cols, interleaved), _x(batch, cols, batch)
    out = q.quant_linear(x, w, level=level)
    ref = q.quant_linear_torch(x.double(), w)
    magnitude = q.quant_linear_torch(x.double().abs(), _abs(w)).abs()
    bound = (cols // q.BLOCK + 8) * 2**-23 * magnitude + 1e-6
    assert out.dtype == torch.float32 and out.shape == (batch, rows)
    assert ((out.double() - ref).abs() <= bound).all()


def _abs(w: q.QuantWeight) -> q.QuantWeight:
    return q.quantize_weight(w.dequantize().abs(), "q8_0")


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_every_variant_gives_the_same_bits(kind, interleaved):
    w, x = _weight(kind, 48, 576, 1, interleaved), _x(13, 576, 2)
    outs = [q.quant_linear(x, w, level=level) for level in LEVELS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_row_does_not_depend_on_its_batch(level, kind, interleaved):
    w, x = _weight(kind, 72, 192, 3, interleaved), _x(70, 192, 4)  # 70: past a 64-row tile
    whole = q.quant_linear(x, w, level=level)
    for start, size in [(0, 1), (7, 1), (39, 1), (3, 5), (10, 29)]:
        part = q.quant_linear(x[start : start + size], w, level=level)
        assert torch.equal(part, whole[start : start + size])
    for start, size in [(60, 10), (64, 6)]:
        part = q.quant_linear(x[start : start + size], w, level=level)
        assert torch.equal(part, whole[start : start + size])


@pytest.mark.parametrize("level", LEVELS)
def test_integer_inputs_give_the_exact_integer_product(level):
    """d = 1 in every block and activations that quantize to themselves: y = x @ q exactly."""
    gen = torch.Generator().manual_seed(5)
    ints = torch.randint(-127, 128, (19, 128), generator=gen).float()
    ints[:, ::32] = 127  # every block's max is 127: its scale is 1
    wq = torch.randint(-127, 128, (23, 128), generator=gen).float()
    wq[:, ::32] = 127
    w = q.quantize_weight(wq, "q8_0")
    assert torch.equal(w.dequantize(), wq)
    assert torch.equal(q.quant_linear(ints, w, level=level), ints @ wq.T)


@pytest.mark.parametrize("level", LEVELS)
def test_activations_quantize_exactly_as_the_reference(kernels, level):
    x = _x(9, 320, 6)
    x[2, :32] = 0  # an all-zero block: scale 0, q 0
    x[3, 40] = 1e4  # an outlier
    got = kernels.quantize_activations(x, q.KERNEL_LEVELS[level])
    want = q.quantize_activations_torch(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_bf16_activations_and_bias(kernels):
    w, x = _weight("q4_1", 33, 64, 7), _x(4, 64, 8, torch.bfloat16)
    bias = torch.randn(33)
    out = q.quant_linear(x, w, bias)
    assert out.dtype == torch.bfloat16
    ref = q.quant_linear(x.float(), w) + bias
    assert torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_equal_the_gguf_package_quantizer(kind):
    """quantize_weight writes the bytes llama.cpp's reference quantizers write."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(9))
    theirs = quantize(w.numpy(), GGMLQuantizationType[kind.upper()])
    ours = q.quantize_weight(w, kind).blocks.numpy()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_equals_the_gguf_package(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = _weight(kind, 10, 128, 10)
    theirs = dequantize(w.blocks.numpy(), GGMLQuantizationType[kind.upper()])
    assert torch.equal(w.dequantize(), torch.from_numpy(np.asarray(theirs, np.float32)))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_rows_are_the_dequantized_rows(kind, interleaved):
    w = _weight(kind, 56, 96, 11, interleaved)
    ids = torch.tensor([[0, 55, 7], [7, 3, 3]])
    rows = q.quant_embedding(ids, w, torch.float32)
    assert torch.equal(rows, w.dequantize()[ids])
    assert q.quant_embedding(ids, w, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_interleaving_moves_the_bytes_and_back(kind):
    w = _weight(kind, 24, 160, 15)
    moved = w.interleave()
    assert moved.shape == w.shape and moved.nbytes == w.nbytes
    assert not torch.equal(moved.blocks.flatten(), w.blocks.flatten())
    assert torch.equal(moved.rows_layout().blocks, w.blocks)
    with pytest.raises(ValueError, match="multiples of 8"):
        _weight(kind, 12, 32, 16).interleave()


def test_narrow_splits_rows_and_whole_blocks_of_inputs():
    w = _weight("q4_1", 8, 128, 12)
    assert torch.equal(w.narrow(0, 2, 3).dequantize(), w.dequantize()[2:5])
    assert torch.equal(w.narrow(1, 32, 64).dequantize(), w.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match="multiples of 32"):
        w.narrow(1, 16, 32)


def test_input_size_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        q.quantize_weight(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="quantization must be one of"):
        q.mode_kind("q5_k")


def test_the_cap_lowers_the_level(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV, "portable")
    assert cpu.isa() == "portable" and not cpu.cpu_info().has("avx2")
    monkeypatch.setenv(cpu.ISA_ENV, "avx512")  # never above what the CPU has
    assert cpu.isa() == cpu.cpu_info().detected_isa
    monkeypatch.setenv(cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="P3_CPU_ISA"):
        cpu.isa()


def test_an_unavailable_variant_is_refused(kernels):
    if kernels.quant_level_available(1):
        pytest.skip("this CPU runs every compiled variant")
    w, x = _weight("q8_0", 4, 32, 13), _x(1, 32, 14)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.quant_linear(x, w.blocks, 0, None, 1)


def test_kernels_let_other_threads_run(kernels):
    """A node's event loop (its heartbeats) shares the process with the step thread: a long
    kernel call must release the GIL. Seen: without it, a moved stream's re-prefill silenced a
    node's heartbeats and it was declared dead."""
    import threading
    import time

    w, x = _weight("q8_0", 4096, 1024, 17, True), _x(512, 1024, 18)
    done = threading.Event()
    ticks = 0

    def long_calls():
        for _ in range(3):
            q.quant_linear(x, w)
        done.set()

    worker = threading.Thread(target=long_calls)
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        ticks += 1
    worker.join()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.05 and ticks > elapsed / 0.01  # the main thread was not held
