"""Serving benchmark: concurrent streaming clients through REST (the edge) and the native client.

    python scripts/bench_serve.py [--clients 1 8 32 64] [--max-tokens 64] [--nodes 1]
                                  [--llama-server PATH]

Starts `p3 coordinator`, N `p3 node` and `p3 edge` on ephemeral ports (or uses --coordinator
and --url), then for each concurrency runs that many streaming requests at once, first over
HTTP/SSE, then with p3.client over ZeroMQ. Prints total tokens/s, TTFT and inter-token
p50/p99, and the edge's overhead: REST TTFT minus native-client TTFT at the same load (the
cluster without HTTP), and REST TTFT minus an in-process engine's TTFT on the same requests.
The edge also times itself (p3:edge_overhead_seconds: request in to Submit out, first
token frame in to its SSE event out); its bucket bounds are printed per concurrency.
With --llama-server (llama.cpp's binary, e.g. ../shared/tools/llama.cpp/bin/llama-server),
the same streaming requests then go to llama-server on the same GGUF with 32 slots (-np 32,
started after p3's cluster is stopped) and the ratios are printed.
Not a test: numbers swing on a busy host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp
import benchjson

from p3.client import Client
from p3.nodes.actor.launch import READY_MARKER
from p3.protocol.security import generate
from p3.sampling_params import SamplingParams
from p3.weights.files import DEFAULT_MODEL


@dataclass
class Run:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    num_tokens: int = 0
    wall_s: float = 0.0
    round_tok_s: list[float] = field(default_factory=list)  # the samples of tokens/s

    def arrived(self, started: float, last: float) -> float:
        """Text arrived: a TTFT if it is the first, else an inter-token gap. Returns now."""
        now = time.perf_counter()
        if last == started:
            self.ttft_s.append(now - started)
        else:
            self.itl_s.append(now - last)
        return now


def spawn(*args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "p3", *args], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(READY_MARKER):
            return proc, json.loads(line[len(READY_MARKER) :])
    raise RuntimeError(f"p3 {args[0]} exited before it was ready")


def start_cluster(
    num_nodes: int, threads: int | None, keys: str
) -> tuple[list[subprocess.Popen], str, str]:
    """Keyed as in production: each member its own CurveZMQ key (client-0 for the client)."""
    generate(keys, [f"bench-{i}" for i in range(num_nodes)], ["edge-0", "client-0"])
    keyed = ["--keys", keys]
    coord, info = spawn("coordinator", "--bind", "tcp://127.0.0.1:0", *keyed)
    procs = [coord]
    node_args = ["--threads", str(threads)] if threads else []
    for i in range(num_nodes):
        node, _ = spawn(
            "node", "--coordinator", info["address"], "--node-id", f"bench-{i}", *node_args, *keyed
        )
        procs.append(node)
    edge, edge_info = spawn("edge", "--coordinator", info["address"], "--port", "0", *keyed)
    procs.append(edge)
    return procs, info["address"], edge_info["url"]


def prompt(i: int) -> str:
    return f"Request {i}: write a long story about a lighthouse keeper."


async def rest_one(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, run: Run):
    body = {
        "model": DEFAULT_MODEL,
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    started = last = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            last = run.arrived(started, last)
    run.num_tokens += max_tokens  # ignore_eos: every request makes exactly max_tokens


async def native_one(client: Client, i: int, max_tokens: int, run: Run) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    started = last = time.perf_counter()
    async for delta in client.stream(prompt(i), params):
        run.num_tokens += len(delta.token_ids)  # held-back tokens are generated all the same
        if delta.text:  # timing as over SSE: a step whose text is held back sends nothing
            last = run.arrived(started, last)


async def bench(
    kind: str, url: str, client: Client, clients: int, args, force_close: bool = False
) -> Run:
    """`rounds` rounds of `clients` concurrent requests; the client is connected beforehand.
    force_close: a connection per request (llama-server drops kept-alive ones after a stream)."""
    run = Run()
    connector = aiohttp.TCPConnector(limit=0, force_close=force_close)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(args.rounds):
            started, tokens_before = time.perf_counter(), run.num_tokens
            if kind == "rest":
                jobs = [rest_one(session, url, i, args.max_tokens, run) for i in range(clients)]
            else:
                jobs = [native_one(client, i, args.max_tokens, run) for i in range(clients)]
            await asyncio.gather(*jobs)
            wall_s = time.perf_counter() - started
            run.wall_s += wall_s
            run.round_tok_s.append((run.num_tokens - tokens_before) / wall_s)
    return run


async def overhead_buckets(session: aiohttp.ClientSession, url: str) -> dict[str, list]:
    """The edge's own-time histogram from /metrics: {leg: [(upper bound s, cumulative count)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as response:
        text = await response.text()
    legs: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "p3:edge_overhead_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                legs.setdefault(sample.labels["leg"], []).append((bound, sample.value))
    return legs


def bucket_quantile(before: list, after: list, q: float) -> str:
    """The bucket bound under which a share q of this run's observations fell (in ms)."""
    counts = [(bound, n - n0) for (bound, n), (_, n0) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0
    for bound, n in counts:
        if total and n >= q * total:
            return "<=" + (f"{bound * 1000:g}" if bound != float("inf") else "inf")
    return "n/a"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def main_async(args: argparse.Namespace) -> None:
    report = benchjson.Report("serve", args)
    procs: list[subprocess.Popen] = []
    url, coordinator, keys = args.url, args.coordinator, args.keys
    if url is None:
        keys = tempfile.mkdtemp(prefix="p3-bench-keys-")
        procs, coordinator, url = start_cluster(args.nodes, args.node_threads, keys)
    try:
        async with Client(coordinator, keys=keys) as client:
            p3_rates = await bench_all(args, url, client, report)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            proc.wait(timeout=30)
    if args.llama_server:
        await bench_llama_server(args, p3_rates, report)
    report.write(args.json)


async def bench_llama_server(args: argparse.Namespace, p3_rates: dict, report) -> None:
    """The same REST load against llama-server -np 32 on the default GGUF."""
    import os

    from p3.nodes.actor.launch import free_port
    from p3.weights.files import default_gguf_path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llama_cpp import llama_server

    threads = args.node_threads or os.cpu_count() or 1
    port = free_port("127.0.0.1")
    server = llama_server(args.llama_server, default_gguf_path(), port, 32, threads)
    url = f"http://127.0.0.1:{port}"
    try:
        warm_up = argparse.Namespace(rounds=1, max_tokens=4)
        await bench("rest", url, None, 2, warm_up, force_close=True)
        print(f"{'clients':>7} {'llama-server tok/s':>19} {'p3 tok/s':>9} {'p3 / llama':>10}")
        for clients in args.clients:
            run = await bench("rest", url, None, clients, args, force_close=True)
            theirs = run.num_tokens / run.wall_s
            ours = p3_rates.get(clients, float("nan"))
            print(f"{clients:>7} {theirs:>19.1f} {ours:>9.1f} {ours / theirs:>9.2f}x")
            report.add("tok_s", run.round_tok_s, "tok/s", "higher", path="llama", clients=clients)
            report.ratio("p3_over_llama", ours / theirs, "higher", "tok_s[path=llama]",
                         clients=clients)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)


def engine_ttft(llm, clients: int, args) -> list[float]:
    """TTFT of the same requests on an engine in this process (no sockets, no HTTP): what the
    edge's overhead is measured against. The cluster's node idles meanwhile. Timed, like the
    other paths, to the first token that has text (a leading special token has none)."""
    from p3.engine.sequence import Request
    from p3.tokenizer import OutputText

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    ttft: list[float] = []
    for r in range(args.rounds):
        started = time.perf_counter()
        texts: dict[str, OutputText] = {}
        for i in range(clients):
            ids = llm.tokenizer.encode(prompt(i))
            texts[f"{r}-{i}"] = OutputText(llm.tokenizer, ids, params)
            llm.engine.add(Request(f"{r}-{i}", ids, params))
        while llm.engine.has_unfinished():
            for out in llm.engine.step():
                text = texts.get(out.request_id)
                if text is not None and out.new_token_ids:
                    last = out.finish_reason is not None
                    if text.push(out.new_token_ids, 0, last)[0] or last:
                        ttft.append(time.perf_counter() - started)
                        del texts[out.request_id]
    return ttft


async def bench_all(args: argparse.Namespace, url: str, client: Client, report) -> dict:
    """Every concurrency over REST and the native client; returns REST tokens/s by clients."""
    from p3.llm import LLM

    llm = LLM()  # the same default model and flags, for the in-process reference
    rates: dict[int, float] = {}
    warm_up = argparse.Namespace(rounds=1, max_tokens=4)
    engine_ttft(llm, 2, warm_up)
    await bench("rest", url, client, 2, warm_up)
    await bench("native", url, client, 2, warm_up)
    print(
        f"{'clients':>7} {'path':>6} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'itl p50':>8} {'itl p99':>8}   (ms)"
    )
    for clients in args.clients:
        runs = {}
        async with aiohttp.ClientSession() as session:
            before = await overhead_buckets(session, url)
        for kind in ("rest", "native"):
            run = runs[kind] = await bench(kind, url, client, clients, args)
            if kind == "rest":
                rates[clients] = run.num_tokens / run.wall_s
            print(
                f"{clients:>7} {kind:>6} {run.num_tokens / run.wall_s:>8.1f} "
                f"{pct(run.ttft_s, 0.5):>9.1f} {pct(run.ttft_s, 0.99):>9.1f} "
                f"{pct(run.itl_s, 0.5):>8.2f} {pct(run.itl_s, 0.99):>8.2f}"
            )
            where = {"path": kind, "clients": clients}
            report.add("tok_s", run.round_tok_s, "tok/s", "higher", **where)
            report.add("ttft_ms", [t * 1000 for t in run.ttft_s], "ms", "lower", **where)
            report.add("itl_p50_ms", pct(run.itl_s, 0.5), "ms", "lower", **where)
            report.add("itl_p99_ms", pct(run.itl_s, 0.99), "ms", "lower", **where)
        async with aiohttp.ClientSession() as session:
            after = await overhead_buckets(session, url)
        own = ", ".join(
            f"{leg} p50 {bucket_quantile(before[leg], after[leg], 0.5)} "
            f"p99 {bucket_quantile(before[leg], after[leg], 0.99)}"
            for leg in sorted(after)
        )
        print(f"{'':>7} the edge's own time (its /metrics, ms): {own}")
        in_process = engine_ttft(llm, clients, args)
        report.add("ttft_ms", [t * 1000 for t in in_process], "ms", "lower", path="engine",
                   clients=clients)  # fmt: skip
        print(
            f"{clients:>7} {'engine':>6} {'':>8} {pct(in_process, 0.5):>9.1f} "
            f"{pct(in_process, 0.99):>9.1f}   (in this process, no sockets)"
        )
        for kind, reference in (("rest", runs["native"].ttft_s), ("engine", in_process)):
            overhead = [pct(runs["rest"].ttft_s, q) - pct(reference, q) for q in (0.5, 0.99)]
            print(
                f"{'':>7} TTFT overhead, REST - {'native' if kind == 'rest' else 'engine'}: "
                f"p50 {overhead[0]:.2f} ms, p99 {overhead[1]:.2f} ms"
            )
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-threads", type=int, default=None, help="torch threads per node")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and path")
    parser.add_argument("--url", default=None, help="an edge already running")
    parser.add_argument("--coordinator", default=None, help="its coordinator (with --url)")
    parser.add_argument("--llama-server", default=None, help="llama.cpp's binary, to compare")
    parser.add_argument("--keys", default=None, help="with --url: the cluster's key directory")
    benchjson.add_arguments(parser)
    return parser


def main() -> None:
    asyncio.run(main_async(build_parser().parse_args()))


if __name__ == "__main__":
    main()
