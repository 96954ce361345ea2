"""The int8 KV cache: quantization, its stores (torch and the fused C++ kernel, the same bits),
decode (C++ kernel, every ISA this machine runs, against the dequantizing torch reference) and
prefill over an int8 prefix; the config and CLI that ask for it."""

from __future__ import annotations

import pytest
import torch

from p3 import cli, flags
from p3.config import EngineConfig, ModelConfig
from p3.kernels import attention, build, fused

from .test_attention import PagedBatch, dense_attention

BUILD_TIMEOUT_S = 600

# Bounds, measured with margin (observed max in brackets): the kernel and the torch reference
# attend over the same dequantized values in fp32 and differ only in summation order and exp
# (fp32: absolute [7e-7]); a bf16 output is rounded to bf16 once more, and the two may land
# one bf16 ulp apart (relative 2^-7 [exactly one ulp]).
KERNEL_VS_TORCH = {
    torch.float32: dict(atol=2e-5, rtol=0),
    torch.bfloat16: dict(atol=1e-4, rtol=2**-7),
}
# What int8 costs against unquantized K/V ~ N(0, 1), hd 20-128: per element |x - scale * q| is
# at most scale / 2 = amax / 254 (~0.015 here); the attention output moves by less [0.013].
INT8_VS_EXACT = 3e-2


@pytest.fixture(scope="module")
def kernels():
    module = build.load()
    if module is None:
        pytest.fail(f"C++ kernels failed to build: {build.build_error()}")
    return module


def isas(kernels, head_dim: int) -> list[str]:
    """The decode implementations this machine runs for head_dim: the best, and portable."""
    return sorted({kernels.decode_isa(head_dim), "portable"})


def int8_batch(context_lens, kv_heads, head_dim, block_size=16, seed=0):
    """A PagedBatch whose caches are quantized through store_kv (garbage slots stay garbage:
    int8 -128 and NaN scales, which a correct reader never touches)."""
    batch = PagedBatch(context_lens, kv_heads, head_dim, torch.float32, block_size, seed)
    shape = batch.k_cache.shape
    batch.k_cache = torch.full(shape, -128, dtype=torch.int8)
    batch.v_cache = torch.full(shape, -128, dtype=torch.int8)
    batch.k_scale = torch.full(shape[:3], torch.nan)
    batch.v_scale = torch.full(shape[:3], torch.nan)
    for i, n in enumerate(context_lens):
        attention.store_kv(
            batch.keys[i], batch.values[i], batch.k_cache, batch.v_cache,
            batch.slots(i, 0, n), batch.k_scale, batch.v_scale,
        )  # fmt: skip
    return batch


def decode_args(batch, q):
    return (
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens,
        q.shape[-1] ** -0.5,
    )  # fmt: skip


# -- quantization ----------------------------------------------------------------------------------


def test_quantize_kv_is_symmetric_per_row_with_scale_amax_over_127():
    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 30.0])[None, :, None]
    q, scale = attention.quantize_kv(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (5, 3)
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127, rtol=0, atol=0)
    assert q.abs().amax(-1).eq(127).all()  # each row's largest value maps to +-127
    assert q.ne(-128).all()
    error = (attention.dequantize_kv(q, scale, torch.float32) - x).abs()
    assert (error <= scale[..., None] / 2 * (1 + 1e-5)).all()  # round to nearest


def test_quantize_kv_rounds_half_to_even_and_leaves_zero_rows_zero():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0] * 6])  # scale 1, then 0
    q, scale = attention.quantize_kv(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2], [0] * 6]
    assert scale.tolist() == [1.0, 0.0]


def test_store_kv_quantizes_into_each_slot_and_its_scale_only():
    k_cache = torch.zeros(4, 8, 2, 16, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    k_scale, v_scale = torch.zeros(4, 8, 2), torch.zeros(4, 8, 2)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16) * 5
    slots = torch.tensor([13, 0, 31])
    attention.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        q, s = attention.quantize_kv(x)
        assert torch.equal(cache.view(32, 2, 16)[slots], q)
        assert torch.equal(scales.view(32, 2)[slots], s)
        untouched = torch.ones(32, dtype=torch.bool)
        untouched[slots] = False
        assert cache.view(32, -1)[untouched].eq(0).all()
        assert scales.view(32, -1)[untouched].eq(0).all()


def test_store_then_read_round_trip_is_within_half_a_step():
    batch = int8_batch([40, 7], kv_heads=3, head_dim=64)
    for i, n in enumerate([40, 7]):
        table = batch.block_tables[i]
        for cache, scales, original in (
            (batch.k_cache, batch.k_scale, batch.keys[i]),
            (batch.v_cache, batch.v_scale, batch.values[i]),
        ):
            read = attention._gather(cache, table, n, scales, torch.float32)
            step = original.abs().amax(-1, keepdim=True) / 127
            assert ((read - original).abs() <= step / 2 * (1 + 1e-5)).all()


def test_store_kv_refuses_an_int8_cache_without_scales():
    cache = torch.zeros(2, 4, 1, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="k_scale"):
        x = torch.ones(1, 1, 8)
        attention.store_kv(x, x, cache, cache, torch.tensor([0]))


# -- the fused store: the same bits as torch -------------------------------------------------------

ROPE_HEADS = {"smollm2": (9, 3, 64), "mha": (4, 4, 32), "gqa4": (8, 2, 128), "hd80": (2, 1, 80)}


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("heads", ROPE_HEADS.values(), ids=ROPE_HEADS.keys())
def test_fused_rope_store_into_int8_matches_torch_bit_for_bit(kernels, dtype, tokens, heads):
    if fused.cpu_kernels() is None:
        pytest.skip("fused kernels built for another vector ISA than torch dispatches to here")
    H, KVH, hd = heads
    gen = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, (H + 2 * KVH) * hd, generator=gen) * 2).to(dtype)
    qkv[0, (H + KVH) * hd : (H + KVH + 1) * hd] = 0  # an all-zero v head: scale 0
    cos, sin = torch.randn(2, tokens, 1, hd, generator=gen).to(dtype)
    slots = torch.randperm(20 * 16, generator=gen)[:tokens]
    caches = [torch.randint(-127, 128, (20, 16, KVH, hd), dtype=torch.int8) for _ in range(2)]
    scales = [torch.rand(20, 16, KVH) for _ in range(2)]
    expected = [t.clone() for t in caches + scales]
    actual = [t.clone() for t in caches + scales]
    qk = kernels.rope_store_kv(qkv, cos, sin, *actual[:2], slots, H, KVH, *actual[2:])
    ref = fused.rope_store_kv_torch(qkv, cos, sin, *expected[:2], slots, H, KVH, *expected[2:])
    assert torch.equal(qk, ref)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"


def test_rope_store_kv_routes_an_int8_cache_to_the_kernel(kernels, monkeypatch):
    if fused.cpu_kernels() is None:
        pytest.skip("fused kernels built for another vector ISA than torch dispatches to here")
    monkeypatch.setattr(fused, "rope_store_kv_torch", None)  # must not be called
    k_cache = torch.zeros(2, 16, 2, 32, dtype=torch.int8)
    k_scale = torch.zeros(2, 16, 2)
    qkv, cos, sin = torch.randn(3, 8 * 32), torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    fused.rope_store_kv(
        qkv, cos, sin, k_cache, k_cache.clone(), torch.tensor([0, 5, 17]), 4, 2,
        k_scale, k_scale.clone(),
    )  # fmt: skip
    assert k_scale.view(32, 2)[[0, 5, 17]].gt(0).all()


# -- the Hadamard turn of q and k before an int8 store ------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


@pytest.mark.parametrize("hd", [64, 128, 80, 20])
def test_hadamard_heads_is_the_orthonormal_transform_on_power_of_two_stretches(hd):
    x = torch.randn(5, 3, hd, dtype=torch.float64)
    n = hd & -hd  # 64, 128, 16, 4
    expected = (x.view(5, 3, hd // n, n) @ sylvester(n)).view(5, 3, hd)
    turned = attention.hadamard_heads(x.float())
    torch.testing.assert_close(turned.double(), expected, atol=1e-5, rtol=0)
    q, k = torch.randn(2, 7, hd)
    scores = (attention.hadamard_heads(q) * attention.hadamard_heads(k)).sum(-1)
    torch.testing.assert_close(scores, (q * k).sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("via", ["kernel", "torch"])
def test_turned_keys_with_outlier_channels_lose_far_less_to_int8(kernels, via, monkeypatch):
    """Keys whose few channels are 10x the rest, as RoPE'd keys of Llama models have: the
    attention over the int8 cache that rope_store_kv fills (turned) is much closer to the one
    over an fp32 cache than attention over the same keys quantized without the turn."""
    if via == "torch":
        monkeypatch.setattr(fused, "cpu_kernels", lambda: None)
    H, KVH, hd, n = 6, 2, 64, 200
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (H + 2 * KVH) * hd, generator=gen)
    k_cols = qkv.view(n, H + 2 * KVH, hd)[:, H : H + KVH]
    k_cols[..., [5, 5 + hd // 2, 17]] *= 10  # outlier channels (a RoPE pair and one more)
    v = qkv.view(n, H + 2 * KVH, hd)[:, H + KVH :]  # values int8 holds exactly: K's cost only
    v.copy_(torch.randint(-127, 128, v.shape, generator=gen) / 64)
    v[..., 0] = 127 / 64
    cos, sin = torch.ones(n, 1, hd), torch.zeros(n, 1, hd)  # position 0: RoPE leaves x as is
    slots = torch.arange(n)
    tables = torch.arange((n + 15) // 16, dtype=torch.int32)[None]
    lens = torch.tensor([n], dtype=torch.int32)

    def attend(cache_dtype, store):
        k_cache = torch.zeros(13, 16, KVH, hd, dtype=cache_dtype)
        v_cache = torch.zeros_like(k_cache)
        scales = [torch.zeros(13, 16, KVH) for _ in range(2)] if cache_dtype == torch.int8 else []
        q = store(k_cache, v_cache, *scales)[-1:, :H]  # the last token asks
        args = (q, k_cache, v_cache, tables, lens, hd**-0.5, *scales)
        return attention.paged_decode_attention(*args)

    def rope_store(*caches):
        return fused.rope_store_kv(qkv, cos, sin, caches[0], caches[1], slots, H, KVH, *caches[2:])

    def plain_store(k_cache, v_cache, k_scale, v_scale):
        heads = qkv.view(n, H + 2 * KVH, hd)
        attention.store_kv(heads[:, H : H + KVH], heads[:, H + KVH :], k_cache, v_cache, slots,
                           k_scale, v_scale)  # fmt: skip
        return heads[:, : H + KVH]

    exact = attend(torch.float32, rope_store)
    turned_error = (attend(torch.int8, rope_store) - exact).abs().max()
    plain_error = (attend(torch.int8, plain_store) - exact).abs().max()
    assert turned_error < plain_error / 3, (turned_error, plain_error)


# -- decode ----------------------------------------------------------------------------------------

# (context lens, query heads per kv head, kv heads, head_dim): odd head counts, GQA, contexts
# 1..300 crossing blocks, batches of 1 to 64
DECODE_CASES = {
    "one-token": ([1], 1, 1, 64),
    "block-edges": ([15, 16, 17, 32, 33], 3, 3, 64),
    "gqa4-hd128": ([300, 5, 129], 4, 2, 128),
    "odd-heads-hd80": ([77, 1, 250], 7, 1, 80),
    "mha5-hd32": ([64, 100, 3], 1, 5, 32),
    "batch64": ([(i * 37) % 300 + 1 for i in range(64)], 3, 3, 64),
    "hd20-portable-only": ([9, 40], 2, 3, 20),
}


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_int8_decode_kernel_matches_the_torch_reference(kernels, dtype, case):
    lens, group, kv_heads, head_dim = case
    batch = int8_batch(lens, kv_heads, head_dim, seed=len(lens))
    q = torch.randn(len(lens), kv_heads * group, head_dim).to(dtype)
    args = decode_args(batch, q)
    expected = attention.paged_decode_attention_torch(*args, batch.k_scale, batch.v_scale)
    assert expected.isfinite().all()
    for isa in isas(kernels, head_dim):
        out = kernels.paged_decode(*args, k_scale=batch.k_scale, v_scale=batch.v_scale, isa=isa)
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(out.double(), expected.double(), **KERNEL_VS_TORCH[dtype])


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_int8_decode_is_close_to_attention_over_the_unquantized_kv(kernels):
    lens = [1, 16, 77, 300]
    batch = int8_batch(lens, 3, 64)
    q = torch.randn(len(lens), 9, 64)
    out = kernels.paged_decode(*decode_args(batch, q), k_scale=batch.k_scale, v_scale=batch.v_scale)
    exact = torch.stack(
        [dense_attention(q[i : i + 1], batch.keys[i], batch.values[i], 0.125)[0] for i in range(4)]
    )
    torch.testing.assert_close(out.double(), exact, atol=INT8_VS_EXACT, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("kv_heads_per_item", [1, 2, 4])
def test_int8_decode_does_not_depend_on_the_work_split(kernels, kv_heads_per_item):
    batch = int8_batch([3, 16, 50, 130, 1, 77], 4, 64)
    q = torch.randn(6, 8, 64)
    args = decode_args(batch, q)
    expected = attention.paged_decode_attention_torch(*args, batch.k_scale, batch.v_scale)
    out = kernels.paged_decode(
        *args, kv_heads_per_item=kv_heads_per_item, k_scale=batch.k_scale, v_scale=batch.v_scale
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_int8_decode_with_other_block_sizes_and_an_empty_context(kernels):
    for block_size, lens in [(8, [3, 8, 50]), (32, [31, 0, 100]), (1, [1, 7])]:
        batch = int8_batch([max(n, 1) for n in lens], 2, 64, block_size=block_size)
        batch.context_lens = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(len(lens), 4, 64)
        args = decode_args(batch, q)
        expected = attention.paged_decode_attention_torch(*args, batch.k_scale, batch.v_scale)
        for isa in isas(kernels, 64):
            out = kernels.paged_decode(*args, k_scale=batch.k_scale, v_scale=batch.v_scale, isa=isa)
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
            assert out[torch.tensor(lens) == 0].eq(0).all()


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_int8_decode_refuses_missing_or_misshapen_scales(kernels):
    batch = int8_batch([20], 1, 32)
    args = decode_args(batch, torch.randn(1, 1, 32))
    with pytest.raises(RuntimeError, match="k_scale and v_scale"):
        kernels.paged_decode(*args)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.paged_decode(*args, k_scale=batch.k_scale[:, :8], v_scale=batch.v_scale[:, :8])
    with pytest.raises(RuntimeError, match="isa must be"):
        kernels.paged_decode(*args, k_scale=batch.k_scale, v_scale=batch.v_scale, isa="sse9")


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_paged_decode_attention_reads_int8_in_the_kernel(kernels, monkeypatch):
    batch = int8_batch([30, 2], 2, 64)
    q = torch.randn(2, 6, 64)
    args = decode_args(batch, q)
    expected = attention.paged_decode_attention_torch(*args, batch.k_scale, batch.v_scale)
    monkeypatch.setattr(attention, "paged_decode_attention_torch", None)  # must not be called
    out = attention.paged_decode_attention(*args, batch.k_scale, batch.v_scale)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_paged_decode_attention_falls_back_to_torch_for_int8_without_the_kernel(monkeypatch):
    batch = int8_batch([30, 2], 2, 64)
    args = decode_args(batch, torch.randn(2, 6, 64))
    expected = attention.paged_decode_attention_torch(*args, batch.k_scale, batch.v_scale)
    monkeypatch.setattr(build, "load", lambda: None)
    out = attention.paged_decode_attention(*args, batch.k_scale, batch.v_scale)
    assert torch.equal(out, expected)


# -- prefill over an int8 prefix -------------------------------------------------------------------


def test_prefill_reads_the_int8_prefix_dequantized_and_its_chunk_as_computed():
    total, cached = [50, 7, 33], [20, 0, 32]
    batch = int8_batch(total, 2, 32)
    chunk = [n - c for n, c in zip(total, cached, strict=True)]
    cu = [0, chunk[0], chunk[0] + chunk[1], sum(chunk)]
    q = torch.randn(cu[-1], 6, 32)
    k = torch.cat([batch.keys[i][c:] for i, c in enumerate(cached)])
    v = torch.cat([batch.values[i][c:] for i, c in enumerate(cached)])
    out = attention.prefill_attention(
        q, k, v, cu, cached, batch.block_tables, batch.k_cache, batch.v_cache, 32**-0.5,
        batch.k_scale, batch.v_scale,
    )  # fmt: skip
    for i, c in enumerate(cached):
        table, n = batch.block_tables[i], total[i]
        keys = attention._gather(batch.k_cache, table, n, batch.k_scale, torch.float32)
        values = attention._gather(batch.v_cache, table, n, batch.v_scale, torch.float32)
        keys[c:], values[c:] = batch.keys[i][c:], batch.values[i][c:]  # the chunk: unquantized
        expected = dense_attention(q[cu[i] : cu[i + 1]], keys, values, 32**-0.5, causal_offset=c)
        torch.testing.assert_close(out[cu[i] : cu[i + 1]].double(), expected, atol=1e-5, rtol=0)


# -- config and CLI --------------------------------------------------------------------------------

SMOLLM2 = ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True, qkv_bias=False,
)  # fmt: skip


def test_int8_blocks_count_values_and_scales():
    fp32 = EngineConfig(dtype="float32", kv_cache_bytes=1 << 30)
    bf16 = EngineConfig(dtype="bfloat16", kv_cache_bytes=1 << 30)
    int8 = EngineConfig(dtype="float32", kv_cache_bytes=1 << 30, kv_cache_dtype="int8")
    per_token_head = 2 * 30 * 16 * 3  # K and V, layers, block, kv heads
    assert int8.kv_block_bytes(SMOLLM2) == per_token_head * (64 + 4)
    assert fp32.kv_block_bytes(SMOLLM2) == per_token_head * 64 * 4
    ratio = int8.num_kv_blocks(SMOLLM2) / fp32.num_kv_blocks(SMOLLM2)
    assert ratio == pytest.approx(4 * 64 / 68, rel=1e-3)  # ~3.76: 4x, less the scales
    assert int8.num_kv_blocks(SMOLLM2) / bf16.num_kv_blocks(SMOLLM2) == pytest.approx(
        2 * 64 / 68, rel=1e-3
    )
    assert int8.kv_cache_torch_dtype == torch.int8 and fp32.kv_cache_torch_dtype == torch.float32


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("command", ["serve", "node", "generate"])
def test_the_kv_cache_dtype_flag_reaches_engine_config(command):
    extra = {"serve": [], "node": ["--coordinator", "tcp://x:1"], "generate": ["hi"]}[command]
    args = cli.build_parser().parse_args([command, "--kv-cache-dtype", "int8", *extra])
    assert args.kv_cache_dtype == "int8"
    assert EngineConfig(**flags.engine_options(args)).kv_cache_dtype == "int8"
    if command == "serve":  # and on to the nodes it starts
        argv = flags.engine_argv(args)
        assert argv[argv.index("--kv-cache-dtype") + 1] == "int8"
        node = cli.build_parser().parse_args(["node", "--coordinator", "tcp://x:1", *argv])
        assert node.kv_cache_dtype == "int8"
    default = cli.build_parser().parse_args([command, *extra])
    assert EngineConfig(**flags.engine_options(default)).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--kv-cache-dtype", "fp8", *extra])
