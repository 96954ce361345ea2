"""What moved between two bench runs, beyond the noise their own samples show.

    python scripts/compare_bench.py OLD.json [OLD2.json ...] --new NEW.json [NEW2.json ...]
    python scripts/compare_bench.py OLD.json NEW.json [--threshold 0.03] [--alpha 0.05]

The files are what a scripts/bench_*.py writes with --json (scripts/benchjson.py). Several
files on a side are repeated runs: their samples are pooled. For every figure in both sides:
the change of the median, the noise (the samples' largest distance from their side's median,
relative), and a verdict, `better`, `worse` or `same`, in the direction the figure says is
better. Exit code 1 when a figure got worse beyond noise (for CI), 2 on unusable input.

Why Mann-Whitney, exact: a bench repeats a case 3-5 times, too few for a t-interval's
normality or a bootstrap's resampling to mean much, and timings on a shared machine have a
long slow tail. The rank test assumes neither; exact over every split of the pooled samples,
its one-sided p is the share of splits whose old and new are at least as far apart as the
observed ones. A figure moves only when that p is at most --alpha and the median changed by at
least --threshold (a significant 0.5% is no regression worth failing CI for). 3 samples a
side can reach p = 0.05 (every new sample past every old one); 2 a side cannot (0.17), and
such a figure is reported as `same (too few samples)`: repeat the bench or pool runs. A
figure the bench marks `exact` (a count, a perplexity: the same in every run of the same
code) has no noise: a change of at least --threshold is real.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

SCHEMA = "p3-bench/1"  # scripts/benchjson.py writes it
MACHINE_KEYS = ("cpu_model", "arch", "isa", "flags", "cores", "torch")
EXACT_SPLITS = 200_000  # beyond this many splits, the normal approximation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "old", type=Path, nargs="+", help="the old run(s); with one path each side, OLD NEW"
    )
    p.add_argument("--new", type=Path, nargs="+", default=None, help="the new run(s)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.03,
        help="least relative change of the median that counts (default 0.03)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="one-sided Mann-Whitney p at most this to count (default 0.05)",
    )
    return p


class BadInput(Exception):
    pass


def load(path: Path) -> dict:
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: {e}") from e
    if not isinstance(run, dict) or run.get("schema") != SCHEMA:
        raise BadInput(f"{path}: not a bench run (expected schema {SCHEMA!r})")
    for key, fig in run.get("figures", {}).items():
        if fig.get("better") not in ("higher", "lower") or not fig.get("samples"):
            raise BadInput(f"{path}: figure {key} needs `better` (higher|lower) and samples")
    return run


def pool(runs: list[dict]) -> dict[str, dict]:
    """Every figure's samples over the side's runs."""
    figures: dict[str, dict] = {}
    for run in runs:
        for key, fig in run["figures"].items():
            entry = figures.setdefault(key, {**fig, "samples": []})
            entry["samples"] = entry["samples"] + [float(s) for s in fig["samples"]]
    return figures


def mismatches(runs: list[dict], what: str, keys=None) -> list[str]:
    """What differs between the runs' `what` (machine, args), one line per key."""
    values = [run.get(what) or {} for run in runs]
    keys = keys or sorted({k for v in values for k in v})
    out = []
    for key in keys:
        seen = {json.dumps(v.get(key), sort_keys=True) for v in values}
        if len(seen) > 1:
            out.append(f"{what} {key} differs: {' vs '.join(sorted(seen))}")
    return out


def u_statistic(old: list[float], new: list[float]) -> float:
    """Pairs where new is above old (ties count a half), from midranks: O(n log n), so that
    thousands of latency samples a side stay cheap."""
    pooled = sorted([(v, 1) for v in new] + [(v, 0) for v in old])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        midrank = (i + j + 1) / 2  # ranks i+1 .. j
        rank_sum += midrank * sum(flag for _, flag in pooled[i:j])
        i = j
    return rank_sum - len(new) * (len(new) + 1) / 2


def p_above(old: list[float], new: list[float]) -> float:
    """One-sided p that new is stochastically above old, exact over every split."""
    n_old, n_new = len(old), len(new)
    observed = u_statistic(old, new)
    pooled = old + new
    total = math.comb(n_old + n_new, n_new)
    if total <= EXACT_SPLITS:
        hits = 0
        for picked in itertools.combinations(range(len(pooled)), n_new):
            chosen = set(picked)
            new_k = [pooled[i] for i in picked]
            old_k = [pooled[i] for i in range(len(pooled)) if i not in chosen]
            hits += u_statistic(old_k, new_k) >= observed - 1e-9
        return hits / total
    mean = n_old * n_new / 2
    sd = math.sqrt(n_old * n_new * (n_old + n_new + 1) / 12)
    return 0.5 * math.erfc((observed - 0.5 - mean) / sd / math.sqrt(2))


def least_p(n_old: int, n_new: int) -> float:
    return 1 / math.comb(n_old + n_new, n_new)


def spread(samples: list[float]) -> float:
    """Largest distance of a sample from the median, relative to it."""
    median = statistics.median(samples)
    return max(abs(s - median) for s in samples) / abs(median) if median else 0.0


def compare_figure(old: dict, new: dict, threshold: float, alpha: float) -> dict:
    a, b = old["samples"], new["samples"]
    m_old, m_new = statistics.median(a), statistics.median(b)
    change = (m_new - m_old) / abs(m_old) if m_old else (0.0 if m_new == m_old else math.inf)
    p = p_above(a, b) if m_new >= m_old else p_above(b, a)
    improved = (change > 0) == (old["better"] == "higher")
    if old.get("exact") and new.get("exact"):
        p = 0.0 if m_new != m_old else 1.0
    if p <= alpha and abs(change) >= threshold:
        verdict = "better" if improved else "worse"
    elif least_p(len(a), len(b)) > alpha:
        verdict = "same (too few samples)"
    else:
        verdict = "same (within noise)"
    return {
        "old": m_old,
        "new": m_new,
        "change": change,
        "p": p,
        "verdict": verdict,
        "noise": max(spread(a), spread(b)),
        "n": (len(a), len(b)),
    }


def compare(old_runs: list[dict], new_runs: list[dict], threshold: float, alpha: float):
    """(rows by figure key, warnings)."""
    everything = old_runs + new_runs
    warnings = mismatches(everything, "machine", MACHINE_KEYS) + mismatches(everything, "args")
    benches = sorted({run.get("bench") for run in everything})
    if len(benches) > 1:
        warnings.insert(0, f"different benches: {', '.join(map(str, benches))}")
    old, new = pool(old_runs), pool(new_runs)
    rows = {}
    for key in old.keys() & new.keys():
        if old[key]["better"] != new[key]["better"]:
            warnings.append(f"{key}: better is {old[key]['better']} before, {new[key]['better']}")
        rows[key] = compare_figure(old[key], new[key], threshold, alpha)
        rows[key]["unit"] = new[key].get("unit", "")
    for side, keys in (("old", old.keys() - new.keys()), ("new", new.keys() - old.keys())):
        warnings += [f"{key}: only in the {side} run" for key in sorted(keys)]
    return dict(sorted(rows.items())), warnings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    old_paths, new_paths = args.old, args.new
    if new_paths is None:
        if len(old_paths) != 2:
            parser.error("give OLD NEW, or OLD... --new NEW...")
        old_paths, new_paths = old_paths[:1], old_paths[1:]
    try:
        rows, warnings = compare(
            [load(p) for p in old_paths], [load(p) for p in new_paths], args.threshold, args.alpha
        )
    except BadInput as e:
        print(f"compare_bench: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    width = max([len(k) for k in rows] + [6])
    print(
        f"{'figure':<{width}} {'old':>10} {'new':>10} {'unit':>5} {'change':>8} "
        f"{'noise':>7} {'n':>5} {'p':>6}  verdict"
    )
    for key, r in rows.items():
        n = "{}/{}".format(*r["n"])
        print(
            f"{key:<{width}} {r['old']:>10.4g} {r['new']:>10.4g} {r['unit']:>5} "
            f"{r['change']:>+8.1%} {r['noise']:>6.1%} {n:>5} {r['p']:>6.3f}  {r['verdict']}"
        )
    worse = [k for k, r in rows.items() if r["verdict"] == "worse"]
    if worse:
        print(f"worse beyond noise: {', '.join(worse)}", file=sys.stderr)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
