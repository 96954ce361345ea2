"""Quality of p3's quantized configurations against the unquantized fp32 reference.

    python scripts/eval_quality.py [--model M] [--configs as-stored,q8_0,...] [--tokens 100000]
        [--context 512] [--chunk 128] [--corpus DIR_OR_FILE] [--json PATH]

For each test configuration: perplexity on an offline English corpus, its rise over the
reference's, the mean per-token KL(ref || test) over the full vocabulary and the top-1
(argmax) agreement with the reference. The default corpus is the reStructuredText sources of
the Python 3.11 documentation as Debian ships them (apt-get install python3.11-doc): files in
sorted order, concatenated, tokenized with the model's tokenizer and cut into windows of
--context tokens, each scored on its --context - 1 next-token predictions.

Every window goes through the engine's real paged KV cache and attention: a first step of one
token (a decode step), then prefill chunks of --chunk tokens that attend to everything before
them through the cache. So every query reads its keys and values back from the cache (on the
CPU p3 does that for every token anyway; off it, a sequence's first prefill chunk attends to
its fresh K/V, which the one-token step keeps out of the way), and an int8 KV cache is really
measured. Not a test; on 2 cores the
default 100k tokens take about 15 min per configuration on one thread, --tokens 4000 about
40 s (the model, and the float64 log-softmax over the vocabulary for every row).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
CORPUS_GLOB = "*.rst.txt"
CORPUS_INSTALL = "apt-get update && apt-get install -y python3.11-doc"

# name -> keyword arguments of p3.LLM besides the model
REFERENCE = "reference"
CONFIGS: dict[str, dict[str, Any]] = {
    REFERENCE: {"dtype": "float32", "quantization": "none"},
    "as-stored": {"dtype": "float32"},  # quantization="auto": the checkpoint's blocks as stored
    "q8_0": {"dtype": "float32", "quantization": "q8_0"},
    "q4_0": {"dtype": "float32", "quantization": "q4_0"},
    "q4_1": {"dtype": "float32", "quantization": "q4_1"},
    "int8-kv": {"dtype": "float32", "quantization": "none", "kv_cache_dtype": "int8"},
}
TEST_CONFIGS = [name for name in CONFIGS if name != REFERENCE]


# -- pure helpers (tests/unit/test_eval_quality.py) -----------------------------------------


def corpus_files(path: Path, pattern: str = CORPUS_GLOB) -> list[Path]:
    """A file, or every file under a directory matching pattern, in sorted relative-path order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files = [p for p in path.rglob(pattern) if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def read_corpus(files: list[Path], min_chars: int | None = None) -> str:
    """The files concatenated (one newline between them), stopping after the file that brings
    the text to min_chars (None: all of them)."""
    parts: list[str] = []
    size = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text) + 1
        if min_chars is not None and size >= min_chars:
            break
    return "\n".join(parts)


def windows(ids: list[int], context: int, num_scored: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `context` tokens; a window of n tokens scores
    n - 1 predictions, and the last one is cut so that num_scored are scored in all (fewer if
    ids run out)."""
    if context < 2:
        raise ValueError("a window needs at least 2 tokens")
    out: list[list[int]] = []
    left = num_scored
    for start in range(0, len(ids) - 1, context):
        if left <= 0:
            break
        window = ids[start : start + min(context, left + 1)]
        if len(window) < 2:
            break
        out.append(window)
        left -= len(window) - 1
    return out


def chunk_bounds(n: int, chunk: int, lead: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each step over a window of n tokens: the first `lead` tokens alone
    (0: none), then chunks of `chunk`."""
    if chunk < 1:
        raise ValueError("chunk must be positive")
    bounds = [(0, min(lead, n))] if lead > 0 else []
    start = bounds[-1][1] if bounds else 0
    while start < n:
        bounds.append((start, min(start + chunk, n)))
        start = bounds[-1][1]
    return bounds


@dataclass
class Stats:
    """Running sums over scored positions of one configuration against the reference."""

    nll: float = 0.0  # sum of -log p_test(next token)
    kl: float = 0.0  # sum of KL(p_ref || p_test)
    agree: int = 0  # positions where argmax p_test == argmax p_ref
    count: int = 0
    seconds: float = 0.0  # in the model (forward passes), not in these metrics

    def update(self, ref_logprobs, test_logprobs, targets) -> None:
        """ref_logprobs, test_logprobs: float64 log-softmaxes [N, V]; targets: [N] next ids."""
        nll = -test_logprobs.gather(1, targets[:, None]).squeeze(1)
        kl = (ref_logprobs.exp() * (ref_logprobs - test_logprobs)).sum(dim=-1)
        self.nll += float(nll.sum())
        self.kl += float(kl.sum())
        self.agree += int((ref_logprobs.argmax(-1) == test_logprobs.argmax(-1)).sum())
        self.count += len(targets)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl / self.count if self.count else math.nan

    @property
    def top1(self) -> float:
        return 100.0 * self.agree / self.count if self.count else math.nan


@dataclass
class Row:
    config: str
    ppl: float
    ppl_rise_pct: float
    mean_kl: float
    top1_pct: float
    tokens: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)


def result_rows(stats: dict[str, Stats], options: dict[str, dict[str, Any]]) -> list[Row]:
    ref_ppl = stats[REFERENCE].ppl
    return [
        Row(
            name,
            s.ppl,
            100.0 * (s.ppl / ref_ppl - 1.0),
            s.mean_kl,
            s.top1,
            s.count,
            s.seconds,
            options.get(name, {}),
        )
        for name, s in stats.items()
    ]


def format_table(rows: list[Row]) -> str:
    head = f"{'config':<10} {'ppl':>9} {'ppl rise':>9} {'mean KL':>10} {'top-1':>8} "
    head += f"{'tokens':>7} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.config:<10} {r.ppl:>9.4f} {r.ppl_rise_pct:>+8.2f}% {r.mean_kl:>10.6f} "
            f"{r.top1_pct:>7.2f}% {r.tokens:>7d} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)


def parse_configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {', '.join(TEST_CONFIGS)}")
    return [c for c in dict.fromkeys(names) if c != REFERENCE]


# -- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def kernel_choice() -> dict[str, str] | None:
    try:
        from p3.kernels import quant
    except ImportError:
        return None
    choice = getattr(quant, "kernel_choice", None)
    return choice() if choice is not None else None


def kernel_report() -> dict[str, Any] | None:
    """p3.kernels.dispatch.kernel_report() where this p3 has it: every op's kernel."""
    try:
        from p3.kernels import dispatch
    except ImportError:
        return None
    report = getattr(dispatch, "kernel_report", None)
    return report() if report is not None else None


# -- full-vocabulary logits from the engine ----------------------------------------------------


class WindowScorer:
    """One LLM's engine, run over a window step by step, giving [n, V] logits for every row.

    p3 has no public call for all of a prompt's logits (prompt_logprobs gives the top k), so
    this reaches into the engine the way Engine.step does, minus the scheduler: a Sequence
    with blocks from the engine's BlockManager, ModelRunner.plan for the packed batch and
    its attention metadata (slots, block tables, cached lengths), the plan's logits_indices
    widened to every row, and ModelRunner.forward, which runs the model through the paged KV
    cache and attention and returns those rows' logits.
    """

    def __init__(self, llm: Any):
        import msgspec

        from p3.engine.scheduler import ScheduledBatch
        from p3.engine.sequence import Request, Sequence
        from p3.sampling_params import SamplingParams

        self._replace = msgspec.structs.replace
        self._batch, self._request, self._sequence = ScheduledBatch, Request, Sequence
        self._params = SamplingParams(max_tokens=1)
        self.engine = llm.engine
        self.seconds = 0.0
        self._n = 0

    def logits(self, ids: list[int], bounds: list[tuple[int, int]]) -> Iterator[Any]:
        """Each step's logits [end - start, V] (float32), in order; the KV blocks are
        given back when the generator ends or is closed."""
        engine = self.engine
        runner, bm = engine.runner, engine.block_manager
        self._n += 1
        seq = self._sequence(
            self._request(f"eval-{self._n}", list(ids), self._params), engine.config.block_size, 0
        )
        try:
            for start, end in bounds:
                started = time.perf_counter()
                num_new = end - start
                assert seq.num_computed_tokens == start
                if not bm.can_allocate(bm.blocks_needed(seq, num_new)):
                    raise RuntimeError("the KV cache cannot hold a window: raise kv_cache_bytes")
                bm.allocate(seq, num_new)
                batch = self._batch()
                batch.add(seq, num_new)
                plan, _, _ = runner.plan(batch)
                plan = self._replace(plan, logits_indices=list(range(num_new)))
                logits = runner.forward(plan)
                seq.num_computed_tokens += num_new
                self.seconds += time.perf_counter() - started
                yield logits
        finally:
            bm.free_sequence(seq)


def kv_cache_bytes(model_dir: Path, context: int, block_size: int = 16) -> int:
    """Enough KV cache for one window at 4 bytes an element (plus slack): a small cache, so
    that several engines side by side do not each fault in the default 2 GiB as blocks
    cycle through the free list."""
    from p3.config import ModelConfig
    from p3.weights.files import load_config

    cfg = ModelConfig.from_hf(load_config(model_dir))
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    return per_token * (context + 4 * block_size)


def load(
    name: str, model: str | None, extra: dict[str, Any], say: Callable[[str], None]
) -> Any | None:
    """The configuration's LLM, or None (said why) where this p3 does not take its options."""
    from p3.llm import LLM

    options = CONFIGS[name]
    try:
        return LLM(model, **options, **extra)
    except TypeError as e:
        say(f"skipped: {name} (not supported by this p3)")
        say(f"  LLM(model, {_kwargs(options)}): {e}")
    except (ValueError, NotImplementedError) as e:
        say(f"skipped: {name} ({e})")
    return None


def _kwargs(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: p3's default)")
    ap.add_argument("--configs", default=",".join(TEST_CONFIGS), help="comma list")
    ap.add_argument("--tokens", type=int, default=100_000, help="next-token predictions scored")
    ap.add_argument("--context", type=int, default=512, help="tokens per window")
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk, through the KV cache")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a file or a directory")
    ap.add_argument("--glob", default=CORPUS_GLOB, help="files taken from a corpus directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        ap.error(str(e))
    if args.context < 2 or args.chunk < 1 or args.tokens < 1:
        ap.error("--context must be at least 2, --chunk and --tokens positive")

    files = corpus_files(args.corpus, args.glob)
    if not files:
        print(
            f"no corpus at {args.corpus} (no {args.glob} files). The default corpus is Debian's "
            f"python3.11-doc; install it with:\n    {CORPUS_INSTALL}\n"
            f"or pass --corpus DIR_OR_FILE (a directory is searched for --glob {args.glob!r})",
            file=sys.stderr,
        )
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from p3.weights.files import resolve_model

    model_dir = resolve_model(args.model)
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s)")
    choice = kernel_choice()
    print(f"kernels: {choice if choice is not None else 'p3.kernels.quant.kernel_choice: none'}")
    report = kernel_report()
    if report is not None:
        print(f"         {report}")
    print(f"model:   {args.model or 'default'} ({model_dir})")

    extra = {
        "num_threads": args.threads,
        "enable_prefix_caching": False,
        "kv_cache_bytes": kv_cache_bytes(model_dir, args.context),
    }
    notes: list[str] = []

    def say(text: str) -> None:
        print(text)
        notes.append(text)

    llms: dict[str, Any] = {}
    started = time.perf_counter()
    ref = load(REFERENCE, args.model, extra, say)
    options = {REFERENCE: CONFIGS[REFERENCE]}
    if ref is None:  # a p3 without the option loads every GGUF dequantized: that is the reference
        options[REFERENCE] = {"dtype": "float32"}
        say("reference: LLM(model, dtype='float32') instead (this p3 dequantizes every checkpoint)")
        from p3.llm import LLM

        ref = LLM(args.model, dtype="float32", **extra)
    llms[REFERENCE] = ref
    for name in configs:
        llm = load(name, args.model, extra, say)
        if llm is not None:
            llms[name], options[name] = llm, CONFIGS[name]
    print(f"loaded {len(llms)} engine(s) in {time.perf_counter() - started:.1f} s")

    # tokenize only as much of the corpus as the run needs (whole files; ~3 chars a token)
    tokenizer = ref.tokenizer
    min_chars = 8 * (args.tokens + args.tokens // max(1, args.context - 1) + 1)
    text = read_corpus(files, min_chars)
    ids = tokenizer.encode(text, False)
    needed = args.tokens + -(-args.tokens // (args.context - 1))
    if len(ids) < needed:
        ids = tokenizer.encode(read_corpus(files), False)
    wins = windows(ids, args.context, args.tokens)
    num_scored = sum(len(w) - 1 for w in wins)
    print(
        f"corpus:  {args.corpus} ({len(files)} files); {len(wins)} windows of up to "
        f"{args.context} tokens, chunks of {args.chunk}: {num_scored} tokens scored"
    )
    if num_scored < args.tokens:
        say(f"the corpus gives only {num_scored} of the {args.tokens} tokens asked for")

    scorers = {name: WindowScorer(llm) for name, llm in llms.items()}
    stats = {name: Stats() for name in llms}
    last_report = time.perf_counter()
    for w, window in enumerate(wins):
        bounds = chunk_bounds(len(window), args.chunk)
        targets = torch.tensor(window[1:] + [0])  # the window's last row predicts nothing
        streams = {name: s.logits(window, bounds) for name, s in scorers.items()}
        for start, end in bounds:
            rows = min(end, len(window) - 1) - start  # rows with a next token inside the window
            chunk_logits = {name: next(stream) for name, stream in streams.items()}
            if rows <= 0:
                continue
            ref_lp = chunk_logits[REFERENCE][:rows].double().log_softmax(-1)
            tgt = targets[start : start + rows]
            for name, logits in chunk_logits.items():
                lp = ref_lp if name == REFERENCE else logits[:rows].double().log_softmax(-1)
                stats[name].update(ref_lp, lp, tgt)
        for stream in streams.values():
            stream.close()
        if time.perf_counter() - last_report > 30 or w == len(wins) - 1:
            last_report = time.perf_counter()
            done = stats[REFERENCE].count
            print(
                f"  {done}/{num_scored} tokens, reference ppl {stats[REFERENCE].ppl:.4f}",
                flush=True,
            )
    for name, s in scorers.items():
        stats[name].seconds = s.seconds

    rows = result_rows(stats, options)
    print()
    print(format_table(rows))
    if args.json is not None:
        report = {
            "machine": cpu_model(),
            "threads": torch.get_num_threads(),
            "kernel_choice": choice,
            "kernel_report": report,
            "model": args.model or "default",
            "model_dir": str(model_dir),
            "corpus": str(args.corpus),
            "corpus_files": len(files),
            "context": args.context,
            "chunk": args.chunk,
            "tokens": num_scored,
            "notes": notes,
            "results": [asdict(r) for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
