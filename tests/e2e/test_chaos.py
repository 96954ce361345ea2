"""The chaos runs CI does: `chaos.run` on real processes (coordinator, two nodes, edge, fault
proxies on every link), its workload of 8 streaming clients, one fault, the fault-free
reference pass, and the checker's verdict. The longer scenarios run by command
(python -m chaos.run)."""

from __future__ import annotations

import asyncio

import pytest

from chaos.cluster import Settings
from chaos.run import run_once

pytestmark = pytest.mark.timeout(300)


def run(scenario: str, seed: int, tmp_path, settings: Settings | None = None):
    return asyncio.run(run_once(scenario, seed, 10.0, tmp_path, settings or Settings()))


def test_link_reset_moves_streams_with_nothing_lost(default_model_dir, tmp_path):
    """The edge's link to a node stalls, then is reset with frames inside: they are gone,
    the node lives. The edge sees the disconnect at once and the streams move on, with
    nothing lost or repeated."""
    report = run("reset-once", 3, tmp_path)
    print(report.summary())
    assert report.passed, report.violations
    assert [f["kind"] for f in report.faults] == ["reset"]
    assert report.ok == report.requests == 8
    assert report.tokens_lost == report.tokens_repeated == 0
    # seen: 1-2 s with the edge's disconnect monitor; 21 s without it (the streams' tokens
    # were gone and they waited out the 20 s token timeout before moving)
    assert report.fault_gaps_s, "no stream was under way at the reset"
    assert max(report.fault_gaps_s) < 10.0, report.fault_gaps_s


def test_a_hung_node_nobody_declares_dead_loses_its_streams_to_the_token_timeout(
    default_model_dir, tmp_path
):
    """The last resort: a node whose engine step hangs while its process, heartbeats and
    links stay up, and which the coordinator does not call hung (--hung-after 60 s here).
    The edge's token timeout (2 s here) moves its streams; nothing is lost or repeated."""
    settings = Settings(hung_after_s=60.0, token_timeout_s=2.0)
    report = run("hang-once", 5, tmp_path, settings)
    print(report.summary())
    undeclared = [v for v in report.violations if v.endswith("never declared dead")]
    assert [v for v in report.violations if v not in undeclared] == []
    assert report.ok == report.requests == 8
    assert report.tokens_lost == report.tokens_repeated == 0
    moves = (tmp_path / "logs" / "edge.log").read_text().count("no tokens for 2 s")
    assert moves > 0, "no stream was moved by the token timeout"
    assert 2.0 <= max(report.gaps_s) < 10.0  # one waited out the timeout, then moved


def test_one_kill_while_16_streams_run_half_of_them_constrained(default_model_dir, tmp_path):
    """kill -9 of the busiest node while 8 clients stream (two requests each): plain
    completions, and half of the requests JSON under a schema (completions) or a required
    tool call (chat). All finish, equal to the reference, nothing lost or repeated, and every
    constrained output still validates against its schema."""
    report = run("constrained-once", 1, tmp_path)
    print(report.summary())
    assert report.passed, report.violations
    assert [f["kind"] for f in report.faults] == ["kill"]
    assert (report.requests, report.ok, report.failed) == (16, 16, 0)
    assert report.tokens_lost == report.tokens_repeated == report.differing == 0
    assert report.detection_s["kill"], "the kill was never detected"
    assert report.fault_gaps_s, "no stream was under way at the kill"
    assert report.kv_free and not report.leftovers
