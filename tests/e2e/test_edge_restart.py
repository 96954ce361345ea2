"""An edge that can die: kill -9 of `p3 serve`'s edge mid-stream; the node keeps the stream
going, p3 serve starts the edge again on its port, and the client's re-POST with
Last-Event-ID gets the rest: together exactly the fault-free text, no event lost or repeated.
Then the same with two edges, resuming on the other one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from . import openai_cluster

pytestmark = pytest.mark.timeout(240)

MODEL = "SmolLM2-135M-Instruct"
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
        "ignore_eos": True}  # fmt: skip
EVENTS_BEFORE_KILL = 10


@pytest.fixture(scope="module")
def served(default_model_dir):
    cluster = openai_cluster.serve()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(served) -> str:
    async def whole() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.post(served.url + "/v1/completions", json=BODY) as r,
        ):
            return (await r.json())["choices"][0]["text"]

    return asyncio.run(whole())


def edge_of(served) -> tuple[int, list[str]]:
    return next(c for c in openai_cluster.children(served.procs[0].pid) if "edge" in c[1])


async def read_stream(response, limit: int | None = None) -> tuple[str, list[str]]:
    """(text, event ids) of an SSE response, the first `limit` text events or all of it."""
    text, ids, num = "", [], 0
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            ids.append(line[4:])
        elif line.startswith("data: {"):
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            num += 1
            if num == limit:
                break
    return text, ids


async def wait_serving(session: aiohttp.ClientSession, url: str, timeout_s: float = 60) -> None:
    """Until the edge at url lists the model (a restarted one has its tokenizer again)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(url + "/v1/models") as r:
                    if r.status == 200 and MODEL in {m["id"] for m in (await r.json())["data"]}:
                        return
            except aiohttp.ClientError:
                pass  # the port has no edge behind it yet
            await asyncio.sleep(0.05)


async def stream_kill_resume(first_url: str, resume_url: str, kill) -> tuple[str, list[str]]:
    async with aiohttp.ClientSession() as session:
        stream = {**BODY, "stream": True}
        async with session.post(first_url + "/v1/completions", json=stream) as r:
            before, ids = await read_stream(r, EVENTS_BEFORE_KILL)
        kill()
        await wait_serving(session, resume_url)
        headers = {"Last-Event-ID": ids[-1]}
        async with session.post(resume_url + "/v1/completions", json=stream, headers=headers) as r:
            assert r.status == 200, await r.text()
            after, more_ids = await read_stream(r)
    return before + after, ids + more_ids


def numbers(ids: list[str]) -> list[int]:
    return [int(i.split(".")[1]) for i in ids]


async def test_a_killed_edge_restarts_and_the_stream_resumes_exactly(served, reference):
    pid, _ = edge_of(served)
    text, ids = await stream_kill_resume(
        served.url, served.url, lambda: os.kill(pid, signal.SIGKILL)
    )
    assert text == reference
    assert numbers(ids) == list(range(1, len(ids) + 1))  # none lost, none repeated
    assert edge_of(served)[0] != pid  # it was started again


@contextlib.contextmanager
def another_edge(served):
    """A second `p3 edge` on the served cluster (its url), stopped after."""
    _, argv = edge_of(served)
    other = subprocess.Popen(
        [sys.executable, "-m", "p3", "edge", "--coordinator", openai_cluster.flag(argv,
         "--coordinator"), "--port", "0", "--keys", openai_cluster.flag(argv, "--keys"),
         "--edge-id", "client-0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield openai_cluster._wait_ready(other)["url"]
    finally:
        other.terminate()
        other.wait(timeout=30)


async def metric(url: str, name: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
        return next((line for line in (await r.text()).splitlines() if line.startswith(name)), "")


async def test_a_stream_resumes_on_another_edge_of_the_cluster(served, reference):
    with another_edge(served) as other_url:
        pid, _ = edge_of(served)
        text, ids = await stream_kill_resume(
            served.url, other_url, lambda: os.kill(pid, signal.SIGKILL)
        )
        assert text == reference
        assert numbers(ids) == list(range(1, len(ids) + 1))
        assert await metric(other_url, "p3:streams_adopted_total") == "p3:streams_adopted_total 1.0"


async def test_a_stream_whose_edge_lives_resumes_on_another_edge(served, reference):
    """The client lost its way to its edge, not the edge: the other edge takes the stream
    over, and the first stops serving it (it neither cancels nor moves it)."""
    await wait_serving_session(served.url)
    with another_edge(served) as other_url:
        text, ids = await stream_kill_resume(served.url, other_url, lambda: None)
        assert text == reference
        assert numbers(ids) == list(range(1, len(ids) + 1))
        handed = "p3:streams_handed_over_total 1.0"
        assert await metric(served.url, "p3:streams_handed_over_total") == handed
        assert await metric(other_url, "p3:streams_adopted_total") == "p3:streams_adopted_total 1.0"


async def wait_serving_session(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_serving(session, url)


async def test_a_stream_of_two_choices_resumes_after_an_edge_kill(served):
    """Two samples' events interleave as they come; the ids count each choice's, so the
    restarted edge knows where each one's client is."""
    body = {**BODY, "max_tokens": 120, "temperature": 0.8, "seed": 11, "n": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(served.url + "/v1/completions", json=body) as r:
            want = [c["text"] for c in sorted((await r.json())["choices"],
                                              key=lambda c: c["index"])]  # fmt: skip
        stream = {**body, "stream": True}
        texts, ids = ["", ""], []

        async def read(response, limit=None):
            num = 0
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    ids.append(line[4:])
                elif line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    texts[choice["index"]] += choice["text"]
                    num += 1
                    if num == limit:
                        return

        async with session.post(served.url + "/v1/completions", json=stream) as r:
            await read(r, EVENTS_BEFORE_KILL)
        pid, _ = edge_of(served)
        os.kill(pid, signal.SIGKILL)
        await wait_serving(session, served.url)
        headers = {"Last-Event-ID": ids[-1]}
        async with session.post(served.url + "/v1/completions", json=stream,
                                headers=headers) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            await read(r)
    assert texts == want
    assert numbers(ids) == list(range(1, len(ids) + 1))
    assert sum(map(int, ids[-1].split(".")[2].split("-"))) == len(ids) - 1  # all but [DONE]


def test_sigterm_with_nothing_in_flight_stops_every_process_within_2_s(served):
    """Last in this module: it stops the cluster the tests above shared."""
    proc = served.procs[0]
    members = [pid for pid, _ in openai_cluster.children(proc.pid)]
    assert len(members) >= 3  # coordinator, node, edge
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=2.0) == 0
    while any(openai_cluster.alive(pid) for pid in members):
        assert time.monotonic() - started < 2.0, [p for p in members if openai_cluster.alive(p)]
        time.sleep(0.01)  # polling the process table, bounded by the 2 s deadline
