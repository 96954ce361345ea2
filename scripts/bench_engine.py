"""Offline engine throughput: p3 against transformers `generate`, side by side in one run.

    python scripts/bench_engine.py [--prompts 32] [--new-tokens 64] [--hf-batches 8,16,32]

Prints p3's throughput on N chat prompts x M new tokens against transformers at its best static
batch size, batch-1 decode speed of both, p3's load time from the converted cache, and decode
speed as a share of the memory-bandwidth ceiling. Not a test: figures swing ±30% on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
MEMORY_BANDWIDTH_BYTES_S = 33e9  # two cores, ../shared/MACHINE.md


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 32]}])
        for i in range(n)
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def bench_p3(model_dir, prompts, new_tokens) -> dict:
    from p3 import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model_dir, dtype="bfloat16")
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
        "batch1_tok_s": p3_batch1_decode(llm, prompts[0], new_tokens * 2),
        "text0": outs[0].outputs[0].text,
    }


def p3_batch1_decode(llm, prompt, new_tokens) -> float:
    from p3 import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(3):
        stamps = []
        for _text in llm.stream({"prompt_token_ids": prompt}, params):
            stamps.append(time.perf_counter())
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def bench_hf(model_dir, prompts, new_tokens, batch_sizes) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    results = {}
    for bs in batch_sizes:
        started = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), bs):
            generated += hf_generate(model, prompts[i : i + bs], new_tokens)
        results[bs] = generated / (time.perf_counter() - started)
    return {"by_batch": results, "batch1_tok_s": hf_batch1_decode(model, prompts[0], new_tokens)}


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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


def bandwidth_ceiling_tok_s(model_dir) -> float:
    from p3.config import ModelConfig
    from p3.weights import load_config

    cfg = ModelConfig.from_hf(load_config(model_dir))
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = d * (cfg.num_heads * cfg.head_dim) * 2 + d * kv * 2 + 3 * d * i
    weight_bytes = 2 * (cfg.num_layers * per_layer + v * d)  # bf16, the head read once
    return MEMORY_BANDWIDTH_BYTES_S / weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batches", default="8,16,32")
    args = parser.parse_args()
    from p3.tokenizer import Tokenizer
    from p3.weights import resolve_model

    model_dir = resolve_model(args.model)
    prompts = chat_prompt_ids(Tokenizer.from_dir(model_dir), args.prompts)
    print(
        f"model {model_dir.name}, bf16, {args.prompts} chat prompts "
        f"(mean {statistics.mean(map(len, prompts)):.0f} tokens) x {args.new_tokens} new tokens, "
        f"torch threads {torch.get_num_threads()}"
    )
    p3 = bench_p3(model_dir, prompts, args.new_tokens)
    hf = bench_hf(model_dir, prompts, args.new_tokens, [int(b) for b in args.hf_batches.split(",")])
    best_bs, best = max(hf["by_batch"].items(), key=lambda kv: kv[1])
    ceiling = bandwidth_ceiling_tok_s(model_dir)
    print(f"p3 load from cache        {p3['load_s']:.3f} s   (target < 0.5 s)")
    for bs, tok_s in hf["by_batch"].items():
        print(f"transformers batch {bs:<3}    {tok_s:8.1f} tok/s")
    print(
        f"p3 continuous batching    {p3['tok_s']:8.1f} tok/s   "
        f"= {p3['tok_s'] / best:.2f}x transformers' best (batch {best_bs}; target >= 2x)"
    )
    print(
        f"batch-1 decode            p3 {p3['batch1_tok_s']:.1f} tok/s, transformers "
        f"{hf['batch1_tok_s']:.1f} tok/s = {p3['batch1_tok_s'] / hf['batch1_tok_s']:.2f}x "
        "(target >= 1.3x)"
    )
    print(
        f"bf16 weight-bandwidth ceiling at batch 1: {ceiling:.0f} tok/s; p3 reaches "
        f"{100 * p3['batch1_tok_s'] / ceiling:.0f}%"
    )
    print(f"sample: {p3['text0'][:80]!r}")


if __name__ == "__main__":
    main()
