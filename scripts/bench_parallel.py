"""Decode step time of the default model at tp=1, tp=2 and pp=2, and the communication share.

    python scripts/bench_parallel.py [--batch 1 16] [--steps 40] [--prompt-len 64]

Each layout runs as real processes joined by gloo over loopback (this script started again
with --rank), each rank with cores / ranks torch threads. The leader adds `batch` requests,
lets prefill finish, then times `steps` decode-only steps and the tokens they yield (with
pp=2 a step launches one micro-batch, half the sequences, and finishes the other half); the
leader reports the seconds it spent inside collectives and send/recv (waiting for a slower
peer included). A second part
times the raw messages the layouts use: an all-reduce of one decode step's hidden state,
and a send/recv of the activations one stage passes on, at several sizes.

Not a test. On one 2-core host tp and pp cannot win: the ranks split the same two cores and
every message crosses loopback through gloo; docs/parallel.md extrapolates these figures to
hosts joined by 10 and 100 Gbit/s links.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import benchjson

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def run_rank(args: argparse.Namespace) -> None:
    import torch

    from p3.config import EngineConfig
    from p3.engine.engine import Engine
    from p3.engine.parallel import comm_seconds, host_rendezvous, init_shard
    from p3.engine.sequence import Request
    from p3.sampling_params import SamplingParams

    tp, pp = LAYOUTS[args.layout]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.rank == 0:
        store = host_rendezvous("127.0.0.1", tp * pp) if tp * pp > 1 else None
        print(json.dumps({"port": store.port if store else 0}), flush=True)
        shard = init_shard(0, tp, pp, device, store=store)
    else:
        shard = init_shard(args.rank, tp, pp, device, address=("127.0.0.1", args.port))
    engine = Engine(None, EngineConfig(num_threads=args.threads, kv_cache_bytes=512 << 20), shard)
    if args.rank != 0:
        engine.runner.follow()
        report = {"comm_s": dict(comm_seconds), "rank": args.rank}
        print(json.dumps(report), flush=True)
        from p3.engine.stages import close_shard

        close_shard(shard)
        return
    results = {}
    for batch in args.batch:
        params = SamplingParams(max_tokens=args.steps + 8, ignore_eos=True, temperature=0)
        for i in range(batch):
            prompt = [(7 * i + j) % 4000 + 100 for j in range(args.prompt_len)]
            engine.add(Request(f"{batch}-{i}", prompt, params))
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()) or (
            engine._inbox
        ):
            engine.step()  # prefill (and the first decode steps of early finishers)
        for _ in range(3):
            engine.step()  # warm
        before = dict(comm_seconds)
        times = []
        num_tokens = 0
        for _ in range(args.steps):
            started = time.perf_counter()
            num_tokens += sum(len(out.new_token_ids) for out in engine.step())
            times.append(time.perf_counter() - started)
        comm = {k: v - before.get(k, 0.0) for k, v in comm_seconds.items()}
        while engine.has_unfinished():
            engine.step()
        results[batch] = {
            "step_s": statistics.median(times),
            "step_samples_s": times,
            "total_s": sum(times),
            "tok_s": num_tokens / sum(times),
            "comm": comm,
        }
    engine.close()
    print(json.dumps({"results": results, "rank": 0}), flush=True)


def run_layout(layout: str, args: argparse.Namespace) -> list[dict]:
    tp, pp = LAYOUTS[layout]
    ranks = tp * pp
    threads = max(1, (os.cpu_count() or 2) // ranks)
    base = [sys.executable, __file__, "--layout", layout, "--threads", str(threads)]
    base += ["--steps", str(args.steps), "--prompt-len", str(args.prompt_len), "--batch"]
    base += [str(b) for b in args.batch]
    leader = subprocess.Popen([*base, "--rank", "0"], stdout=subprocess.PIPE, text=True)
    port = json.loads(leader.stdout.readline())["port"]
    others = [
        subprocess.Popen(
            [*base, "--rank", str(r), "--port", str(port)], stdout=subprocess.PIPE, text=True
        )
        for r in range(1, ranks)
    ]
    reports = [json.loads(leader.stdout.readline())]
    reports += [json.loads(p.stdout.readline()) for p in others]
    for proc in [leader, *others]:
        proc.wait(timeout=120)
    return reports


def comm_micro(args: argparse.Namespace) -> None:
    """Two ranks: all-reduce latency and send/recv latency at decode-step sizes."""
    import torch
    import torch.distributed as dist

    from p3.engine.parallel import host_rendezvous

    torch.set_num_threads(1)
    if args.rank == 0:
        store = host_rendezvous("127.0.0.1", 2)
        print(json.dumps({"port": store.port}), flush=True)
    else:
        store = dist.TCPStore("127.0.0.1", args.port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=2)
    out = {}
    for rows in (1, 16, 64, 256):
        x = torch.zeros(rows, 576, dtype=torch.bfloat16)
        both = torch.zeros(2, rows, 576, dtype=torch.bfloat16)
        reduce_s, p2p_s = [], []
        for _ in range(200):
            started = time.perf_counter()
            dist.all_reduce(x)
            reduce_s.append(time.perf_counter() - started)
        for _ in range(200):
            dist.barrier()
            started = time.perf_counter()
            if args.rank == 0:
                dist.send(both, dst=1)
                dist.recv(both, src=1)
            else:
                dist.recv(both, src=0)
                dist.send(both, dst=0)
            p2p_s.append((time.perf_counter() - started) / 2)
        out[rows] = {
            "bytes": x.numel() * 2,
            "all_reduce_us": statistics.median(reduce_s) * 1e6,
            "all_reduce_p99_us": sorted(reduce_s)[int(0.99 * len(reduce_s))] * 1e6,
            "send_recv_us": statistics.median(p2p_s) * 1e6,
            "all_reduce_samples_us": [t * 1e6 for t in reduce_s],
            "send_recv_samples_us": [t * 1e6 for t in p2p_s],
        }
    if args.rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def run_micro() -> dict:
    base = [sys.executable, __file__, "--layout", "comm"]
    leader = subprocess.Popen([*base, "--rank", "0"], stdout=subprocess.PIPE, text=True)
    port = json.loads(leader.stdout.readline())["port"]
    other = subprocess.Popen([*base, "--rank", "1", "--port", str(port)])
    out = json.loads(leader.stdout.readline())
    leader.wait(timeout=120)
    other.wait(timeout=120)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    benchjson.add_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.rank is not None:
        return comm_micro(args) if args.layout == "comm" else run_rank(args)
    print("decode step, default model (SmolLM2-135M, bf16), median over", args.steps, "steps")
    print(
        f"{'layout':>6} {'batch':>5} {'step ms':>8} {'tok/s':>7} {'vs tp1':>7} "
        "comm ms/step on the leader (share of its time)"
    )
    report = benchjson.Report("parallel", args)
    reference = {}
    for layout in LAYOUTS:
        reports = run_layout(layout, args)
        leader = next(r for r in reports if r["rank"] == 0)
        for batch, res in leader["results"].items():
            step_ms = res["step_s"] * 1000
            reference.setdefault(batch, res["tok_s"])
            per_step = {k: v / args.steps * 1000 for k, v in res["comm"].items()}
            share = sum(res["comm"].values()) / res["total_s"] if res["total_s"] else 0.0
            kinds = " ".join(f"{k} {v:.2f}" for k, v in sorted(per_step.items())) or "-"
            print(
                f"{layout:>6} {batch:>5} {step_ms:>8.2f} {res['tok_s']:>7.1f} "
                f"{res['tok_s'] / reference[batch]:>6.2f}x {kinds} ({share:.0%})"
            )
            where = {"layout": layout, "batch": batch}
            step_samples_ms = [t * 1000 for t in res["step_samples_s"]]
            report.add("decode_step_ms", step_samples_ms, "ms", "lower", **where)
            report.add("tok_s", res["tok_s"], "tok/s", "higher", **where)
            report.add("comm_share", share, "share", "lower", **where)
            report.ratio("tok_s_over_tp1", res["tok_s"] / reference[batch], "higher",
                         "tok_s[layout=tp1]", **where)  # fmt: skip
    print("\nraw gloo messages between two processes on this host (loopback), median over 200")
    print(f"{'rows':>5} {'bytes':>8} {'all-reduce us':>14} {'p99':>8} {'send/recv us':>13}")
    for rows, r in run_micro().items():
        print(
            f"{rows:>5} {r['bytes']:>8} {r['all_reduce_us']:>14.0f} {r['all_reduce_p99_us']:>8.0f} "
            f"{r['send_recv_us']:>13.0f}"
        )
        report.add("all_reduce_us", r["all_reduce_samples_us"], "us", "lower", rows=rows)
        report.add("send_recv_us", r["send_recv_samples_us"], "us", "lower", rows=rows)
    report.write(args.json)


if __name__ == "__main__":
    main()
