"""Paged decode attention, microseconds per call (best round): the C++ kernel over a cache in
the model dtype and over an int8 cache, and the torch fallback over the former.

python scripts/bench_attention.py [--threads N] [--dtype float32|bfloat16] [--isa CAP]
                                  [--float-avx2] [--batches 1,32] [--contexts 128,512,1024]

GB/s is the K/V bytes a call reads (values, and an int8 cache's scales) over its time.
--float-avx2 runs the model-dtype cache on the AVX2 path too (int8 takes it by default).
"""

from __future__ import annotations

import argparse
import time

import benchjson


def make_case(batch, context, heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=None):
    import torch

    dtype = dtype or torch.bfloat16
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype)
    v_cache = torch.randn(shape, dtype=dtype)
    tables = torch.randperm(num_blocks).view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, lens, head_dim**-0.5


def quantized(case):
    """The same case over an int8 cache: (args, k_scale, v_scale)."""
    from p3.kernels import attention

    q, k_cache, v_cache, tables, lens, scale = case
    k8, k_scale = attention.quantize_kv(k_cache)
    v8, v_scale = attention.quantize_kv(v_cache)
    return (q, k8, v8, tables, lens, scale), k_scale, v_scale


def time_us(fn, args, rounds=5, round_s=0.1) -> list[float]:
    """Each round's microseconds a call; the best is printed: the machine is shared, so the
    minimum is the honest figure."""
    fn(*args)
    times = []
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < round_s:
            fn(*args)
            calls += 1
        times.append(elapsed / calls * 1e6)
    return times


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--isa", default="", help="cap: portable, avx2, avx512 (default: best)")
    parser.add_argument("--float-avx2", action="store_true", help="AVX2 for the fp cache too")
    parser.add_argument("--batches", type=ints, default=[1, 32])
    parser.add_argument("--contexts", type=ints, default=[128, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    benchjson.add_arguments(parser)
    return parser


def main() -> None:
    import torch

    from p3.kernels import attention, build

    args = build_parser().parse_args()
    report = benchjson.Report("attention", args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    kernels = build.load()
    print(f"kernel load/build: {time.perf_counter() - started:.1f} s ({build.extension_name()})")
    print(
        f"threads {torch.get_num_threads()}; {args.dtype} q, 9 heads / 3 kv heads, hd 64, "
        f"block 16; kernel isa {kernels.decode_isa(64, args.isa, False, args.float_avx2)}, "
        f"int8 {kernels.decode_isa(64, args.isa, True)}"
    )
    print(
        f"{'batch':>5} {'context':>7} {'c++ us':>9} {'GB/s':>5} {'int8 us':>9} {'GB/s':>5}"
        f" {'int8/dt':>7} {'torch us':>9}"
    )

    def cpp(*a):
        return kernels.paged_decode(*a, isa=args.isa, float_avx2=args.float_avx2)

    with torch.inference_mode():
        for batch in args.batches:
            for context in args.contexts:
                case = make_case(batch, context, dtype=dtype)
                q8, k_scale, v_scale = quantized(case)

                def cpp8(*a, ks=k_scale, vs=v_scale):
                    return kernels.paged_decode(*a, k_scale=ks, v_scale=vs, isa=args.isa)

                full_s = time_us(cpp, case, args.rounds)
                int8_s = time_us(cpp8, q8, args.rounds)
                ref_s = time_us(attention.paged_decode_attention_torch, case, args.rounds)
                full, int8, ref = min(full_s), min(int8_s), min(ref_s)
                where = {"batch": batch, "context": context}
                report.add("cpp_us", full_s, "us", "lower", **where)
                report.add("int8_us", int8_s, "us", "lower", **where)
                report.add("torch_us", ref_s, "us", "lower", **where)
                ratios = [i / f for i, f in zip(int8_s, full_s, strict=True)]  # round by round
                report.ratio("int8_over_cpp", ratios, "lower", "cpp_us", **where)
                rows = 2 * case[1][0, 0].shape[0] * context * batch  # K and V rows, per kv head
                full_bytes = rows * case[1].shape[-1] * case[1].element_size()
                int8_bytes = rows * (case[1].shape[-1] + 4)
                print(
                    f"{batch:>5} {context:>7} {full:>9.1f} {full_bytes / full / 1e3:>5.1f}"
                    f" {int8:>9.1f} {int8_bytes / int8 / 1e3:>5.1f} {int8 / full:>7.2f}"
                    f" {ref:>9.1f}"
                )
    report.write(args.json)


if __name__ == "__main__":
    main()
