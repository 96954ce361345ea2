"""Tracing off (no --otlp-endpoint) costs no import; the flag names a bad URL clearly; a
node's sample spans for a move, a cancel and a refusal."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from p3 import tracing
from p3.engine.sequence import StepOutput
from p3.flags import add_tracing_args
from p3.nodes.node.inflight import InFlightTable
from p3.protocol import messages as m

pytestmark = pytest.mark.timeout(60)

# The edge's and the node's code paths with tracing off: the processes' own configure calls,
# an edge's app built and a request's samples made, a node's sample taken, stepped, finished
# and cancelled; then no OpenTelemetry module may be loaded.
UNTRACED = """
import sys
from p3 import tracing
from p3.engine.sequence import StepOutput
from p3.nodes.cluster.samples import make_samples
from p3.nodes.edge.api import make_app
from p3.nodes.edge.edge import Edge, EdgeConfig
from p3.nodes.node.inflight import InFlightTable
from p3.nodes.node.node import Node
from p3.protocol import messages as m
from p3.sampling_params import SamplingParams
from p3.tokenizer import NoTokenizer

tracing.configure(None, "p3-edge", {})
make_app(Edge(EdgeConfig("tcp://127.0.0.1:1")))
samples = make_samples("req-1", "m", [[1, 2]], SamplingParams(), NoTokenizer("none"))
submit = samples[0].journal.submit_message()
assert submit.traceparent == ""
traces = tracing.SampleTraces()
traces.submitted(submit, b"edge-0/x")
traces.rejected(submit, b"edge-0/x", "busy", "why")
traces.on_step([StepOutput(submit.request_id, [3], finish_reason="length")], 0.0, InFlightTable())
traces.cancelled([submit])
tracing.shutdown()
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
"""


def test_untraced_edge_and_node_import_no_opentelemetry():
    done = subprocess.run([sys.executable, "-c", UNTRACED], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "url, want",
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example/custom/path", "https://otel.example/custom/path"),
    ],
)
def test_otlp_endpoint_gets_the_traces_path_unless_it_names_one(url, want):
    parser = argparse.ArgumentParser()
    add_tracing_args(parser)
    assert parser.parse_args(["--otlp-endpoint", url]).otlp_endpoint == want


def test_otlp_endpoint_that_is_no_http_url_is_refused_by_name(capsys):
    parser = argparse.ArgumentParser()
    add_tracing_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--otlp-endpoint", "127.0.0.1:4318"])
    assert (
        "--otlp-endpoint: not an http:// or https:// URL: '127.0.0.1:4318'"
        in capsys.readouterr().err
    )


@pytest.fixture
def spans(monkeypatch):
    """Spans as the SDK ends them, in memory (the exporter swapped for the SDK's own)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    return exporter


def test_a_moved_sample_is_a_move_span_in_its_requests_trace(spans):
    trace_id, parent_id = "ab" * 16, "cd" * 8
    submit = m.Submit("req-1-0", [1, 2, 3], output_token_ids=[7, 8],
                      traceparent=f"00-{trace_id}-{parent_id}-01")  # fmt: skip
    traces = tracing.SampleTraces()
    traces.submitted(submit, b"edge-0/x")
    traces.on_step([StepOutput("req-1-0", [9], finish_reason="length")], 0.0, InFlightTable())
    move = next(s for s in spans.get_finished_spans() if s.name == "p3.sample.move")
    assert (f"{move.context.trace_id:032x}", f"{move.parent.span_id:016x}") == (trace_id, parent_id)
    assert move.attributes["p3.moved"] and move.attributes["p3.resumed_at_token"] == 2
    assert [e.name for e in move.events] == ["queued", "first_token", "finished"]


def test_a_cancelled_or_refused_sample_ends_its_span_saying_so(spans):
    traces = tracing.SampleTraces()
    taken, refused = m.Submit("req-1-0", [1]), m.Submit("req-2-0", [1])
    traces.submitted(taken, b"edge-0/x")
    traces.rejected(refused, b"edge-0/x", "busy", "still running")
    traces.cancelled([taken])
    ended = {s.attributes["p3.request_id"]: [e.name for e in s.events]
             for s in spans.get_finished_spans()}  # fmt: skip
    assert ended == {"req-1-0": ["queued", "cancelled"], "req-2-0": ["rejected"]}
    traces.on_step([StepOutput("req-1-0", [9], finish_reason="stop")], 0.0, InFlightTable())
    assert len(spans.get_finished_spans()) == 2  # nothing after its end
