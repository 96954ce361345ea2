"""Configuration: frozen sections built once at the entry point and validated with ValueError."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a dtype or device is asked for: the CLI reads these
    import torch  # defaults without it

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
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
    """"auto": bf16 where the hardware computes it natively (CUDA with bf16, a CPU with
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
    """Llama-3 style frequency scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None

    @property
    def num_parameters(self) -> int:
        """Weights the model holds (the head counted once when tied)."""
        d, hd, inter = self.hidden_size, self.head_dim, self.intermediate_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * hd
        bias = (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        layer = qkv + bias + self.num_heads * hd * d + 3 * d * inter + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        arch = _architecture(hf)
        num_heads = hf["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(_rope_parameters(hf).get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            rope_scaling=_rope_scaling(hf),
        )


def _architecture(hf: dict[str, Any]) -> str:
    for name in hf.get("architectures") or []:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if hf.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return hf["model_type"]
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ValueError(f"unsupported architecture {hf.get('architectures')!r}; p3 runs {supported}")


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 nests rope settings in rope_parameters; 4.x keeps them top level."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    if "rope_theta" in hf:
        params.setdefault("rope_theta", hf["rope_theta"])
    return params


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    params = _rope_parameters(hf)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; p3 supports default and llama3")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


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
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
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
