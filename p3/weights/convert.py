"""One-time conversions of a checkpoint into a Hugging Face style safetensors directory.

A llama.cpp GGUF file keeps its Q8_0 / Q4_0 / Q4_1 tensors as they are: their blocks are
stored as uint8 [rows, row bytes] under the Hugging Face name and listed in quantization.json
(see p3.kernels.quant for the layout); tensors of other types are dequantized to float32 with
the `gguf` package (exactly as transformers' own GGUF loader does). A pytorch_model*.bin
checkpoint is re-saved as safetensors. Either way config.json and the tokenizer files land
beside the weights. GGUF architectures read: every one p3.weights.gguf_write writes (llama,
with Mistral and Mixtral; qwen2, qwen3, qwen2moe, qwen3moe, gemma, gemma2, gemma3, phi3, phi2,
olmo, olmo2, granite, stablelm, gptneox, gpt2, starcoder2, falcon, smollm3), through the same
tables: each writer's transform (q/k rows permuted, fused q/k/v reordered, Gemma's norms + 1,
GPT-2's transpose, experts stacked) undone, the family's own Hugging Face names and config.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from p3.weights.files import QUANTIZATION_FILE

MAX_SHARD_BYTES = 2 * 1024**3
GGUF_BLOCK_KINDS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
BIN_WEIGHTS = re.compile(r"pytorch_model.*\.bin(\.index\.json)?")
SAFETENSORS_WEIGHTS = re.compile(r".*\.safetensors(\.index\.json)?")


def convert(src: Path, dst: Path, progress: bool = True) -> None:
    """A .gguf file or a directory of pytorch_model*.bin -> safetensors directory `dst`."""
    src, dst = Path(src), Path(dst)
    if src.is_file() and src.suffix == ".gguf":
        convert_gguf(src, dst, progress)
    elif src.is_dir() and bin_files(src):
        convert_bin(src, dst, progress)
    else:
        expected = "a .gguf file or a directory with pytorch_model*.bin"
        raise ValueError(f"cannot convert {src}: expected {expected}")


# --- GGUF ---------------------------------------------------------------------------------------


def convert_gguf(src: Path, dst: Path, progress: bool = True) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    config = gguf_config(reader)
    dst.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    save_sharded(_gguf_tensors(reader, config, progress, kinds), dst)
    write_quantization(dst, kinds, source="gguf")
    write_json(dst / "config.json", config)
    write_json(dst / "generation_config.json", _generation_config(config))
    add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token")
    _save_gguf_tokenizer(src, dst, add_bos, _gguf_value(reader, "general.architecture"))


def gguf_config(reader: Any) -> dict[str, Any]:
    """A config.json dict from the GGUF metadata, for any architecture
    p3.weights.gguf_write.FAMILIES writes (the tables are shared: reading undoes writing)."""
    from p3.weights.gguf_write import ROPE_FACTORS, ROPE_FREQS, gguf_family, hf_config_from_gguf

    arch = _gguf_value(reader, "general.architecture")
    meta = gguf_metadata(reader, arch)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if ROPE_FREQS in tensors:
        raise ValueError("GGUF files with a rope_freqs tensor (Llama-3 RoPE scaling) are not read")
    for name in ROPE_FACTORS:
        if name in tensors:  # LongRoPE's factors: config, not weights
            meta[name.removesuffix(".weight")] = np.asarray(tensors[name].data).tolist()
    family = gguf_family(arch, meta)
    config = hf_config_from_gguf(family, meta, set(tensors))
    config["vocab_size"] = int(tensors["token_embd.weight"].data.shape[0])
    tied = _head_is_embedding(tensors)
    if config.get("tie_word_embeddings") and not tied:
        raise ValueError(f"a {arch} GGUF file with its own output.weight: {arch} ties its head")
    config["tie_word_embeddings"] = tied
    for token, gguf_token in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        config[f"{token}_token_id"] = _gguf_value(reader, f"tokenizer.ggml.{gguf_token}_token_id")
    return config


def gguf_metadata(reader: Any, arch: str) -> dict[str, Any]:
    """The file's "<arch>.*" keys, without "<arch>."."""
    prefix = f"{arch}."
    return {
        key.removeprefix(prefix): field.contents()
        for key, field in reader.fields.items()
        if key.startswith(prefix)
    }


def _head_is_embedding(tensors: dict[str, Any]) -> bool:
    """No output.weight (llama.cpp's tied head), or one that is token_embd's copy (written
    where an architecture needs the tensor)."""
    head, embedding = tensors.get("output.weight"), tensors["token_embd.weight"]
    if head is None:
        return True
    return head.tensor_type == embedding.tensor_type and np.array_equal(head.data, embedding.data)


def undo_rope_permutation(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves (rows 0,d/2,1,d/2+1,...); put them back."""
    return _swap_within_heads(weights, num_heads, interleaved=True)


def rope_permutation(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Each head's rotary halves interleaved as llama.cpp's "llama" wants them: the inverse of
    undo_rope_permutation (rows of blocks move as rows of floats do)."""
    return _swap_within_heads(weights, num_heads, interleaved=False)


def _swap_within_heads(weights: np.ndarray, num_heads: int, interleaved: bool) -> np.ndarray:
    """Rows of each head as [d/2, 2] (interleaved pairs) or [2, d/2] (halves), transposed."""
    half_dim = weights.shape[0] // num_heads // 2
    split = (half_dim, 2) if interleaved else (2, half_dim)
    per_head = weights.reshape(num_heads, *split, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)


def _gguf_tensors(
    reader: Any, config: dict, progress: bool, kinds: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its HF name, the writer's transforms undone (q/k rows, fused q/k/v
    order, Gemma's norms, GPT-2's transpose, stacked experts split): blocks as they are for
    the kinds p3 multiplies directly (recorded in kinds) where only rows move, float32 for
    the rest."""
    from gguf.quants import dequantize

    from p3.config import ModelConfig
    from p3.weights.gguf_write import ROPE_FACTORS, family_for

    family, cfg = family_for(config), ModelConfig.from_hf(config)
    experts = cfg.moe.num_experts if cfg.moe else 0
    skipped = set(ROPE_FACTORS) | ({"output.weight"} if config["tie_word_embeddings"] else set())
    for tensor in tqdm(reader.tensors, desc="Reading GGUF tensors", disable=not progress):
        if tensor.name in skipped:
            continue
        names = family.hf_tensors(tensor.name, config, experts)
        transforms = [family.transform(name, cfg) for name in names]
        kind = GGUF_BLOCK_KINDS.get(tensor.tensor_type.name)
        rows_only = all(t.moves_rows_only for t in transforms)
        stacked = len(names) > 1
        blocks = kind is not None and rows_only and len(tensor.data.shape) == 2 + stacked
        if blocks:
            weights = np.array(tensor.data, dtype=np.uint8)  # [(experts,) rows, row bytes]
        else:
            weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        parts = list(weights) if stacked else [weights]
        for name, transform, part in zip(names, transforms, parts, strict=True):
            if blocks:
                kinds[name] = kind
            yield name, torch.from_numpy(transform.undo(part))


def write_quantization(dst: Path, kinds: dict[str, str], source: str) -> None:
    """quantization.json: which stored tensors are blocks, of which kind (none: no file)."""
    if kinds:
        write_json(dst / QUANTIZATION_FILE, {"format": 1, "source": source, "tensors": kinds})


def read_quantization(model_dir: Path) -> dict[str, str]:
    """{HF tensor name: block kind} of a directory's quantized tensors ({} when none)."""
    path = Path(model_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        kinds = data["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is malformed: {exc}") from None
    if data.get("format") != 1 or not isinstance(kinds, dict):
        raise ValueError(f"{path}: unknown format {data.get('format')!r}")
    return kinds


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _generation_config(config: dict) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if config.get(key) is not None}


def _save_gguf_tokenizer(src: Path, dst: Path, add_bos: bool | None, arch: str) -> None:
    """transformers builds tokenizer.json and the chat template from the GGUF metadata (its
    generic fast tokenizer for architectures whose GGUF config transformers does not read)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = arch in GGUF_SUPPORTED_ARCHITECTURES or arch in ("qwen2moe", "qwen3moe")
    cls = AutoTokenizer if known else PreTrainedTokenizerFast
    tokenizer = cls.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    tokenizer.save_pretrained(dst)
    _tidy_tokenizer_config(dst / "tokenizer_config.json", tokenizer.chat_template, add_bos)
    _compact_merges(dst / "tokenizer.json")


def _tidy_tokenizer_config(path: Path, chat_template: str | None, add_bos: bool | None) -> None:
    config = json.loads(path.read_text())
    for load_time_key in ("is_local", "local_files_only"):
        config.pop(load_time_key, None)
    if add_bos is not None:
        config["add_bos_token"] = bool(add_bos)
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(path, config)


def _compact_merges(path: Path) -> None:
    """BPE merges as "a b" strings: tokenizers parses that form ~35% faster than pairs."""
    tokenizer = json.loads(path.read_text())
    merges = tokenizer["model"].get("merges") or []
    if all(isinstance(m, list) and not any(" " in part for part in m) for m in merges):
        tokenizer["model"]["merges"] = [" ".join(m) for m in merges]
        path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n")


# --- pytorch_model*.bin ---------------------------------------------------------------------------


def convert_bin(src: Path, dst: Path, progress: bool = True) -> None:
    """pytorch_model*.bin (one file or shards) -> model*.safetensors plus every other file."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    tied = config.get("tie_word_embeddings") is True
    save_sharded(_bin_tensors(bin_files(src), tied, progress), dst)
    _copy_side_files(src, dst)


def bin_files(model_dir: Path) -> list[Path]:
    return _checkpoint_files(model_dir, "pytorch_model.bin", "pytorch_model*.bin")


def safetensors_files(model_dir: Path) -> list[Path]:
    return _checkpoint_files(model_dir, "model.safetensors", "model*.safetensors") or sorted(
        model_dir.glob("*.safetensors")
    )


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _checkpoint_files(model_dir: Path, single: str, pattern: str) -> list[Path]:
    index = model_dir / f"{single}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob(pattern))


def _bin_tensors(files: list[Path], tied: bool, progress: bool) -> Iterator[tuple[str, Tensor]]:
    """Every tensor once, owning its memory: safetensors refuses tensors that share storage."""
    seen_storages: set[int] = set()
    for file in tqdm(files, desc="Converting .bin shards", disable=not progress):
        for name, tensor in load_bin(file).items():
            if name == "lm_head.weight" and tied:
                continue
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            seen_storages.add(storage)
            yield name, tensor


def _copy_side_files(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    for path in src.iterdir():
        weights = BIN_WEIGHTS.fullmatch(path.name) or SAFETENSORS_WEIGHTS.fullmatch(path.name)
        if path.is_file() and not weights:
            shutil.copy2(path, dst / path.name)


# --- writing --------------------------------------------------------------------------------------


def save_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], dst: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_bytes."""
    parts = []
    for i, shard in enumerate(_group_into_shards(tensors, max_shard_bytes)):
        part = dst / f".part-{i:05d}.safetensors"
        save_file(shard, part, metadata={"format": "pt"})
        parts.append((part, {name: _nbytes(t) for name, t in shard.items()}))
    if len(parts) == 1:
        parts[0][0].replace(dst / "model.safetensors")
    else:
        _name_shards(parts, dst)


def _group_into_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        if shard and size + _nbytes(tensor) > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += _nbytes(tensor)
    yield shard


def _name_shards(parts: list[tuple[Path, dict[str, int]]], dst: Path) -> None:
    weight_map, total_bytes = {}, 0
    for i, (part, sizes) in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.replace(dst / name)
        weight_map.update(dict.fromkeys(sizes, name))
        total_bytes += sum(sizes.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    write_json(dst / "model.safetensors.index.json", index)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
