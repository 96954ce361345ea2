"""Training speed of `p3 finetune` on the default model: tokens/s of fp32 LoRA and of QLoRA
(the frozen base's projections held as p3 blocks), the frozen base's bytes, the process's
peak RSS, and the time 1M tokens would take at that speed.

    python scripts/bench_finetune.py [--modes none,q8_0] [--steps 40] [--rank 16]

Each mode is one `p3 finetune` process (so each peak RSS is its own) on the worked example's
chat data (scripts/make_finetune_example.py: ~50 tokens a sequence, 8 a step); its
training_summary.json and training_log.jsonl are read back and the loss curve summarised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS = {"loaded": "loaded_rss_bytes", "training peak": "training_peak_rss_bytes"}
sys.path.insert(0, str(ROOT / "scripts"))

import benchjson  # noqa: E402
from make_finetune_example import make_example  # noqa: E402

FIGURES = {  # summary key: (unit, which way is better, the same in every run)
    "tokens_per_s": ("tokens/s", "higher", False),
    "base_bytes": ("bytes", "lower", True),
    "training_peak_rss_bytes": ("bytes", "lower", False),
    "held_out_loss_after": ("nats", "lower", False),
}


def run_mode(mode: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "p3", "finetune", "--quiet", "--data", str(data), "--out", str(out),
        "--rank", str(args.rank), "--lr", str(args.lr), "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--quantization", mode,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "training_summary.json").read_text())
    summary["curve"] = [json.loads(line) for line in (out / "training_log.jsonl").open()]
    return summary


def curve_summary(curve: list[dict], points: int = 6) -> str:
    every = max(len(curve) // points, 1)
    picked = curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else [])
    return ", ".join(f"{r['step']}: {r['loss']:.3f}" for r in picked)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="none,q8_0", help="comma-separated --quantization")
    parser.add_argument("--steps", type=int, default=40, help="training steps per mode")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    benchjson.add_arguments(parser, repeat=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    results, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_example(Path(tmp) / "quillon.jsonl")
        for i in range(args.repeat):
            for mode in args.modes.split(","):
                results[mode] = run_mode(mode, data, Path(tmp) / f"{mode}-{i}", args)
                runs.setdefault(mode, []).append(results[mode])
                report(mode, results[mode])
    base = results.get("none")
    for mode, r in results.items():
        if base is not None and mode != "none":
            ratios = {
                key: r[key] / base[key]
                for key in ("tokens_per_s", "base_bytes", *RSS.values())
                if r.get(key) and base.get(key)
            }
            print(f"{mode} / none: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    write_json(args, runs)


def write_json(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    out = benchjson.Report("finetune", args)
    for mode, mine in runs.items():
        for key, (unit, better, exact) in FIGURES.items():
            if all(r.get(key) for r in mine):
                out.add(key, [r[key] for r in mine], unit, better, exact, mode=mode)
        if mode != "none" and "none" in runs:
            pairs = zip(mine, runs["none"], strict=True)  # repeat by repeat
            ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in pairs]
            out.ratio("tokens_per_s_over_none", ratios, "higher", "tokens_per_s", mode=mode)
    out.write(args.json)


def report(mode: str, r: dict) -> None:
    mib = 2**20
    hours = 1e6 / r["tokens_per_s"] / 3600
    rss = ", ".join(f"{what} {r[key] / mib:.0f} MiB" for what, key in RSS.items() if r.get(key))
    print(
        f"{mode:>5}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens, {r['steps']} steps "
        f"in {r['seconds']:.1f} s); 1M tokens in {hours:.1f} h; frozen base "
        f"{r['base_bytes'] / mib:.0f} MiB; RSS {rss}, peak with loading "
        f"{r['peak_rss_bytes'] / mib:.0f} MiB"
    )
    print(
        f"       held-out loss {r['held_out_loss_before']:.4f} -> {r['held_out_loss_after']:.4f}; "
        f"training loss by step: {curve_summary(r['curve'])}"
    )


if __name__ == "__main__":
    main()
