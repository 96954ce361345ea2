"""How evenly the edge spreads work: 4 replicas, skewed requests at a fixed arrival rate.

    python scripts/bench_router.py [--replicas 4] [--requests 400] [--rate 40] [--seed 0]

Starts `p3 serve --nodes N` on a tiny random model with the default model's tokenizer (built
in a temporary directory), sends `requests` completions at `rate` per second (evenly spaced,
not waiting for answers) whose prompt and output lengths are drawn from skewed (log-normal)
distributions, then reads every replica's tokens processed (prompt and output tokens run
through its model) from GET /cluster. Prints the tokens per replica and their coefficient of
variation (stdev / mean). Target: under 5%.

Not a test: the spread depends on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchjson  # noqa: E402

SERVING = "p3 serving "


def start(model_dir: Path, replicas: int) -> tuple[subprocess.Popen, str]:
    args = ["serve", "--model", str(model_dir), "--nodes", str(replicas), "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "p3", *args, "--threads", "1"], stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith(SERVING):
            return proc, line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")
    raise RuntimeError("p3 serve exited before it was ready")


async def processed(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(url + "/cluster") as r:
        nodes = (await r.json())["nodes"]
    return {n["id"]: n["load"]["num_tokens_processed"] for n in nodes if "load" in n}


def skewed(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(0, sigma) * median)))


async def run(args: argparse.Namespace, url: str, model: str) -> float:
    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):
        prompt_len = skewed(rng, 24, 1.0, 2, 300)  # + outputs: within the tiny model's 512
        jobs.append(
            ([rng.randrange(100, 40000) for _ in range(prompt_len)], skewed(rng, 24, 1.0, 1, 200))
        )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        while len(await processed(session, url)) < args.replicas:
            await asyncio.sleep(0.1)
        before = await processed(session, url)

        async def one(prompt: list[int], max_tokens: int) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as r:
                out = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {out}")
                return out["usage"]["total_tokens"]

        started = time.perf_counter()
        tasks = []
        for i, (prompt, max_tokens) in enumerate(jobs):
            await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(prompt, max_tokens)))
        billed = sum(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
        await asyncio.sleep(1.0)  # a few heartbeats: every replica's last count reaches the table
        after = await processed(session, url)
    tokens = {node: after[node] - before.get(node, 0) for node in sorted(after)}
    mean = statistics.mean(tokens.values())
    cv = statistics.pstdev(tokens.values()) / mean if mean else float("nan")
    print(f"{args.requests} requests at {args.rate}/s over {args.replicas} replicas, {wall:.1f} s")
    print("prompt lengths: median 24, log-normal sigma 1, 2..300; outputs: median 24, 1..200")
    for node, n in tokens.items():
        print(f"  {node}: {n} tokens ({n / mean:.3f} of the mean)")
    print(f"tokens billed {billed}, processed {sum(tokens.values())}")
    print(f"coefficient of variation: {cv:.2%} (target < 5%)")
    return cv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=0)
    benchjson.add_arguments(parser, repeat=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from p3.weights.files import ensure_default_model
    from tests.model.tiny import make_tiny_chat_model  # the tests' tiny models

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_chat_model(Path(tmp), ensure_default_model())
        proc, url = start(model_dir, args.replicas)
        try:  # each repeat on the same cluster: the counts are differences
            cvs = [asyncio.run(run(args, url, model_dir.name)) for _ in range(args.repeat)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report = benchjson.Report("router", args)
    report.add("tokens_cv", cvs, "share", "lower", replicas=args.replicas)
    report.write(args.json)


if __name__ == "__main__":
    main()
