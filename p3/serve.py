"""`p3 serve`: a coordinator, N nodes (N / tp replicas) and an edge on this machine.

Every member gets its own CurveZMQ key (made for the run unless --keys names a directory, or
--insecure), so no other process on the host can join, submit or listen in.

Starts them in order (coordinator on an ephemeral port, then the nodes, then the edge),
waiting for each to be ready; prints the URL; then supervises them: a node, the coordinator
or the edge that exits is started again (the coordinator on the very address it had, which
the nodes and the edge keep dialling, so they reconnect and register again by themselves;
the edge on the same port, where clients resume their streams with Last-Event-ID). On Ctrl-C
or SIGTERM stops the edge, the nodes, then the coordinator (each drains, then is killed after
a timeout).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from p3.log import get_logger
from p3.nodes.actor.launch import Child, LaunchError, python_m_p3, stop_all, wait_ready

log = get_logger(__name__)


def threads_per_node(num_nodes: int) -> int:
    """Cores split evenly: oversubscribed torch threads make every op many times slower."""
    return max(1, len(os.sched_getaffinity(0)) // num_nodes)


def serve(args: argparse.Namespace, engine_argv: list[str]) -> int:
    if args.lora and len(args.model or [None]) > 1:
        print("p3 serve: --lora takes one --model (its base)", file=sys.stderr)
        return 2
    if (args.lora or args.enable_lora) and args.tp * args.pp > 1:
        print("p3 serve: LoRA runs on replicas of one node (--tp 1 --pp 1)", file=sys.stderr)
        return 2
    for model in args.model or [None]:
        _prepare_model(model, args.skip_tokenizer_init)
    children: list[Child] = []
    stop = _stop_on_signals()
    made_keys = _prepare_keys(args)
    try:
        port = _start_cluster(args, engine_argv, children)
        served = ", ".join(args.model or ["the default model"])
        print(f"p3 serving {served} at http://{args.host}:{port}/v1")
        sys.stdout.flush()
        return _supervise(children, stop)
    except LaunchError as exc:
        print(f"p3 serve: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(list(reversed(children)), timeout_s=args.stop_timeout)
        if made_keys:
            shutil.rmtree(args.keys, ignore_errors=True)


CLIENT_KEY = "client-0"  # an edge key p3 serve makes for p3.client (with --keys DIR)


def _prepare_keys(args: argparse.Namespace) -> bool:
    """Every member's key, unless --insecure: in --keys DIR when given (made there if DIR has
    none), else in a private temporary directory, removed at exit. True if temporary."""
    if args.insecure:
        if args.keys:
            raise ValueError("--keys and --insecure contradict each other")
        return False
    from p3.protocol.security import generate, list_keys

    temporary = not args.keys
    if temporary:
        args.keys = tempfile.mkdtemp(prefix="p3-keys-")
    nodes = [f"node-{i}" for i in range(args.nodes)]
    if temporary or not list_keys(args.keys):
        generate(args.keys, nodes, ["edge-0", CLIENT_KEY])
        if not temporary:
            print(f"p3 serve: cluster keys in {args.keys} (p3.client: name={CLIENT_KEY!r})")
    else:
        have = {(m.role, m.name) for m in list_keys(args.keys)}
        missing = [n for n in nodes if ("node", n) not in have]
        missing += [] if ("edge", "edge-0") in have else ["edge-0"]
        if missing:
            raise ValueError(f"{args.keys} has no key for {missing}; `p3 keys add` makes them")
    Path(args.keys).chmod(0o700)
    return temporary


def _prepare_model(model: str | None, skip_tokenizer_init: bool) -> None:
    """Convert the model once here, not N times in racing nodes; and read its config, its
    tokenizer and its weight files' headers, so that a missing or malformed file is one
    error naming it here, not nodes or an edge that keep exiting."""
    from p3.tokenizer import NoTokenizer, load_tokenizer
    from p3.weights.files import check_model_files, resolve_model

    model_dir = resolve_model(model)
    check_model_files(model_dir)
    tokenizer = load_tokenizer(model_dir, skip_tokenizer_init)
    if isinstance(tokenizer, NoTokenizer):
        print(f"p3 serve: {tokenizer.why}; it takes token-id prompts only")


def _common(args: argparse.Namespace) -> list[str]:
    return ["--log-level", args.log_level] + (["--log-json"] if args.log_json else [])


def _start_cluster(args, engine_argv: list[str], children: list[Child]) -> int:
    """Coordinator, nodes, edge, each ready before the next; the edge's port (the one it
    bound when --port 0, which a restart binds again). The edge started with the nodes saved
    0.4 s of a 5.6 s start here, and a CI run with that had one start of the default model
    that never became ready (cause not found): not worth it."""
    common = _common(args)
    coordinator = Child(
        "coordinator",
        python_m_p3(
            *common, "coordinator", "--bind", "tcp://127.0.0.1:0",
            "--heartbeat-interval", str(args.heartbeat_interval),
            "--heartbeat-misses", str(args.heartbeat_misses),
            "--hung-after", str(args.hung_after), "--tp", str(args.tp), "--pp", str(args.pp),
            "--lend-threads-after", str(args.lend_threads_after),
            *_keys(args), *_status(args, 0),
        ),
    )  # fmt: skip
    children.append(coordinator)
    wait_ready([coordinator], args.ready_timeout)
    address = coordinator.info["address"]
    coordinator.argv = _flag_at(coordinator.argv, "--bind", address)  # a restart binds it again
    threads = args.threads or threads_per_node(args.nodes)
    models = args.model or [None]
    per_model = args.nodes // len(models)  # nodes of each model, in a block

    def model_of(i: int) -> list[str]:
        model = models[i // per_model]
        return ["--model", model] if model else []

    nodes = [
        Child(
            f"node-{i}",
            python_m_p3(
                *common,
                "node",
                "--coordinator",
                address,
                "--node-id",
                f"node-{i}",
                "--threads",
                str(threads),
                "--max-threads",  # a node's peers here down: their cores are its to use
                str(len(os.sched_getaffinity(0))),
                *model_of(i),
                *_keys(args),
                *_status(args, 1 + i),
                *_tracing(args),
                *engine_argv,
            ),
        )  # fmt: skip
        for i in range(args.nodes)
    ]
    children.extend(nodes)
    spares = len(models) * (per_model % (args.tp * args.pp))
    wait_ready(nodes, args.ready_timeout, num_spare=spares)
    print(kv_cache_summary(nodes))
    if args.status_port_base is not None:
        print(status_summary([coordinator, *nodes]))
    api_key = [f"--api-key={key}" for key in args.api_key or []]
    edge = Child(
        "edge",
        python_m_p3(
            *common, "edge", "--coordinator", address, "--host", args.host,
            "--port", str(args.port), *api_key, *[a for m in models if m for a in ("--model", m)],
            *(["--skip-tokenizer-init"] if args.skip_tokenizer_init else []), *_keys(args),
            *_tracing(args),
        ),
        ready_path="/ready",  # at the url it announces: port 0 is bound by the edge itself
    )  # fmt: skip
    children.append(edge)
    wait_ready([edge], args.ready_timeout)
    port = urllib.parse.urlsplit(edge.info["url"]).port
    edge.argv = _flag_at(edge.argv, "--port", str(port))
    return port


def kv_cache_summary(nodes: list[Child]) -> str:
    """One line on the nodes' KV caches, from what each announced when it was ready."""
    ready = [n.info for n in nodes if n.info and "num_kv_blocks" in n.info]
    if not ready:
        return "p3 KV cache: no node reported one"
    blocks = sorted({info["num_kv_blocks"] for info in ready})
    dtypes = sorted({info["kv_cache_dtype"] for info in ready})
    count = str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
    return (
        f"p3 KV cache: kv_cache_dtype {'/'.join(dtypes)}, num_kv_blocks {count} per node "
        f"({len(ready)} node(s) ready)"
    )


def status_summary(children: list[Child]) -> str:
    """One line: each child's status server (/health, /ready, /metrics), as it announced it."""
    urls = [f"{c.name} {c.info['status_url']}" for c in children if "status_url" in (c.info or {})]
    return "p3 status: " + ", ".join(urls)


def _flag_at(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with flag's value replaced (by the port the first start was given)."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def _status(args: argparse.Namespace, offset: int) -> list[str]:
    """--status-port-base N: the coordinator's status server on N, node i's on N + 1 + i; 0:
    each on a free port (a restart binds another: read them from the P3_READY lines)."""
    base = args.status_port_base
    if base is None:
        return []
    return ["--status-port", str(base + offset if base else 0), "--status-host", args.host]


def _keys(args: argparse.Namespace) -> list[str]:
    return ["--keys", args.keys] if args.keys else ["--insecure"]


def _tracing(args: argparse.Namespace) -> list[str]:
    """The edge and the nodes export traces where p3 serve was told to (p3.tracing)."""
    return ["--otlp-endpoint", args.otlp_endpoint] if args.otlp_endpoint else []


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame) -> None:
        log.info("serve.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


RESTARTS_PER_WINDOW, RESTART_WINDOW_S = 5, 60.0


def _supervise(children: list[Child], stop: threading.Event) -> int:
    """Until a signal: a node or the coordinator that exits is started again, unless it keeps
    exiting (more than RESTARTS_PER_WINDOW times in RESTART_WINDOW_S). The others serve on
    meanwhile. A restarted node joins as a spare, so a tensor- or pipeline-parallel replica
    that lost a member is formed anew; a node that keeps exiting stays down. The coordinator
    is off the token path: streams go on while it is away, and the restarted one binds the
    same address, where nodes and the edge reconnect, register again and rebuild its
    membership and routing table. The edge comes back on its port; streams it was serving go
    on in the nodes for their grace period, for clients to resume there. A coordinator or an
    edge that keeps exiting ends the cluster."""
    restarts: dict[str, list[float]] = {}
    given_up: set[str] = set()
    while not stop.wait(0.2):
        for i, child in enumerate(children):
            if child.proc.poll() is None or child.name in given_up:
                continue
            log.warning("serve.child_exited", child=child.name, code=child.proc.returncode)
            if not _restartable(child):
                print(f"p3 serve: {child.describe_failure('exited')}", file=sys.stderr)
                return 1
            now = time.monotonic()
            recent = [t for t in restarts.get(child.name, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= RESTARTS_PER_WINDOW:
                print(f"p3 serve: {child.describe_failure('keeps exiting')}", file=sys.stderr)
                if child.name in ("coordinator", "edge"):
                    return 1
                given_up.add(child.name)
                continue
            restarts[child.name] = [*recent, now]
            children[i] = Child(child.name, child.argv)
            log.info("serve.child_restarted", child=child.name, attempt=len(recent) + 1)
    return 0


def _restartable(child: Child) -> bool:
    return child.name in ("coordinator", "edge") or child.name.startswith("node-")
