"""The series p3 exports: vLLM's names, types and labels where the meaning is the same, p3's
own beside them; where each comes from (routes, the scheduler, the coordinator, decoders);
the status server's three paths over real HTTP."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p3.engine.block_manager import BlockManager
from p3.engine.scheduler import Scheduler
from p3.engine.sequence import Request, Sequence
from p3.nodes.actor.base import Actor
from p3.nodes.edge.metrics import EdgeMetrics
from p3.protocol import messages as m
from p3.protocol import wire
from p3.status import CoordinatorMetrics, NodeMetrics, ProcessMetrics, StatusServer, death_cause

pytestmark = pytest.mark.timeout(30)

MODEL = "tiny"
# vLLM's series, as p3's edge exports them: name -> (type, labels besides model_name)
VLLM_SERIES = {
    "p3:num_requests_running": ("gauge", {"node"}),
    "p3:num_requests_waiting": ("gauge", {"node"}),
    "p3:kv_cache_usage_perc": ("gauge", {"node"}),
    "p3:prefix_cache_queries": ("counter", {"node"}),
    "p3:prefix_cache_hits": ("counter", {"node"}),
    "p3:prompt_tokens": ("counter", set()),
    "p3:generation_tokens": ("counter", set()),
    "p3:request_success": ("counter", {"finished_reason"}),
    "p3:request_prompt_tokens": ("histogram", set()),
    "p3:request_generation_tokens": ("histogram", set()),
    "p3:time_to_first_token_seconds": ("histogram", set()),
    "p3:inter_token_latency_seconds": ("histogram", set()),
    "p3:e2e_request_latency_seconds": ("histogram", set()),
}


def families(metrics: ProcessMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def route(node_id: str, **load) -> m.Route:
    return m.Route(node_id, 1, "tcp://x:1", MODEL, num_kv_blocks=100, load=m.Load(**load))


class Finished:
    """What the edge's metrics read of a finished sample."""

    def __init__(self, num_output_tokens: int, finish_reason: str):
        self.journal = type("J", (), {"model": MODEL})()
        self.num_output_tokens, self.finish_reason = num_output_tokens, finish_reason


def loaded_edge() -> EdgeMetrics:
    metrics = EdgeMetrics()
    load = {"num_running": 2, "num_waiting": 1, "num_free_blocks": 75}
    cache = {"num_prefix_cache_queries": 40, "num_prefix_cache_hits": 16}
    metrics.observe_routes([route("node-0", **load, **cache)])
    metrics.observe_finished([Finished(5, "length"), Finished(3, "stop")], 7)
    for histogram in (metrics.ttft, metrics.itl, metrics.e2e):
        histogram.labels(MODEL).observe(0.01)
    return metrics


def test_the_edge_exports_vllms_series_with_their_types_and_labels():
    found = families(loaded_edge())
    for name, (kind, labels) in VLLM_SERIES.items():
        assert found[name].type == kind, name
        samples = [s for s in found[name].samples if not s.name.endswith("_created")]
        assert samples, name
        for sample in samples:
            assert set(sample.labels) - {"le"} == {"model_name", *labels}, sample
            assert sample.labels["model_name"] == MODEL


def test_engine_state_comes_from_each_routes_load():
    found = families(loaded_edge())

    def value(name: str) -> float:
        (sample,) = [s for s in found[name].samples if s.labels.get("node") == "node-0"]
        return sample.value

    assert value("p3:num_requests_running") == 2 and value("p3:num_requests_waiting") == 1
    assert value("p3:kv_cache_usage_perc") == 0.25
    assert value("p3:prefix_cache_queries") == 40 and value("p3:prefix_cache_hits") == 16


def test_a_finished_request_counts_its_tokens_and_finish_reasons():
    found = families(loaded_edge())
    totals = {
        s.name: s.value
        for f in found.values()
        for s in f.samples
        if not s.labels.keys() - {"model_name"}
    }
    assert totals["p3:prompt_tokens_total"] == 7 and totals["p3:generation_tokens_total"] == 8
    reasons = {s.labels["finished_reason"]: s.value for s in found["p3:request_success"].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert reasons == {"length": 1, "stop": 1}
    assert totals["p3:request_generation_tokens_count"] == 2


def test_p3s_own_series_exist_at_zero_before_their_first_event():
    """A rate over them is then 0, not empty: dashboards and alerts see that nothing happened."""
    found = families(EdgeMetrics())
    for name, label in (("p3:streams_moved", "cause"), ("p3:stream_resumes", "result"),
                        ("p3:request_failure", "code")):  # fmt: skip
        totals = [s for s in found[name].samples if s.name.endswith("_total")]
        assert totals and all(s.value == 0 and label in s.labels for s in totals), name
    deaths = families(CoordinatorMetrics())["p3:node_deaths"].samples
    assert {s.labels["cause"] for s in deaths} >= {"heartbeat-timeout", "fatal", "no-progress"}


def test_a_death_is_counted_by_the_leading_word_of_its_cause_with_its_silence():
    assert death_cause("heartbeat-timeout (0.312s silent)") == "heartbeat-timeout"
    assert death_cause("fatal: CUDA error") == "fatal"
    assert death_cause("orphaned rank") == "orphaned"
    assert death_cause("something new") == "other"
    metrics = CoordinatorMetrics()
    metrics.observe_death("heartbeat-timeout (0.312s silent)", 0.312)
    found = families(metrics)
    deaths = {s.labels["cause"]: s.value for s in found["p3:node_deaths"].samples
              if s.name.endswith("_total")}  # fmt: skip
    assert deaths["heartbeat-timeout"] == 1 and deaths["fatal"] == 0
    detection = {
        (s.name, s.labels["cause"]): s.value for s in found["p3:failure_detection_seconds"].samples
    }
    assert detection[("p3:failure_detection_seconds_sum", "heartbeat-timeout")] == 0.312


def test_frames_dropped_and_fenced_are_counted_per_socket_of_the_process():
    decoder = wire.Decoder(m.ToCoordinator, "test-socket")
    decoder.decode(b"\xc1 not msgpack")
    decoder.fenced()
    decoder.fenced()
    found = families(ProcessMetrics())
    dropped = {s.labels["socket"]: s.value for s in found["p3:frames_dropped"].samples}
    fenced = {s.labels["socket"]: s.value for s in found["p3:frames_fenced"].samples}
    assert dropped["test-socket"] == 1 and fenced["test-socket"] == 2


def test_the_scheduler_counts_prefix_cache_tokens_and_queue_times_at_first_admission():
    bs = 4
    s = Scheduler(BlockManager(16, bs), max_num_seqs=8, max_num_batched_tokens=64)
    first = Sequence(Request("a", list(range(1, 10))), bs, arrival=0)
    s.add(first)
    batch = s.schedule()
    first.num_computed_tokens = len(first)
    s.block_manager.register_full_blocks(first)
    s.finish(first, "stop")
    assert (s.num_prefix_cache_queries, s.num_prefix_cache_hits) == (9, 0)
    s.add(Sequence(Request("b", list(range(1, 10))), bs, arrival=1))
    s.schedule()
    assert (s.num_prefix_cache_queries, s.num_prefix_cache_hits) == (18, 8)  # 2 whole blocks
    assert len(s.queue_times_s) == 2 and all(t >= 0 for t in s.queue_times_s)
    assert batch.seqs == [first]

    node = NodeMetrics(MODEL)
    node.queue_times_s = s.queue_times_s
    (count,) = [x for x in families(node)["p3:request_queue_time_seconds"].samples
                if x.name.endswith("_count")]  # fmt: skip
    assert count.value == 2 and count.labels == {"model_name": MODEL} and not s.queue_times_s


class Toy(Actor):
    kind = "toy"
    serves_after_setup = False


async def test_the_status_server_answers_health_ready_and_metrics():
    actor = Toy("toy")
    run = asyncio.create_task(actor.run())
    server = StatusServer(actor, actor.serving.is_set, CoordinatorMetrics())
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def status(path: str) -> int:
                async with http.get(server.url + path) as r:
                    return r.status

            await asyncio.sleep(0)  # the actor runs
            assert (await status("/health"), await status("/ready")) == (200, 503)
            actor.mark_serving()
            assert await status("/ready") == 200
            async with http.get(server.url + "/metrics") as r:
                assert "p3:node_deaths_total" in await r.text()
            actor.stop("abort")
            await run
            assert (await status("/health"), await status("/ready")) == (503, 503)
    finally:
        await server.stop()
