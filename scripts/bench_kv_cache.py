"""The int8 KV cache against the model-dtype cache on a real model, end to end.

    python scripts/bench_kv_cache.py [--model DIR] [--dtype float32] [--quantization auto]
                                     [--threads 1] [--batch 4] [--context 1024]
                                     [--new-tokens 32]

Prints, for each --kv-cache-dtype: the blocks --kv-cache-memory buys; greedy chat answers'
agreement with the model-dtype cache (tokens before the first divergence); and the time of
a decode step of `batch` sequences `context` tokens deep (the median of new-tokens steps,
with the attention share measured by running the same steps over a 1-token context).
Not a test: figures swing on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import benchjson

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Describe a cat to someone who has never seen one.",
    "How do vaccines work?",
]


def make_llm(model, dtype, quantization, kv_cache_dtype, memory):
    from p3 import LLM

    return LLM(
        model,
        dtype=dtype,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_bytes=memory,
    )


def chat_answers(llm, new_tokens: int) -> list[list[int]]:
    from p3 import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    return [o.outputs[0].token_ids for o in outs]


def agreement(expected: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """(share of tokens before the first divergence, answers identical throughout)."""
    same, whole = 0, 0
    for a, b in zip(expected, got, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        same += n
        whole += n == len(a)
    return same / sum(map(len, expected)), whole


def decode_step_ms(llm, batch: int, context: int, steps: int) -> list[float]:
    """Wall time of each decode step of `batch` sequences at depth ~context (the median is
    printed)."""
    from p3 import SamplingParams

    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(100, 40000) for _ in range(context)] for _ in range(batch)]
    from p3.engine.sequence import Request

    for i, p in enumerate(prompts):
        engine.add(Request(f"bench-{context}-{i}", p, params))
    times = []
    while engine.has_unfinished():
        started = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - started
        if len(outs) == batch and all(len(o.new_token_ids) == 1 for o in outs):
            times.append(elapsed)
    return [1e3 * t for t in times[1:]]  # the first: the prefill's last chunk


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="auto", help="weights, as --quantization")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", default="1GiB", help="--kv-cache-memory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    benchjson.add_arguments(parser)
    return parser


def main() -> None:
    import torch

    args = build_parser().parse_args()
    report = benchjson.Report("kv_cache", args)
    torch.set_num_threads(args.threads)
    from p3.flags import parse_size
    from p3.weights.files import resolve_model

    model = resolve_model(args.model)
    memory = parse_size(args.memory)
    print(
        f"model {model.name}, {args.dtype}, weights {args.quantization}, "
        f"threads {torch.get_num_threads()}"
    )
    answers = {}
    for kv in ("auto", "int8"):
        llm = make_llm(model, args.dtype, args.quantization, kv, memory)
        answers[kv] = chat_answers(llm, args.new_tokens)
        shallow_ms = decode_step_ms(llm, args.batch, 1, args.new_tokens)
        deep_ms = decode_step_ms(llm, args.batch, args.context, args.new_tokens)
        shallow, deep = statistics.median(shallow_ms), statistics.median(deep_ms)
        where = {"kv_cache_dtype": kv, "batch": args.batch}
        report.add("kv_blocks", llm.engine.num_kv_blocks, "blocks", "higher", True, **where)
        report.add("decode_step_ms", deep_ms, "ms", "lower", context=args.context, **where)
        report.add("decode_step_ms", shallow_ms, "ms", "lower", context=1, **where)
        line = (
            f"kv_cache_dtype {kv:>4}: {llm.engine.num_kv_blocks:>6} blocks in {args.memory}; "
            f"decode step x{args.batch} at context {args.context}: {deep:.1f} ms "
            f"(at context 1: {shallow:.1f} ms)"
        )
        if kv != "auto":
            share, whole = agreement(answers["auto"], answers[kv])
            line += (
                f"; greedy chat answers: {100 * share:.0f}% of tokens before the first "
                f"divergence, {whole}/{len(QUESTIONS)} identical"
            )
            report.add("greedy_agreement", share, "share", "higher", True, kv_cache_dtype=kv)
        print(line)
        del llm
    report.write(args.json)


if __name__ == "__main__":
    main()
