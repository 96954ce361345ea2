"""scripts/eval_quality.py's pure helpers: windows, chunks, the metrics, the corpus order."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_quality.py"
spec = importlib.util.spec_from_file_location("eval_quality", SCRIPT)
eq = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = eq  # dataclasses look their module up there
spec.loader.exec_module(eq)


def test_windows_score_exactly_the_tokens_asked_for():
    ids = list(range(100))
    wins = eq.windows(ids, 10, 25)
    assert [len(w) for w in wins] == [10, 10, 8]
    assert sum(len(w) - 1 for w in wins) == 25
    assert wins[1][0] == 10  # consecutive, not overlapping


def test_windows_stop_when_the_ids_run_out():
    wins = eq.windows(list(range(21)), 10, 1000)
    assert [len(w) for w in wins] == [10, 10]  # a last window of one token scores nothing
    with pytest.raises(ValueError):
        eq.windows([1, 2, 3], 1, 2)


def test_chunk_bounds_lead_token_then_chunks():
    assert eq.chunk_bounds(10, 4) == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert eq.chunk_bounds(10, 4, lead=0) == [(0, 4), (4, 8), (8, 10)]
    assert eq.chunk_bounds(1, 4) == [(0, 1)]


def test_stats_of_identical_distributions():
    logits = torch.randn(6, 11, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    targets = torch.tensor([0, 3, 5, 7, 9, 10])
    s = eq.Stats()
    s.update(lp, lp, targets)
    assert s.count == 6 and s.top1 == 100.0
    assert s.mean_kl == pytest.approx(0.0, abs=1e-12)
    nll = -lp[torch.arange(6), targets]
    assert s.ppl == pytest.approx(math.exp(float(nll.mean())))


def test_stats_kl_and_agreement_against_a_known_case():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    s = eq.Stats()
    s.update(p.log(), q.log(), torch.tensor([1]))
    assert s.mean_kl == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert s.top1 == 0.0
    assert s.ppl == pytest.approx(2.0)


def test_result_rows_rise_against_the_reference():
    ref, test = eq.Stats(nll=2.0, count=2), eq.Stats(nll=2.2, kl=0.02, agree=1, count=2)
    rows = eq.result_rows({eq.REFERENCE: ref, "q4_0": test}, {})
    assert rows[0].ppl_rise_pct == 0.0
    assert rows[1].ppl_rise_pct == pytest.approx(100 * (math.exp(0.1) - 1))
    assert rows[1].mean_kl == pytest.approx(0.01) and rows[1].top1_pct == 50.0
    assert "q4_0" in eq.format_table(rows)


def test_parse_configs():
    assert eq.parse_configs("q8_0, int8-kv,q8_0") == ["q8_0", "int8-kv"]
    assert eq.parse_configs("reference,as-stored") == ["as-stored"]
    with pytest.raises(ValueError):
        eq.parse_configs("q2_k")


def test_corpus_files_sorted_by_relative_path(tmp_path):
    for name in ("b.rst.txt", "a/z.rst.txt", "a.rst.txt", "c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    files = eq.corpus_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "a.rst.txt",
        "a/z.rst.txt",
        "b.rst.txt",
    ]
    assert eq.corpus_files(tmp_path / "c.txt") == [tmp_path / "c.txt"]
    assert eq.corpus_files(tmp_path / "missing") == []
    assert eq.read_corpus(files, min_chars=5) == "a.rst.txt"
    assert eq.read_corpus(files) == "a.rst.txt\na/z.rst.txt\nb.rst.txt"
