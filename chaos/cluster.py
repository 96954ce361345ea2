"""The cluster a chaos run attacks: a coordinator, N nodes and an edge as real processes
(`python -m p3 coordinator|node|edge`), with a fault proxy on every cluster link.

The edge is reached directly (its clients are the workload's); `restart_edge` kills it and
starts it again on the same port.

Links (each a `FaultProxy` in this process, on loopback):
- `coord<-node-i`: node i dials the coordinator through it (heartbeats, placement);
- `node-i<-edge`: the edge dials node i through it (Submit/Cancel out, Tokens back): node i
  binds a fixed port and advertises the proxy's;
- `coord<-edge`: the edge's route tables.
Every address is fixed for the run, so a restarted process binds where the old one did and
its peers reconnect by themselves. Each child logs JSON lines to RUN_DIR/logs/NAME.log (the
checker reads the coordinator's for detection times) and carries P3_CHAOS_RUN=<id> in its
environment, which is how `leftovers()` finds any p3 process still alive after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from chaos.proxy import FaultProxy
from p3.nodes.actor.launch import Child, free_port, python_m_p3, stop_all, wait_ready
from p3.protocol.security import generate

RUN_ENV = "P3_CHAOS_RUN"
LOCALHOST = "127.0.0.1"
COMMON = ["--log-level", "info", "--log-json"]


@dataclass
class Settings:
    num_nodes: int = 2
    dtype: str = "float32"  # bf16 moved streams may differ from the reference (rounding)
    kv_cache_bytes: int = 128 << 20
    heartbeat_interval_s: float = 0.1
    heartbeat_misses: int = 3
    hung_after_s: float = 5.0  # busy with no step this long: dead (an fp32 prefill chunk of
    # 256 tokens on one thread, sharing 2 cores with everything else, took over 1.5 s)
    # the edge moves a stream whose tokens stop this long: a last resort (deaths are declared
    # by the coordinator, broken links seen by ZMTP heartbeats). At 3 s it moved streams that
    # were only queued behind other moved streams' re-prefill on a busy node.
    token_timeout_s: float = 20.0
    threads_per_node: int = 1
    model: str | None = None  # None: the embedded default
    ready_timeout_s: float = 180.0
    # a prefill chunk of 256 tokens per step: a moved stream's re-prefill then stalls the
    # survivor's own streams for one chunk at a time (2048 stalled them for 2 s in fp32)
    max_num_batched_tokens: int = 256
    extra_node_args: list[str] = field(default_factory=list)


class ChaosCluster:
    def __init__(self, settings: Settings, run_dir: Path, run_id: str):
        self.settings = settings
        self.run_dir = run_dir
        self.run_id = run_id
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.coordinator_port = 0  # bound by the first coordinator, then kept across restarts
        self.node_ports = [free_port(LOCALHOST) for _ in range(settings.num_nodes)]
        self.proxies: dict[str, FaultProxy] = {}
        self.coordinator: Child | None = None
        self.nodes: list[Child | None] = [None] * settings.num_nodes
        self.edge: Child | None = None
        self.edge_port = 0
        self.url = ""
        self._logs: dict[str, TextIO] = {}
        self.pids_seen: set[int] = set()
        self.keys = run_dir / "keys"  # every member its own CurveZMQ key, as in production
        if not self.keys.exists():
            nodes = [f"node-{i}" for i in range(settings.num_nodes)]
            generate(self.keys, nodes, ["edge-0"])

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.start_coordinator()
        await asyncio.to_thread(wait_ready, [self.coordinator], s.ready_timeout_s)
        self.coordinator_port = int(self.coordinator.info["address"].rsplit(":", 1)[1])
        for i, port in enumerate(self.node_ports):
            await self._proxy(f"coord<-node-{i}", self.coordinator_port)
            await self._proxy(f"node-{i}<-edge", port)
        await self._proxy("coord<-edge", self.coordinator_port)
        for i in range(s.num_nodes):
            self.start_node(i)
        nodes = [n for n in self.nodes if n is not None]
        await asyncio.to_thread(wait_ready, nodes, s.ready_timeout_s)
        await self.start_edge()  # on port 0 the first time: it binds a free one itself
        self.edge_port = int(self.url.rsplit(":", 1)[1])

    async def start_edge(self) -> None:
        """The edge, on its port (the same one when it starts again), until it is ready."""
        s = self.settings
        self.edge = self._child(
            "edge",
            COMMON + ["edge", "--coordinator", self._via("coord<-edge"), "--port",
             str(self.edge_port), "--token-timeout", str(s.token_timeout_s), *self._model(),
             *self._keys()],
            ready_path="/ready",
        )  # fmt: skip
        await asyncio.to_thread(wait_ready, [self.edge], s.ready_timeout_s)
        self.url = self.edge.info["url"]

    def start_coordinator(self) -> None:
        s = self.settings
        self.coordinator = self._child(
            "coordinator",
            COMMON + ["coordinator", "--bind", f"tcp://{LOCALHOST}:{self.coordinator_port}",
             "--heartbeat-interval", str(s.heartbeat_interval_s), "--heartbeat-misses",
             str(s.heartbeat_misses), "--hung-after", str(s.hung_after_s), *self._keys()],
        )  # fmt: skip

    def start_node(self, i: int) -> Child:
        s = self.settings
        node = self._child(
            f"node-{i}",
            COMMON + ["node", "--coordinator", self._via(f"coord<-node-{i}"),
             "--node-id", f"node-{i}", "--bind", f"tcp://{LOCALHOST}:{self.node_ports[i]}",
             "--advertise-port", str(self.proxies[f"node-{i}<-edge"].port),
             "--threads", str(s.threads_per_node), "--max-threads",
             str(len(os.sched_getaffinity(0))), "--dtype", s.dtype,
             "--kv-cache-memory", str(s.kv_cache_bytes), "--max-num-batched-tokens",
             str(s.max_num_batched_tokens), *self._model(), *self._keys(), *s.extra_node_args],
        )  # fmt: skip
        self.nodes[i] = node
        return node

    async def stop(self, timeout_s: float = 30.0) -> None:
        children = [c for c in [self.edge, *self.nodes, self.coordinator] if c is not None]
        await asyncio.to_thread(stop_all, children, timeout_s)
        for proxy in self.proxies.values():
            await proxy.close()
        for log in self._logs.values():
            log.close()

    def leftovers(self) -> list[int]:
        """Pids of live processes of this run (ours or their children): none after stop."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                environ = (entry / "environ").read_bytes().split(b"\0")
                if f"{RUN_ENV}={self.run_id}".encode() in environ and _alive(entry):
                    found.append(int(entry.name))
        return found

    # -- what the nemesis acts on -----------------------------------------------------------

    def node_pid(self, i: int) -> int | None:
        node = self.nodes[i]
        return node.pid if node is not None and node.proc.poll() is None else None

    def signal_node(self, i: int, signum: int) -> None:
        node = self.nodes[i]
        if node is not None:
            node.signal(signum)

    async def wait_node_exit(self, i: int, timeout_s: float) -> int | None:
        node = self.nodes[i]
        if node is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(node.proc.wait, timeout_s)
        return None

    async def restart_node(self, i: int) -> None:
        """As a supervisor would: kill what is left of node i, start it again (same ports),
        and wait until it announces itself (placed and serving)."""
        node = self.nodes[i]
        if node is not None and node.proc.poll() is None:
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGKILL)
            await asyncio.to_thread(node.proc.wait)
        node = self.start_node(i)
        await asyncio.to_thread(wait_ready, [node], self.settings.ready_timeout_s)

    def edge_alive(self) -> bool:
        return self.edge is not None and self.edge.proc.poll() is None

    async def restart_edge(self) -> None:
        """kill -9 the edge and start it again on its port, as `p3 serve` does: its streams
        go on on their nodes until clients resume them there."""
        if self.edge_alive():
            self.edge.signal(signal.SIGKILL)
            await asyncio.to_thread(self.edge.proc.wait)
        await self.start_edge()

    async def restart_coordinator(self) -> None:
        """kill -9 the coordinator and start it again on its address."""
        coordinator = self.coordinator
        if coordinator is not None and coordinator.proc.poll() is None:
            coordinator.signal(signal.SIGKILL)
            await asyncio.to_thread(coordinator.proc.wait)
        self.start_coordinator()
        await asyncio.to_thread(wait_ready, [self.coordinator], self.settings.ready_timeout_s)

    async def cluster_state(self) -> dict:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/cluster") as r:
            return await r.json()

    async def wait_nodes(
        self, done: Callable[[list[dict]], bool], timeout_s: float, interval_s: float = 0.05
    ) -> bool:
        """Poll the edge's /cluster nodes until done(nodes); False after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if done((await self.cluster_state())["nodes"]):
                    return True
            await asyncio.sleep(interval_s)  # polling the edge's table, bounded by the deadline
        return False

    # -- plumbing ---------------------------------------------------------------------------

    async def _proxy(self, name: str, target_port: int) -> None:
        proxy = FaultProxy(LOCALHOST, target_port, name=name)
        await proxy.start()
        self.proxies[name] = proxy

    def _via(self, link: str) -> str:
        return f"tcp://{LOCALHOST}:{self.proxies[link].port}"

    def _model(self) -> list[str]:
        return ["--model", self.settings.model] if self.settings.model else []

    def _keys(self) -> list[str]:
        return ["--keys", str(self.keys)]

    def _child(self, name: str, args: list[str], ready_path: str | None = None) -> Child:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = open(self.run_dir / "logs" / f"{name}.log", "a", buffering=1)  # noqa: SIM115
        env = {RUN_ENV: self.run_id, "P3_FAULT_SIGNALS": "1"}
        child = Child(name, python_m_p3(*args), env=env, output=log, ready_path=ready_path)
        self.pids_seen.add(child.pid)
        return child


def _alive(proc_dir: Path) -> bool:
    """Not a zombie (a reaped-later child still has /proc/PID)."""
    with contextlib.suppress(OSError, IndexError):
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False
