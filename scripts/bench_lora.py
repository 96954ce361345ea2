"""Decode throughput with LoRA adapters batched together against the bare base, one run.

    .venv/bin/python scripts/bench_lora.py [--seqs 32] [--tokens 64] [--rank 16]

The default model (or --model), --seqs greedy streams of --tokens each: all on the base, all
on one adapter, and spread over 4 adapters (one batch mixing them); random PEFT-format
adapters on every attention and MLP projection. Prints tokens/s and the ratio to the base
(the median of --repeat runs of each case, interleaved).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import benchjson

if TYPE_CHECKING:
    from p3 import LLM

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from p3.weights.files import load_config

    hf = load_config(model_dir)
    d, inter = hf["hidden_size"], hf["intermediate_size"]
    hd = hf.get("head_dim") or d // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(hf["num_hidden_layers"]):
        for proj, (rows, cols) in shapes.items():
            mod = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{mod}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(shapes)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def run(llm: LLM, prompts, loras, tokens: int) -> float:
    from p3 import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:2], SamplingParams(max_tokens=4), lora_request=loras[:2])  # warm
    started = time.perf_counter()
    outs = llm.generate(batch, params, lora_request=loras)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    benchjson.add_arguments(p, repeat=1)
    return p


def main() -> None:
    import torch

    from p3 import LLM, LoRARequest
    from p3.weights.files import resolve_model

    args = build_parser().parse_args()
    model_dir = resolve_model(args.model)
    root = Path(tempfile.mkdtemp())
    adapters = [
        LoRARequest(f"a{i}", i + 1, str(write_adapter(model_dir, root / f"a{i}", args.rank, i)))
        for i in range(4)
    ]
    llm = LLM(model_dir, enable_lora=True, max_loras=4, max_lora_rank=args.rank)
    prompts = [[1, 9690, 198, 4093 + i, 28, 1311, 314] for i in range(args.seqs)]
    cases = {
        "base": [None] * args.seqs,
        "one_adapter": [adapters[0]] * args.seqs,
        "four_adapters_mixed": [adapters[i % 4] for i in range(args.seqs)],
    }
    samples = {case: [] for case in cases}
    for _ in range(args.repeat):  # interleaved: a slow minute of the box hits every case
        for case, loras in cases.items():
            samples[case].append(run(llm, prompts, loras, args.tokens))
    base, one, mixed = (statistics.median(samples[case]) for case in cases)
    print(f"{args.seqs} streams x {args.tokens} tokens, rank {args.rank}, threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"base              {base:8.1f} tok/s")
    print(f"one adapter       {one:8.1f} tok/s  ({one / base:.3f}x base)")
    print(f"4 adapters mixed  {mixed:8.1f} tok/s  ({mixed / base:.3f}x base)")
    report = benchjson.Report("lora", args)
    for case, rates in samples.items():
        report.add("tok_s", rates, "tok/s", "higher", case=case)
        if case != "base":
            ratios = [r / b for r, b in zip(rates, samples["base"], strict=True)]
            report.ratio("tok_s_over_base", ratios, "higher", "tok_s[case=base]", case=case)
    report.write(args.json)


if __name__ == "__main__":
    main()
