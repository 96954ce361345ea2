"""The edge's Prometheus metrics, vLLM's names with a p3: prefix, in a per-edge registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from p3.protocol import messages as m

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_success = Counter(
            "p3:request_success",
            "Finished requests by finish reason",
            ["finished_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            "p3:request_failure", "Requests that ended in an error, by code", ["code"], registry=r
        )
        self.prompt_tokens = Counter("p3:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("p3:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "p3:time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "p3:inter_token_latency_seconds",
            "Time between tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "p3:e2e_request_latency_seconds", "End-to-end latency", buckets=E2E_BUCKETS, registry=r
        )
        self.running = Gauge("p3:num_requests_running", "Running requests", ["node"], registry=r)
        self.waiting = Gauge("p3:num_requests_waiting", "Waiting requests", ["node"], registry=r)
        self.kv_usage = Gauge("p3:kv_cache_usage_perc", "KV cache usage, 0-1", ["node"], registry=r)
        self.edge_overhead = Histogram(
            "p3:edge_overhead_seconds",
            "The edge's own time on a streamed request: ingress (HTTP request in to its Submit "
            "sent), first_token (the frame with the first text in to its SSE event written)",
            ["leg"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.edge_pending = Gauge("p3:edge_requests_pending", "Requests in this edge", registry=r)
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

    def observe_routes(self, routes: list[m.Route]) -> None:
        for gauge in (self.running, self.waiting, self.kv_usage):
            gauge.clear()
        for route in routes:
            self.running.labels(route.node_id).set(route.load.num_running)
            self.waiting.labels(route.node_id).set(route.load.num_waiting)
            self.kv_usage.labels(route.node_id).set(kv_usage(route))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def kv_usage(route: m.Route) -> float:
    if route.num_kv_blocks <= 0:
        return 0.0
    return 1.0 - route.load.num_free_blocks / route.num_kv_blocks
