"""A coordinator's or a node's status server: GET /health, /ready and /metrics over HTTP.

Off unless asked for (`--status-port PORT`; 0 binds any free port, announced as `status_url`
in the process's P3_READY line). Kubernetes probes and Prometheus scrapes use these paths:

    /health  200 while the actor runs (starting, running, stopping), else 503
    /ready   200 while it serves (the coordinator listens; a node has its engine loaded and is
             registered), else 503
    /metrics this process's Prometheus registry: its own series (CoordinatorMetrics,
             NodeMetrics) and the frames its sockets dropped or fenced (FrameCollector)

The edge serves the same three paths on its API port (p3.nodes.edge.api). docs/design.md
"Metrics" lists every series and where it comes from.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from p3.nodes.actor.base import Actor, Status
from p3.protocol import wire

LIVE = frozenset({Status.STARTING, Status.RUNNING, Status.STOPPING})
# vLLM's request_queue_time_seconds buckets to 120 s, finer below 0.3 s (a CPU node's queue)
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5)
QUEUE_TIME_BUCKETS += (5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
# silence at a death's declaration: 0.3 s with the default 0.1 s x 3 misses, up to 2x that
# on a late host; 10 s for a node still loading
DETECTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 2.0, 5.0, 10.0, 30.0)


class FrameCollector(Collector):
    """p3:frames_dropped_total / p3:frames_fenced_total by socket: every wire.Decoder of
    this process (malformed frames dropped; frames of an epoch declared dead, ignored)."""

    def collect(self):
        dropped = CounterMetricFamily(
            "p3:frames_dropped", "Frames that did not decode, dropped", labels=["socket"]
        )
        fenced = CounterMetricFamily(
            "p3:frames_fenced",
            "Frames from an epoch declared dead (a fenced sender), ignored",
            labels=["socket"],
        )
        for socket_name, (num_dropped, num_fenced) in frame_counts().items():
            dropped.add_metric([socket_name], num_dropped)
            fenced.add_metric([socket_name], num_fenced)
        yield dropped
        yield fenced


def frame_counts() -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for decoder in list(wire.DECODERS):
        d, f = counts.get(decoder.socket_name, (0, 0))
        counts[decoder.socket_name] = (d + decoder.num_dropped, f + decoder.num_fenced)
    return counts


class ProcessMetrics:
    """A process's registry, its frames' counts in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FrameCollector())

    def render(self) -> bytes:
        return generate_latest(self.registry)


# why the coordinator declares a node dead (membership.find_dead, Fatal, an orphaned rank)
DEATH_CAUSES = ("heartbeat-timeout", "no-progress", "fatal", "orphaned", "other")


def death_cause(cause: str) -> str:
    """A declaration's cause as a label: its leading word ("heartbeat-timeout (0.312s
    silent)" -> heartbeat-timeout, "fatal: ..." -> fatal, "orphaned rank" -> orphaned)."""
    word = re.match(r"[a-z-]+", cause)
    return word.group(0) if word and word.group(0) in DEATH_CAUSES else "other"


def with_labels(metric, values) -> None:
    """Each label value's series exists, at 0, before its first event: a rate over it is 0,
    not empty, and a dashboard shows that nothing happened."""
    for value in values:
        metric.labels(value)


class CoordinatorMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.node_deaths = Counter(
            "p3:node_deaths", "Nodes declared dead, by cause", ["cause"], registry=r
        )
        self.detection = Histogram(
            "p3:failure_detection_seconds",
            "Silence of a node when it was declared dead (time from its last message)",
            ["cause"],
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        with_labels(self.node_deaths, DEATH_CAUSES)
        with_labels(self.detection, DEATH_CAUSES)

    def observe_death(self, cause: str, silence_s: float) -> None:
        label = death_cause(cause)
        self.node_deaths.labels(label).inc()
        self.detection.labels(label).observe(silence_s)


class NodeMetrics(ProcessMetrics):
    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.queue_times_s: deque[float] = deque()  # the engine's, once it is loaded
        self.queue_time = Histogram(
            "p3:request_queue_time_seconds",
            "Time a request waited in the engine's queue before its first admission",
            ["model_name"],
            buckets=QUEUE_TIME_BUCKETS,
            registry=self.registry,
        ).labels(model_name)

    def render(self) -> bytes:
        """With the engine's waits since the last scrape (its step thread appends them)."""
        while self.queue_times_s:
            self.queue_time.observe(self.queue_times_s.popleft())
        return super().render()


class StatusServer:
    """/health, /ready and /metrics of one actor, on host:port (0: any free port)."""

    def __init__(
        self,
        actor: Actor,
        ready: Callable[[], bool],
        metrics: ProcessMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.actor, self.ready, self.metrics = actor, ready, metrics
        self.host, self.port = host, port
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.on_health)
        app.router.add_get("/ready", self.on_ready)
        app.router.add_get("/metrics", self.on_metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def on_health(self, request: web.Request) -> web.Response:
        status = self.actor.status
        return _status(status in LIVE, {"status": status.value})

    async def on_ready(self, request: web.Request) -> web.Response:
        ready = self.actor.is_running and self.ready()
        return _status(ready, {"status": "ready" if ready else "not ready"})

    async def on_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")


def _status(ok: bool, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=200 if ok else 503)


async def start_status(
    actor: Actor, host: str, port: int | None, ready: Callable[[], bool], metrics: ProcessMetrics
) -> StatusServer | None:
    """The actor's status server, started; None when port is None (off)."""
    if port is None:
        return None
    server = StatusServer(actor, ready, metrics, host, port)
    await server.start()
    return server
