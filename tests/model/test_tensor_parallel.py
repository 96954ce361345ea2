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


def run_ranks(
    model_dirs: list[Path], tp: int, pp: int, prompts: list[list[int]]
) -> dict[str, dict[str, list[int]]]:
    """Every model on one group of tp x pp rank processes: {model dir: {prompt index: ids}}."""
    size = tp * pp

    def spawn(rank: int, port: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "tests.model.tp_worker", str(rank), str(tp), str(pp), port]
        return subprocess.Popen(
            [*args, *map(str, model_dirs)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    leader = spawn(0, "-")
    procs = [leader]
    try:
        port = leader.stdout.readline().split()[1]
        procs += [spawn(rank, port) for rank in range(1, size)]
        leader.stdin.write(json.dumps({"prompts": prompts, "num_new": NUM_NEW}) + "\n")
        leader.stdin.flush()
        result = leader.stdout.readline()
        followed = [p.stdout.readline().split() for p in procs[1:]]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            proc.kill()
    assert all(f[0] == "followed" and int(f[1]) > 0 for f in followed), followed
    assert result.startswith("result "), result
    return json.loads(result[len("result ") :])


# Each (tp, pp) runs its configs on one group of rank processes, one engine after another.
@pytest.mark.parametrize(
    ("tp", "pp", "configs"),
    [
        (2, 1, [
            "llama-gqa-untied",  # 2 KV heads: one per rank
            "llama3-rope-scaling",  # 1 KV head: replicated
            "qwen2-bias-tied",  # qkv biases sliced, tied vocab-parallel head
            "mistral",
            "llama-uneven",  # 3 KV heads, FFN 135: uneven splits, a padded vocabulary
            # families (tests/model/families.py): experts split, one all-reduce after them
            "qwen2-moe",
            "phi",  # parallel layout, o_proj/down/head biases added once after reduce
        ]),
        (4, 1, ["llama-gqa-untied"]),  # 2 KV heads over 4 ranks: each replicated twice
        # one layer per stage; a tied head: the last stage loads the embedding as its head
        (1, 2, ["llama-gqa-untied", "qwen2-bias-tied"]),
        (2, 2, ["llama-gqa-untied"]),  # both: two stages of two tp ranks
    ],
    ids=["tp2", "tp4", "pp2", "tp2-pp2"],
)  # fmt: skip
def test_parallel_greedy_equals_transformers(tmp_path, tp, pp, configs):
    rng = random.Random(tp * 10 + pp)
    prompts = [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in (5, 33, 1, 70)]
    dirs = [
        (make_family_model if c in FAMILIES else make_tiny_model)(tmp_path, c) for c in configs
    ]
    got = run_ranks(dirs, tp, pp, prompts)
    for config, model_dir in zip(configs, dirs, strict=True):
        ref = load_reference(model_dir)
        want = {str(i): reference_greedy(ref, p, NUM_NEW) for i, p in enumerate(prompts)}
        assert got[str(model_dir)] == want, config
