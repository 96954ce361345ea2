"""The one entry point: p3 serve | coordinator | node | edge | generate | convert | quantize |
finetune | info."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from p3.config import EngineConfig, default_of
from p3.finetune import add_arguments as add_finetune_args
from p3.flags import (
    add_cluster_args,
    add_engine_args,
    add_security_args,
    add_status_args,
    add_tracing_args,
    cluster_keys,
    engine_argv,
    engine_options,
    port_number,
)
from p3.log import setup_logging
from p3.nodes.actor.launch import watch_parent
from p3.nodes.coordinator.coordinator import CoordinatorConfig
from p3.nodes.node.config import NodeConfig


def cmd_generate(args: argparse.Namespace) -> int:
    from p3.llm import LLM
    from p3.lora import LoRARequest
    from p3.sampling_params import SamplingParams

    skip = args.skip_tokenizer_init
    llm = LLM(args.model, dtype=args.dtype, skip_tokenizer_init=skip, **engine_options(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompt = args.prompt
    if not args.raw:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = {"prompt": text, "prompt_token_ids": llm.tokenizer.encode(text, False)}
    if len(args.lora) > 1:
        raise ValueError("p3 generate runs under one --lora at most")
    lora = LoRARequest(args.lora[0][0], 1, args.lora[0][1]) if args.lora else None
    for text in llm.stream(prompt, params, lora):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.dst.endswith(".gguf") or args.outtype is not None:
        from p3.weights.gguf_write import DEFAULT_OUTTYPE, export_gguf

        outtype = args.outtype or DEFAULT_OUTTYPE
        export_gguf(args.src, Path(args.dst), outtype, progress=not args.quiet)
        print(f"converted {args.src} -> {args.dst} ({outtype})")
        return 0
    from p3.weights.convert import convert

    convert(Path(args.src), Path(args.dst), progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from p3.weights.quantize import quantize_checkpoint

    dst = quantize_checkpoint(args.src, Path(args.dst), args.quantization)
    print(f"quantized {args.src} ({args.quantization}) -> {dst}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from p3.finetune.train import finetune_from_args

    return finetune_from_args(args)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from p3.kernels.dispatch import kernel_report

    print(json.dumps(kernel_report(args.device), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from p3.serve import serve

    if args.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {args.nodes}")
    num_models = len(args.model or [None])
    if len(set(args.model or [])) != len(args.model or []):
        raise ValueError("each --model may be given once")
    if args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp and --pp must be at least 1, got {args.tp} and {args.pp}")
    if args.nodes % num_models or args.nodes // num_models < args.tp * args.pp:
        raise ValueError(
            f"--nodes ({args.nodes}) must split evenly over {num_models} model(s), each with "
            f"at least --tp x --pp = {args.tp * args.pp} nodes (the rest of a model's nodes "
            "are spares, that replace a failed replica's)"
        )
    return serve(args, engine_argv(args))


def cmd_coordinator(args: argparse.Namespace) -> int:
    from p3.nodes.actor.process import run_actor
    from p3.nodes.coordinator.coordinator import Coordinator

    config = CoordinatorConfig(
        bind=args.bind,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_misses=args.heartbeat_misses,
        hung_after_s=args.hung_after,
        tp_size=args.tp,
        pp_size=args.pp,
        keys=cluster_keys(args, "p3 coordinator"),
        lend_threads_after_s=args.lend_threads_after,
        status_host=args.status_host,
        status_port=args.status_port,
    )
    return run_actor(Coordinator(config))


def cmd_node(args: argparse.Namespace) -> int:
    from p3 import tracing
    from p3.nodes.actor.process import run_actor
    from p3.nodes.node.config import NodeConfig, default_node_id
    from p3.nodes.node.node import Node

    engine = EngineConfig(dtype=args.dtype, num_threads=args.threads, **engine_options(args))
    config = NodeConfig(
        coordinator=args.coordinator,
        node_id=args.node_id or default_node_id(),
        bind=args.bind,
        advertise_host=args.advertise_host,
        advertise_port=args.advertise_port,
        model=args.model,
        engine=engine,
        max_in_flight=args.max_in_flight,
        drain_timeout_s=args.drain_timeout,
        keys=cluster_keys(args, "p3 node"),
        max_threads=args.max_threads,
        skip_tokenizer_init=args.skip_tokenizer_init,
        loras=tuple(args.lora),
        status_host=args.status_host,
        status_port=args.status_port,
    )
    tracing.configure(args.otlp_endpoint, "p3-node", {"p3.node_id": config.node_id})
    return run_actor(Node(config))


def cmd_keys(args: argparse.Namespace) -> int:
    from p3.protocol import security

    if args.action == "generate":
        nodes = args.node or [f"node-{i}" for i in range(args.nodes)]
        edges = args.edge or [f"edge-{i}" for i in range(args.edges)]
        security.generate(args.dir, nodes, edges)
        print(f"cluster keys in {args.dir}: the coordinator, nodes {nodes}, edges {edges}")
        print("each host needs the *.key files and its own members' *.key_secret; pass --keys")
    elif args.action == "add":
        if len(args.names) != 2:
            raise ValueError("p3 keys add DIR ROLE NAME (ROLE: node or edge)")
        print(f"added {security.add_key(args.dir, *args.names)}")
    elif args.action == "revoke":
        for name in args.names:
            print(f"revoked {name}: {security.revoke_key(args.dir, name)}")
    else:
        for member in security.list_keys(args.dir):
            print(f"{member.role}\t{member.name}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from p3.hosts import run_command

    return run_command(args.action, args.hosts_file, args.keys)


def cmd_edge(args: argparse.Namespace, rest: list[str]) -> int:
    from p3.nodes.edge import edge

    parser = argparse.ArgumentParser(prog="p3 edge", description="the OpenAI HTTP edge")
    edge.add_arguments(parser)
    return edge.main(parser.parse_args(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p3", description=__doc__)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--log-json", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="a whole cluster on this machine, serving the OpenAI API")
    add_engine_args(serve, several_models=True)
    add_cluster_args(serve)
    add_security_args(serve, made_here=True)
    add_tracing_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port")
    serve.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="node processes, split evenly over the models; tp x pp per replica, the rest spare",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="a bearer key clients must send (repeatable)",
    )
    serve.add_argument("--threads", type=int, default=None, help="per node (default: cores/N)")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="per start-up stage")
    serve.add_argument("--stop-timeout", type=float, default=30.0)
    serve.add_argument(
        "--status-port-base", type=port_number, default=None,
        help="status servers (/health, /ready, /metrics): the coordinator's on this port, "
        "node i's on this + 1 + i (0: each on any free port; default: none)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    coord = sub.add_parser("coordinator", help="the cluster's membership and routing table")
    coord.add_argument("--bind", default="tcp://127.0.0.1:5555", help="tcp://HOST:PORT")
    add_cluster_args(coord)
    add_security_args(coord)
    add_status_args(coord)
    coord.set_defaults(func=cmd_coordinator)

    node = sub.add_parser("node", help="one replica's engine, registered with a coordinator")
    add_engine_args(node)
    node.add_argument("--coordinator", required=True, help="tcp://HOST:PORT")
    node.add_argument("--node-id", default=None, help="default: HOSTNAME-PID")
    node.add_argument(
        "--bind", default=default_of(NodeConfig, "bind"), help="where edges reach this node"
    )
    node.add_argument("--advertise-host", default=None, help="host edges dial (default: bind's)")
    node.add_argument("--advertise-port", type=int, default=None, help="port edges dial")
    node.add_argument("--threads", type=int, default=None, help="torch threads")
    node.add_argument(
        "--max-threads", type=int, default=None,
        help="grow to this many threads while other nodes on this host are down (default: no)",
    )  # fmt: skip
    node.add_argument("--max-in-flight", type=int, default=default_of(NodeConfig, "max_in_flight"))
    node.add_argument(
        "--drain-timeout", type=float, default=default_of(NodeConfig, "drain_timeout_s"), help="s"
    )
    add_security_args(node)
    add_status_args(node)
    add_tracing_args(node)
    node.set_defaults(func=cmd_node)

    keys = sub.add_parser(
        "keys",
        help="CurveZMQ keys, one per member: generate DIR, add DIR ROLE NAME, revoke DIR NAME, "
        "list DIR",
    )
    keys.add_argument("action", choices=["generate", "add", "revoke", "list"])
    keys.add_argument("dir", help="the cluster's key directory")
    keys.add_argument("names", nargs="*", help="add: ROLE NAME; revoke: NAME...")
    keys.add_argument("--nodes", type=int, default=1, help="generate: node-0 .. node-N-1")
    keys.add_argument("--edges", type=int, default=1, help="generate: edge-0 .. edge-N-1")
    keys.add_argument("--node", action="append", help="generate: a node by name (repeatable)")
    keys.add_argument("--edge", action="append", help="generate: an edge by name (repeatable)")
    keys.set_defaults(func=cmd_keys)

    cluster = sub.add_parser(
        "cluster", help="a cluster over hosts named in a TOML file, by ssh (p3/hosts.py)"
    )
    cluster.add_argument("action", choices=["up", "down", "status", "keys"])
    cluster.add_argument("hosts_file", help="the hosts file (TOML)")
    cluster.add_argument("--keys", default=None, help="the key directory (else the file's)")
    cluster.set_defaults(func=cmd_cluster)

    edge = sub.add_parser("edge", help="the OpenAI HTTP edge (p3 edge --help)", add_help=False)
    edge.set_defaults(func=cmd_edge)

    gen = sub.add_parser("generate", help="generate from one prompt, streamed to the terminal")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser(
        "convert",
        help="GGUF or .bin checkpoint -> safetensors directory; a model directory -> DST.gguf",
    )
    conv.add_argument("src", help=".gguf, .bin directory; for a .gguf DST: a model directory")
    conv.add_argument("dst", help="a directory, or a .gguf file (llama.cpp's format) to write")
    conv.add_argument(
        "--outtype",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default=None,
        help="a .gguf DST's tensor type (default f16; norms and biases stay f32)",
    )
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)

    quant = sub.add_parser("quantize", help="write a checkpoint with its linears quantized")
    quant.add_argument("src", help="model dir, .gguf, or SmolLM2-135M-Instruct")
    quant.add_argument("dst")
    quant.add_argument("--quantization", default="q8_0", choices=("int8", "q8_0", "q4_0", "q4_1"))
    quant.set_defaults(func=cmd_quantize)

    tune = sub.add_parser("finetune", help="train a LoRA adapter (PEFT format) on JSONL data")
    add_finetune_args(tune)
    tune.set_defaults(func=cmd_finetune)

    info = sub.add_parser("info", help="this machine's processor and the kernels p3 picks here")
    info.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.func is not cmd_edge:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.log_level, args.log_json)
    watch_parent()
    try:
        if args.func is cmd_edge:
            return cmd_edge(args, rest)
        return args.func(args)
    except (ValueError, OSError) as exc:  # a missing or malformed file says which, in one line
        print(f"p3: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The process entry (`p3`, `python -m p3`): main, then exit_process."""
    exit_process(main())


def exit_process(code: int) -> None:
    """Exit with code. A process that loaded torch skips the interpreter's teardown, which
    takes half a second with torch loaded and saves nothing of ours (logs are flushed,
    coverage is saved when it measures this process): a node stops within SIGTERM's budget."""
    if "torch" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.stop()
        current.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
