"""One JSON schema for every scripts/bench_*.py: what ran, where, and every sample it took.

    report = benchjson.Report("attention", args)
    report.add("cpp_us", samples, "us", "lower", batch=1, context=128)
    report.ratio("int8_over_cpp", ratios, "lower", reference="cpp_us", batch=1, context=128)
    report.write(args.json)  # a no-op when --json was not given

Here in scripts/, not in p3/: it is tooling for the bench scripts (which find it beside them on
sys.path) and for scripts/compare_bench.py, not part of the engine. Light on purpose (no
torch: its version comes from the installed metadata), so that a bench's argument parser can be
imported and checked without starting anything.

A figure keeps every repeated sample, not only the median: compare_bench.py estimates the
run-to-run noise from them. Its key is its name and labels, `cpp_us[batch=1,context=128]`, the
same in every run with the same arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # p3 itself, when a bench runs as `python scripts/bench_x.py`

SCHEMA = "p3-bench/1"
DIRECTIONS = ("higher", "lower")


def add_arguments(parser: argparse.ArgumentParser, repeat: int | None = None) -> None:
    """--json PATH, and --repeat N (default `repeat`) for a bench that measures once."""
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the figures and every sample here (scripts/benchjson.py)",
    )
    if repeat is not None:
        parser.add_argument(
            "--repeat",
            type=positive,
            default=repeat,
            help=f"measure this often: the samples (default {repeat})",
        )


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a count of at least 1, got {text}")
    return value


def figure_key(name: str, labels: dict) -> str:
    inner = ",".join(f"{k}={v}" for k, v in labels.items())
    return f"{name}[{inner}]" if inner else name


class Report:
    def __init__(self, bench: str, args: argparse.Namespace):
        self.bench = bench
        self.args = {k: v for k, v in vars(args).items() if k != "json"}
        self.figures: dict[str, dict] = {}

    def add(self, name: str, samples, unit: str, better: str, exact=False, **labels) -> None:
        """A figure: `samples` one number or a list of every repeat's. exact: the same in
        every run of the same code (a count, a perplexity), so any change of it is real."""
        if better not in DIRECTIONS:
            raise ValueError(f"figure {name}: better must be one of {DIRECTIONS}, got {better!r}")
        values = [float(s) for s in (samples if isinstance(samples, list | tuple) else [samples])]
        if not values:
            raise ValueError(f"figure {name}: no samples")
        key = figure_key(name, labels)
        self.figures[key] = {
            "name": name,
            "labels": labels,
            "unit": unit,
            "better": better,
            "samples": values,
            "median": statistics.median(values),
            "exact": exact,
        }

    def ratio(self, name: str, samples, better: str, reference: str, exact=False, **labels):
        """A figure over its reference (another engine, the base case), as the bench prints."""
        self.add(name, samples, "x", better, exact, **labels)
        self.figures[figure_key(name, labels)]["reference"] = reference

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "bench": self.bench,
            "args": self.args,
            "machine": machine(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "figures": self.figures,
        }

    def write(self, path: Path | None) -> None:
        if path is None:
            return
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        print(f"figures written to {path}")


def machine() -> dict:
    from p3.kernels.cpu import cpu_info, isa

    info = cpu_info().summary()
    return {
        "cpu_model": info["model"],
        "arch": info["machine"],
        "isa": isa(),
        "flags": info["flags"],
        "cores": len(os.sched_getaffinity(0)),
        "torch": _version("torch"),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
