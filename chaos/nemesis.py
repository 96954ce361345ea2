"""The nemesis: one fault at a time on a running cluster, then repair, then wait until whole.

Kinds (each records `fault` with its wall-clock time, then `heal` once repaired, into the
history; the run waits until every node is routed again before the next fault):
- kill:      kill -9 the busiest node; restart it (as a supervisor would) once declared dead;
- term:      SIGTERM it (it drains what it runs, then exits); restart it;
- pause:     SIGSTOP it for 0.5-2 s, then SIGCONT (it wakes fenced and re-registers);
- raise:     an exception inside its next engine step (SIGUSR1 fault point): Fatal, exit;
- hang:      its step thread blocks (SIGUSR2 fault point) until declared hung; restart;
- partition: its link to the coordinator carries nothing for 0.5-2 s (declared dead while
             it still streams to the edge: fencing), then heals;
- isolate:   its link from the edge carries nothing for 0.5-4 s (the edge's token timeout
             moves its streams when it is long enough), then heals;
- reset:     its link from the edge stalls for 0.2-0.5 s and is then reset (TCP RST) with
             the frames it held: they are lost, and ZeroMQ reconnects;
- latency:   every link: 20 ms + up to 30 ms of jitter for 2-4 s;
- loss:      every link: 5 % of chunks held 200 ms (a retransmission) for 2-4 s;
- coordinator: kill -9 the coordinator and start it again on its address;
- edge:      kill -9 the edge and start it again on its port: its streams go on on their
             nodes, and the clients resume them there with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable

from chaos.cluster import ChaosCluster

KINDS = (
    "kill", "term", "pause", "raise", "hang", "partition", "isolate", "reset", "latency", "loss",
    "coordinator", "edge",
)  # fmt: skip
DEATHS = {"kill", "pause", "raise", "hang", "partition"}  # the coordinator must declare these
WHOLE_TIMEOUT_S = 90.0


class Nemesis:
    def __init__(
        self, cluster: ChaosCluster, rng: random.Random, record: Callable[[dict], None]
    ):
        self.cluster = cluster
        self.rng = rng
        self.record = record
        self.faults: list[dict] = []
        self.acting: tuple[str, int] | None = None  # (kind, node) while a fault is under way

    async def run(self, kinds: tuple[str, ...], count: int, until: asyncio.Event,
                  started: asyncio.Event, pause_s: tuple[float, float] = (0.2, 1.0)) -> None:
        """Up to count faults drawn from kinds, each after a pause, while `until` is unset;
        the first only once `started` (a token has streamed)."""
        await started.wait()
        for _ in range(count):
            await _wait_or(until, self.rng.uniform(*pause_s))
            if until.is_set():
                return
            await self.inject(self.rng.choice(kinds))

    async def inject(self, kind: str) -> None:
        target = await self._busiest()
        node = "edge-0" if kind == "edge" else f"node-{target}"
        fault = {"t": time.time(), "type": "fault", "kind": kind, "node": node}
        self.faults.append(fault)
        self.record(fault)
        self.acting = (kind, target)
        try:
            await getattr(self, f"_{kind}")(target)
        except asyncio.CancelledError:  # the workload ended first: the run repairs it
            self.record({"t": time.time(), "type": "cut", "kind": kind, "fault_t": fault["t"]})
            raise
        self.acting = None
        self.record({"t": time.time(), "type": "heal", "kind": kind, "node": node})
        whole = await self.wait_whole()
        self.record({"t": time.time(), "type": "whole" if whole else "stuck", "kind": kind})

    # -- the faults ---------------------------------------------------------------------------

    async def _kill(self, i: int) -> None:
        self.cluster.signal_node(i, signal.SIGKILL)
        await self.wait_dead(i)
        await self.cluster.restart_node(i)

    async def _term(self, i: int) -> None:
        self.cluster.signal_node(i, signal.SIGTERM)
        await self.cluster.wait_node_exit(i, 60.0)
        await self.cluster.restart_node(i)

    async def _pause(self, i: int) -> None:
        self.cluster.signal_node(i, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        finally:
            self.cluster.signal_node(i, signal.SIGCONT)

    async def _raise(self, i: int) -> None:
        self.cluster.signal_node(i, signal.SIGUSR1)
        if await self.cluster.wait_node_exit(i, 10.0) is None:  # idle: no step came
            self.cluster.signal_node(i, signal.SIGKILL)
        await self.cluster.restart_node(i)

    async def _hang(self, i: int) -> None:
        self.cluster.signal_node(i, signal.SIGUSR2)
        await self.wait_dead(i)
        await self.cluster.restart_node(i)  # a hung process is the supervisor's to kill

    async def _partition(self, i: int) -> None:
        await self._cut(f"coord<-node-{i}", (0.5, 2.0))

    async def _isolate(self, i: int) -> None:
        await self._cut(f"node-{i}<-edge", (0.5, 4.0))

    async def _cut(self, link: str, hold_s: tuple[float, float]) -> None:
        proxy = self.cluster.proxies[link]
        proxy.partition()
        try:
            await asyncio.sleep(self.rng.uniform(*hold_s))
        finally:
            proxy.heal()

    async def _reset(self, i: int) -> None:
        """Frames in flight are lost for sure: held for a moment (a stalled link), then the
        connection is reset with them still inside."""
        proxy = self.cluster.proxies[f"node-{i}<-edge"]
        proxy.partition()
        try:
            await asyncio.sleep(self.rng.uniform(0.2, 0.5))
            proxy.reset()
        finally:
            proxy.heal()

    async def _latency(self, i: int) -> None:
        for proxy in self.cluster.proxies.values():
            proxy.set_latency(0.02, 0.03)
        await self._hold_then_heal((2.0, 4.0))

    async def _loss(self, i: int) -> None:
        for proxy in self.cluster.proxies.values():
            proxy.set_loss(0.05, 0.2)
        await self._hold_then_heal((2.0, 4.0))

    async def _hold_then_heal(self, hold_s: tuple[float, float]) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(*hold_s))
        finally:
            for proxy in self.cluster.proxies.values():
                proxy.heal()

    async def _coordinator(self, i: int) -> None:
        await self.cluster.restart_coordinator()

    async def _edge(self, i: int) -> None:
        await self.cluster.restart_edge()

    # -- watching the cluster -----------------------------------------------------------------

    async def _busiest(self) -> int:
        """The node with the most streams under way (a fault there moves the most)."""
        num = self.cluster.settings.num_nodes
        with contextlib.suppress(Exception):
            nodes = (await self.cluster.cluster_state())["nodes"]
            loads = {n["id"]: n["load"]["num_running"] for n in nodes if "load" in n}
            ranked = sorted(range(num), key=lambda i: (-loads.get(f"node-{i}", -1), i))
            return ranked[0]
        return self.rng.randrange(num)

    async def wait_dead(self, i: int, timeout_s: float = 10.0) -> bool:
        return await self.cluster.wait_nodes(
            lambda nodes: _status(nodes, f"node-{i}") != "ready", timeout_s
        )

    async def wait_whole(self, timeout_s: float = WHOLE_TIMEOUT_S) -> bool:
        """Every node routed again (ready in /cluster)."""
        num = self.cluster.settings.num_nodes
        return await self.cluster.wait_nodes(
            lambda nodes: all(_status(nodes, f"node-{i}") == "ready" for i in range(num)),
            timeout_s,
        )


def _status(nodes: list[dict], node_id: str) -> str | None:
    for node in nodes:
        if node["id"] == node_id:
            return node.get("status")
    return None


async def _wait_or(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
