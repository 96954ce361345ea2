"""Traces (`--otlp-endpoint URL`): one trace per request, across its edge and its nodes.

The edge opens a server span per /v1/ request, continuing the client's W3C `traceparent` (a
new trace without one); its samples' Submits carry that span's traceparent to the nodes. A node
opens a span per sample under it: "queued" when the Submit is taken, a "prefill" child span
(the engine step that computed the prompt and sampled the first token), "first_token",
"finished" with its reason and tokens. A sample moved to a node after a failover (its Submit
carries tokens generated elsewhere) is a span of its own in the same trace, `p3.sample.move`.
Spans leave in batches over OTLP/HTTP (protobuf) from a BatchSpanProcessor's thread
(OTEL_BSP_SCHEDULE_DELAY, in ms, says how often: 5000 by default), and what is queued is sent
at shutdown.

Off (no --otlp-endpoint, the default) no OpenTelemetry module is imported and every function
here returns at its first line. On, the work is per request and per phase, never per token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from p3.engine.sequence import StepOutput
    from p3.nodes.node.inflight import InFlightTable
    from p3.protocol.messages import Submit

EXPORT_TIMEOUT_S = 3.0  # one batch's POST, retries included

_tracer: Tracer | None = None
_processor: Any = None  # the BatchSpanProcessor


def configure(endpoint: str | None, service: str, resource: dict[str, str]) -> None:
    """Export this process's spans to endpoint (a collector's /v1/traces URL) as service
    (p3-edge, p3-node), with resource attributes (p3.edge_id, p3.node_id); None: stay off."""
    global _tracer, _processor
    if endpoint is None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": service, **resource}),
        shutdown_on_exit=False,  # shutdown() below, bounded: a node exits with os._exit
    )
    _processor = BatchSpanProcessor(OTLPSpanExporter(endpoint, timeout=EXPORT_TIMEOUT_S))
    provider.add_span_processor(_processor)
    _tracer = provider.get_tracer("p3")


def shutdown() -> None:
    """Send the spans still queued, then stop (blocking, at most about EXPORT_TIMEOUT_S a
    batch: call it off the event loop)."""
    if _processor is not None:
        _processor.force_flush()
        _processor.shutdown()


def _propagator():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans are stamped in."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


# -- the edge ----------------------------------------------------------------------------------


def edge_middlewares() -> list:
    """aiohttp middlewares: the server span of each /v1/ request ([] when off)."""
    if _tracer is None:
        return []
    from aiohttp import web
    from opentelemetry.trace import SpanKind, StatusCode

    propagator = _propagator()

    @web.middleware
    async def trace_request(request: web.Request, handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        with _tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagator.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(StatusCode.ERROR)
            return response

    return [trace_request]


def annotate(**attributes: Any) -> None:
    """Set p3.<name> attributes on the current request's span (the edge's), if one records."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span

    span = get_current_span()
    if span.is_recording():  # a stream's pump may outlive its span (its client left)
        span.set_attributes({f"p3.{name}": value for name, value in attributes.items()})


def traceparent() -> str:
    """The current span's W3C traceparent header, for a Submit ("" when off or outside one)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator().inject(carrier)
    return carrier.get("traceparent", "")


# -- a node ------------------------------------------------------------------------------------


class SampleTraces:
    """A node's span per sample in flight, by request id, ended when it finishes or goes."""

    def __init__(self) -> None:
        self._spans: dict[str, Span] = {}
        self._waiting: set[str] = set()  # taken, no token yet

    def submitted(self, submit: Submit, edge: bytes) -> None:
        """The Submit was taken: its span opens, with "queued"."""
        if _tracer is None:
            return
        moved = bool(submit.output_token_ids)
        span = self._start(submit, edge, moved)
        span.add_event("queued")
        self._spans[submit.request_id] = span
        self._waiting.add(submit.request_id)

    def rejected(self, submit: Submit, edge: bytes, code: str, reason: str) -> None:
        """Refused: a span with only that (the edge tries another replica, in the trace too)."""
        if _tracer is None:
            return
        span = self._start(submit, edge, bool(submit.output_token_ids))
        span.add_event("rejected", {"p3.code": code, "p3.reason": reason})
        span.end()

    def on_step(
        self, outputs: list[StepOutput], started_at: float, inflight: InFlightTable
    ) -> None:
        """One engine step's outputs (started_at: time.monotonic() when it began), before
        inflight counts them: the first token of a waiting sample closes its prefill; a
        finished sample's span ends with its reason and its output tokens, all told."""
        if not self._spans:
            return
        for out in outputs:
            span = self._spans.get(out.request_id)
            if span is None:
                continue
            if out.request_id in self._waiting:
                self._waiting.discard(out.request_id)
                self._prefill(span, out, _wall_ns(started_at), time.time_ns())
            if out.finished:
                entry = inflight.get(out.request_id) or inflight.orphans.get(out.request_id)
                before = entry.num_output_tokens if entry is not None else 0
                finished = {"p3.finish_reason": out.finish_reason,
                            "p3.output_tokens": before + len(out.new_token_ids)}  # fmt: skip
                span.add_event("finished", finished)
                self._end(out.request_id)

    def cancelled(self, entries: Iterable[Any]) -> None:
        """Entries (anything with a request_id) ended without finishing here: cancelled by
        their edge, fenced, aborted, or their edge went away."""
        if not self._spans:
            return
        for entry in entries:
            if (span := self._spans.get(entry.request_id)) is not None:
                span.add_event("cancelled")
                self._end(entry.request_id)

    def _start(self, submit: Submit, edge: bytes, moved: bool) -> Span:
        from opentelemetry.trace import SpanKind

        from p3.protocol.security import routing_name

        parent = _propagator().extract({"traceparent": submit.traceparent})
        attributes = {
            "p3.request_id": submit.request_id,
            "p3.edge_id": routing_name(edge),
            "p3.prompt_tokens": len(submit.prompt_token_ids),
            "p3.moved": moved,
        }
        if moved:
            attributes["p3.resumed_at_token"] = len(submit.output_token_ids)
        name = "p3.sample.move" if moved else "p3.sample"
        return _tracer.start_span(name, parent, SpanKind.SERVER, attributes)

    def _prefill(self, span: Span, out: StepOutput, step_ns: int, now_ns: int) -> None:
        from opentelemetry.trace import set_span_in_context

        prefill = _tracer.start_span(
            "prefill",
            set_span_in_context(span),
            start_time=max(step_ns, span.start_time),  # a step may start as its Submit is taken
            attributes={"p3.cached_tokens": out.num_cached_tokens},
        )
        prefill.end(now_ns)
        span.add_event("first_token", timestamp=now_ns)

    def _end(self, request_id: str) -> None:
        span = self._spans.pop(request_id)
        self._waiting.discard(request_id)
        span.end()
