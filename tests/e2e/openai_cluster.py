"""Start a real cluster for the OpenAI end-to-end tests, as subprocesses on ephemeral ports.

`p3 serve --port 0` when the CLI has it (it prints `P3_READY {"url": ...}`); until then, a
coordinator + node process (this file run as a script) and an edge process started through
p3.nodes.edge.edge.main, each waited for by its P3_READY line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY_PREFIX = "P3_READY "
SERVING_LINE = re.compile(r"^p3 serving .* at (http://\S+?)/v1\s*$")
START_TIMEOUT_S = 180.0

EDGE_SCRIPT = (
    "import argparse, sys; from p3.log import setup_logging; from p3.nodes.edge import edge; "
    "p = argparse.ArgumentParser(); edge.add_arguments(p); setup_logging('warning'); "
    "sys.exit(edge.main(p.parse_args(sys.argv[1:])))"
)


@dataclass
class Cluster:
    url: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    coordinator: str = ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_available() -> bool:
    """Whether the CLI has grown its cluster commands (`p3 edge` and `p3 serve` with --nodes)."""
    import argparse

    from p3.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "edge" in action.choices
    return False


def start(num_nodes: int = 1, edge_args: tuple[str, ...] = (), own: bool = False) -> Cluster:
    """own: our launcher even when `p3 serve` exists (to pass edge-only flags)."""
    if not own and serve_available() and not os.environ.get("P3_TEST_OWN_LAUNCHER"):
        return serve("--nodes", str(num_nodes), *edge_args)
    cluster_proc = _spawn([sys.executable, __file__, str(num_nodes)])
    coordinator = _wait_ready(cluster_proc)["coordinator"]
    edge_cmd = [sys.executable, "-c", EDGE_SCRIPT, "--coordinator", coordinator, "--port", "0",
                "--insecure"]  # fmt: skip
    edge_proc = _spawn([*edge_cmd, *edge_args])
    try:
        url = _wait_ready(edge_proc)["url"]
        wait_routed(url)
    except Exception:
        Cluster("", [cluster_proc, edge_proc]).stop()
        raise
    return Cluster(url, [cluster_proc, edge_proc], coordinator)


def serve(*args: str) -> Cluster:
    """`p3 serve --port 0 ARGS` as a subprocess, once it has a ready replica; stopped again
    if it never gets there."""
    proc = _spawn([sys.executable, "-m", "p3", "serve", "--port", "0", *args])
    cluster = Cluster("", [proc])
    try:
        cluster.url = _wait_ready(proc)["url"]
        wait_routed(cluster.url)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, command line) of each child process of pid (p3 serve's coordinator, nodes, edge)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if proc.name.isdigit() and parent == pid:
                found.append((int(proc.name), (proc / "cmdline").read_bytes().decode().split("\0")))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    """A process that is there and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def wait_routed(url: str, timeout_s: float = 60.0) -> None:
    """Until the edge has a ready replica (GET /ready answers 200)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise TimeoutError(f"{url} has no ready replica after {timeout_s} s")


def wait_model(url: str, model: str, timeout_s: float = 60.0) -> None:
    """Until GET /v1/models lists model (its replica is routed and its tokenizer loaded)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
            if model in {m["id"] for m in json.load(r)["data"]}:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} does not list {model} after {timeout_s} s")


class MixedStreams:
    """Stream i of a mixed load with the openai SDK: odd ones seeded at temperature 0.8, even
    ones greedy, all ignore_eos (so max_tokens each); calling it gives (text, finish, usage)
    and appends the stream's longest pause to max_gaps."""

    def __init__(self, model: str, prompt: str, max_tokens: int, seed_base: int):
        self.model, self.prompt, self.max_tokens = model, prompt, max_tokens
        self.seed_base = seed_base
        self.max_gaps: list[float] = []

    def request(self, i: int) -> dict:
        seeded = {"temperature": 0.8, "seed": self.seed_base + i} if i % 2 else {"temperature": 0}
        return {
            "model": self.model,
            "prompt": self.prompt.format(i=i),
            "max_tokens": self.max_tokens,
            "extra_body": {"ignore_eos": True},
            **seeded,
        }

    async def __call__(self, client, i: int, started=None) -> tuple[str, str | None, Any]:
        text, finish, usage, max_gap = await stream_completion(client, self.request(i), started)
        self.max_gaps.append(max_gap)
        return text, finish, usage


async def stream_completion(client, body: dict, started=None) -> tuple[str, str | None, Any, float]:
    """Stream one completion with the openai SDK: (text, finish reason, usage, the longest
    pause between two chunks after the first). started (an asyncio.Event) is set once more
    than 20 characters have come."""
    chunks = await client.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish = "", None, None
    last, gaps = time.monotonic(), []
    async for chunk in chunks:
        if chunk.choices:
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if started is not None and len(text) > 20:
                started.set()
        if chunk.usage:
            usage = chunk.usage
    return text, finish, usage, max(gaps[1:], default=0.0)


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)


def _wait_ready(proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not selector.select(timeout=0.5):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            continue
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if line.startswith(READY_PREFIX):
            return json.loads(line[len(READY_PREFIX) :])
        if (served := SERVING_LINE.search(line)) is not None:  # `p3 serve` says it this way
            return {"url": served.group(1)}
    proc.kill()
    raise TimeoutError(f"{proc.args} not ready after {timeout_s} s")


async def _run_cluster(num_nodes: int) -> None:
    """A coordinator and num_nodes nodes in one process (the fallback before `p3 serve`)."""
    from p3.config import EngineConfig
    from p3.log import setup_logging
    from p3.nodes.coordinator.coordinator import Coordinator, CoordinatorConfig
    from p3.nodes.node.node import Node, NodeConfig

    setup_logging("warning")
    coordinator = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:0"))
    actors = [coordinator]
    tasks = [asyncio.create_task(coordinator.run())]
    await coordinator.wait_ready()
    engine = EngineConfig(kv_cache_bytes=256 << 20)
    for i in range(num_nodes):
        node = Node(NodeConfig(coordinator.address, node_id=f"node-{i}", engine=engine))
        actors.append(node)
        tasks.append(asyncio.create_task(node.run()))
        await node.wait_ready()
    print(READY_PREFIX + json.dumps({"coordinator": coordinator.address}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for actor in reversed(actors):
        actor.stop("abort")
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(_run_cluster(int(sys.argv[1])))
