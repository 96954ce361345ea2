"""Does llama.cpp load and run what `p3 convert MODEL_DIR OUT.gguf` writes? One run:

    python scripts/check_gguf_export.py ../shared/tools/llama.cpp/bin [--tokens 32] [--tiny]

Exports the default model (SmolLM2-135M-Instruct, as p3 serves it from its converted cache) to
f16, q8_0 and q4_0; runs llama-bench on each (-t 2 -p 64 -n 32 -r 1); then serves the q8_0 file
with llama-server (an f32 K/V cache, as p3's here; see SERVER_FLAGS) and compares its greedy
continuation of a fixed chat prompt (sent as p3's token ids, temperature 0, end of sequence
ignored) with p3's own (LLM, quantization q8_0: the same bytes as the file's, since both
requantize the cache's Q4_1 linears to q8_0 the same way). Prints llama-bench's tokens/s and
whether the tokens agree (else the first index that differs, and both sides' top
probabilities there). First the same for an f32 file against p3 with quantization none (the
cache's blocks dequantized), where nothing is rounded differently: that tells a wrong file
from q8_0 arithmetic whose rounding differs (the --tiny models agree to about 1e-5 in
probability).
--tiny also checks the two paths the default model does not take, on tiny random models with
SmolLM2's tokenizer written in f32: qwen2 (q/k/v biases, rows not permuted) and Llama-3 RoPE
scaling (the rope_freqs tensor), each against p3 with quantization none.

--families does the same for the tiny random model of every family p3 writes
(tests/model/families.py, with the switch tests/model/test_gguf_families.py VARIANTS sets
where the tiny one differs from what llama.cpp runs), with SmolLM2's whole vocabulary and
tokenizer, and ends with a table: does llama-server load the file, do its 32 greedy tokens
agree with p3's, and where not, the first index that differs. Only those families, without
the default model's benchmarks: --families NAME ... picks some.

Exit status 0 when every comparison agrees. p3 never depends on llama.cpp; this script does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "Write two sentences about the history of the bicycle."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bin_dir", type=Path, help="llama.cpp's bin (llama-bench, llama-server)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="also qwen2 and Llama-3 RoPE scaling")
    parser.add_argument(
        "--families", nargs="*", metavar="NAME", help="only every family's tiny model (or these)"
    )
    args = parser.parse_args()
    if args.families is not None:
        return check_families(args)

    from llama_cpp import llama_bench

    from p3.tokenizer import Tokenizer
    from p3.weights.files import resolve_model
    from p3.weights.gguf_write import export_gguf

    model_dir = resolve_model(None)
    tokenizer = Tokenizer.from_dir(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    agree = True
    with tempfile.TemporaryDirectory(prefix="p3-gguf-check-") as tmp:
        files = {}
        for outtype in ("f16", "q8_0", "q4_0"):
            start = time.perf_counter()
            files[outtype] = export_gguf(model_dir, Path(tmp) / f"smollm2-{outtype}.gguf", outtype)
            seconds = time.perf_counter() - start
            rates = llama_bench(
                args.bin_dir / "llama-bench", files[outtype], args.threads, 1, 64, 32
            )
            size = files[outtype].stat().st_size / 2**20
            print(
                f"{outtype:5} {size:6.1f} MiB, written in {seconds:4.1f} s; llama-bench "
                f"pp64 {rates['pp']:7.1f} t/s, tg32 {rates['tg']:6.1f} t/s",
                flush=True,
            )
        exact = export_gguf(model_dir, Path(tmp) / "smollm2-f32.gguf", "f32", progress=False)
        agree &= compare_greedy(args, exact, model_dir, "none", prompt_ids, tokenizer)
        exact.unlink()
        agree &= compare_greedy(args, files["q8_0"], model_dir, "q8_0", prompt_ids, tokenizer)
        if args.tiny:
            for name, config in tiny_configs(tokenizer.vocab_size).items():
                tiny_dir = make_tiny(Path(tmp) / name, config, model_dir)
                gguf = export_gguf(tiny_dir, Path(tmp) / f"{name}.gguf", "f32", progress=False)
                agree &= compare_greedy(args, gguf, tiny_dir, "none", prompt_ids, tokenizer)
    print("all agree" if agree else "DISAGREEMENT")
    return 0 if agree else 1


# llama.cpp's default cache (f16 K/V, flash attention) rounds what p3's fp32 cache keeps: on a
# near tie that alone flips a greedy token. An f32 cache without flash attention gives p3's
# probabilities to about 1e-5 (checked on the --tiny models).
SERVER_FLAGS = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")
TOP = 3  # probabilities shown where the tokens first differ


def compare_greedy(args, gguf: Path, model_dir: Path, quantization: str, prompt_ids, tokenizer):
    """llama-server's greedy tokens for prompt_ids beside p3's on model_dir; True if equal."""
    differ, _ = greedy_difference(args, gguf, model_dir, quantization, prompt_ids, tokenizer)
    return differ is None


def greedy_difference(
    args, gguf: Path, model_dir: Path, quantization: str, prompt_ids, tokenizer
) -> tuple[int | None, float]:
    """compare_greedy's comparison, printed: the first index where the tokens differ (None
    when they agree), and how far apart both sides' top probabilities are at most."""
    from llama_cpp import llama_server

    from p3 import LLM, SamplingParams
    from p3.nodes.actor.launch import free_port

    port = free_port("127.0.0.1")
    server = llama_server(args.bin_dir / "llama-server", gguf, port, 1, args.threads, *SERVER_FLAGS)
    try:
        theirs, their_top = completion(port, prompt_ids, args.tokens)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    llm = LLM(model_dir, dtype="float32", quantization=quantization, num_threads=args.threads)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, logprobs=TOP)
    out = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]
    ours = list(out.token_ids)
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if differ is None and len(ours) != len(theirs):
        differ = min(len(ours), len(theirs))
    label = f"{gguf.name} vs p3 (quantization {quantization})"
    our_top = [{t: math.exp(lp.logprob) for t, lp in step.items()} for step in out.logprobs]
    gap = max(
        (abs(p - mine[t]) for mine, step in zip(our_top, their_top, strict=False)
         for t, p in step.items() if t in mine),
        default=float("nan"),
    )  # fmt: skip
    if differ is None:
        print(
            f"{label}: {len(ours)}/{len(theirs)} greedy tokens agree, top-{TOP} probabilities "
            f"within {gap:.1e}",
            flush=True,
        )
        print(f"  {tokenizer.decode(ours)!r}")
        return None, gap
    print(f"{label}: tokens differ first at index {differ} of {len(ours)}", flush=True)
    print(f"  p3:        {tokenizer.decode(ours)!r}\n  llama.cpp: {tokenizer.decode(theirs)!r}")
    if differ < min(len(ours), len(theirs)):
        print(
            f"  there, p3's top {TOP} {rounded(our_top[differ])}, "
            f"llama.cpp's {rounded(their_top[differ])}"
        )
    return differ, gap


def rounded(probabilities: dict[int, float]) -> dict[int, float]:
    return {token: round(p, 4) for token, p in probabilities.items()}


def completion(port: int, prompt_ids: list[int], n: int) -> tuple[list[int], list[dict]]:
    """llama-server's greedy tokens after prompt_ids, and each step's top TOP probabilities."""
    body = {
        "prompt": prompt_ids,
        "n_predict": n,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "return_tokens": True,
        "n_probs": TOP,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    top = [
        {p["id"]: math.exp(p["logprob"]) for p in step["top_logprobs"]}
        for step in answer.get("completion_probabilities", [])
    ]
    return list(answer["tokens"]), top


def check_families(args) -> int:
    """Every family's tiny model, with SmolLM2's tokenizer, written in f32 and run by
    llama-server beside p3 (quantization none); a table of what happened."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from p3.tokenizer import Tokenizer
    from p3.weights.files import resolve_model
    from tests.model.families import FAMILIES
    from tests.model.test_gguf_families import EXPORTED, family_model

    model_dir = resolve_model(None)
    tokenizer = Tokenizer.from_dir(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    names = args.families or EXPORTED
    rows = []
    with tempfile.TemporaryDirectory(prefix="p3-gguf-families-") as tmp:
        for name in names:
            if name not in FAMILIES:
                raise SystemExit(f"unknown family {name!r}; known: {', '.join(EXPORTED)}")
            switches, label = {}, name
            while switches is not None:
                print(f"--- {label}", flush=True)
                tiny_dir = family_model(
                    Path(tmp) / label, name, model_dir, vocab_size=tokenizer.vocab_size, **switches
                )
                # llama.cpp gives models named like Phi-3 its SentencePiece tokens' attributes
                tiny_dir = tiny_dir.rename(tiny_dir.with_name("tiny"))
                outcome = llama_cpp_outcome(args, tiny_dir, Path(tmp), prompt_ids, tokenizer)
                rows.append((label, outcome))
                again = None if switches else as_llama_cpp_runs(tiny_dir)
                shutil.rmtree(tiny_dir.parent)
                described = " and ".join(SWITCHES[key] for key in again or ())
                switches, label = again, f"{name} as llama.cpp runs it ({described})"
    width = max(len(label) for label, _ in rows) + 1
    print(f"\n{'family':{width}} llama.cpp ({args.tokens} greedy tokens beside p3's)")
    for label, outcome in rows:
        print(f"{label:{width}} {outcome}")
    return 0 if all("agree" in outcome for _, outcome in rows) else 1


def llama_cpp_outcome(args, tiny_dir: Path, tmp: Path, prompt_ids, tokenizer) -> str:
    """tiny_dir written in f32 and compared: what llama.cpp did with it, in a few words."""
    from p3.weights.gguf_write import export_gguf

    gguf = export_gguf(tiny_dir, tmp / "tiny.gguf", "f32", progress=False)
    try:
        differ, gap = greedy_difference(args, gguf, tiny_dir, "none", prompt_ids, tokenizer)
    except RuntimeError as exc:  # llama-server would not load it
        return f"refused: {exc}; {server_log_tail()}"
    finally:
        gguf.unlink()
    if differ is None:
        return f"loads, tokens agree (top-{TOP} probabilities within {gap:.0e})"
    return f"loads, tokens differ from index {differ}"


SWITCHES = {"sliding_window": "no window", "rope_parameters": "long factors only"}


def as_llama_cpp_runs(model_dir: Path) -> dict | None:
    """Config switches that make p3 run the model as llama.cpp runs its file, where the file
    says what llama.cpp's architecture does not do (None: nothing such): a sliding window it
    ignores; LongRoPE's short factors, which llama.cpp takes only for a context no longer
    than original_max_position_embeddings (llama-server's is longer), not per position."""
    from p3.config import ModelConfig
    from p3.weights.files import load_config
    from p3.weights.gguf_write import family_for

    config = load_config(model_dir)
    cfg, switches = ModelConfig.from_hf(config), {}
    if any(cfg.windows) and not family_for(config).default_swa_period:
        switches["sliding_window"] = None
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":
        rope = config["rope_parameters"]
        switches["rope_parameters"] = {**rope, "short_factor": rope["long_factor"]}
    return switches or None


def server_log_tail(lines: int = 3) -> str:
    """The last lines of the newest llama-server log (scripts/llama_cpp.py writes one)."""
    logs = sorted(Path(tempfile.gettempdir()).glob("llama-server-*.log"), key=os.path.getmtime)
    if not logs:
        return "no log"
    tail = logs[-1].read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(line.strip() for line in tail)


def tiny_configs(vocab_size: int) -> dict:
    """The tests' tiny qwen2 and Llama-3-scaled configs (tests/model/tiny.py) with a real
    tokenizer's vocabulary and larger weights: peaked logits, so that no greedy token hinges
    on a near tie."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.model.tiny import CONFIGS

    configs = {}
    for name in ("qwen2-bias-tied", "llama3-rope-scaling"):
        configs[name] = CONFIGS[name]()
        configs[name].vocab_size = vocab_size
        configs[name].initializer_range = 1.0
    return configs


def make_tiny(out: Path, config, tokenizer_dir: Path) -> Path:
    """A seeded random model of config (random q/k/v biases where it has them), with the
    tokenizer files of tokenizer_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, parameter in model.named_parameters():
        if name.endswith("_proj.bias"):
            torch.nn.init.normal_(parameter, std=0.2)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


if __name__ == "__main__":
    sys.exit(main())
