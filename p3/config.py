"""Configuration: frozen sections built once at the entry point and validated with ValueError."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a dtype or device is asked for: the CLI reads these
    import torch  # defaults without it

DTYPES = ("bfloat16", "float32", "float16")  # torch dtype names
DTYPE_CHOICES = ("auto", *DTYPES)
# "auto": the KV cache holds the model dtype; "int8": int8 values and one fp32 scale per token
# and kv head (p3.kernels.attention)
KV_CACHE_DTYPES = ("auto", "int8")
KV_SCALE_BYTES = 4  # one fp32 scale per (token, kv head) of an int8 cache


def default_of(cls: type, name: str) -> Any:
    """A dataclass field's default: command-line flags show and take the config's own."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    if spec.default is dataclasses.MISSING:
        raise ValueError(f"{cls.__name__}.{name} has no default")
    return spec.default


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": bf16 where the hardware computes it natively (CUDA with bf16, a CPU with
    AVX512-BF16 or AMX that oneDNN packs for), else fp32 (bf16 emulated on AVX2 is 8x slower
    than fp32, and fp16 on a CPU slower still)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16_is_native():
        return torch.bfloat16
    return torch.float32


def cpu_bf16_is_native() -> bool:
    """The CPU computes bf16 in hardware and oneDNN packs bf16 linears for it (P3_CPU_ISA)."""
    from p3.kernels.cpu import cpu_info

    return cpu_info().native_bf16 and onednn_bf16_supported()


def onednn_bf16_supported() -> bool:
    """oneDNN's bf16 linears run here: AVX-512 BW/VL/DQ (or AVX-NE-CONVERT), within the cap."""
    import torch

    from p3.kernels.cpu import cpu_info

    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is None or not hasattr(mkldnn, "_is_mkldnn_bf16_supported"):
        return False
    return cpu_info().has("avx512") and bool(mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: llama3 (keep high frequencies, divide low ones by factor,
    blend in between), linear (positions divided by factor), longrope (Phi-3: a factor per
    frequency, short_factor before original_max_position_embeddings and long_factor from
    there on, cos and sin times attention_factor)."""

    kind: str = "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class MoEConfig:
    """A mixture of experts in place of the MLP: a router's softmax picks top_k of
    num_experts per token (their weights renormalized to sum to 1 when renormalize), plus a
    shared expert every token takes (scaled by a sigmoid gate when shared_gate)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP


@dataclass(frozen=True)
class ModelConfig:
    """One transformer with switches (p3.architectures says which family sets which)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float  # the eps of every norm, RMSNorm or LayerNorm
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    norm: str = "rms"  # rms | layer
    norm_bias: bool = False  # LayerNorm's bias
    norm_weight: bool = True  # False: a norm without parameters (OLMo)
    norm_offset: float = 0.0  # Gemma: x * (1 + weight)
    layout: str = "pre"  # pre | parallel | sandwich | post (p3.architectures)
    shared_norm: bool = False  # parallel layout: attention and MLP read one norm
    act: str = "silu"  # silu | gelu | gelu_tanh
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    qk_norm: str | None = None  # head | full
    clip_qkv: float | None = None
    rotary_dim: int | None = None  # None: head_dim; 0: no RoPE
    rope_interleaved: bool = False  # pairs (2i, 2i+1) turn, not halves: rows permuted at load
    local_rope_theta: float | None = None  # sliding layers' RoPE base (Gemma 3)
    nope_layers: tuple[int, ...] = ()  # layers without RoPE
    windows: tuple[int, ...] = ()  # per layer sliding window, 0 (or absent): none
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float = 1.0
    embed_scale_in_dtype: bool = False  # the scale rounded to the model dtype first (Gemma)
    residual_scale: float = 1.0
    logits_scale: float = 1.0
    learned_positions: bool = False  # GPT-2: a position embedding instead of RoPE
    falcon_qkv: str | None = None  # how Falcon packs q, k, v in one tensor
    moe: MoEConfig | None = None

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    def window(self, layer: int) -> int:
        return self.windows[layer] if layer < len(self.windows) else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    @property
    def llama_shaped(self) -> bool:
        """Every layer is Llama's (RMSNorm, pre-norm, gated SiLU, full RoPE, a bias on qkv
        at most, no window): what the fused C++ layer loop runs."""
        return (
            self.norm == "rms"
            and self.norm_offset == 0.0
            and self.layout == "pre"
            and self.act == "silu"
            and self.gated_mlp
            and not (self.o_bias or self.mlp_bias or self.qk_norm or self.clip_qkv)
            and self.rope_dim == self.head_dim
            and not self.nope_layers
            and not any(self.windows)
            and self.attn_softcap is None
            and self.residual_scale == 1.0
            and self.local_rope_theta is None
            and self.moe is None
            and not self.learned_positions
        )

    @property
    def num_parameters(self) -> int:
        """Weights the model holds (the head counted once when tied; norms and biases aside)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        mlp_mats = 3 if self.gated_mlp else 2
        total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        for layer in range(self.num_layers):
            total += attn
            if self.is_moe_layer(layer):
                m = self.moe
                total += m.num_experts * (mlp_mats * d * m.intermediate_size + d)
                total += mlp_mats * d * m.shared_intermediate_size
            else:
                total += mlp_mats * d * self.intermediate_size
        return total

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        from p3.architectures import read

        return cls(**read(hf))


@dataclass(frozen=True)
class EngineConfig:
    """What the engine may use. KV blocks come from kv_cache_bytes, not a fixed count."""

    dtype: str = "auto"  # see resolve_dtype
    device: str | None = None  # None: cuda when available, else cpu
    block_size: int = 16
    kv_cache_bytes: int = 2 * 1024**3
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    quantization: str = "auto"  # p3.kernels.quant.QUANTIZATION_MODES
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    # StreamingLLM: each sequence keeps its first attention_sinks tokens and its latest ones,
    # at most sliding_window, in its KV cache, so it generates past the model's context with
    # bounded KV (Sequence.window_view). None: off
    sliding_window: int | None = None
    attention_sinks: int = 4
    enable_lora: bool = False  # LoRA adapters per request (p3.engine.lora)
    max_loras: int = 4  # adapters held at once
    max_lora_rank: int = 64

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        from p3.kernels.quant import mode_kind

        mode_kind(self.quantization)  # ValueError names the modes
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got "
                f"{self.kv_cache_dtype!r}"
            )
        names = ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens")
        for name in (*names, "max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window < 2:
            raise ValueError(f"sliding_window must be at least 2, got {self.sliding_window}")
        if self.attention_sinks < 0:
            raise ValueError(f"attention_sinks must be >= 0, got {self.attention_sinks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device)

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """What the K/V cache tensors hold: the model dtype, or int8."""
        import torch

        return torch.int8 if self.kv_cache_dtype == "int8" else self.torch_dtype

    def kv_block_bytes(self, model: ModelConfig) -> int:
        """Bytes of one KV block over all layers: K and V values, and an int8 cache's scales."""
        itemsize = self.kv_cache_torch_dtype.itemsize
        per_head = model.head_dim * itemsize
        if self.kv_cache_dtype == "int8":
            per_head += KV_SCALE_BYTES
        return 2 * model.num_layers * self.block_size * model.num_kv_heads * per_head

    def num_kv_blocks(self, model: ModelConfig) -> int:
        """How many KV blocks fit in kv_cache_bytes for this model."""
        return max(1, math.floor(self.kv_cache_bytes / self.kv_block_bytes(model)))
