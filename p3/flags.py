"""The flags the commands share: engine options, the cluster's timing, keys, sizes."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from p3.config import EngineConfig, default_of
from p3.nodes.coordinator.coordinator import CoordinatorConfig

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


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def add_engine_args(p: argparse.ArgumentParser, several_models: bool = False) -> None:
    def engine(name: str):
        return default_of(EngineConfig, name)

    if several_models:
        p.add_argument(
            "--model",
            action="append",
            default=None,
            help="model dir or .gguf (default: SmolLM2-135M-Instruct); repeat to serve several",
        )
    else:
        p.add_argument(
            "--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)"
        )
    p.add_argument(
        "--dtype",
        default=engine("dtype"),
        choices=("auto", "bfloat16", "float32", "float16"),
        help="activations and unquantized weights (auto: bf16 where the hardware computes it, "
        "else float32)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument(
        "--quantization",
        default=engine("quantization"),
        choices=("auto", "none", "int8", "q8_0", "q4_0", "q4_1"),
        help="weights: auto = as stored (a GGUF's blocks as they are), none = all float, a kind "
        "= linears quantized at load (embedding and head q8_0; int8 = q8_0)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=engine("kv_cache_bytes"),
        dest="kv_cache_bytes",
        help=f"memory for the paged KV cache (default: {format_size(engine('kv_cache_bytes'))})",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=engine("kv_cache_dtype"),
        choices=["auto", "int8"],
        help="what the KV cache holds: auto = the model dtype; int8 = int8 with a scale per "
        "token and kv head (about 2x the blocks of bf16, 4x of fp32, in the same memory)",
    )
    p.add_argument("--max-num-seqs", type=int, default=engine("max_num_seqs"))
    p.add_argument("--max-num-batched-tokens", type=int, default=engine("max_num_batched_tokens"))
    p.add_argument("--max-model-len", type=int, default=engine("max_model_len"))
    p.add_argument("--block-size", type=int, default=engine("block_size"))
    p.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        metavar="W",
        help="StreamingLLM: each sequence keeps its first --attention-sinks tokens and its "
        "latest W//2 to W in its KV cache, so it goes on past the model's context",
    )
    p.add_argument("--attention-sinks", type=int, default=engine("attention_sinks"), metavar="S")
    p.add_argument("--no-prefix-caching", action="store_false", dest="enable_prefix_caching")
    p.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="no tokenizer (vLLM's flag; a model without tokenizer.json is served so anyway): "
        "prompts are token ids, outputs token ids with empty text",
    )
    p.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA adapter served as model NAME (repeatable; implies --enable-lora)",
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="take LoRA adapters (also loaded at run time: POST /v1/load_lora_adapter)",
    )
    p.add_argument("--max-loras", type=int, default=engine("max_loras"), help="held at once")
    p.add_argument("--max-lora-rank", type=int, default=engine("max_lora_rank"))


def parse_lora(text: str) -> tuple[str, str]:
    """NAME=PATH, the adapter's config read now: a bad one is one clear error at start."""
    from p3.lora import read_adapter_config

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    try:
        read_adapter_config(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, str(Path(path).resolve())


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags again, as a command line (p3 serve passes them down to its nodes)."""
    argv = ["--dtype", args.dtype, "--kv-cache-memory", str(args.kv_cache_bytes)]
    argv += ["--quantization", args.quantization]
    argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    argv += ["--max-num-seqs", str(args.max_num_seqs)]
    argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    argv += ["--block-size", str(args.block_size)]
    if args.device:
        argv += ["--device", args.device]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.sliding_window:
        argv += ["--sliding-window", str(args.sliding_window)]
        argv += ["--attention-sinks", str(args.attention_sinks)]
    if not args.enable_prefix_caching:
        argv.append("--no-prefix-caching")
    if args.skip_tokenizer_init:
        argv.append("--skip-tokenizer-init")
    for name, path in args.lora:
        argv += ["--lora", f"{name}={path}"]
    if args.enable_lora:
        argv.append("--enable-lora")
    argv += ["--max-loras", str(args.max_loras), "--max-lora-rank", str(args.max_lora_rank)]
    return argv


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    def cluster(name: str):
        return default_of(CoordinatorConfig, name)

    p.add_argument(
        "--heartbeat-interval", type=float, default=cluster("heartbeat_interval_s"), help="s"
    )
    p.add_argument(
        "--heartbeat-misses",
        type=int,
        default=cluster("heartbeat_misses"),
        help="missed intervals = dead",
    )
    p.add_argument(
        "--hung-after",
        type=float,
        default=cluster("hung_after_s"),
        help="busy with no step this long = dead (s)",
    )
    p.add_argument(
        "--lend-threads-after",
        type=float,
        default=cluster("lend_threads_after_s"),
        help="a node dead this long lends its threads to its host's other nodes (s)",
    )
    p.add_argument(
        "--tp", type=int, default=cluster("tp_size"), help="tensor-parallel nodes per stage"
    )
    p.add_argument("--pp", type=int, default=cluster("pp_size"), help="pipeline stages per replica")


def add_security_args(p: argparse.ArgumentParser, made_here: bool = False) -> None:
    """--keys DIR, or --insecure: a piece of a cluster never starts open by accident."""
    p.add_argument(
        "--keys",
        default=None,
        help="the cluster's key directory (p3 keys generate): CurveZMQ with a key per member"
        + (" (default: keys made for this run, in a private temporary directory)" if made_here
           else ""),
    )  # fmt: skip
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain sockets: any process that reaches them can join, submit and read",
    )


def add_status_args(p: argparse.ArgumentParser) -> None:
    """The process's status server (p3.status): GET /health, /ready and /metrics."""
    p.add_argument(
        "--status-port", type=port_number, default=None,
        help="serve /health, /ready and /metrics on this port (0: any free one, announced as "
        "status_url; default: no status server)",
    )  # fmt: skip
    p.add_argument("--status-host", default="127.0.0.1", help="the status server's host")


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


def cluster_keys(args: argparse.Namespace, what: str) -> str | None:
    """The key directory to run with; None with --insecure. Without either: refused."""
    if args.keys and args.insecure:
        raise ValueError("--keys and --insecure contradict each other")
    if not args.keys and not args.insecure:
        raise ValueError(
            f"{what} refuses to start without --keys DIR (make one with `p3 keys generate "
            "DIR`) unless --insecure says any process that reaches its sockets may join"
        )
    return args.keys


def add_tracing_args(p: argparse.ArgumentParser) -> None:
    """--otlp-endpoint URL: traces to an OpenTelemetry collector (p3.tracing); off without."""
    p.add_argument(
        "--otlp-endpoint",
        type=otlp_endpoint,
        default=None,
        metavar="URL",
        help="send a trace of each request (OTLP over HTTP/protobuf) to this collector, "
        "e.g. http://127.0.0.1:4318 (/v1/traces is added when the URL has no path)",
    )


def otlp_endpoint(text: str) -> str:
    """An http(s) collector URL; its path /v1/traces unless it names one (as the
    OTEL_EXPORTER_OTLP_ENDPOINT variable is read)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL: {text!r}")
    return text if parts.path.strip("/") else text.rstrip("/") + "/v1/traces"


def engine_options(args: argparse.Namespace) -> dict:
    names = (
        "device",
        "quantization",
        "kv_cache_bytes",
        "kv_cache_dtype",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "block_size",
        "enable_prefix_caching",
        "max_loras",
        "max_lora_rank",
        "sliding_window",
        "attention_sinks",
    )
    options = {n: getattr(args, n) for n in names}
    options["enable_lora"] = bool(args.enable_lora or args.lora)
    return options
