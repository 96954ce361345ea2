"""Every refusal over raw HTTP: OpenAI's error body, the right status and param; never a 500."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from tests.e2e import openai_cluster

pytestmark = pytest.mark.timeout(90)

MODEL = "SmolLM2-135M-Instruct"
KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
MAX_BODY_BYTES = 64 * 1024
MAX_PENDING = 2


@pytest.fixture(scope="module")
def url(default_model_dir):
    edge_args = [f"--api-key={k}" for k in KEYS]
    edge_args += [f"--max-body-bytes={MAX_BODY_BYTES}", f"--max-pending={MAX_PENDING}"]
    cluster = openai_cluster.start(edge_args=tuple(edge_args), own=True)
    yield cluster.url
    cluster.stop()


async def call(url, path, body=None, raw: bytes | None = None, headers=AUTH, method="POST"):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with session.request(method, url + path, data=data, headers=headers) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text.startswith("{") else text)


def assert_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/chat/completions", {"temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"max_tokens": 100_000}, "max_tokens"),
        ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "word " * 9000}, "prompt"),
        ("/v1/completions", {"top_p": 2}, "top_p"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_an_invalid_field_is_a_400_naming_it(url, path, change, param):
    body = {**(CHAT if "chat" in path else COMPLETION), **change}
    assert_error(*await call(url, path, body), 400, param)


async def test_invalid_json_is_a_400(url):
    status, body = await call(url, "/v1/chat/completions", raw=b"{not json")
    assert_error(status, body, 400)
    assert body["error"]["code"] == "invalid_json"


async def test_unknown_model_is_a_404(url):
    assert_error(
        *await call(url, "/v1/completions", {**COMPLETION, "model": "gpt-9"}), 404, "model"
    )


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}])
async def test_a_missing_or_wrong_key_is_a_401(url, headers):
    assert_error(*await call(url, "/v1/completions", COMPLETION, headers=headers), 401)
    assert_error(*await call(url, "/v1/models", headers=headers, method="GET"), 401)


async def test_every_configured_key_works_and_health_stays_open(url):
    for key in KEYS:
        status, _ = await call(
            url, "/v1/models", headers={"Authorization": f"Bearer {key}"}, method="GET"
        )
        assert status == 200
    assert (await call(url, "/health", headers={}, method="GET"))[0] == 200
    assert (await call(url, "/ready", headers={}, method="GET"))[0] == 200


async def test_an_oversized_body_is_a_413(url):
    body = {**COMPLETION, "prompt": "x" * (MAX_BODY_BYTES + 10)}
    assert_error(*await call(url, "/v1/completions", body), 413)


async def test_a_full_admission_queue_answers_429_at_once(url):
    long = {**COMPLETION, "max_tokens": 400, "ignore_eos": True}
    busy = [asyncio.create_task(call(url, "/v1/completions", long)) for _ in range(MAX_PENDING)]
    await asyncio.sleep(0.5)
    started = asyncio.get_running_loop().time()
    status, body = await call(url, "/v1/completions", COMPLETION)
    assert_error(status, body, 429)
    assert asyncio.get_running_loop().time() - started < 1.0
    for task in busy:
        task.cancel()
    await asyncio.gather(*busy, return_exceptions=True)


async def test_unknown_route_is_an_openai_shaped_404(url):
    assert_error(*await call(url, "/v1/nothing", {}), 404)


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:5])
    values = {
        "int": lambda: rng.choice([0, 1, -1, 2**31, 2**70, rng.randint(-5, 10**6)]),
        "float": lambda: rng.choice([0.5, -1e300, 1e308, rng.uniform(-3, 3)]),
        "str": lambda: rng.choice(["", "x", MODEL, "user", "system", "\u00e9\ud7ff", "9" * 50]),
        "bool": lambda: rng.random() < 0.5,
        "null": lambda: None,
        "list": lambda: [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))],
        "dict": lambda: {
            rng.choice(FIELDS): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))
        },
    }
    return values[kind]()


FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
    "logprobs", "top_logprobs", "echo", "stream", "stream_options", "user", "top_k", "min_p",
    "repetition_penalty", "ignore_eos", "min_tokens", "role", "content", "tokens", "type", "text",
]  # fmt: skip


def fuzzed_body(rng: random.Random, i: int):
    """Mostly a valid body with random fields over it; every third one anything at all."""
    if i % 3 == 0:
        return random_json(rng)
    body = dict(rng.choice([CHAT, COMPLETION, {}]))
    for _ in range(rng.randint(1, 4)):
        body[rng.choice(FIELDS)] = random_json(rng, 1)
    if isinstance(body.get("n"), int) and body["n"] > 4:
        body["n"] = 4
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 8:
        body["max_tokens"] = rng.choice([2, "2", -1])  # valid ones stay short
    body.pop("max_completion_tokens", None)
    return body


async def test_fuzzed_bodies_never_get_a_500(url):
    rng = random.Random(1234)
    paths = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
    for i in range(300):
        body = fuzzed_body(rng, i)
        status, answer = await call(url, rng.choice(paths), body)
        assert status < 500, (body, answer)
