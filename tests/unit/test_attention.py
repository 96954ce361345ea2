"""Paged attention: store_kv, decode (C++ kernel and torch) and varlen prefill against dense
references computed from the original, unpaged K/V."""

from __future__ import annotations

import pytest
import torch

from p3.kernels import attention, build

BUILD_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def kernels():
    """The C++ kernels, built once per session (the first build takes ~15 s here)."""
    module = build.load()
    if module is None:
        pytest.fail(f"C++ kernels failed to build: {build.build_error()}")
    return module


def dense_attention(q, k, v, scale, causal_offset=None):
    """q [Tq, H, hd], k/v [Tk, kvh, hd] -> [Tq, H, hd] in fp64; query j sits at position
    causal_offset + j (None: attends to everything)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal_offset is not None:
        q_pos = causal_offset + torch.arange(q.shape[0])
        scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos[:, None], -torch.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class PagedBatch:
    """Sequences of random K/V scattered into a paged cache through shuffled block tables."""

    def __init__(self, context_lens, kv_heads, head_dim, dtype, block_size=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        blocks_per_seq = [-(-n // block_size) for n in context_lens]
        num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold garbage
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # Every slot not written below stays NaN: reading one poisons the result.
        self.k_cache = torch.full(shape, torch.nan, dtype=dtype)
        self.v_cache = torch.full(shape, torch.nan, dtype=dtype)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        max_blocks = max(blocks_per_seq) + 2
        self.block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
        self.keys, self.values = [], []
        for i, n in enumerate(context_lens):
            blocks = [order.pop() for _ in range(blocks_per_seq[i])]
            self.block_tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
            attention.store_kv(k, v, self.k_cache, self.v_cache, self.slots(i, 0, n))
            self.keys.append(k)
            self.values.append(v)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)

    def slots(self, seq, start, end):
        positions = torch.arange(start, end)
        blocks = self.block_tables[seq, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size


def decode_case(context_lens, group, head_dim, dtype, kv_heads=2, seed=0):
    batch = PagedBatch(context_lens, kv_heads, head_dim, dtype, seed=seed)
    q = torch.randn(len(context_lens), kv_heads * group, head_dim).to(dtype)
    scale = head_dim**-0.5
    expected = torch.stack(
        [
            dense_attention(q[i : i + 1], batch.keys[i], batch.values[i], scale)[0]
            for i in range(len(context_lens))
        ]
    )
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, scale)
    return args, expected


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CONTEXTS = {
    "one": [1],
    "block-1": [15],
    "block": [16],
    "blocks": [77],
    "batch33": [(i * 37) % 200 + 1 for i in range(33)],
}


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("contexts", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_cpp_decode_matches_dense_attention(kernels, dtype, group, head_dim, contexts):
    args, expected = decode_case(contexts, group, head_dim, dtype)
    out = kernels.paged_decode(*args)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("contexts", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_torch_decode_matches_dense_attention(dtype, group, head_dim, contexts):
    args, expected = decode_case(contexts, group, head_dim, dtype)
    out = attention.paged_decode_attention_torch(*args)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads_per_item", [1, 2, 4])
def test_cpp_decode_result_does_not_depend_on_the_work_split(kernels, dtype, kv_heads_per_item):
    args, expected = decode_case([3, 16, 50, 130, 1, 77], 2, 64, dtype, kv_heads=4)
    out = kernels.paged_decode(*args, kv_heads_per_item=kv_heads_per_item)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("head_dim", [80, 128])
def test_cpp_decode_handles_head_dims_off_the_vector_width(kernels, head_dim):
    args, expected = decode_case([5, 40, 123], 3, head_dim, torch.float32, kv_heads=3)
    torch.testing.assert_close(kernels.paged_decode(*args).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cpp_decode_handles_block_sizes_other_than_16(kernels):
    for block_size, contexts in [(8, [3, 8, 50]), (32, [31, 32, 100]), (1, [1, 7])]:
        batch = PagedBatch(contexts, 2, 64, torch.float32, block_size=block_size)
        q = torch.randn(len(contexts), 4, 64)
        expected = torch.stack(
            [
                dense_attention(q[i : i + 1], batch.keys[i], batch.values[i], 0.125)[0]
                for i in range(len(contexts))
            ]
        )
        out = kernels.paged_decode(
            q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 0.125
        )
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cpp_decode_returns_zeros_for_empty_context(kernels):
    args, _ = decode_case([4, 9], 2, 32, torch.float32)
    context_lens = torch.tensor([0, 9], dtype=torch.int32)
    out = kernels.paged_decode(*args[:4], context_lens, args[5])
    assert out[0].eq(0).all()
    torch_out = attention.paged_decode_attention_torch(*args[:4], context_lens, args[5])
    torch.testing.assert_close(out, torch_out, atol=1e-5, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cpp_decode_rejects_block_ids_outside_the_cache(kernels):
    args, _ = decode_case([20], 1, 32, torch.float32)
    tables = args[3].clone()
    tables[0, 1] = args[1].shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_decode(*args[:3], tables, *args[4:])


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_paged_decode_attention_uses_the_kernel_on_cpu(kernels, monkeypatch):
    args, expected = decode_case([30, 2], 3, 64, torch.bfloat16)
    monkeypatch.setattr(attention, "paged_decode_attention_torch", None)  # must not be called
    out = attention.paged_decode_attention(*args)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


def test_paged_decode_attention_falls_back_to_torch_without_the_kernel(monkeypatch):
    args, expected = decode_case([30, 2], 3, 64, torch.float32)
    monkeypatch.setattr(build, "load", lambda: None)  # as after a failed build
    out = attention.paged_decode_attention(*args)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_store_kv_writes_each_token_into_its_slot():
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros(4, 8, 2, 16)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([13, 0, 31])  # block 1 offset 5, block 0 offset 0, block 3 offset 7
    attention.store_kv(k, v, k_cache, v_cache, slots)
    for token, (block, offset) in enumerate([(1, 5), (0, 0), (3, 7)]):
        assert torch.equal(k_cache[block, offset], k[token])
        assert torch.equal(v_cache[block, offset], v[token])
    written = torch.zeros(4 * 8, dtype=torch.bool)
    written[slots] = True
    assert k_cache.view(32, -1)[~written].eq(0).all()
    assert v_cache.view(32, -1)[~written].eq(0).all()


def prefill_case(total_lens, cached_lens, group=3, kv_heads=2, head_dim=32, seed=0):
    """Sequences whose first cached_lens tokens are cached and whose next chunk is stored
    too; returns prefill_attention's arguments and the dense expected output."""
    batch = PagedBatch(total_lens, kv_heads, head_dim, torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    chunk_lens = [n - c for n, c in zip(total_lens, cached_lens, strict=True)]
    cu_seqlens = [0]
    for n in chunk_lens:
        cu_seqlens.append(cu_seqlens[-1] + n)
    q = torch.randn(cu_seqlens[-1], kv_heads * group, head_dim, generator=gen)
    k = torch.cat([batch.keys[i][c:] for i, c in enumerate(cached_lens)])
    v = torch.cat([batch.values[i][c:] for i, c in enumerate(cached_lens)])
    scale = head_dim**-0.5
    expected = torch.cat(
        [
            dense_attention(
                q[cu_seqlens[i] : cu_seqlens[i + 1]],
                batch.keys[i],
                batch.values[i],
                scale,
                causal_offset=c,
            )
            for i, c in enumerate(cached_lens)
        ]
    )
    args = (q, k, v, cu_seqlens, cached_lens, batch.block_tables, batch.k_cache, batch.v_cache)
    return (*args, scale), expected


def test_prefill_without_cache_is_causal_attention_over_the_chunk():
    args, expected = prefill_case([21], [0])
    out = attention.prefill_attention(*args)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_prefill_continuing_a_cached_prefix_sees_the_prefix_and_is_causal():
    args, expected = prefill_case([50], [20])  # the chunk is positions 20..49
    out = attention.prefill_attention(*args)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_prefill_of_mixed_sequences_in_one_flat_batch():
    args, expected = prefill_case([7, 40, 16, 33, 1], [0, 17, 0, 32, 0])
    out = attention.prefill_attention(*args)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_prefill_in_bf16_matches_the_fp32_result():
    args, expected = prefill_case([30, 25], [0, 10])
    q, k, v, cu, cached, tables, k_cache, v_cache, scale = args
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = attention.prefill_attention(
        *bf16, cu, cached, tables, k_cache.bfloat16(), v_cache.bfloat16(), scale
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=0)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3])
def test_cpp_decode_on_the_avx2_path_when_asked_matches_dense_attention(kernels, dtype, group):
    """A cache in q's dtype runs the AVX2 path only with float_avx2 (int8 caches by default)."""
    if kernels.decode_isa(64, "avx2", int8_cache=False, float_avx2=True) != "avx2":
        pytest.skip("no AVX2 path here (another ISA, or a build with AVX-512)")
    assert kernels.decode_isa(64, "", int8_cache=False) != "avx2"
    for contexts in CONTEXTS.values():
        args, expected = decode_case(contexts, group, 64, dtype)
        out = kernels.paged_decode(*args, isa="avx2", float_avx2=True)
        torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
