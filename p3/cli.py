"""The one entry point: p3 serve | generate | convert."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from p3.log import setup_logging

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """'2GiB', '512m', '1000000' -> bytes."""
    number = text.rstrip("bBkKmMgGiI")
    unit = text[len(number) :].lower()
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default="2GiB",
        dest="kv_cache_bytes",
        help="memory for the paged KV cache (e.g. 2GiB)",
    )
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_false", dest="enable_prefix_caching")


def engine_options(args: argparse.Namespace) -> dict:
    names = (
        "device",
        "kv_cache_bytes",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "block_size",
        "enable_prefix_caching",
    )
    return {n: getattr(args, n) for n in names}


def cmd_generate(args: argparse.Namespace) -> int:
    from p3.llm import LLM
    from p3.sampling_params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, **engine_options(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompt = args.prompt
    if not args.raw:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = {"prompt": text, "prompt_token_ids": llm.tokenizer.encode(text, False)}
    for text in llm.stream(prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from p3.weights import convert

    convert(Path(args.src), Path(args.dst), progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from p3.weights import resolve_model

    model_dir = resolve_model(args.model)
    print(f"model ready at {model_dir}")
    print(
        "serving is not built yet (issue 3: the cluster and the OpenAI edge); "
        "try: p3 generate 'What is the capital of France?'"
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p3", description=__doc__)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--log-json", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI API")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate from one prompt, streamed to the terminal")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="GGUF or .bin checkpoint -> safetensors directory")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"p3: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
