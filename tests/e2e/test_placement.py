"""Placement refuses what cannot fit, with the figures, at Hello (not later, in a failed load)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p3.nodes.coordinator.placement import why_unfit
from p3.protocol import messages as m

from ..model.tiny import make_tiny_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(120)
GIB = 1024**3


def test_a_shard_fits_when_its_share_of_the_weights_and_its_kv_cache_do():
    capacity = m.Capacity(memory_bytes=3 * GIB, model_bytes=4 * GIB, kv_cache_bytes=1 * GIB)
    reason = why_unfit(capacity, 1, "big")
    assert "needs 5.00 GiB" in reason and "has 3.00 GiB" in reason
    assert why_unfit(capacity, 2, "big") is None  # 4 / 2 + 1 = 3 GiB
    assert why_unfit(m.Capacity(), 1, "unknown sizes") is None


def test_a_node_that_cannot_hold_its_shard_is_refused_and_says_why(tmp_path):
    model = make_tiny_model(tmp_path, "llama-gqa-untied")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "p3", "coordinator", "--bind", "tcp://127.0.0.1:0", "--insecure"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = openai_cluster._wait_ready(coordinator)["address"]
        node = subprocess.run(
            [sys.executable, "-m", "p3", "node", "--coordinator", address, "--model", str(model),
             "--kv-cache-memory", "100000GiB", "--insecure"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=30)
    assert node.returncode == 1
    assert "needs" in node.stderr and "GiB available" in node.stderr, node.stderr[-2000:]
