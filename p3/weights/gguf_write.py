"""`p3 convert MODEL_DIR OUT.gguf`: a Hugging Face directory -> one GGUF file llama.cpp runs.

What goes where follows llama.cpp's own convert_hf_to_gguf.py: tensors under llama.cpp's names
(one table per architecture, ARCHITECTURES), the hyperparameters under `<arch>.*`, and the
byte-level BPE tokenizer as tokenizer.ggml.* ("gpt2"). The "llama" architecture rotates
interleaved pairs, so its q/k rows are permuted (p3.weights.convert.rope_permutation, the
inverse of what reading a GGUF undoes); "qwen2" rotates halves, as Hugging Face does, and is
written as it is.

Types (--outtype): f32 everything; f16 the 2-D weights, norms and biases f32; q8_0 / q4_0 the
2-D weights (embedding and head included) in that kind, a row whose width is not whole blocks
of 32 in f16. A directory whose quantization.json lists blocks of the kind asked for (p3
converted a Q8_0 / Q4_0 GGUF, or `p3 quantize` wrote it) has them copied as they are: p3's
blocks are GGML's bytes (p3.kernels.quant). Other blocks are dequantized and converted.

Tensors are written one at a time: a first pass over the checkpoint plans every tensor's type
and shape (the header), a second converts and writes each, so memory holds one tensor at once.
The file is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p3.config import ModelConfig
from p3.kernels.quant import BLOCK, QuantWeight
from p3.log import get_logger
from p3.tokenizer import Tokenizer, read_tokenizer_files
from p3.weights.convert import GGUF_GLOBAL_TENSORS, GGUF_LAYER_TENSORS, rope_permutation
from p3.weights.files import load_config, resolve_model
from p3.weights.read import iter_state_dict

log = get_logger(__name__)

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
DEFAULT_OUTTYPE = "f16"

# HF module -> GGUF name: within model.layers.N -> blk.N, and outside the layers
LAYER_TENSORS = {hf: gguf for gguf, hf in GGUF_LAYER_TENSORS.items()}
GLOBAL_TENSORS = {hf: gguf for gguf, hf in GGUF_GLOBAL_TENSORS.items()}
SKIPPED_TENSORS = (".rotary_emb.inv_freq",)  # old checkpoints store rope's frequencies

# GGUFWriter method <- ModelConfig field, as llama.cpp's llama-like architectures read them
LLAMA_METADATA = (
    ("add_context_length", "max_position_embeddings"),
    ("add_embedding_length", "hidden_size"),
    ("add_block_count", "num_layers"),
    ("add_feed_forward_length", "intermediate_size"),
    ("add_head_count", "num_heads"),
    ("add_head_count_kv", "num_kv_heads"),
    ("add_rope_freq_base", "rope_theta"),
    ("add_layer_norm_rms_eps", "rms_norm_eps"),
    ("add_vocab_size", "vocab_size"),
    ("add_rope_dimension_count", "head_dim"),
)


@dataclass(frozen=True)
class Architecture:
    """How one llama.cpp architecture wants a Hugging Face model written."""

    name: str  # general.architecture
    hf_architecture: str  # what reading the file back (p3 convert X.gguf DIR) calls it
    permute_qk: bool  # rotates interleaved pairs: q/k rows (and biases) permuted
    rope_freqs: bool  # takes Llama-3 RoPE scaling as a rope_freqs tensor
    layer_tensors: Mapping[str, str] = field(default_factory=lambda: LAYER_TENSORS)
    global_tensors: Mapping[str, str] = field(default_factory=lambda: GLOBAL_TENSORS)
    metadata: tuple[tuple[str, str], ...] = LLAMA_METADATA

    def gguf_name(self, hf_name: str) -> str:
        """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
        base, suffix = hf_name.rsplit(".", 1)
        parts = base.split(".", 3)
        if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in self.layer_tensors:
            return f"blk.{parts[2]}.{self.layer_tensors[parts[3]]}.{suffix}"
        if base in self.global_tensors:
            return f"{self.global_tensors[base]}.{suffix}"
        raise ValueError(f"tensor {hf_name!r} has no GGUF name in llama.cpp's {self.name!r}")


LLAMA = Architecture("llama", "LlamaForCausalLM", permute_qk=True, rope_freqs=True)
QWEN2 = Architecture("qwen2", "Qwen2ForCausalLM", permute_qk=False, rope_freqs=False)
ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,  # llama.cpp runs Mistral (no sliding window) as llama
    "Qwen2ForCausalLM": QWEN2,
}


def architecture_for(hf_config: dict[str, Any]) -> Architecture:
    names = hf_config.get("architectures") or [hf_config.get("model_type")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    known = ", ".join(ARCHITECTURES)
    raise ValueError(f"cannot write architecture {names[0]!r} as GGUF; known: {known}")


def gguf_architecture(name: str) -> Architecture:
    """The Architecture a GGUF file's general.architecture names (for reading one back)."""
    for arch in ARCHITECTURES.values():
        if arch.name == name:
            return arch
    known = sorted({arch.name for arch in ARCHITECTURES.values()})
    raise ValueError(f"GGUF architecture {name!r} is not supported (only {', '.join(known)})")


# --- the file ---------------------------------------------------------------------------------


def export_gguf(
    src: str | os.PathLike | None, dst: Path, outtype: str = DEFAULT_OUTTYPE, progress: bool = True
) -> Path:
    """Write src (a model directory, a .gguf or the default model's name) as the GGUF dst."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir = resolve_model(src)
    hf_config = load_config(model_dir)
    arch = architecture_for(hf_config)
    cfg = ModelConfig.from_hf(hf_config)
    _check_rope_scaling(cfg, arch)
    _warn_of_sliding_window(hf_config, arch)
    tokenizer_files = read_tokenizer_files(model_dir)  # FileNotFoundError names tokenizer.json
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch.name)
    try:
        _write_metadata(writer, arch, cfg, model_dir.name, outtype)
        _write_tokenizer(writer, tokenizer_files, model_dir, hf_config, cfg.vocab_size)
        plan = list(_plan(model_dir, arch, cfg, outtype))
        for tensor in plan:
            writer.add_tensor_info(*tensor.info())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(plan, model_dir, cfg, progress):
            writer.write_tensor_data(data)
        writer.close()
        tmp.replace(dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log.info("model.exported", src=str(model_dir), dst=str(dst), outtype=outtype, tensors=len(plan))
    return dst


def _check_rope_scaling(cfg: ModelConfig, arch: Architecture) -> None:
    """Llama-3 scaling is written as llama.cpp's rope_freqs tensor ("llama" only); other
    kinds are refused rather than written as a model that runs differently."""
    if cfg.rope_scaling is None:
        return
    kind = getattr(cfg.rope_scaling, "kind", "llama3")
    if kind != "llama3" or not arch.rope_freqs:
        raise ValueError(
            f"RoPE scaling {kind!r} is not written to GGUF for llama.cpp's {arch.name!r} "
            "(only Llama-3 scaling, for llama)"
        )


def _warn_of_sliding_window(hf_config: dict[str, Any], arch: Architecture) -> None:
    """llama.cpp's llama and qwen2 attend to everything (its convert drops the window, as
    here): the file runs as p3 does up to the window, then differs. Said, not refused."""
    window = hf_config.get("sliding_window")
    slides = window and hf_config.get("use_sliding_window", True)
    if slides and window < hf_config.get("max_position_embeddings", window + 1):
        log.warning("gguf.sliding_window_dropped", window=window, architecture=arch.name)


def _write_metadata(
    writer: Any, arch: Architecture, cfg: ModelConfig, name: str, outtype: str
) -> None:
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, config_field in arch.metadata:
        getattr(writer, method)(getattr(cfg, config_field))
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)


# --- tensors -----------------------------------------------------------------------------------

ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Planned:
    """One tensor of the file, before its bytes are made."""

    name: str  # GGUF name
    source: str | None  # HF name; None: made here (rope_freqs)
    heads: int  # permute rows by this many heads (0: as they are)
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def blocks(self) -> bool:
        return self.qtype.name not in ("F32", "F16")

    def info(self) -> tuple[str, tuple[int, ...], np.dtype, int, Any]:
        """GGUFWriter.add_tensor_info's arguments (blocks: uint8 [rows, row bytes])."""
        from gguf import quant_shape_to_byte_shape

        floats = np.float32 if self.qtype.name == "F32" else np.float16
        dtype = np.dtype(np.uint8 if self.blocks else floats)
        shape = quant_shape_to_byte_shape(self.shape, self.qtype) if self.blocks else self.shape
        return self.name, shape, dtype, math.prod(shape) * dtype.itemsize, self.qtype


def _plan(model_dir: Path, arch: Architecture, cfg: ModelConfig, outtype: str) -> Iterator[Planned]:
    from gguf import GGMLQuantizationType

    if cfg.rope_scaling is not None:
        yield Planned(ROPE_FREQS, None, 0, GGMLQuantizationType.F32, (cfg.head_dim // 2,))
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if arch.permute_qk else {}
    for hf_name, tensor in iter_state_dict(model_dir):
        if hf_name.endswith(SKIPPED_TENSORS):
            continue
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp takes a missing output.weight as tied to token_embd
        shape = tuple(tensor.shape)
        permute_by = heads.get(hf_name.split(".")[-2], 0)
        yield Planned(
            arch.gguf_name(hf_name), hf_name, permute_by, _gguf_type(shape, outtype), shape
        )


def _gguf_type(shape: tuple[int, ...], outtype: str) -> Any:
    """1-D (norms, biases) and f32 files: F32; else F16, or the block kind when whole blocks."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or outtype == "f32":
        return T.F32
    if outtype == "f16" or shape[-1] % BLOCK:
        return T.F16
    return T[outtype.upper()]


def _tensor_data(
    plan: list[Planned], model_dir: Path, cfg: ModelConfig, progress: bool
) -> Iterator[np.ndarray]:
    """The planned tensors' bytes, in the plan's order (the checkpoint's)."""
    from tqdm.auto import tqdm

    stored = iter_state_dict(model_dir)
    for tensor in tqdm(plan, desc="Writing GGUF tensors", disable=not progress):
        if tensor.source is None:
            data = llama3_rope_freqs(cfg)
        else:
            source = next(t for name, t in stored if name == tensor.source)
            data = _converted(source, tensor.qtype, tensor.heads)
        if data.nbytes != tensor.info()[3]:
            raise ValueError(f"{tensor.name}: made {data.nbytes} bytes, not as planned")
        yield data


def _converted(tensor: torch.Tensor | QuantWeight, qtype: Any, heads: int) -> np.ndarray:
    from gguf.quants import quantize

    if isinstance(tensor, QuantWeight) and tensor.kind == qtype.name.lower():
        data = tensor.rows_layout().blocks.numpy()  # GGML's own block bytes: copied
    else:
        floats = tensor.dequantize() if isinstance(tensor, QuantWeight) else tensor
        data = quantize(floats.to(torch.float32).numpy(), qtype)
    if heads:  # a permutation of rows: blocks move with their row
        data = rope_permutation(data, heads)
    return np.ascontiguousarray(data)


def llama3_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs: what each rotary frequency is divided by under Llama-3 scaling
    (1 for short wavelengths, `factor` for long ones, a smooth blend between)."""
    s = cfg.rope_scaling
    if s is None:
        raise ValueError("rope_freqs is made for Llama-3 RoPE scaling only")
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    wavelen = 2 * math.pi * cfg.rope_theta**exponents
    context = s.original_max_position_embeddings
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1 / ((1 - smooth) / s.factor + smooth)
    long = np.where(wavelen > context / s.low_freq_factor, s.factor, blended)
    return np.where(wavelen < context / s.high_freq_factor, 1.0, long).astype(np.float32)


# --- tokenizer ---------------------------------------------------------------------------------

# llama.cpp tells pre-tokenizers apart by the token ids of this text (convert_hf_to_gguf.py's
# get_vocab_base_pre): sha256 of str(ids) -> tokenizer.ggml.pre, for the families p3 serves
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438"
    " ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer(tokenizer: Tokenizer, tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre as llama.cpp's converter picks it, by the hash of PRE_TOKENIZER_TEXT.
    An unknown hash (llama.cpp's converter refuses those) falls back to "gpt-2" when the
    pre-tokenizer is plain ByteLevel with its regex (exactly GPT-2's split), else to "default"
    (llama.cpp's generic BPE split), with a warning: such a file may split text differently."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    fallback = "gpt-2" if gpt2 else "default"
    log.warning("gguf.pre_tokenizer_unknown", hash=digest, using=fallback)
    return fallback


def _write_tokenizer(
    writer: Any,
    files: dict[str, bytes],
    model_dir: Path,
    hf_config: dict[str, Any],
    vocab_size: int,
) -> None:
    tokenizer = Tokenizer.from_files(files, model_dir)  # a malformed file: named, ValueError
    data = json.loads(files["tokenizer.json"])
    _check_byte_level_bpe(data, model_dir / "tokenizer.json")
    tokens, types = _token_list(data, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data["model"].get("merges") or []))
    special = {
        writer.add_bos_token_id: (tokenizer.bos_token_id, hf_config.get("bos_token_id")),
        writer.add_eos_token_id: (tokenizer.eos_token_id, _first(hf_config.get("eos_token_id"))),
        writer.add_pad_token_id: (tokenizer.pad_token_id, hf_config.get("pad_token_id")),
        writer.add_unk_token_id: (_token_id(tokenizer, "unk_token"), None),
    }
    for add, (from_tokenizer, from_config) in special.items():
        token_id = from_tokenizer if from_tokenizer is not None else from_config
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            add(token_id)
    with_special, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) > len(plain)
    writer.add_add_bos_token(extra and with_special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(extra and with_special[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _token_id(tokenizer: Tokenizer, key: str) -> int | None:
    token = tokenizer.tokens.get(key)
    return None if token is None else tokenizer.backend.token_to_id(token)


def _check_byte_level_bpe(data: dict[str, Any], path: Path) -> None:
    """Only GPT-2 style byte-level BPE (SmolLM2, Llama 3, Qwen2) has a "gpt2" GGUF form."""
    parts = [data.get("pre_tokenizer") or {}, data.get("decoder") or {}]
    parts += parts[0].get("pretokenizers", []) + parts[1].get("decoders", [])
    if data.get("model", {}).get("type") != "BPE" or not any(
        p.get("type") == "ByteLevel" for p in parts
    ):
        raise ValueError(
            f"{path} is not a byte-level BPE (GPT-2 style) tokenizer: only those are written "
            "to GGUF for now (SentencePiece-style vocabularies are not)"
        )


def _token_list(data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size: its token text and llama.cpp token type (added tokens:
    control when special, user-defined when not; ids the tokenizer lacks: unused pads)."""
    from gguf import TokenType

    tokens: dict[int, tuple[str, int]] = {
        i: (text, TokenType.NORMAL) for text, i in data["model"]["vocab"].items()
    }
    for added in data.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= vocab_size:
        raise ValueError(
            f"tokenizer.json has token id {max(tokens)}, beyond the model's vocab_size {vocab_size}"
        )
    listed = [tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    return [text for text, _ in listed], [int(kind) for _, kind in listed]


def _merges(merges: list[str] | list[list[str]]) -> list[str]:
    """Merges as "a b" strings; a pair's own spaces as U+0120, as llama.cpp's converter does."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]


def _first(value: int | list[int] | None) -> int | None:
    """config.json's eos_token_id may list several ids; llama.cpp takes one."""
    return value[0] if isinstance(value, list) and value else value
