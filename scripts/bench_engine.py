"""Offline engine speed: p3 (default flags) beside llama.cpp and transformers, in one run.

    python scripts/bench_engine.py [--llama-bench PATH] [--prompts 32] [--new-tokens 64]
                                   [--hf-batches 8,16,32] [--quantization auto] [--dtype auto]

Prints p3's batch-1 decode beside llama-bench's tg64 on the same GGUF (when given the binary,
e.g. ../shared/tools/llama.cpp/bin/llama-bench) and p3's prefill beside its pp128; p3's
throughput on N chat prompts x M new tokens against transformers at its best static batch
(in the dtype p3's --dtype auto picks here); p3's load time from the converted cache; and
decode as a share of the weight-bandwidth ceiling. Not a test: figures swing on 2 cores.
With --json PATH, batch-1 decode and prefill keep their 3 samples each; the throughput runs
measure once (a second pass would find its prompts in the prefix cache): pool several runs'
files in scripts/compare_bench.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import benchjson

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Name three prime numbers.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Hamlet?",
    "What is gravity?",
    "Describe a cat to someone who has never seen one.",
    "List the planets of the solar system.",
    "What is the boiling point of water?",
    "How do vaccines work?",
    "Tell me a short joke.",
    "What is machine learning?",
    "Summarise the plot of Cinderella.",
    "What is a black hole?",
    "How many legs does a spider have?",
    "Suggest a name for a pet goldfish.",
    "What is the largest ocean?",
    "Explain what a noun is.",
    "Why do leaves change colour?",
    "What is the speed of light?",
    "Write a limerick about a programmer.",
    "What are the primary colours?",
    "How does a rainbow form?",
    "What is democracy?",
    "Give two tips for better sleep.",
    "What is the tallest mountain?",
    "What is an atom?",
]
MEMORY_BANDWIDTH_BYTES_S = 25e9  # two cores of the AVX2 EPYC this was written on (measured)


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 32]}])
        for i in range(n)
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def bench_p3(model_dir, prompts, new_tokens, args) -> dict:
    from p3 import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model_dir, dtype=args.dtype, quantization=args.quantization)
    load_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # warm up on an unrelated prompt: the measured prompts find nothing in the prefix cache
    llm.generate([{"prompt_token_ids": [1, 9690, 198]}], SamplingParams(max_tokens=4))
    started = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "load_s": load_s,
        "tok_s": generated / elapsed,
        "elapsed_s": elapsed,
        "batch1_samples": p3_batch1_decode(llm, prompts[0], new_tokens * 2),
        "prefill_samples": p3_prefill(llm),
        "text0": outs[0].outputs[0].text,
        "weight_bytes": weight_bytes(llm.engine.runner.model),
    }


def p3_prefill(llm, length: int = 128) -> list[float]:
    """A fresh 128-token prompt (nothing in the prefix cache) to its first token, as pp128;
    3 rates (the median is printed)."""
    from p3 import SamplingParams

    rates = []
    for r in range(3):
        ids = [(7919 * (i + 1000 * r)) % 40000 + 100 for i in range(length)]
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1))
        rates.append(length / (time.perf_counter() - started))
    return rates


def weight_bytes(model) -> int:
    """Bytes a batch-1 token reads: every linear and the head (the embedding row is noise)."""
    from p3.engine.layers import Linear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, Linear):
            weight = module.quant if module.quant is not None else module.weight
            if weight is None:
                weight = module.packed
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            total += (
                weight.nbytes if hasattr(weight, "kind") else weight.numel() * weight.element_size()
            )
    return total


def p3_batch1_decode(llm, prompt, new_tokens) -> list[float]:
    from p3 import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(3):
        stamps = []
        for _text in llm.stream({"prompt_token_ids": prompt}, params):
            stamps.append(time.perf_counter())
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates


def bench_hf(source, prompts, new_tokens, batch_sizes, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    if source.suffix == ".gguf":  # transformers dequantizes it itself
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model = model.eval()
    results = {}
    for bs in batch_sizes:
        started = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), bs):
            generated += hf_generate(model, prompts[i : i + bs], new_tokens)
        results[bs] = generated / (time.perf_counter() - started)
    return {"by_batch": results, "batch1_tok_s": hf_batch1_decode(model, prompts[0], new_tokens)}


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> int:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return (out.shape[1] - width) * len(prompts)


def hf_batch1_decode(model, prompt, new_tokens) -> float:
    def timed(n: int) -> float:
        started = time.perf_counter()
        hf_generate(model, [prompt], n)
        return time.perf_counter() - started

    timed(4)
    one = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(new_tokens) for _ in range(3))
    return (new_tokens - 1) / (full - one)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: the embedded GGUF")
    parser.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batches", default="8,16,32")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="auto")
    benchjson.add_arguments(parser)
    return parser


def main() -> None:
    import torch

    args = build_parser().parse_args()
    from p3.config import resolve_dtype
    from p3.kernels.dispatch import kernel_report
    from p3.tokenizer import Tokenizer
    from p3.weights.files import default_gguf_path, resolve_model

    model_dir = resolve_model(args.model)
    gguf = default_gguf_path() if args.model is None else Path(args.model)
    prompts = chat_prompt_ids(Tokenizer.from_dir(model_dir), args.prompts)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    threads = torch.get_num_threads()
    report = kernel_report("cpu")
    print(f"machine: {report['cpu']['model']}, isa {report['cpu']['isa']}, {threads} threads")
    print(
        f"model {model_dir.name}: p3 --dtype {args.dtype} ({dtype}) --quantization "
        f"{args.quantization}; {args.prompts} chat prompts (mean "
        f"{statistics.mean(map(len, prompts)):.0f} tokens) x {args.new_tokens} new tokens"
    )
    llama = None
    if args.llama_bench and gguf.suffix == ".gguf":
        sys.path.insert(0, str(Path(__file__).parent))
        from llama_cpp import llama_bench

        llama = llama_bench(args.llama_bench, gguf, threads)
    p3 = bench_p3(model_dir, prompts, args.new_tokens, args)
    p3["batch1_tok_s"] = statistics.median(p3["batch1_samples"])
    p3["prefill_tok_s"] = statistics.median(p3["prefill_samples"])
    batches = [int(b) for b in args.hf_batches.split(",")]
    hf = bench_hf(
        gguf if gguf.suffix == ".gguf" else model_dir, prompts, args.new_tokens, batches, dtype
    )
    best_bs, best = max(hf["by_batch"].items(), key=lambda kv: kv[1])
    ceiling = MEMORY_BANDWIDTH_BYTES_S / p3["weight_bytes"]
    print(f"p3 load from cache        {p3['load_s']:.3f} s")
    if llama:
        print(
            f"batch-1 decode            p3 {p3['batch1_tok_s']:.1f} tok/s, llama.cpp tg64 "
            f"{llama['tg']:.1f} tok/s = {p3['batch1_tok_s'] / llama['tg']:.2f}x (target >= 1.0x)"
        )
        print(
            f"prefill 128 tokens        p3 {p3['prefill_tok_s']:.1f} tok/s, llama.cpp pp128 "
            f"{llama['pp']:.1f} tok/s = {p3['prefill_tok_s'] / llama['pp']:.2f}x"
        )
    for bs, tok_s in hf["by_batch"].items():
        print(f"transformers batch {bs:<3}    {tok_s:8.1f} tok/s ({dtype})")
    print(
        f"p3 continuous batching    {p3['tok_s']:8.1f} tok/s   "
        f"= {p3['tok_s'] / best:.2f}x transformers' best (batch {best_bs}; target >= 3x)"
    )
    print(
        f"batch-1 decode            p3 {p3['batch1_tok_s']:.1f} tok/s, transformers "
        f"{hf['batch1_tok_s']:.1f} tok/s = {p3['batch1_tok_s'] / hf['batch1_tok_s']:.2f}x"
    )
    print(
        f"weight-bandwidth ceiling at batch 1 ({p3['weight_bytes'] / 1e6:.0f} MB a token at "
        f"{MEMORY_BANDWIDTH_BYTES_S / 1e9:.0f} GB/s): {ceiling:.0f} tok/s; p3 reaches "
        f"{100 * p3['batch1_tok_s'] / ceiling:.0f}%"
    )
    print(f"sample: {p3['text0'][:80]!r}")
    report = benchjson.Report("engine", args)
    report.add("p3_load_s", p3["load_s"], "s", "lower")
    report.add("p3_batch1_decode_tok_s", p3["batch1_samples"], "tok/s", "higher")
    report.add("p3_prefill128_tok_s", p3["prefill_samples"], "tok/s", "higher")
    report.add("p3_throughput_tok_s", p3["tok_s"], "tok/s", "higher")
    for bs, tok_s in hf["by_batch"].items():
        report.add("hf_throughput_tok_s", tok_s, "tok/s", "higher", batch=bs)
    report.add("hf_batch1_decode_tok_s", hf["batch1_tok_s"], "tok/s", "higher")
    report.ratio("p3_over_hf_best", p3["tok_s"] / best, "higher", "hf_throughput_tok_s")
    report.ratio("p3_over_hf_batch1", [r / hf["batch1_tok_s"] for r in p3["batch1_samples"]],
                 "higher", "hf_batch1_decode_tok_s")  # fmt: skip
    report.ratio("p3_batch1_over_ceiling", [r / ceiling for r in p3["batch1_samples"]], "higher",
                 "weight-bandwidth ceiling")  # fmt: skip
    if llama:
        report.add("llama_tg_tok_s", llama["tg"], "tok/s", "higher")
        report.add("llama_pp_tok_s", llama["pp"], "tok/s", "higher")
        report.ratio("p3_over_llama_tg", [r / llama["tg"] for r in p3["batch1_samples"]],
                     "higher", "llama_tg_tok_s")  # fmt: skip
        report.ratio("p3_over_llama_pp", [r / llama["pp"] for r in p3["prefill_samples"]],
                     "higher", "llama_pp_tok_s")  # fmt: skip
    report.write(args.json)


if __name__ == "__main__":
    main()
