"""scripts/compare_bench.py over synthetic runs written by scripts/benchjson.py, and every
scripts/bench_*.py's parser taking --json (imported, not run: their imports are torch-free)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchjson  # noqa: E402
import compare_bench  # noqa: E402

BENCHES = sorted(p.stem for p in SCRIPTS.glob("bench_*.py"))


def write_run(path: Path, figures: dict, cpu_model: str | None = None, **args) -> Path:
    """figures: name -> (samples, better[, exact])."""
    report = benchjson.Report("synthetic", argparse.Namespace(json=path, **args))
    for name, (samples, better, *exact) in figures.items():
        report.add(name, samples, "ms", better, *exact)
    run = report.to_dict()
    if cpu_model:
        run["machine"]["cpu_model"] = cpu_model
    path.write_text(json.dumps(run))
    return path


def verdicts(tmp_path, capsys, old: dict, new: dict, *extra) -> tuple[int, str, str]:
    """compare_bench's exit code, stdout and stderr on these two runs."""
    a, b = write_run(tmp_path / "old.json", old), write_run(tmp_path / "new.json", new)
    code = compare_bench.main([str(a), str(b), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def verdict_of(stdout: str, figure: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(figure + " "))
    return line.split("  ")[-1].strip()


STEADY = [10.0, 10.2, 9.9, 10.1, 10.0]


def test_moves_beyond_noise_are_marked_in_the_figures_direction(tmp_path, capsys):
    slower = [v * 1.3 for v in STEADY]
    code, out, err = verdicts(
        tmp_path, capsys,
        {"step_ms": (STEADY, "lower"), "tok_s": (STEADY, "higher"), "flat": (STEADY, "lower")},
        {"step_ms": (slower, "lower"), "tok_s": (slower, "higher"),
         "flat": ([10.1, 9.9, 10.0, 10.2, 10.0], "lower")},
    )  # fmt: skip
    assert verdict_of(out, "step_ms") == "worse"  # lower is better, and it rose 30%
    assert verdict_of(out, "tok_s") == "better"  # the same move, higher is better
    assert verdict_of(out, "flat") == "same (within noise)"
    assert code == 1 and "worse beyond noise: step_ms" in err


def test_a_move_inside_the_samples_spread_is_noise(tmp_path, capsys):
    noisy = [8.0, 12.0, 9.0, 11.5, 10.0]
    shifted = [v * 1.1 for v in [8.5, 12.0, 9.0, 11.0, 10.5]]  # median +10%, ranges overlap
    code, out, _ = verdicts(tmp_path, capsys, {"x": (noisy, "lower")}, {"x": (shifted, "lower")})
    assert verdict_of(out, "x") == "same (within noise)" and code == 0


def test_significant_but_tiny_changes_are_under_the_threshold(tmp_path, capsys):
    code, out, _ = verdicts(
        tmp_path, capsys, {"x": (STEADY, "lower")},
        {"x": ([v * 1.01 + 0.5 for v in STEADY], "lower")}, "--threshold", "0.1",
    )  # fmt: skip
    assert verdict_of(out, "x") == "same (within noise)" and code == 0


def test_two_samples_a_side_cannot_tell(tmp_path, capsys):
    code, out, _ = verdicts(
        tmp_path, capsys, {"x": ([10, 10.1], "lower")}, {"x": ([20, 20.1], "lower")}
    )
    assert verdict_of(out, "x") == "same (too few samples)" and code == 0


def test_an_exact_figure_needs_no_samples_to_move(tmp_path, capsys):
    code, out, _ = verdicts(
        tmp_path, capsys, {"ppl": (5.0, "lower", True)}, {"ppl": (5.5, "lower", True)}
    )
    assert verdict_of(out, "ppl") == "worse" and code == 1


def test_machine_and_argument_mismatches_are_warned(tmp_path):
    a = write_run(tmp_path / "a.json", {"x": (STEADY, "lower")}, "AMD EPYC", steps=40)
    b = write_run(tmp_path / "b.json", {"x": (STEADY, "lower")}, "Intel Xeon", steps=8)
    rows, warnings = compare_bench.compare([json.loads(a.read_text())],
                                           [json.loads(b.read_text())], 0.03, 0.05)  # fmt: skip
    assert rows["x"]["verdict"] == "same (within noise)"
    assert any("cpu_model differs" in w and "Intel Xeon" in w for w in warnings)
    assert any(w.startswith("args steps differs") for w in warnings)


def test_runs_on_a_side_are_pooled(tmp_path):
    """Three 1-sample runs a side: pooled they reach p = 0.05, one pair alone cannot."""
    old = [write_run(tmp_path / f"o{i}.json", {"x": (10 + i * 0.1, "lower")}) for i in range(3)]
    new = [write_run(tmp_path / f"n{i}.json", {"x": (13 + i * 0.1, "lower")}) for i in range(3)]
    assert compare_bench.main([str(old[0]), str(new[0])]) == 0
    assert compare_bench.main([*map(str, old), "--new", *map(str, new)]) == 1


def test_mann_whitney_exact_p_and_ties():
    assert compare_bench.p_above([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / 20)
    assert compare_bench.p_above([1, 2, 3], [1, 2, 3]) > 0.5
    assert compare_bench.u_statistic([1, 2], [2, 3]) == 3.5  # (2>1) (3>1) (3>2), 2=2 a half


def test_bad_input_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"figures": {}}')
    good = write_run(tmp_path / "good.json", {"x": (STEADY, "lower")})
    assert compare_bench.main([str(good), str(bad)]) == 2
    assert "bad.json: not a bench run" in capsys.readouterr().err


@pytest.mark.parametrize("bench", BENCHES)
def test_every_bench_takes_json(bench, tmp_path):
    module = importlib.import_module(bench)
    args = module.build_parser().parse_args(["--json", str(tmp_path / "out.json")])
    assert args.json == tmp_path / "out.json"


def test_the_bench_scripts_import_without_torch():
    """So that their parsers (above) stay cheap to check: torch takes seconds to import. Only
    telling when nothing earlier in the session imported torch."""
    if "torch" in sys.modules:
        pytest.skip("torch already imported in this session")
    for bench in BENCHES:
        importlib.import_module(bench)
    assert "torch" not in sys.modules
