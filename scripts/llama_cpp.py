"""llama.cpp's tools, for side-by-side benchmarks only (p3 itself never depends on them).

runnable(PATH) -> a path that runs: a copied tree whose shared-library symlinks were
    flattened into small text files naming their target (as in a read-only tools folder)
    is rebuilt once in a temporary directory with real links
llama_bench(binary, gguf, threads) -> {"tg": tok/s batch-1 decode, "pp": tok/s prefill}
    (64 and 128 tokens unless told)
llama_server(binary, gguf, port, slots, threads) -> a running llama-server (Popen)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

_copies: dict[Path, Path] = {}


def runnable(binary: str | Path) -> Path:
    binary = Path(binary).resolve()
    folder = binary.parent
    if not any(_is_flattened_link(p) for p in folder.iterdir()):
        return binary
    if folder not in _copies:
        copy = Path(tempfile.mkdtemp(prefix="llama-cpp-"))
        for path in folder.iterdir():
            if _is_flattened_link(path):
                (copy / path.name).symlink_to(path.read_text().strip())
            elif path.is_file():
                shutil.copy2(path, copy / path.name)  # $ORIGIN must be the copy
        _copies[folder] = copy
    return _copies[folder] / binary.name


def _is_flattened_link(path: Path) -> bool:
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 256:
        return False
    target = path.read_text(errors="replace").strip()
    return ".so" in path.name and (path.parent / target).is_file()


def llama_bench(
    binary: str | Path, gguf: Path, threads: int, reps: int = 5, prompt: int = 128, gen: int = 64
) -> dict[str, float]:
    """Batch-1 decode of `gen` tokens and prefill of `prompt`, tokens/s as llama-bench
    reports them."""
    out = subprocess.run(
        [
            str(runnable(binary)),
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-p",
            str(prompt),
            "-n",
            str(gen),
            "-r",
            str(reps),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    rates = {}
    for test in json.loads(out.stdout):
        kind = "tg" if test["n_gen"] else "pp"
        rates[kind] = float(test["avg_ts"])
    return rates


def llama_server(
    binary: str | Path, gguf: Path, port: int, slots: int, threads: int, *extra: str
) -> subprocess.Popen:
    """llama-server with `slots` parallel sequences (context 1024 each), ready on return; its
    log goes to a temporary file (a pipe nobody reads would stall it). extra: more flags
    (--jinja for tools and response_format)."""
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115 (the server holds it)
    proc = subprocess.Popen(
        [
            str(runnable(binary)),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(1024 * slots),
            "-t",
            str(threads),
            *extra,
        ],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server was not ready in 120 s")
