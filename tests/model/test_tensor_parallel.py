"""Tensor and pipeline parallelism: ranks in separate processes over gloo give transformers'
greedy tokens.

Each rank loads only its slice; the leader schedules and samples; the followers run the
plans it broadcasts. Covered: KV heads split (tp <= num_kv_heads) and replicated (tp larger),
tied and untied heads, qkv biases, pipeline stages alone and with tp, a batch of different
lengths.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from .families import FAMILIES, make_family_model
from .tiny import VOCAB, load_reference, make_tiny_model, reference_greedy

ROOT = Path(__file__).resolve().parents[2]
NUM_NEW = 24


def run_ranks(model_dir: Path, tp: int, pp: int, prompts: list[list[int]]) -> dict[str, list[int]]:
    size = tp * pp

    def spawn(rank: int, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "tests.model.tp_worker", str(model_dir), str(rank)]
        return subprocess.Popen(
            [*args, str(tp), str(pp), *extra],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    leader = spawn(0)
    procs = [leader]
    try:
        port = leader.stdout.readline().split()[1]
        procs += [spawn(rank, port) for rank in range(1, size)]
        leader.stdin.write(json.dumps({"prompts": prompts, "num_new": NUM_NEW}) + "\n")
        leader.stdin.flush()
        result = leader.stdout.readline()
        followed = [p.stdout.readline().split() for p in procs[1:]]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            proc.kill()
    assert all(f[0] == "followed" and int(f[1]) > 0 for f in followed), followed
    assert result.startswith("result "), result
    return json.loads(result[len("result ") :])


@pytest.mark.parametrize(
    ("config", "tp", "pp"),
    [
        ("llama-gqa-untied", 2, 1),  # 2 KV heads: one per rank
        ("llama-gqa-untied", 4, 1),  # 2 KV heads over 4 ranks: each replicated twice
        ("llama3-rope-scaling", 2, 1),  # 1 KV head: replicated
        ("qwen2-bias-tied", 2, 1),  # qkv biases sliced, tied vocab-parallel head
        ("mistral", 2, 1),
        ("llama-uneven", 2, 1),  # 3 KV heads, FFN 135: uneven splits, a padded vocabulary
        ("llama-gqa-untied", 1, 2),  # one layer per stage
        ("qwen2-bias-tied", 1, 2),  # tied head: the last stage loads the embedding as its head
        ("llama-gqa-untied", 2, 2),  # both: two stages of two tp ranks
        # families (tests/model/families.py): experts split, one all-reduce after them
        ("qwen2-moe", 2, 1),
        ("phi", 2, 1),  # parallel layout, o_proj/down/head biases added once after reduce
    ],
)
def test_parallel_greedy_equals_transformers(tmp_path, config, tp, pp):
    make = make_family_model if config in FAMILIES else make_tiny_model
    model_dir = make(tmp_path, config)
    rng = random.Random(tp * 10 + pp)
    prompts = [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in (5, 33, 1, 70)]
    got = run_ranks(model_dir, tp, pp, prompts)
    ref = load_reference(model_dir)
    want = {str(i): reference_greedy(ref, p, NUM_NEW) for i, p in enumerate(prompts)}
    assert got == want
