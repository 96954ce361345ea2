"""A bug in the edge's SSE pump (here: the responder raising mid-stream) reaches the client as
an error event and [DONE], is counted, and leaves the edge serving: a real coordinator, node
and edge in this loop, over real sockets and HTTP."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from p3.nodes.edge.edge import Edge, EdgeConfig
from p3.nodes.edge.responses import Responder
from tests.model.tiny import make_tiny_chat_model

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, default_model_dir):
    return make_tiny_chat_model(tmp_path_factory.mktemp("chat"), default_model_dir)


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(line[6:].strip().decode())
    return events


async def wait_model_listed(http: aiohttp.ClientSession, url: str, timeout_s: float = 30.0):
    async with asyncio.timeout(timeout_s):
        while True:
            async with http.get(f"{url}/v1/models") as r:
                if (await r.json())["data"] and (await http.get(f"{url}/ready")).status == 200:
                    return (await r.json())["data"][0]["id"]
            await asyncio.sleep(0.05)


async def test_a_failing_stream_ends_with_an_error_event_and_done(
    running, coordinator, make_node, chat_model, monkeypatch
):
    await make_node(model=str(chat_model))
    edge = await running.start(Edge(EdgeConfig(coordinator=coordinator.address, port=0)))
    real_chunks = Responder.chunks
    calls = 0

    def failing_chunks(self, delta):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("a bug in the responder")
        return real_chunks(self, delta)

    async with aiohttp.ClientSession() as http:
        model = await wait_model_listed(http, edge.url)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        monkeypatch.setattr(Responder, "chunks", failing_chunks)
        async with http.post(f"{edge.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            events = await sse_events(r)
        monkeypatch.setattr(Responder, "chunks", real_chunks)

        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "internal" and "KeyError" in error["message"]
        assert all("error" not in json.loads(e) for e in events[:-2])
        async with http.get(f"{edge.url}/metrics") as r:
            metrics = await r.text()
        assert 'p3:request_failure_total{code="internal"} 1.0' in metrics

        body["stream"] = False  # and the edge goes on serving
        async with http.post(f"{edge.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] > 0
    assert not edge.cluster.inflight
