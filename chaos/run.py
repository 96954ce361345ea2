"""`python -m chaos.run --scenario NAME --seed S --duration D`: one chaos run, checked.

A run: start the cluster (chaos.cluster), run the workload while the nemesis injects faults
(the chaos pass, history.jsonl), wait until the cluster is whole, run exactly the same
requests again with no fault (the reference pass, reference.jsonl), check that every node's
KV blocks are free, stop everything and look for leftover processes, then check the history
(chaos.checker) and print the report. `--runs K` does K runs with seeds S..S+K-1, each on a
fresh cluster, and prints the totals. Exit status 0 when every run passed.

Scenarios: `smoke` (CI: 8 streams, one kill -9 mid-stream), `reset-once` and `hang-once`
(CI: the same with one reset of the edge's link to the busiest node, or one hung engine
step there), one per fault kind (`kill`,
`term`, `pause`, `raise`, `hang`, `partition`, `isolate`, `reset`, `latency`, `loss`,
`coordinator`, `edge`: faults of that kind, one after another, for the duration), and `mixed` (a
seeded draw of every kind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chaos.checker import Report, check, gap_stats, percentile, read_history
from chaos.cluster import ChaosCluster, Settings
from chaos.nemesis import KINDS, Nemesis
from chaos.workload import Workload

MODEL = "SmolLM2-135M-Instruct"
KV_FREE_TIMEOUT_S = 20.0
PROCESS_FAULTS = {"kill", "term", "raise", "hang"}  # cut short, they leave a node to restart


@dataclass(frozen=True)
class Scenario:
    kinds: tuple[str, ...]
    max_faults: int
    clients: int = 8
    requests_per_client: int = 1000
    max_tokens: tuple[int, int] = (24, 64)
    pause_s: tuple[float, float] = (1.0, 3.0)  # between a repair and the next fault
    constrained: bool = False  # half the requests under a JSON schema or a tool call


SCENARIOS = {
    # one fault 0.2-0.6 s after the first token, while all 8 streams are surely under way
    **{
        name: Scenario((kind,), 1, requests_per_client=1, max_tokens=(40, 64), pause_s=(0.2, 0.6))
        for name, kind in (("smoke", "kill"), ("reset-once", "reset"), ("hang-once", "hang"))
    },
    **{kind: Scenario((kind,), 100) for kind in KINDS},
    "mixed": Scenario(KINDS, 100),
    # the same, half the requests constrained (JSON schema, required tool call)
    "constrained": Scenario(KINDS, 100, constrained=True),
    "constrained-once": Scenario(
        ("kill",),
        1,
        requests_per_client=2,
        max_tokens=(40, 64),
        pause_s=(0.2, 0.6),
        constrained=True,
    ),
}


async def run_once(
    scenario: str, seed: int, duration_s: float, out: Path, settings: Settings
) -> Report:
    spec = SCENARIOS[scenario]
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"{scenario}-{seed}-{time.time_ns()}"
    cluster = ChaosCluster(settings, out, run_id)
    history_file = open(out / "history.jsonl", "w", buffering=1)  # noqa: SIM115
    reference_file = open(out / "reference.jsonl", "w", buffering=1)  # noqa: SIM115

    def writer(f):
        return lambda rec: f.write(json.dumps(rec) + "\n")

    record = writer(history_file)
    kv_free = None
    try:
        await cluster.start()
        workload = Workload(
            cluster.url, MODEL, seed, spec.clients, spec.requests_per_client, duration_s,
            spec.max_tokens, spec.constrained, record=record,
        )  # fmt: skip
        nemesis = Nemesis(cluster, random.Random(seed), record)
        finished = asyncio.Event()
        chaos = asyncio.create_task(workload.run())
        chaos.add_done_callback(lambda _: finished.set())
        await asyncio.sleep(0)  # workload.run sets its first_token event
        faults = asyncio.create_task(
            nemesis.run(spec.kinds, spec.max_faults, finished, workload.first_token, spec.pause_s)
        )
        await chaos
        faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults  # a fault under way is left as it is: repair below
        await _repair(cluster, nemesis)
        workload.record = writer(reference_file)
        await workload.run(only=list(workload.specs_run))
        kv_free = await _kv_free(cluster)
    finally:
        await cluster.stop()
        history_file.close()
        reference_file.close()
    report = check(
        read_history(out / "history.jsonl"), read_history(out / "reference.jsonl"), out / "logs"
    )
    report.kv_free = kv_free
    if not kv_free:
        report.violations.append("KV blocks still held after the workload ended")
    report.leftovers = cluster.leftovers()
    if report.leftovers:
        report.violations.append(f"p3 processes left after shutdown: {report.leftovers}")
    (out / "report.json").write_text(json.dumps(report.summary(), indent=1))
    return report


async def _repair(cluster: ChaosCluster, nemesis: Nemesis) -> None:
    """Undo a fault cut short by the end of the workload: heal links, wake, restart."""
    for proxy in cluster.proxies.values():
        proxy.heal()
    for i in range(cluster.settings.num_nodes):
        cluster.signal_node(i, signal.SIGCONT)
    if not cluster.edge_alive():  # killed, and the end came before it was started again
        await cluster.start_edge()
    if nemesis.acting is not None and nemesis.acting[0] in PROCESS_FAULTS:
        await cluster.restart_node(nemesis.acting[1])  # hung, or half-way through a restart
    if not await nemesis.wait_whole(15.0):
        for i in range(cluster.settings.num_nodes):
            if cluster.node_pid(i) is None:
                await cluster.restart_node(i)
        await nemesis.wait_whole()


async def _kv_free(cluster: ChaosCluster) -> bool:
    """Every node routed, nothing running, every KV block free (as its heartbeats say)."""

    def free(nodes: list[dict]) -> bool:
        loads = [n["load"] for n in nodes if "load" in n]
        return len(loads) == cluster.settings.num_nodes and all(
            load["num_running"] == load["num_waiting"] == 0
            and load["num_free_blocks"] == load["num_kv_blocks"]
            for load in loads
        )

    # heartbeats refresh the table every 100 ms
    return await cluster.wait_nodes(free, KV_FREE_TIMEOUT_S, interval_s=0.1)


def totals(reports: list[Report]) -> dict:
    gaps = [g for r in reports for g in r.fault_gaps_s]

    def by_kind(attr: str) -> dict[str, dict]:
        """A per-kind list of seconds (Report.detection_s or edge_reaction_s), in ms."""
        merged: dict[str, list[float]] = {}
        for r in reports:
            for kind, values in getattr(r, attr).items():
                merged.setdefault(kind, []).extend(values)
        return {
            k: {"n": len(v), "p50": round(percentile(v, 50) * 1000), "max": round(max(v) * 1000)}
            for k, v in merged.items()
        }

    return {
        "runs": len(reports),
        "passed": sum(r.passed for r in reports),
        "requests": sum(r.requests for r in reports),
        "ok": sum(r.ok for r in reports),
        "failed": sum(r.failed for r in reports),
        "retried_definite": sum(r.retried for r in reports),
        "tokens": sum(r.tokens for r in reports),
        "tokens_lost": sum(r.tokens_lost for r in reports),
        "tokens_repeated": sum(r.tokens_repeated for r in reports),
        "differing_from_reference": sum(r.differing for r in reports),
        "faults": sum(len(r.faults) for r in reports),
        "detection_ms": by_kind("detection_s"),
        "edge_reaction_ms": by_kind("edge_reaction_s"),
        "fault_gap_s": gap_stats(gaps),
        "token_gap_s": gap_stats([g for r in reports for g in r.gaps_s]),
        "reference_token_gap_s (prefix cache warm)": gap_stats(
            [g for r in reports for g in r.reference_gaps_s]
        ),
        "fault_gaps_by_kind_s": {
            kind: gap_stats([g for r in reports for g in r.gaps_by_kind.get(kind, [])])
            for kind in sorted({k for r in reports for k, v in r.gaps_by_kind.items() if v})
        },
        "violations": [v for r in reports for v in r.violations][:30],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="smoke", choices=sorted(SCENARIOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of workload per run")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None, help="default: /tmp/p3-chaos/SCENARIO-SEED")
    p.add_argument("--node-args", default="", help="more `p3 node` flags, one string")
    args = p.parse_args(argv)
    settings = Settings(
        num_nodes=args.nodes, dtype=args.dtype, extra_node_args=shlex.split(args.node_args)
    )
    reports = []
    for seed in range(args.seed, args.seed + args.runs):
        out = Path(args.out or "/tmp/p3-chaos") / f"{args.scenario}-{seed}"
        started = time.monotonic()
        report = asyncio.run(run_once(args.scenario, seed, args.duration, out, settings))
        reports.append(report)
        summary = report.summary()
        print(
            json.dumps(
                {
                    "seed": seed,
                    "seconds": round(time.monotonic() - started, 1),
                    "dir": str(out),
                    **summary,
                }
            ),
            flush=True,
        )
    if len(reports) > 1:
        print(json.dumps({"totals": totals(reports)}, indent=1), flush=True)
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
