"""The move pause: kill -9 a node mid-stream and measure how long the streams it held wait.

    python scripts/bench_move_pause.py [--nodes 2] [--clients 8] [--kills 10]
        [--modes serial+lend,serial] [--dtype auto] [--max-num-batched-tokens N] [--threads T]

Starts a real cluster the way `p3 serve --nodes N` does (a coordinator and N node processes,
each with cores/N torch threads, CurveZMQ keys made for the run, the default model and
flags), and streams from this process through p3.client's Cluster and Generation, the code
the HTTP edge runs for failover (so the bench knows which node each stream is on).
`--clients` streams run at once, each going through the chaos workload's seeded requests
(chaos.workload.make_spec: 20-250 token prompts, 24-64 tokens, half greedy, 15% n=2, 20%
stopping at "."), one after another. Once every node is routed and the streams are under
way (2-3.5 s after the previous kill's streams ended), a node is SIGKILLed and at once
started again, as p3 serve's supervisor does.

For every stream the killed node held (a sample whose tokens had started), the pause is the
longest gap between two of its tokens that ends after the kill: from its last token from the
dead node to its first from the replica it moved to (detection, then the re-prefill of its
prompt and tokens so far there). The streams of the other nodes are measured the same way
up to the moment the last moved stream resumed, and so is the time to first token of the
requests that arrived meanwhile. Printed per mode: n, p50, p99, max (seconds), the moved
context a kill left to re-prefill (prompt + outputs so far, tokens), and the moves' spread.

Modes set the nodes' $P3_BENCH_MOVE_SCHEDULE, a benchmark switch of p3/engine/scheduler.py:
`serial` (the default: decodes, then moved streams one after another, then fresh prompts),
`queue` (moved streams queue ahead of fresh prompts and are batched with them, as before),
`fifo` (arrival order). A mode with `+lend` also starts its node with `--max-threads`
(the cores), as p3 serve does: while its peer is down, the survivor computes with the dead
one's threads too (p3/nodes/coordinator/threads.py). Two modes (two nodes) run side by
side in one cluster: node-0 runs the first, node-1 the second, and the kills alternate,
so each kill measures the survivor's mode and a busy machine weighs on both alike. One
mode: every node runs it, and each kill takes the node holding the most streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchjson  # noqa: E402

from chaos.workload import make_spec  # noqa: E402
from p3.client import Client  # noqa: E402
from p3.engine.scheduler import MOVE_SCHEDULE_ENV, MOVE_SCHEDULES  # noqa: E402  (torch-free)
from p3.log import setup_logging  # noqa: E402
from p3.nodes.actor.launch import Child, python_m_p3, stop_all, wait_ready  # noqa: E402
from p3.nodes.cluster.generation import Generation, RequestFailed  # noqa: E402
from p3.nodes.cluster.samples import Sample, make_samples  # noqa: E402
from p3.outputs import prompt_ids  # noqa: E402
from p3.protocol.security import generate  # noqa: E402
from p3.sampling_params import SamplingParams  # noqa: E402
from p3.serve import threads_per_node  # noqa: E402

CLIENT = "client-0"
LEND = "+lend"  # a mode's node may grow into a dead peer's threads
RESTART_AFTER_S = 0.2  # p3 serve's supervisor polls its children this often
RETRY_PAUSE_S = 0.5  # after a failed request, as chaos's clients wait


@dataclass
class Stream:
    sample: Sample
    started: float
    times: list[float] = field(default_factory=list)  # when each Delta with tokens came

    def longest_gap(self, after: float, before: float = float("inf")) -> tuple[float, float]:
        """(length, end) of the longest pause between two tokens that ends after `after` and
        starts before `before`; (0, after) if there is none."""
        gaps = [(b - a, b) for a, b in itertools.pairwise(self.times) if b > after and a < before]
        return max(gaps, default=(0.0, after))


@dataclass
class Kill:
    mode: str  # the survivors'
    moved: list[float]  # each moved stream's pause
    stayed: list[float]  # the longest pause of each stream on the other nodes meanwhile
    fresh_ttft: list[float]  # first token of requests that arrived during the moves
    moved_context: int  # prompt + outputs so far of the moved streams, in tokens
    moved_to: dict[str, list[int]]  # replica -> [streams, their tokens to prefill again]
    failed: int  # requests that failed meanwhile (a survivor falsely declared dead, say)


class BenchCluster:
    """A coordinator and N nodes, launched as p3 serve launches them; node i runs
    modes[i % len(modes)]."""

    def __init__(self, args: argparse.Namespace, modes: list[str], workdir: Path):
        self.workdir = workdir
        self.restart_after_s = args.restart_after
        names = [f"node-{i}" for i in range(args.nodes)]
        self.modes = {name: modes[i % len(modes)] for i, name in enumerate(names)}
        self.keys = str(generate(workdir / "keys", names, [CLIENT]))
        self.logs: list = []
        common = ["--log-level", "warning"]
        self.coordinator = self._child(
            "coordinator",
            python_m_p3(*common, "coordinator", "--bind", "tcp://127.0.0.1:0", "--keys",
                        self.keys, "--lend-threads-after", str(args.lend_after)),
        )  # fmt: skip
        wait_ready([self.coordinator], 120)
        self.address = self.coordinator.info["address"]
        threads = args.threads or threads_per_node(args.nodes)
        engine = ["--dtype", args.dtype]
        if args.max_num_batched_tokens:
            engine += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        node = [*common, "node", "--coordinator", self.address, "--threads", str(threads),
                "--keys", self.keys, *engine]  # fmt: skip
        lend = ["--max-threads", str(len(os.sched_getaffinity(0)))]
        self.nodes = [
            self._child(name, python_m_p3(*node, "--node-id", name,
                                          *(lend if self.modes[name].endswith(LEND) else [])))
            for name in names
        ]  # fmt: skip
        wait_ready(self.nodes, 300)

    def _child(self, name: str, argv: list[str]) -> Child:
        log = open(self.workdir / f"{name}.log", "a", buffering=1)  # noqa: SIM115
        self.logs.append(log)
        schedule = self.modes.get(name, "").removesuffix(LEND)
        env = {MOVE_SCHEDULE_ENV: schedule} if schedule else {}
        return Child(name, argv, env=env, output=log)

    def kill_and_restart(self, i: int) -> None:
        """SIGKILL node i; start it again once it is gone, as p3 serve's supervisor does."""
        node = self.nodes[i]
        os.kill(node.pid, signal.SIGKILL)
        node.proc.wait()
        time.sleep(self.restart_after_s)
        self.nodes[i] = self._child(node.name, node.argv)

    def stop(self) -> None:
        stop_all([*reversed(self.nodes), self.coordinator], timeout_s=20)
        for log in self.logs:
            log.close()


class Load:
    """`clients` request loops on one Client, recording every stream's token times."""

    def __init__(self, client: Client, model: str, seed: int, clients: int):
        self.client, self.model, self.seed = client, model, seed
        self.streams: list[Stream] = []
        self.failed = 0
        self.stopping = False
        self._ids = itertools.count()
        self.tasks = [asyncio.create_task(self._loop(c)) for c in range(clients)]

    async def _loop(self, c: int) -> None:
        tokenizer = await self.client.models.tokenizer(self.model)
        for k in itertools.count():
            if self.stopping:
                return
            spec = make_spec(self.seed, c, k, (24, 64))
            params = SamplingParams(
                n=spec.n, max_tokens=spec.max_tokens, temperature=spec.temperature,
                seed=spec.seed, stop=(spec.stop,) if spec.stop else (),
                ignore_eos=spec.stop is None,
            )  # fmt: skip
            _, ids = prompt_ids(tokenizer, spec.prompt)
            rid = f"{self.client.cluster.edge_id}-{next(self._ids)}"
            samples = make_samples(rid, self.model, [ids], params, tokenizer)
            now = time.perf_counter()
            streams = [Stream(s, now) for s in samples]
            generation = Generation(self.client.cluster, samples, 60.0)
            try:
                await generation.start()
                self.streams += streams
                async with contextlib.aclosing(generation.stream()) as deltas:
                    async for delta in deltas:
                        if delta.token_ids:
                            streams[delta.index].times.append(time.perf_counter())
            except RequestFailed:
                self.failed += 1  # no replica (both down), or it failed mid-stream
                await asyncio.sleep(RETRY_PAUSE_S)

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def wait_routed(client: Client, nodes: list[Child], timeout_s: float = 300.0) -> None:
    """Until every node is routed as its current process."""
    deadline = time.monotonic() + timeout_s
    while True:
        routes = client.cluster.routes
        if all(n.name in routes and routes[n.name].pid == n.pid for n in nodes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster is not whole again")
        await asyncio.sleep(0.05)


async def one_kill(cluster: BenchCluster, load: Load, rng: random.Random, victim: int | None
                   ) -> Kill:  # fmt: skip
    """Kill node `victim` (None: the one holding the most streams) once all are routed and
    streams are under way; measure until every stream it held has ended."""
    await wait_routed(load.client, cluster.nodes)
    await asyncio.sleep(rng.uniform(2.0, 3.5))  # every stream under way, none just started
    on: dict[str, list[Stream]] = {}
    for stream in load.streams:
        if stream.times and not stream.sample.finished:
            on.setdefault(stream.sample.journal.node_id or "", []).append(stream)
    if victim is None:
        victim = max(range(len(cluster.nodes)), key=lambda i: len(on.get(f"node-{i}", [])))
    name = f"node-{victim}"
    moved = on.get(name, [])
    stayed = [s for node, streams in on.items() if node != name for s in streams]
    had = [s.sample.num_prompt_tokens + s.sample.num_output_tokens for s in moved]
    failed_before = load.failed
    killed_at = time.perf_counter()
    await asyncio.to_thread(cluster.kill_and_restart, victim)
    deadline = killed_at + 120
    while time.perf_counter() < deadline and not all(s.sample.finished for s in moved):
        await asyncio.sleep(0.05)
    # tokens the dead node had sent may still come in after the kill: its longest gap after
    # the kill is the move's, and it ends with the first token from the new replica
    gaps = [s.longest_gap(killed_at) for s in moved]
    resumed = max([killed_at, *(end for _, end in gaps)])
    survivors = {m for node, m in cluster.modes.items() if node != name}
    return Kill(
        mode="/".join(sorted(survivors)),
        moved=[length for length, _ in gaps],
        stayed=[s.longest_gap(killed_at, resumed)[0] for s in stayed],
        fresh_ttft=[
            s.times[0] - s.started
            for s in load.streams
            if killed_at <= s.started <= resumed and s.times
        ],
        moved_context=sum(had),
        moved_to=_spread(moved, had),
        failed=load.failed - failed_before,
    )


async def run(args: argparse.Namespace, modes: list[str]) -> list[Kill]:
    with tempfile.TemporaryDirectory(prefix="p3-move-pause-") as tmp:
        cluster = await asyncio.to_thread(BenchCluster, args, modes, Path(tmp))
        try:
            async with Client(cluster.address, keys=cluster.keys, name=CLIENT) as client:
                await wait_routed(client, cluster.nodes)
                model = sorted({r.model for r in client.cluster.routes.values()})[0]
                load = Load(client, model, args.seed, args.clients)
                rng = random.Random(args.seed)
                kills = []
                try:
                    for k in range(args.kills):
                        # two modes: kill node-1 (node-0's mode survives), then node-0, ...
                        victim = (1 - k % 2) if len(modes) == 2 else None
                        kill = await one_kill(cluster, load, rng, victim)
                        kills.append(kill)
                        print(f"  {kill.mode} survives: moved {len(kill.moved)} streams "
                              f"({kill.moved_context} tokens) to {kill.moved_to}; pauses "
                              f"{_fmt(sorted(kill.moved))}"
                              + (f"; {kill.failed} requests failed" if kill.failed else ""),
                              flush=True)  # fmt: skip
                finally:
                    await load.stop()
                if load.failed:
                    print(f"  {load.failed} requests failed", flush=True)
                return kills
        finally:
            await asyncio.to_thread(cluster.stop)


def _spread(moved: list[Stream], had: list[int]) -> dict[str, list[int]]:
    """Where the moved streams went: replica -> [streams, tokens they had at the kill]."""
    out: dict[str, list[int]] = {}
    for stream, num_tokens in zip(moved, had, strict=True):
        entry = out.setdefault(stream.sample.journal.node_id or "", [0, 0])
        entry[0] += 1
        entry[1] += num_tokens
    return out


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def stats(values: list[float]) -> dict:
    """n, p50, p99, max (nearest rank), in seconds."""
    if not values:
        return {"n": 0}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, round(q / 100 * len(v) + 0.5) - 1))], 3)

    return {"n": len(v), "p50": rank(50), "p99": rank(99), "max": round(v[-1], 3)}


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "unknown")  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {' '.join(isa) or 'no avx2'}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--modes", default="serial+lend,serial",
                   help=f"one or two of {MOVE_SCHEDULES}, each with {LEND} or not")  # fmt: skip
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="per node (default: cores/N)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: p3's")
    p.add_argument("--restart-after", type=float, default=RESTART_AFTER_S,
                   help="s from a kill to the restart (p3 serve: at once)")  # fmt: skip
    p.add_argument("--lend-after", type=float, default=0.0,
                   help="s a node is dead before +lend nodes take its threads (p3's default: 10)")
    p.add_argument("--seed", type=int, default=0)
    benchjson.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging("error")  # the moves' warnings: the pauses are what we print
    modes = args.modes.split(",")
    if unknown := {m.removesuffix(LEND) for m in modes} - set(MOVE_SCHEDULES):
        p.error(f"unknown modes {sorted(unknown)}")
    if len(modes) > 2 or (len(modes) == 2 and args.nodes != 2):
        p.error("two modes side by side take two nodes; one mode, any number")
    print(f"machine: {machine()}; {args.nodes} nodes, {args.clients} clients, dtype "
          f"{args.dtype}, load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    kills = asyncio.run(run(args, modes))
    summary = {}
    report = benchjson.Report("move_pause", args)
    for mode in sorted({k.mode for k in kills}):
        mine = [k for k in kills if k.mode == mode]
        samples = {
            "moved_pause_s": [g for k in mine for g in k.moved],
            "stayed_pause_s": [g for k in mine for g in k.stayed],
            "fresh_ttft_during_moves_s": [g for k in mine for g in k.fresh_ttft],
        }
        summary[mode] = {"kills": len(mine), **{what: stats(v) for what, v in samples.items()}}
        summary[mode]["moved_context_tokens_per_kill"] = stats([k.moved_context for k in mine])
        for what, values in samples.items():
            if values:  # every pause, one sample each: their median and spread are the figure
                report.add(what, values, "s", "lower", mode=mode)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for mode, s in summary.items():
        print(f"{mode} (survivor's schedule):")
        for what, figures in s.items():
            print(f"  {what:32} {figures}")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
