"""Will a shard fit? What a node says it can hold, and the coordinator's check before placing.

A node reports in Hello the memory it has (MemAvailable, or free device memory on CUDA), its
model's weight bytes in the serving dtype (from config.json: no conversion, no loading) and
the KV cache it will allocate. A replica of replica_size nodes gives each a 1/replica_size
share of the weights, so a node fits when weights / replica_size + KV cache <= its memory.
One that cannot is refused at Hello with the figures, instead of dying later in a load.
(torch and the weights helpers load lazily: the coordinator only calls why_unfit.)
"""

from __future__ import annotations

from pathlib import Path

from p3.protocol import messages as m

GIB = 1024**3


def available_memory(device: str | None) -> int:
    """Bytes this node can still use on its device (0: unknown)."""
    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def model_bytes(model: str | None, itemsize: int, quantization: str = "auto") -> int:
    """The model's weights as they will be held, from its files alone (0 when not at hand
    yet, e.g. a .gguf not converted so far): every parameter in the dtype's itemsize, in a
    kind's block bytes under --quantization KIND, or the stored bytes of a checkpoint whose
    quantization.json says it is blocks (auto)."""
    from p3.config import ModelConfig
    from p3.kernels.quant import BLOCK, BLOCK_BYTES, mode_kind
    from p3.weights.files import DEFAULT_MODEL, QUANTIZATION_FILE, load_config, models_dir

    path = models_dir() / DEFAULT_MODEL if model in (None, DEFAULT_MODEL) else Path(model)
    if not (path / "config.json").is_file():
        return 0
    cfg = ModelConfig.from_hf(load_config(path))
    if (kind := mode_kind(quantization)) is not None:
        return cfg.num_parameters * BLOCK_BYTES[kind] // BLOCK
    if quantization == "auto" and (path / QUANTIZATION_FILE).is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return cfg.num_parameters * itemsize


def why_unfit(capacity: m.Capacity, replica_size: int, model: str) -> str | None:
    """A reason this node cannot hold its share of model, or None (fits, or unknown)."""
    if not capacity.memory_bytes or not capacity.model_bytes:
        return None
    need = capacity.model_bytes / replica_size + capacity.kv_cache_bytes
    if need <= capacity.memory_bytes:
        return None
    return (
        f"model {model!r} needs {need / GIB:.2f} GiB on each of its {replica_size} node(s) "
        f"({capacity.model_bytes / GIB:.2f} GiB of weights / {replica_size} + "
        f"{capacity.kv_cache_bytes / GIB:.2f} GiB KV cache), but this node has "
        f"{capacity.memory_bytes / GIB:.2f} GiB available: use more nodes per replica "
        f"(--tp/--pp), a smaller --kv-cache-memory, or a bigger machine"
    )
