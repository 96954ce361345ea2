"""Resumable SSE: every event has an id; a client that lost its connection POSTs again with
Last-Event-ID and gets the rest of its stream, nothing lost or repeated."""

from __future__ import annotations

import json

import aiohttp
import pytest

from . import openai_cluster

pytestmark = pytest.mark.timeout(120)
MODEL = "SmolLM2-135M-Instruct"
BODY = {
    "model": MODEL, "prompt": "The lighthouse keeper", "max_tokens": 40, "ignore_eos": True,
    "temperature": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def url(default_model_dir):
    served = openai_cluster.start()
    yield served.url
    served.stop()


async def events(response: aiohttp.ClientResponse, limit: int | None = None):
    """(id, data) pairs of an SSE response, at most limit of them."""
    got, event_id = [], None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            got.append((event_id, line[6:]))
            if limit is not None and len(got) == limit:
                break
    return got


def text_of(pairs) -> str:
    return "".join(json.loads(d)["choices"][0]["text"] for _, d in pairs if d != "[DONE]")


async def test_a_dropped_stream_resumes_after_its_last_event(url):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=BODY) as r:
            whole = (await r.json())["choices"][0]["text"]
        async with session.post(url + "/v1/completions", json={**BODY, "stream": True}) as r:
            first = await events(r, limit=5)  # then the connection drops
        last_id = first[-1][0]
        headers = {"Last-Event-ID": last_id}
        async with session.post(
            url + "/v1/completions", json={**BODY, "stream": True}, headers=headers
        ) as r:
            assert r.status == 200
            rest = await events(r)
    ids = [int(event_id.rsplit(".", 1)[1]) for event_id, _ in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # contiguous: nothing lost, nothing twice
    assert len({event_id.rsplit(".", 1)[0] for event_id, _ in first + rest}) == 1
    assert rest[-1][1] == "[DONE]"
    assert text_of(first) + text_of(rest) == whole


async def test_resuming_an_unknown_stream_is_an_openai_shaped_404(url):
    headers = {"Last-Event-ID": "cmpl-nosuchstream.3"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/completions", json={**BODY, "stream": True}, headers=headers) as r,
    ):
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["code"] == "stream_not_found" and "cmpl-nosuchstream.3" in error["message"]
