"""What the edge shows of the cluster: disconnect frees KV, /metrics, /cluster, native client."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from p3.client import Client
from p3.sampling_params import SamplingParams
from tests.e2e import openai_cluster

pytestmark = pytest.mark.timeout(90)

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cluster(default_model_dir):
    # our own launcher: the native client needs the coordinator's address
    cluster = openai_cluster.start(own=True)
    yield cluster
    cluster.stop()


async def get_json(url: str, path: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return await response.json()


async def node_is_idle(url: str) -> bool:
    nodes = (await get_json(url, "/cluster"))["nodes"]
    load = nodes[0]["load"]
    return load["num_running"] == 0 and load["num_free_blocks"] == load["num_kv_blocks"]


async def test_client_disconnect_mid_stream_frees_the_nodes_kv(cluster):
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 3000, "ignore_eos": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(cluster.url + "/v1/completions", json={**body, "stream": True}) as r,
    ):
        for _ in range(5):
            await r.content.readline()
        running = (await get_json(cluster.url, "/cluster"))["nodes"][0]["load"]
        # leaving the block closes the connection mid-stream
    assert running["num_running"] >= 0
    deadline = time.monotonic() + 10
    while not await node_is_idle(cluster.url):
        assert time.monotonic() < deadline, "the node kept the request after the client left"
        await asyncio.sleep(0.1)


async def test_metrics_count_requests_and_tokens(cluster):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.url + "/v1/completions", json=body) as r:
            assert r.status == 200
        async with session.get(cluster.url + "/metrics") as r:
            text = await r.text()
    for name in (
        'p3:request_success_total{finished_reason="length",model_name="',  # as vLLM labels it
        "p3:prompt_tokens_total",
        "p3:generation_tokens_total",
        "p3:time_to_first_token_seconds_bucket",
        "p3:inter_token_latency_seconds_bucket",
        "p3:e2e_request_latency_seconds_count",
        "p3:num_requests_running{",
        "p3:num_requests_waiting{",
        "p3:kv_cache_usage_perc{",
    ):
        assert name in text, name


async def test_metrics_time_the_edges_own_share_of_a_stream(cluster):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True}

    async def counts() -> dict[str, float]:
        async with aiohttp.ClientSession() as session, session.get(cluster.url + "/metrics") as r:
            text = await r.text()
        return {
            leg: sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("p3:edge_overhead_seconds_count") and f'leg="{leg}"' in line
            )
            for leg in ("ingress", "first_token")
        }

    before = await counts()
    async with (
        aiohttp.ClientSession() as session,
        session.post(cluster.url + "/v1/completions", json=body) as r,
    ):
        events = [line async for line in r.content if line.startswith(b"data: {")]
    assert events
    after = await counts()
    assert after["ingress"] == before["ingress"] + 1
    assert after["first_token"] == before["first_token"] + 1


async def test_cluster_lists_the_node(cluster):
    out = await get_json(cluster.url, "/cluster")
    node = out["nodes"][0]
    assert node["status"] == "ready" and node["model"] == MODEL and node["pid"] > 0
    assert set(node["load"]) >= {"num_running", "num_waiting", "kv_cache_usage"}


async def test_native_client_generates_like_the_edge(cluster):
    params = SamplingParams(max_tokens=8, temperature=0)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    async with (
        aiohttp.ClientSession() as session,
        session.post(cluster.url + "/v1/completions", json=body) as r,
    ):
        via_http = (await r.json())["choices"][0]["text"]
    async with Client(cluster.coordinator) as client:
        out = await client.generate("The capital of France is", params)
        streamed = [d.text async for d in client.stream("The capital of France is", params)]
    assert out.outputs[0].text == via_http == "".join(streamed)
    assert len(out.outputs[0].token_ids) == 8 or out.outputs[0].finish_reason == "stop"
    assert out.prompt_token_ids and out.finished


async def test_native_client_n_and_logprobs(cluster):
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=7, logprobs=2)
    async with Client(cluster.coordinator) as client:
        first = await client.generate({"prompt_token_ids": [504, 3458, 314]}, params)
        again = await client.generate({"prompt_token_ids": [504, 3458, 314]}, params)
    assert [o.index for o in first.outputs] == [0, 1]
    assert [o.text for o in first.outputs] == [o.text for o in again.outputs]
    assert all(len(o.logprobs) == len(o.token_ids) for o in first.outputs)


def test_ready_is_503_without_replicas(default_model_dir):
    """An edge whose coordinator has no nodes: not ready, and generation answers 503."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    edge = subprocess.Popen(
        [sys.executable, "-c", openai_cluster.EDGE_SCRIPT, "--coordinator", "tcp://127.0.0.1:9",
         "--port", "0", "--model", MODEL, "--insecure"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = openai_cluster._wait_ready(edge, 60)["url"]
        for path, body in (("/ready", None), ("/v1/completions", {"model": MODEL, "prompt": "x"})):
            data = json.dumps(body).encode() if body else None
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(urllib.request.Request(url + path, data), timeout=10)
            assert info.value.code == 503
    finally:
        edge.terminate()
        edge.wait(timeout=15)


async def test_a_stream_whose_node_dies_ends_with_an_error_event(default_model_dir):
    """SIGSTOP the node mid-stream: declared dead -> error event, then [DONE]; no hang."""
    import os
    import signal

    served = openai_cluster.start()
    pid = 0
    try:
        pid = (await get_json(served.url, "/cluster"))["nodes"][0]["pid"]
        body = {"model": MODEL, "prompt": "Count", "max_tokens": 2000, "ignore_eos": True}
        events = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(served.url + "/v1/completions", json={**body, "stream": True}) as r,
        ):
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                if len(events) == 3:
                    os.kill(pid, signal.SIGSTOP)
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "node_dead"
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        served.stop()
