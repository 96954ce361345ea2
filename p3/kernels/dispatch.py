"""Which implementation of each op runs here, said once: the `engine.kernels` log line at
start-up and `p3 info` print this report."""

from __future__ import annotations

import functools
from typing import Any

import torch

from p3.config import onednn_bf16_supported, resolve_dtype
from p3.kernels import build, cpu, quant
from p3.kernels.attention import decode_kernel_choice
from p3.log import get_logger

log = get_logger(__name__)


def kernel_report(device: str | None = None) -> dict[str, Any]:
    """The processor, the ISA level the kernels use (after P3_CPU_ISA), what --dtype auto
    becomes, and the implementation each op takes on `device`."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {
        "device": str(target),
        "cpu": cpu.cpu_info().summary(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype_auto": str(resolve_dtype("auto", target)).removeprefix("torch."),
    }
    if target.type == "cuda":
        report["cuda"] = torch.cuda.get_device_name(target)
        report["ops"] = {
            "quant_linear": "torch: dequantized at load, F.linear",
            "attention": "torch sdpa",
            "fused": "torch",
        }
        return report
    module = build.load()
    fused = module is not None and module.fused_capability() == report["torch_cpu_capability"]
    report["ops"] = {
        **quant.kernel_choice(),
        "paged_decode": _decode_choice(module),
        "rms_norm/rope/silu": "cpp" if fused else "torch",
        "bf16_linear": "onednn-packed" if onednn_bf16_supported() else "F.linear",
    }
    if module is None:
        report["build_error"] = build.build_error()
    return report


def _decode_choice(module: Any) -> str:
    if module is None:
        return "torch"
    return decode_kernel_choice()


@functools.cache
def log_kernels(device: str) -> None:
    """Once per process: what runs where."""
    report = kernel_report(device)
    log.info(
        "engine.kernels",
        cpu=report["cpu"]["model"],
        isa=report["cpu"]["isa"],
        detected_isa=report["cpu"]["detected_isa"],
        dtype_auto=report["dtype_auto"],
        **report["ops"],
    )
