"""Hostile input against a real cluster over real HTTP: every request's work is bounded, every
malformed body or header is an OpenAI-shaped 4xx naming its field, and /health keeps answering
while the edge deals with the biggest bodies it accepts."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.e2e import openai_cluster

pytestmark = pytest.mark.timeout(120)

MODEL = "SmolLM2-135M-Instruct"
KEY = "bounds-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MAX_PENDING = 8
HEALTH_LATENCY_S = 1.0


@pytest.fixture(scope="module")
def url(default_model_dir):
    edge_args = (f"--api-key={KEY}", f"--max-pending={MAX_PENDING}", "--resume-grace=0.3")
    cluster = openai_cluster.start(edge_args=edge_args, own=True)
    yield cluster.url
    cluster.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session


async def call(http, url, path, body=None, raw: bytes | None = None, method="POST"):
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.request(method, url + path, data=data, headers=AUTH) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else text)


def assert_error(status, body, expected_status, param=None, code=None):
    assert status == expected_status, str(body)[:500]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


async def while_health_polled(http, url, *requests) -> tuple[list, float, int]:
    """Run the requests while GET /health is asked back to back: (their answers, the slowest
    /health, how many /health answered meanwhile)."""
    tasks = [asyncio.ensure_future(r) for r in requests]
    worst, polls = 0.0, 0
    while not all(t.done() for t in tasks):
        started = time.monotonic()
        async with http.get(url + "/health") as response:
            assert response.status == 200
        worst, polls = max(worst, time.monotonic() - started), polls + 1
        await asyncio.wait(tasks, timeout=0.02)
    return [t.result() for t in tasks], worst, polls


async def max_model_len(http, url) -> int:
    async with http.get(url + "/v1/models", headers=AUTH) as response:
        return (await response.json())["data"][0]["max_model_len"]


# -- size: prompts and stop strings -----------------------------------------------------------


async def test_huge_chats_are_refused_before_any_rendering(url, http):
    """Three 3.8 MB chats froze /health for 14 s while the template and tokenizer ran."""
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a " * 1_900_000}]})
    chats = [call(http, url, "/v1/chat/completions", raw=body.encode()) for _ in range(3)]
    answers, worst, _ = await while_health_polled(http, url, *chats)
    for status, answer in answers:
        assert_error(status, answer, 400, "messages", "context_length_exceeded")
        assert "characters" in answer["error"]["message"]
    assert worst < HEALTH_LATENCY_S


async def test_big_prompts_are_encoded_off_the_event_loop(url, http):
    """3 MB of prompts, each just under the character cap, are encoded (in a thread) and found
    too long in tokens; /health answers all the while (it waited 2.5 s for them on the loop)."""
    context = await max_model_len(http, url)
    prompt = "a " * (15 * context)  # 30 characters a token: under the cap of 32
    prompts = [prompt] * (3_000_000 // len(prompt))
    body = json.dumps({**COMPLETION, "prompt": prompts}).encode()
    started = time.monotonic()
    answers, worst, polls = await while_health_polled(
        http, url, call(http, url, "/v1/completions", raw=body)
    )
    (status, answer), took = answers[0], time.monotonic() - started
    assert_error(status, answer, 400, "prompt", "context_length_exceeded")
    assert "tokens" in answer["error"]["message"]
    assert worst < HEALTH_LATENCY_S, (worst, took)
    assert polls >= 2


async def test_a_prompt_over_the_character_cap_is_refused_and_tokenize_is_bounded(url, http):
    context = await max_model_len(http, url)
    prompt = "a" * (32 * context + 1)
    status, answer = await call(http, url, "/v1/completions", {**COMPLETION, "prompt": prompt})
    assert_error(status, answer, 400, "prompt", "context_length_exceeded")
    status, answer = await call(http, url, "/tokenize", {"model": MODEL, "prompt": "a " * 20_000})
    assert status == 200 and answer["count"] > 20_000  # counting beyond the context is fine


async def test_oversized_stop_strings_are_refused_at_once(url, http):
    """16 stop strings of 100 KB took 45 s and 5.2 GB in the stop matcher."""
    body = json.dumps({**COMPLETION, "stop": ["x" * 100_000] * 16}).encode()
    answers, worst, _ = await while_health_polled(
        http, url, call(http, url, "/v1/completions", raw=body)
    )
    assert_error(*answers[0], 400, "stop")
    assert worst < HEALTH_LATENCY_S


@pytest.mark.parametrize("stream", [False, True])
async def test_the_largest_stop_strings_allowed_work(url, http, stream):
    stops = [f"{i:02d}" + "z" * 254 for i in range(16)]  # 4,096 characters in all
    body = {**COMPLETION, "max_tokens": 16, "stop": stops, "stream": stream}
    status, answer = await call(http, url, "/v1/completions", body)
    assert status == 200, answer
    if stream:
        assert answer.count("data: [DONE]") == 1 and '"error"' not in answer
    else:
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")


# -- shape: nesting, headers, integers --------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
async def test_deep_nesting_is_invalid_json(url, http, depth):
    raw = b'{"model": "%s", "prompt": "hi", "x": %s1%s}' % (
        MODEL.encode(),
        b"[" * depth,
        b"]" * depth,
    )
    status, answer = await call(http, url, "/v1/completions", raw=raw)
    assert_error(status, answer, 400, None, "invalid_json")


async def test_nesting_within_the_limit_parses(url, http):
    raw = b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "x": %s1%s}' % (
        MODEL.encode(),
        b"[" * 63,
        b"]" * 63,
    )
    status, answer = await call(http, url, "/v1/completions", raw=raw)
    assert status == 200, answer


async def raw_request(url: str, path: str, authorization: bytes, body: bytes) -> tuple[int, dict]:
    """One HTTP/1.1 request written byte for byte (clients refuse to send such headers)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n" % (
        path.encode(),
        parts.netloc.encode(),
        authorization,
    )
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    writer.write(head + b"Connection: close\r\n\r\n" + body)
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload) if payload.startswith(b"{") else {}


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff\xfe",  # not UTF-8
        b"Bearer caf\xe9",  # latin-1
        "Bearer ключ".encode(),  # UTF-8 beyond latin-1
        b"Bearer " + KEY.encode() + b"\xff",
        b"\xff\xfe " + KEY.encode(),
    ],
)
async def test_an_undecodable_authorization_header_is_a_401(url, authorization):
    body = json.dumps(COMPLETION).encode()
    status, answer = await raw_request(url, "/v1/completions", authorization, body)
    assert_error(status, answer, 401, None, "invalid_api_key")


async def test_the_raw_request_helper_gets_through_with_the_key(url):
    body = json.dumps(COMPLETION).encode()
    status, answer = await raw_request(url, "/v1/completions", b"Bearer " + KEY.encode(), body)
    assert status == 200 and answer["choices"], answer


@pytest.mark.parametrize("value", [1 << 31, 1 << 63, 1 << 64])
@pytest.mark.parametrize(
    ("field", "wrap"),
    [
        ("top_k", lambda v: v),
        ("seed", lambda v: v << 32),  # any int64 is a seed
        ("min_tokens", lambda v: v),
        ("max_tokens", lambda v: v),
        ("n", lambda v: v),
        ("stop_token_ids", lambda v: [v]),
        ("logit_bias", lambda v: {str(v): 1}),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_an_integer_out_of_range_is_a_400_naming_it(url, http, path, field, wrap, value):
    body = {**(CHAT if "chat" in path else COMPLETION), field: wrap(value)}
    assert_error(*await call(http, url, path, body), 400, field)


async def test_prompt_token_ids_beyond_int64_are_a_400(url, http):
    for prompt in ([1 << 64], [[1], [1 << 63]]):
        status, answer = await call(http, url, "/v1/completions", {**COMPLETION, "prompt": prompt})
        assert_error(status, answer, 400, "prompt")


# -- fan-out and admission --------------------------------------------------------------------


async def test_fan_out_is_bounded(url, http):
    """A 6 KB body of 1,000 prompts x n=16 made 16,000 samples and saturated a node."""
    body = {**COMPLETION, "prompt": ["a"] * 1000, "n": 16, "max_tokens": 1}
    status, answer = await call(http, url, "/v1/completions", body)
    assert_error(status, answer, 400, "prompt")
    assert "at most 64 prompts" in answer["error"]["message"]
    status, answer = await call(http, url, "/v1/completions", {**body, "prompt": ["a"] * 5})
    assert_error(status, answer, 400, "n")
    assert "80 samples" in answer["error"]["message"] and "64" in answer["error"]["message"]
    status, answer = await call(http, url, "/v1/completions", {**body, "prompt": ["a"] * 4})
    assert status == 200 and len(answer["choices"]) == 64, answer


async def wait_idle(http, url, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            async with http.get(url + "/cluster", headers=AUTH) as response:
                if (await response.json())["edge"]["num_pending"] == 0:
                    return
            await asyncio.sleep(0.05)


async def test_samples_in_flight_are_counted_against_max_pending(url, http):
    long = {**COMPLETION, "max_tokens": 48, "ignore_eos": True, "stream": True}
    wide = {**COMPLETION, "n": MAX_PENDING, "max_tokens": 2}
    async with http.post(url + "/v1/completions", json=long, headers=AUTH) as stream:
        assert stream.status == 200
        await stream.content.readline()  # admitted: its one sample is in flight
        status, answer = await call(http, url, "/v1/completions", wide)
        assert_error(status, answer, 429, None, "queue_full")
        assert f"at most {MAX_PENDING} samples" in answer["error"]["message"]
        assert (await stream.read()).count(b"[DONE]") == 1
    await wait_idle(http, url)
    status, answer = await call(http, url, "/v1/completions", wide)
    assert status == 200 and len(answer["choices"]) == MAX_PENDING, answer


async def test_an_abandoned_stream_is_counted(url, http):
    long = {**COMPLETION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    client = aiohttp.ClientSession()
    async with client, client.post(url + "/v1/completions", json=long, headers=AUTH) as stream:
        await stream.content.readline()  # then the client is gone for good
    abandoned = 'p3:request_failure_total{code="abandoned"} 1.0'
    async with asyncio.timeout(30):
        while True:
            async with http.get(url + "/metrics") as response:
                if abandoned in await response.text():
                    return
            await asyncio.sleep(0.05)
