"""The edge's Prometheus metrics, in a per-edge registry: vLLM's series under their names with
a p3: prefix (same type, unit and labels, model_name on each), then p3's own.

The engine state (running, waiting, KV usage, prefix cache) is per node, from the routing
table the coordinator publishes, which repeats each node's latest heartbeat Load: a node
label stands where vLLM has engine. docs/design.md "Metrics" lists every series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from p3.nodes.cluster.generation import FailureCode
from p3.nodes.cluster.samples import Sample
from p3.protocol import messages as m
from p3.status import ProcessMetrics, with_labels

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)
# vLLM's 1-2-5 series for request_prompt_tokens / request_generation_tokens
TOKEN_BUCKETS = tuple(float(k * 10**e) for e in range(6) for k in (1, 2, 5))
MODEL = ["model_name"]
EDGE_FAILURES = ("abandoned", "internal")  # request_failure codes besides a FailureCode's
MOVE_CAUSES = (FailureCode.TIMEOUT, FailureCode.NODE_DEAD, FailureCode.LINK_LOST)
RESUME_RESULTS = ("replayed", "adopted", "not_found")


class RoutesCollector(Collector):
    """Each routed node's engine state, as its latest heartbeat said."""

    def __init__(self) -> None:
        self.routes: list[m.Route] = []

    def collect(self):
        labels = ["model_name", "node"]
        running = GaugeMetricFamily(
            "p3:num_requests_running", "Requests in the node's running batch", labels=labels
        )
        waiting = GaugeMetricFamily(
            "p3:num_requests_waiting", "Requests queued in the node's engine", labels=labels
        )
        usage = GaugeMetricFamily(
            "p3:kv_cache_usage_perc", "KV cache usage, 0-1 (1 = every block used)", labels=labels
        )
        queries = CounterMetricFamily(
            "p3:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=labels
        )
        hits = CounterMetricFamily(
            "p3:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels=labels
        )
        for route in self.routes:
            key, load = [route.model, route.node_id], route.load
            running.add_metric(key, load.num_running)
            waiting.add_metric(key, load.num_waiting)
            usage.add_metric(key, kv_usage(route))
            queries.add_metric(key, load.num_prefix_cache_queries)
            hits.add_metric(key, load.num_prefix_cache_hits)
        yield from (running, waiting, usage, queries, hits)


class EdgeMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.nodes = RoutesCollector()
        r.register(self.nodes)
        self.request_success = Counter(
            "p3:request_success",
            "Finished requests by finish reason",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("p3:prompt_tokens", "Prompt tokens", MODEL, registry=r)
        self.generation_tokens = Counter(
            "p3:generation_tokens", "Tokens generated", MODEL, registry=r
        )
        self.request_prompt_tokens = Histogram(
            "p3:request_prompt_tokens",
            "Prompt tokens per finished request",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "p3:request_generation_tokens",
            "Tokens generated per finished request",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "p3:time_to_first_token_seconds",
            "Time to first token",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "p3:inter_token_latency_seconds",
            "Time between tokens",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "p3:e2e_request_latency_seconds",
            "End-to-end latency",
            MODEL,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        # p3's own
        self.request_failure = Counter(
            "p3:request_failure", "Requests that ended in an error, by code", ["code"], registry=r
        )
        self.edge_overhead = Histogram(
            "p3:edge_overhead_seconds",
            "The edge's own time on a streamed request: ingress (HTTP request in to its Submit "
            "sent), first_token (the frame with the first text in to its SSE event written)",
            ["leg"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.edge_pending = Gauge("p3:edge_requests_pending", "Requests in this edge", registry=r)
        self.streams_moved = Counter(
            "p3:streams_moved",
            "Samples moved to another replica mid-request (failover), by cause",
            ["cause"],
            registry=r,
        )
        self.stream_resumes = Counter(
            "p3:stream_resumes",
            "Streams a client resumed here with Last-Event-ID: from this edge's replay "
            "(replayed), adopted from their nodes (adopted), or not found (not_found)",
            ["result"],
            registry=r,
        )
        self.streams_adopted = Counter(
            "p3:streams_adopted",
            "Streams another edge (or this one before a restart) started, resumed here",
            registry=r,
        )
        self.streams_handed_over = Counter(
            "p3:streams_handed_over",
            "Streams this edge served until their client resumed them on another edge",
            registry=r,
        )
        with_labels(self.request_failure, [*FailureCode, *EDGE_FAILURES])
        with_labels(self.streams_moved, MOVE_CAUSES)
        with_labels(self.stream_resumes, RESUME_RESULTS)
        with_labels(self.edge_overhead, ("ingress", "first_token"))

    def observe_routes(self, routes: list[m.Route]) -> None:
        self.nodes.routes = routes

    def observe_finished(self, samples: list[Sample], num_prompt_tokens: int) -> None:
        """A request's samples, all finished (num_prompt_tokens: its distinct prompts')."""
        model = samples[0].journal.model
        for sample in samples:
            self.request_success.labels(model, sample.finish_reason or "abort").inc()
            self.generation_tokens.labels(model).inc(sample.num_output_tokens)
            self.request_generation_tokens.labels(model).observe(sample.num_output_tokens)
        self.prompt_tokens.labels(model).inc(num_prompt_tokens)
        self.request_prompt_tokens.labels(model).observe(num_prompt_tokens)

    def observe_moves(self, causes: Iterable[str]) -> None:
        for cause in causes:
            self.streams_moved.labels(cause).inc()


def kv_usage(route: m.Route) -> float:
    if route.num_kv_blocks <= 0:
        return 0.0
    return 1.0 - route.load.num_free_blocks / route.num_kv_blocks
