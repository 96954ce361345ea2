"""`p3 serve --otlp-endpoint URL`: one trace per request across the edge and its node, sent
over OTLP/HTTP to a receiver in this test (aiohttp, POST /v1/traces, the protobuf decoded)."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ..model.tiny import make_tiny_chat_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(60)
WAIT_S = 10.0  # for spans: the exporters send every 50 ms here


@dataclass
class Span:
    service: str
    resource: dict
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[tuple[str, int, dict]]


def _values(pairs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


class Receiver:
    """An OTLP/HTTP trace receiver on an ephemeral port, on a thread of its own."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.changed = threading.Condition()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10), "the receiver did not start"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._on_traces)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        started.set()
        self._loop.run_forever()

    async def _on_traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        spans = []
        for resource_spans in export.resource_spans:
            resource = _values(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                spans += [
                    Span(
                        resource["service.name"],
                        resource,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        s.name,
                        s.kind,
                        s.start_time_unix_nano,
                        s.end_time_unix_nano,
                        _values(s.attributes),
                        [(e.name, e.time_unix_nano, _values(e.attributes)) for e in s.events],
                    )  # fmt: skip
                    for s in scope.spans
                ]
        with self.changed:
            self.spans += spans
            self.changed.notify_all()
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def wait_for(self, found, what: str):
        """found(spans) once it is truthy (spans arrive in batches, as nodes finish)."""
        deadline = time.monotonic() + WAIT_S
        with self.changed:
            while not (result := found(list(self.spans))):
                if not self.changed.wait(deadline - time.monotonic()):
                    raise AssertionError(f"no {what} in {WAIT_S} s: {self.spans}")
            return result

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_dir):
    return make_tiny_chat_model(tmp_path_factory.mktemp("model"), default_model_dir)


@pytest.fixture(scope="module")
def client(receiver, model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms between the exporters' sends
        cluster = openai_cluster.serve(
            "--model", str(model), "--dtype", "float32", "--otlp-endpoint", receiver.url
        )
    try:
        yield openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
    finally:
        cluster.stop()


def _request_spans(receiver: Receiver, edge_span: Span) -> tuple[Span, Span]:
    """The node's span of the edge span's one sample, and its prefill span."""

    def found(spans):
        node = [s for s in spans if s.parent_id == edge_span.span_id]
        prefill = [s for s in spans if node and s.parent_id == node[0].span_id]
        return (node[0], prefill[0]) if node and prefill else None

    node, prefill = receiver.wait_for(found, "node span under the edge's")
    return node, prefill


def _check_node_span(node: Span, prefill: Span, edge_span: Span, num_tokens: int) -> None:
    assert node.trace_id == prefill.trace_id == edge_span.trace_id
    assert (node.service, node.name, node.resource["p3.node_id"]) == (
        "p3-node",
        "p3.sample",
        "node-0",
    )
    assert node.attributes["p3.request_id"] == edge_span.attributes["p3.request_id"] + "-0"
    assert node.attributes["p3.moved"] is False
    assert [name for name, _, _ in node.events] == ["queued", "first_token", "finished"]
    times = [t for _, t, _ in node.events]
    assert node.start_ns <= times[0] <= prefill.start_ns <= prefill.end_ns == times[1] <= times[2]
    assert edge_span.start_ns <= node.start_ns <= node.end_ns <= edge_span.end_ns
    finished = node.events[2][2]
    assert finished == {"p3.finish_reason": "length", "p3.output_tokens": num_tokens}


def test_a_completion_continues_the_clients_trace_through_edge_and_node(receiver, client):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    out = client.completions.create(
        model=client.models.list().data[0].id, prompt="Once upon a time", max_tokens=6,
        temperature=0, extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )  # fmt: skip
    edge_span = receiver.wait_for(
        lambda spans: next(
            (s for s in spans if s.trace_id == trace_id and s.service == "p3-edge"), None
        ),
        "edge span in the client's trace",
    )
    assert edge_span.parent_id == parent_id
    assert (edge_span.name, edge_span.kind) == ("POST /v1/completions", 2)  # SPAN_KIND_SERVER
    assert edge_span.resource["p3.edge_id"] == "edge-0"
    attributes = edge_span.attributes
    assert attributes["p3.request_id"].startswith("req-")
    assert attributes["http.route"] == "/v1/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["p3.prompt_tokens"] == out.usage.prompt_tokens
    assert attributes["p3.completion_tokens"] == out.usage.completion_tokens == 6
    node, prefill = _request_spans(receiver, edge_span)
    _check_node_span(node, prefill, edge_span, 6)


def test_a_streamed_chat_without_traceparent_gets_a_trace_of_its_own(receiver, client):
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in stream) >= 1
    edge_span = receiver.wait_for(
        lambda spans: next((s for s in spans if s.name == "POST /v1/chat/completions"), None),
        "edge span of the chat",
    )
    assert edge_span.parent_id == ""  # a root: a new trace
    assert edge_span.trace_id not in {
        s.trace_id for s in receiver.spans if s is not edge_span and s.service == "p3-edge"
    }
    assert edge_span.attributes["p3.completion_tokens"] == 5
    node, prefill = _request_spans(receiver, edge_span)
    _check_node_span(node, prefill, edge_span, 5)
