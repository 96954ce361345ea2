"""The fused C++ kernels against the torch ops they replace: the same bits, not just close."""

from __future__ import annotations

import pytest
import torch

from p3.config import ModelConfig
from p3.engine.model import AttentionContext, Transformer
from p3.kernels import build, fused

BUILD_TIMEOUT_S = 600
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
TOKENS = [1, 7, 32, 300]
HEADS = {"smollm2": (9, 3, 64), "mha": (4, 4, 32), "gqa4": (8, 2, 128), "hd80": (2, 1, 80)}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernels, built once; every test below would otherwise only compare torch with itself."""
    if build.load() is None:
        pytest.fail(f"C++ kernels failed to build: {build.build_error()}")
    if fused.cpu_kernels() is None:
        pytest.skip("kernels built for another vector ISA than torch dispatches to here")


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setattr(fused, "cpu_kernels", lambda: None)  # as after a failed build


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{int((actual != expected).sum())} elements differ"


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [64, 576, 100, 5])
def test_rms_norm_matches_torch(dtype, tokens, hidden):
    x, w = randn(tokens, hidden, dtype=dtype, scale=3), randn(hidden, dtype=dtype, seed=1)
    assert_same_bits(fused.rms_norm(x, w, 1e-5), fused.rms_norm_torch(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [64, 576, 4096])
def test_fused_add_rms_norm_matches_torch(dtype, tokens, hidden):
    x, residual = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, scale=8)
    w = randn(hidden, dtype=dtype, seed=2)
    normed, summed = fused.fused_add_rms_norm(x, residual, w, 1e-6)
    expected_normed, expected_summed = fused.fused_add_rms_norm_torch(x, residual, w, 1e-6)
    assert_same_bits(summed, expected_summed)
    assert_same_bits(normed, expected_normed)


def rope_case(dtype, tokens, heads, kv_heads, head_dim, num_blocks=40, block_size=16):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2)
    table = randn(2, 4096, head_dim, dtype=dtype, seed=1)  # a Transformer.rope_tables entry
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(2))
    cos, sin = table[:, positions].unsqueeze(2)  # [T, 1, hd] each, as the model slices them
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(3))
    cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=4)
    return qkv, cos, sin, cache, slots[:tokens]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_rope_store_kv_matches_torch(dtype, tokens, heads):
    H, KVH, hd = heads
    qkv, cos, sin, cache, slots = rope_case(dtype, tokens, H, KVH, hd)
    k_cache, v_cache = cache.clone(), cache.clone()
    qk = fused.rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots, H, KVH)
    expected_k, expected_v = cache.clone(), cache.clone()
    expected = fused.rope_store_kv_torch(qkv, cos, sin, expected_k, expected_v, slots, H, KVH)
    assert_same_bits(qk, expected)
    assert_same_bits(k_cache, expected_k)  # the token slots, and nothing else, written
    assert_same_bits(v_cache, expected_v)


def test_rope_store_kv_rejects_a_slot_outside_the_cache():
    qkv, cos, sin, cache, slots = rope_case(torch.float32, 2, 4, 2, 32, num_blocks=1)
    slots[1] = cache.shape[0] * cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        fused.rope_store_kv(qkv, cos, sin, cache, cache.clone(), slots, 4, 2)


# Widths with and without a tail left to torch's scalar loop; 33 x 3000 fp32 is split by
# torch's threads in the middle of a row, which moves where the vector loop ends.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", [*TOKENS, 33])
@pytest.mark.parametrize("intermediate", [1536, 128, 100, 3000])
def test_silu_mul_matches_torch(dtype, tokens, intermediate):
    gate_up = randn(tokens, 2 * intermediate, dtype=dtype, scale=4)
    assert_same_bits(fused.silu_mul(gate_up), fused.silu_mul_torch(gate_up))


@pytest.mark.parametrize("width", [64, 37], ids=["vector", "scalar-tail"])
def test_silu_mul_matches_torch_on_every_finite_bfloat16(width):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = every[every.isfinite()]
    gate = finite[: finite.numel() // width * width].view(-1, width)
    gate_up = torch.cat([gate, torch.ones_like(gate)], dim=1)
    assert_same_bits(fused.silu_mul(gate_up), fused.silu_mul_torch(gate_up))


def test_wrappers_fall_back_to_torch_without_the_kernels(torch_only):
    x, w = randn(3, 64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
    assert_same_bits(fused.rms_norm(x, w, 1e-6), fused.rms_norm_torch(x, w, 1e-6))
    qkv, cos, sin, cache, slots = rope_case(torch.bfloat16, 3, 4, 2, 32)
    k_cache, v_cache = cache.clone(), cache.clone()
    qk = fused.rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots, 4, 2)
    assert_same_bits(qk[:, 4:], k_cache.view(-1, 2, 32)[slots])


def test_wrappers_fall_back_to_torch_for_other_dtypes():
    gate_up = randn(3, 256, dtype=torch.float16)
    assert_same_bits(fused.silu_mul(gate_up), fused.silu_mul_torch(gate_up))
    normed, summed = fused.fused_add_rms_norm(gate_up, gate_up, gate_up[0], 1e-6)
    assert_same_bits(summed, gate_up + gate_up)


# -- the whole model: kernels and torch agree on a prefill and a decode step ------------------

SMOLLM2_LIKE = ModelConfig(
    architecture="llama",
    vocab_size=256,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=2,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    qkv_bias=False,
)


def random_model(dtype: torch.dtype) -> Transformer:
    model = Transformer(SMOLLM2_LIKE, max_len=64)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            noise = 1 + 0.1 * noise
        elif "embed" not in name:
            noise = 0.05 * noise  # linears: keep activations in range over the layers
        param.data = noise.to(dtype)
    model.setup_rope()
    for layer in model.layers:
        layer.attn.k_cache = torch.zeros(4, 16, 3, 64, dtype=dtype)
        layer.attn.v_cache = torch.zeros(4, 16, 3, 64, dtype=dtype)
    return model.eval().requires_grad_(False)


def two_steps(model: Transformer) -> list[torch.Tensor]:
    """Prefill sequences of 7 and 20 tokens (blocks [0] and [1, 2]), then decode one each."""
    tables = torch.tensor([[0, 0], [1, 2]], dtype=torch.int32)
    prefill = AttentionContext(
        slot_mapping=torch.cat([torch.arange(7), torch.arange(16, 36)]),
        num_decode=0,
        decode_block_tables=None,
        decode_context_lens=None,
        prefill_cu_seqlens=[0, 7, 27],
        prefill_cached_lens=[0, 0],
        prefill_block_tables=tables,
    )
    decode = AttentionContext(
        slot_mapping=torch.tensor([7, 36]),
        num_decode=2,
        decode_block_tables=tables,
        decode_context_lens=torch.tensor([8, 21], dtype=torch.int32),
        prefill_cu_seqlens=[0],
        prefill_cached_lens=[],
        prefill_block_tables=None,
    )
    ids = torch.randint(0, 256, (27,), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(7), torch.arange(20)])
    with torch.inference_mode():
        first = model(ids, positions, prefill)
        second = model(ids[[6, 26]], torch.tensor([7, 20]), decode)
    return [first, second, *(layer.attn.k_cache for layer in model.layers)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_gives_the_same_bits_with_and_without_the_kernels(dtype, monkeypatch):
    with_kernels = two_steps(random_model(dtype))
    monkeypatch.setattr(fused, "cpu_kernels", lambda: None)
    for actual, expected in zip(with_kernels, two_steps(random_model(dtype)), strict=True):
        assert_same_bits(actual, expected)
