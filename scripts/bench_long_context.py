"""Perplexity of a long text under --sliding-window W --attention-sinks S (StreamingLLM)
against the baselines, side by side in one run:

    .venv/bin/python scripts/bench_long_context.py [--window 512] [--sinks 4] [--tokens 8192]

- streaming: each token predicted from what p3's streaming engine shows the model
  (p3.engine.sequence.window_view: the first S tokens and the latest W//2 .. W), at the
  view's own positions;
- window, no sinks: the same with S = 0 (StreamingLLM's "window attention");
- truncating: the text cut into pieces of W tokens, each piece predicted from its own start
  (a context that restarts: what a server that refuses or truncates long prompts leaves);
- dense: the whole prefix, as far as the model's context goes (the best any bounded cache
  can hope for).

Every prediction is a prompt logprob of p3 itself (one prefill per view, batch-invariant:
the same numbers decoding gives). The text: --text FILE, default the licence texts of
/usr/share/common-licenses (English prose, ~40k tokens), else docs/*.md.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import benchjson

if TYPE_CHECKING:
    from p3 import LLM


def default_text() -> str:
    licences = sorted(Path("/usr/share/common-licenses").glob("*"))
    files = [p for p in licences if p.is_file()] or sorted(Path("docs").glob("*.md"))
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def scored(llm: LLM, requests: list[tuple[list[int], int]]) -> list[float]:
    """Negative log-likelihoods of each prompt's tokens from index `first` on."""
    from p3 import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params)
    nll = []
    for (ids, first), out in zip(requests, outs, strict=True):
        entries = out.prompt_logprobs  # [None, {token: Logprob}, ...], one per prompt token
        for j in range(max(first, 1), len(ids)):
            nll.append(-entries[j][ids[j]].logprob)
    return nll


def windowed(tokens: list[int], sinks: int, window: int, start_at: int) -> list[tuple]:
    """One request per run of targets that share a view: its prompt is the view then the
    run's tokens; scored from the run's first target."""
    from p3.engine.sequence import window_view

    requests, i = [], start_at
    while i < len(tokens):
        view = window_view(i, sinks, window)
        j = i + 1
        while j < len(tokens) and window_view(j, sinks, window) == view:
            j += 1
        context = tokens[:i] if view is None else tokens[: view[0]] + tokens[view[1] : i]
        requests.append((context + tokens[i:j], len(context)))
        i = j
    return requests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--text", type=Path, default=None)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192, help="of the text, at most")
    benchjson.add_arguments(p)
    return p


def main() -> None:
    from p3 import LLM

    args = build_parser().parse_args()
    report = benchjson.Report("long_context", args)  # perplexities: exact, batch-invariant
    llm = LLM(args.model, dtype="float32", kv_cache_bytes=2 * 2**30)
    text = args.text.read_text() if args.text else default_text()
    tokens = llm.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    w = args.window
    first = w  # score every token past the first window, so all methods see the same targets
    dense_limit = llm.engine.max_model_len - 1
    runs = {
        f"streaming (S={args.sinks}, W={w})": windowed(tokens, args.sinks, w, first),
        f"window, no sinks (W={w})": windowed(tokens, 0, w, first),
        f"truncating (pieces of {w})": [
            (tokens[s : s + w], 1 if s >= first else first - s) for s in range(0, len(tokens), w)
        ],
        f"dense (up to {dense_limit})": [(tokens[:dense_limit], first)],
    }
    print(f"{len(tokens)} tokens, targets from {first}; model context {dense_limit + 1}")
    base = None
    for name, requests in runs.items():
        started = time.perf_counter()
        nll = scored(llm, requests)
        ppl = math.exp(sum(nll) / len(nll))
        base = base or ppl
        took = time.perf_counter() - started
        print(f"{name:32s} ppl {ppl:8.3f}  ({ppl / base:.3f}x streaming)  {len(nll)} targets, "
              f"{took:.1f} s")  # fmt: skip
        method = name.split(" (")[0]
        report.add("perplexity", ppl, "ppl", "lower", True, method=method)
        report.ratio("perplexity_over_streaming", ppl / base, "lower", "perplexity", True,
                     method=method)  # fmt: skip
        report.add("seconds", took, "s", "lower", method=method)
    report.write(args.json)


if __name__ == "__main__":
    main()
