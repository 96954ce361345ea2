"""Paged decode attention: C++ kernel vs torch fallback, microseconds per call (best round).

python scripts/bench_attention.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from p3.kernels import attention, build


def make_case(batch, context, heads=9, kv_heads=3, head_dim=64, block_size=16):
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks).view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16)
    return q, k_cache, v_cache, tables, lens, head_dim**-0.5


def time_us(fn, args, rounds=5, round_s=0.1):
    """Best of a few rounds: the machine is shared, so the minimum is the honest figure."""
    fn(*args)
    best = float("inf")
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < round_s:
            fn(*args)
            calls += 1
        best = min(best, elapsed / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    torch.set_num_threads(parser.parse_args().threads)
    started = time.perf_counter()
    kernels = build.load()
    print(f"kernel load/build: {time.perf_counter() - started:.1f} s ({build.extension_name()})")
    print(f"threads {torch.get_num_threads()}; bf16, 9 heads / 3 kv heads, hd 64, block 16")
    print(f"{'batch':>5} {'context':>7} {'c++ us':>9} {'torch us':>9} {'speed-up':>8} {'GB/s':>6}")
    with torch.inference_mode():
        for batch in (1, 32):
            for context in (128, 1024):
                args = make_case(batch, context)
                cpp = time_us(kernels.paged_decode, args)
                ref = time_us(attention.paged_decode_attention_torch, args)
                kv_bytes = 2 * args[1][0, 0].numel() * 2 * context * batch
                print(
                    f"{batch:>5} {context:>7} {cpp:>9.1f} {ref:>9.1f} {ref / cpp:>7.1f}x"
                    f" {kv_bytes / cpp / 1e3:>6.1f}"
                )


if __name__ == "__main__":
    main()
