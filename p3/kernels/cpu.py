"""What this processor can do, read once, and the cap an operator may put on it.

The processor changes from machine to machine (AVX2 only, AVX-512 with VNNI/BF16, AMX, NEON),
so nothing assumes: the features come from /proc/cpuinfo (Linux), the ISA level the kernels
may use is the highest the CPU has, lowered by P3_CPU_ISA=portable|avx2|avx512 so that an
AVX-512 machine can run exactly what an AVX2-only one runs. No torch here.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "P3_CPU_ISA"
# x86 levels, lowest first; "portable" is plain C++ (and torch) that runs anywhere
X86_LEVELS = ("portable", "avx2", "avx512")
ARM_LEVELS = ("portable", "neon")
# the /proc/cpuinfo flags each x86 level needs
LEVEL_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
)


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    model: str
    flags: frozenset[str]

    @property
    def levels(self) -> tuple[str, ...]:
        return ARM_LEVELS if self.machine in ("aarch64", "arm64") else X86_LEVELS

    @property
    def detected_isa(self) -> str:
        """The highest level the processor supports."""
        if self.levels == ARM_LEVELS:
            return "neon" if "asimd" in self.flags or self.machine == "arm64" else "portable"
        best = "portable"
        for level in X86_LEVELS[1:]:
            if not all(flag in self.flags for flag in LEVEL_FLAGS[level]):
                break
            best = level
        return best

    @property
    def native_bf16(self) -> bool:
        """bf16 computed in hardware (AVX512-BF16 or AMX), not emulated: where bf16 pays."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags) and self.has("avx512")

    def has(self, level: str) -> bool:
        """Whether the kernels may use `level` here: the CPU has it and the cap allows it."""
        levels = self.levels
        if level not in levels:
            return False
        return levels.index(level) <= levels.index(isa())

    def summary(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "model": self.model,
            "detected_isa": self.detected_isa,
            "isa": isa(),
            "flags": sorted(f for f in REPORTED_FLAGS if f in self.flags),
        }


@functools.cache
def cpu_info() -> CpuInfo:
    machine = platform.machine()
    flags: set[str] = set()
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and value.strip():
            model = value.strip()
    return CpuInfo(machine=machine, model=model, flags=frozenset(flags))


def isa() -> str:
    """The ISA level the kernels may use: the detected one, capped by $P3_CPU_ISA."""
    info = cpu_info()
    detected = info.detected_isa
    cap = os.environ.get(ISA_ENV, "").strip().lower()
    if not cap:
        return detected
    levels = info.levels
    if cap not in (*X86_LEVELS, *ARM_LEVELS):
        raise ValueError(f"{ISA_ENV}={cap!r}: expected one of {', '.join(levels)}")
    if cap not in levels:  # e.g. avx2 asked for on an ARM machine: only portable is common
        return "portable"
    return levels[min(levels.index(cap), levels.index(detected))]


def allowed_isas() -> tuple[str, ...]:
    """Every level this machine can run, lowest first (what the parity tests cover)."""
    info = cpu_info()
    levels = info.levels
    return levels[: levels.index(info.detected_isa) + 1]
