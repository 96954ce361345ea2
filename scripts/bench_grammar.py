"""What grammars cost a step: a batch of 32 decoding sequences, 0, 8 or 32 of them under a
JSON schema (structured outputs), on the default model, one engine, in one run.

    python scripts/bench_grammar.py [--batch 32] [--constrained 0,8,32] [--steps 48]

Each case starts 32 chat requests (ignore_eos; the constrained ones under a schema whose one
string must be at least 2000 characters long, so none ends early), runs until every one is
decoding, then times --steps engine steps; the cases are interleaved --rounds times. Prints
the median step time, the ratio to the first case, the time the worker thread spent computing
masks per step, and how much of it the step waited for (the rest ran while the model did).
Not a test: figures swing on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

import benchjson

if TYPE_CHECKING:
    from p3 import LLM

LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--constrained", default="0,8,32")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rounds", type=int, default=3, help="the cases interleaved, this often")
    benchjson.add_arguments(p)
    return p


def main() -> None:
    from p3 import LLM

    args = build_parser().parse_args()
    report = benchjson.Report("grammar", args)
    llm = LLM(dtype=args.dtype, kv_cache_bytes=512 * 2**20)
    engine = llm.engine
    engine.grammars.tokenizer()  # built once, outside the timings
    fills, waits = _instrument(engine)
    cases = [int(x) for x in args.constrained.split(",")]
    results: dict[int, list[tuple[float, float, float]]] = {num: [] for num in cases}
    for _ in range(args.rounds):  # interleaved: a slow minute of the box hits every case
        for num in cases:
            times, fill_s, wait_s = run_case(llm, args.batch, num, args.steps, fills, waits)
            results[num].append((statistics.median(times), fill_s, wait_s))
    baseline = statistics.median(step for step, _, _ in results[cases[0]])
    for num in cases:
        step = statistics.median(r[0] for r in results[num])
        fill_s = statistics.median(r[1] for r in results[num])
        wait_s = statistics.median(r[2] for r in results[num])
        print(
            f"batch {args.batch}, {num:2d} constrained: step {step * 1e3:6.1f} ms "
            f"(median of {args.rounds} rounds' medians; {step / baseline:.3f}x); masks "
            f"{fill_s * 1e3:5.2f} ms a step on the worker, of which the step waited "
            f"{wait_s * 1e3:5.2f} ms",
            flush=True,
        )
        where = {"batch": args.batch, "constrained": num}
        report.add("step_ms", [r[0] * 1e3 for r in results[num]], "ms", "lower", **where)
        report.add("mask_fill_ms", [r[1] * 1e3 for r in results[num]], "ms", "lower", **where)
        report.add("mask_wait_ms", [r[2] * 1e3 for r in results[num]], "ms", "lower", **where)
        ratios = [r[0] / b[0] for r, b in zip(results[num], results[cases[0]], strict=True)]
        report.ratio("step_over_first_case", ratios, "lower", "step_ms", **where)
    report.write(args.json)


def run_case(llm: LLM, batch: int, num: int, steps: int, fills: list, waits: list):
    from p3 import SamplingParams
    from p3.engine.sequence import Request
    from p3.structured import StructuredOutputsParams

    engine = llm.engine
    text = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a long story about the sea, as JSON."}], True
    )
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    so = StructuredOutputsParams(json=LONG)
    for i in range(batch):
        params = SamplingParams(
            max_tokens=steps + 64, temperature=0.8, seed=i, ignore_eos=True,
            structured_outputs=so if i < num else None,
        )  # fmt: skip
        engine.add(Request(f"{num}-{i}", prompt, params))
    while engine.num_waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()
    ):
        engine.step()
    engine.step()  # every sequence decodes from here
    fills.clear()
    waits.clear()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - started)
        assert len(outs) == batch and not any(o.finished for o in outs), "a sequence ended"
    for rid in list(engine.seqs):
        engine.cancel(rid)
    while engine.has_unfinished():
        engine.step()
    per_step = steps or 1
    return times, sum(fills) / per_step, sum(waits) / per_step


def _instrument(engine):
    """Time the worker's mask fills and the step's wait for them."""
    grammars, runner = engine.grammars, engine.runner
    fills: list[float] = []
    waits: list[float] = []
    fill = grammars._fill

    def timed_fill(matchers):
        started = time.perf_counter()
        try:
            return fill(matchers)
        finally:
            fills.append(time.perf_counter() - started)

    grammars._fill = timed_fill
    finish = runner.finish

    def timed_finish(launched):
        if launched.masks is not None:
            started = time.perf_counter()
            launched.masks.result()
            waits.append(time.perf_counter() - started)
        return finish(launched)

    runner.finish = timed_finish
    return fills, waits


if __name__ == "__main__":
    main()
