"""Builds p3's C++ kernels once per (source, Python, torch, CPU), cached under p3_home().

The extension name carries a hash of the sources, the compiler flags, the Python and torch
versions and the CPU's flags, so an edited source is rebuilt and a stale or foreign build is
never loaded. A finished build leaves a marker next to the library; later processes import
that library directly, without ninja or a compiler. Concurrent first builds are serialised
by an flock on `build.flock`, which the kernel releases when its holder dies: a build killed
half-way (Ctrl-C on a first `p3 serve`) leaves no lock that stalls the next process, whose
clock may not even agree with the file's mtime. A build that cannot take the lock within
BUILD_WAIT_S, or fails, is logged once; callers then fall back to torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import platform
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from p3.log import get_logger
from p3.paths import p3_home

log = get_logger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE_NAMES = ("paged_attention.cpp", "fused.cpp", "rms_norm.cpp", "quant.cpp", "layers.cpp")
SOURCES = tuple(CSRC / f for f in SOURCE_NAMES)
HEADERS = (CSRC / "fused.h",)  # hashed with the sources: an edit must rebuild
# OpenMP: at::parallel_for is header code. No contraction of a * b + c into one fma: the fused
# kernels must round where torch's separate ops round.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)  # resolves to the libgomp torch has already loaded
BUILD_WAIT_S = 20 * 60  # longer than any build seen (about 2 min on 2 cores)

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


@functools.cache
def extension_name() -> str:
    """`p3_kernels_<hash>` over the sources, flags, Python and torch versions, and CPU."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    python = sysconfig.get_config_var("EXT_SUFFIX") or sys.version
    for part in (*CFLAGS, *LDFLAGS, python, torch.__version__, platform.machine(), _cpu_flags()):
        digest.update(part.encode())
    return f"p3_kernels_{digest.hexdigest()[:16]}"


def build_dir() -> Path:
    return p3_home() / "torch_extensions" / extension_name()


def load() -> ModuleType | None:
    """The compiled kernels, building them on first use; None if they cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = _import_or_build()
            except Exception as exc:  # noqa: BLE001 - any build failure means "use torch"
                _failed = f"{type(exc).__name__}: {exc}"
                log.warning("kernels.build_failed", error=_failed[-2000:], fallback="torch")
    return _module


def warm() -> bool:
    """Build (or load) the kernels now, e.g. at start-up; True if they are usable."""
    return load() is not None


def build_error() -> str | None:
    """Why the kernels could not be built, if they could not."""
    return _failed


def _import_or_build() -> ModuleType:
    name, directory = extension_name(), build_dir()
    library = directory / f"{name}.so"
    marker = directory / "built.ok"
    if marker.exists() and library.exists():
        with contextlib.suppress(ImportError):
            return _import_built(name, library, marker)
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "build.flock"):
        if marker.exists() and library.exists():  # another process built it while we waited
            with contextlib.suppress(ImportError):
                return _import_built(name, library, marker)
        # cpp_extension's own baton: only a build that died can have left it, since every
        # builder of this directory holds the flock; left in place it would block forever.
        (directory / "lock").unlink(missing_ok=True)
        _put_venv_bin_on_path()  # where pip's `ninja` lands when the venv is not activated
        from torch.utils import cpp_extension

        started = time.monotonic()
        log.info("kernels.building", name=name, build_dir=str(directory))
        module = cpp_extension.load(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=False,
        )
        marker.write_text(torch.__version__)
        log.info("kernels.built", name=name, build_s=round(time.monotonic() - started, 1))
        return module


def _import_built(name: str, library: Path, marker: Path) -> ModuleType:
    try:
        return _import_library(name, library)
    except ImportError as exc:
        log.warning("kernels.cached_build_unusable", library=str(library), error=str(exc))
        marker.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive flock on `path`, waiting at most BUILD_WAIT_S for another builder."""
    with path.open("a") as handle:
        deadline = time.monotonic() + BUILD_WAIT_S
        logged = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    held = f"another process held {path} for {BUILD_WAIT_S} s"
                    raise TimeoutError(held) from None
                if not logged:
                    log.info("kernels.waiting_for_build", lock=str(path))
                    logged = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _put_venv_bin_on_path() -> None:
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + path


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
