"""The edge's HTTP side, with a real coordinator, node and edge in this loop over real sockets:
a bug in the SSE pump (the responder raising mid-stream) reaches the client as an error event
and [DONE], is counted, and leaves the edge serving; connections that never finish their
headers (slowloris) are closed while /health answers."""

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


async def drip_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One more byte of a header that never ends; whether the edge has closed the connection
    (EOF, or a reset for writing to it)."""
    try:
        writer.write(b"a")
        await writer.drain()
        async with asyncio.timeout(0.1):  # the drip of a slowloris, not a readiness wait
            return await reader.read(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_slow_headers_are_cut_off_and_health_answers_meanwhile(running, coordinator):
    edge = await running.start(
        Edge(EdgeConfig(coordinator=coordinator.address, port=0, keepalive_timeout_s=1.0))
    )
    host, port = edge.url.removeprefix("http://").split(":")
    slow = []
    for _ in range(50):  # headers that never end, a byte now and then
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        slow.append((reader, writer))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge.url}/health") as r:
            assert r.status == 200
        async with asyncio.timeout(10):
            for reader, writer in slow:
                while not await drip_closed(reader, writer):
                    pass
        async with http.get(f"{edge.url}/health") as r:
            assert r.status == 200
    for _, writer in slow:
        writer.close()


async def test_a_body_that_never_arrives_is_a_408(running, coordinator):
    edge = await running.start(
        Edge(EdgeConfig(coordinator=coordinator.address, port=0, body_timeout_s=0.5))
    )
    host, port = edge.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{\"model\":")  # fmt: skip
    async with asyncio.timeout(5):
        status_line = await reader.readline()
        while await reader.readline() not in (b"\r\n", b""):
            pass
        body = json.loads(await reader.read(1000))
    assert b" 408 " in status_line and body["error"]["code"] == "timeout"
    writer.close()


async def test_the_edge_takes_the_tokenizer_from_the_node_never_from_its_path(
    running, coordinator, make_node, chat_model, tmp_path
):
    """The route names a directory on the node's host; an edge elsewhere has no such path.
    Here the directory is gone once the node has loaded: the edge still serves the model,
    with the tokenizer files the node sent (checked against their hash)."""
    import shutil

    model = tmp_path / "node-host-only"
    shutil.copytree(chat_model, model)
    node = await make_node(model=str(model))
    shutil.rmtree(model)
    edge = await running.start(Edge(EdgeConfig(coordinator=coordinator.address, port=0)))
    async with aiohttp.ClientSession() as http:
        name = await wait_model_listed(http, edge.url)
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        async with http.post(f"{edge.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["prompt_tokens"] > 3  # the template was applied
    assert edge.models.tokenizers[str(model)].chat_template is not None
    assert node._tokenizer[0] == edge.cluster.routes[node.name].tokenizer_hash
