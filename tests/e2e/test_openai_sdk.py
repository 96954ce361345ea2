"""The OpenAI API through the official SDK, against a real cluster on ephemeral ports."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from p3 import LLM, SamplingParams

pytestmark = pytest.mark.timeout(90)

MODEL = "SmolLM2-135M-Instruct"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def aclient(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_chat_answer_is_the_offline_apis(client, default_model_dir):
    """Served greedy text = p3.LLM's on the same weights (batch invariance: the server's
    other traffic and chunking change nothing)."""
    out = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=16, temperature=0)
    offline = LLM(default_model_dir, kv_cache_bytes=32 * 2**20)
    expected = offline.chat(PARIS, SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0]
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.model == MODEL and out.system_fingerprint


def test_streamed_chat_equals_whole_chat_at_temperature_0(client):
    args = {"model": MODEL, "messages": PARIS, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices[0].delta.content is None  # OpenAI: the finish comes alone
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_streamed_chat_ends_with_its_finish_reason_alone_like_openai(client):
    args = {"model": MODEL, "messages": PARIS, "max_tokens": 3, "temperature": 0}
    chunks = list(client.chat.completions.create(**args, stream=True))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and last.delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert sum(bool(c.choices[0].delta.content) for c in chunks) >= 1


def test_streamed_completion_equals_whole_completion(client):
    args = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole


def test_usage_is_exact(client, url):
    out = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=5, temperature=0)
    count = post(url, "/tokenize", {"model": MODEL, "messages": PARIS})["count"]
    assert out.usage.prompt_tokens == count
    assert out.usage.completion_tokens == 5 or out.choices[0].finish_reason == "stop"
    assert out.usage.total_tokens == count + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_include_usage_ends_the_stream_with_usage_and_no_choices(client):
    stream = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None for c in chunks[:-1])


def test_n_2_gives_two_choices_with_their_own_finish_and_exact_usage(client):
    out = client.chat.completions.create(
        model=MODEL, messages=PARIS, max_tokens=8, n=2, temperature=1.0, seed=1, logprobs=True
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    num_tokens = sum(len(c.logprobs.content) for c in out.choices)
    assert out.usage.completion_tokens == num_tokens


def test_seed_reproduces_the_same_text(client):
    args = {"model": MODEL, "prompt": "My favourite colour is", "max_tokens": 12, "seed": 42}
    first = client.completions.create(**args, temperature=1.0).choices[0].text
    second = client.completions.create(**args, temperature=1.0).choices[0].text
    assert first == second


def test_stop_string_cuts_the_text(client):
    args = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**args).choices[0].text
    assert " 8" in full
    out = client.completions.create(**args, stop=[" 8"])
    assert out.choices[0].text == full[: full.index(" 8")]
    assert out.choices[0].finish_reason == "stop"


def test_chat_logprobs_have_tokens_bytes_and_top(client):
    out = client.chat.completions.create(
        model=MODEL, messages=PARIS, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert isinstance(entry.bytes, list)
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_completion_logprobs_and_echo(client):
    """As OpenAI's legacy completions: the echoed prompt's tokens lead the logprobs, the first
    with none; offsets run through prompt and completion; a stream carries the same."""
    body = dict(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    out = client.completions.create(**body, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith("The sky is")
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 3 + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[3] == len("The sky is")
    plain = client.completions.create(**body)  # without echo: the completion's part alone
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[3:]
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**body, echo=True, stream=True):
        for key in streamed:
            streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed == {key: getattr(lp, key) for key in streamed}


def test_text_offsets_index_the_text_when_special_tokens_are_skipped(client, url):
    """A special token (here <|im_end|>, forced past ignore_eos) is in `tokens` but not in
    the text, so it takes no room: every offset still points into the text returned."""
    end = post(url, "/tokenize", {"model": MODEL, "prompt": "<|im_end|>"})["tokens"][-1]
    body = dict(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=0)
    extra = {"ignore_eos": True}
    first = client.completions.create(**body, extra_body=extra).choices[0]
    forced = client.completions.create(
        **body, logit_bias={str(end): 100}, extra_body=extra
    ).choices[0]
    assert forced.logprobs.tokens == ["<|im_end|>"] * 4 and forced.text == ""
    assert forced.logprobs.text_offset == [0, 0, 0, 0]
    assert first.logprobs.text_offset[-1] < len(first.text)


def test_prompt_as_token_ids_and_several_prompts(client, url):
    ids = post(url, "/tokenize", {"model": MODEL, "prompt": "The sky is"})["tokens"]
    by_text = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, temperature=0
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = client.completions.create(
        model=MODEL,
        prompt=["a", "b", "c"],
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.usage.completion_tokens == 6


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_tokenize_detokenize_round_trip(url):
    out = post(url, "/tokenize", {"model": MODEL, "prompt": "Hello, world"})
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert post(url, "/detokenize", {"model": MODEL, "tokens": out["tokens"]}) == {
        "prompt": "Hello, world"
    }


async def test_async_sdk_stream_and_whole(aclient):
    args = {"model": MODEL, "messages": PARIS, "max_tokens": 12, "temperature": 0}
    whole = await aclient.chat.completions.create(**args)
    stream = await aclient.chat.completions.create(**args, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == whole.choices[0].message.content
