"""OpenAI request validation: each bad field is a 400 that names it; good bodies parse."""

from __future__ import annotations

import pytest

from p3.nodes.edge.schemas import ApiError, Limits, parse_chat, parse_completion

pytestmark = pytest.mark.timeout(10)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def refusal(parse, body, limits: Limits | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        request = parse(body, limits or Limits())
        request.sampling_params(request.max_tokens)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", -1, "temperature"),
        ("temperature", "hot", "temperature"),
        ("top_p", 0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("n", 0, "n"),
        ("n", 1000, "n"),
        ("n", True, "n"),
        ("n", 1.5, "n"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", "10", "max_tokens"),
        ("max_completion_tokens", -3, "max_completion_tokens"),
        ("presence_penalty", 3, "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("top_k", -2, "top_k"),
        ("min_p", 2, "min_p"),
        ("min_tokens", -1, "min_tokens"),
        ("seed", "x", "seed"),
        ("seed", 1 << 70, "seed"),
        ("stop", 5, "stop"),
        ("stop", [""], "stop"),
        ("stop", ["a"] * 100, "stop"),
        ("logit_bias", {"x": 1}, "logit_bias"),
        ("logit_bias", {"5": 300}, "logit_bias"),
        ("logit_bias", [1], "logit_bias"),
        ("stream", "yes", "stream"),
        ("stream_options", {"include_usage": True}, "stream_options"),
        ("ignore_eos", 1, "ignore_eos"),
        ("user", 5, "user"),
        ("model", 5, "model"),
        ("model", "", "model"),
    ],
)
def test_a_bad_common_field_is_named(field, value, param):
    for parse, body in ((parse_chat, CHAT), (parse_completion, COMPLETION)):
        assert refusal(parse, {**body, field: value}).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (None, "messages"),
        ("hi", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ],
)
def test_bad_messages_are_named(messages, param):
    assert refusal(parse_chat, {**CHAT, "messages": messages}).param == param


@pytest.mark.parametrize("prompt", [None, 5, [], [1, "a"], [[1], []], [-1], {"a": 1}, [True]])
def test_a_bad_prompt_is_named(prompt):
    assert refusal(parse_completion, {**COMPLETION, "prompt": prompt}).param == "prompt"


def test_top_logprobs_needs_logprobs():
    assert refusal(parse_chat, {**CHAT, "top_logprobs": 2}).param == "top_logprobs"
    assert refusal(parse_chat, {**CHAT, "logprobs": True, "top_logprobs": 50}).param == (
        "top_logprobs"
    )


def test_completion_logprobs_is_an_int_in_range():
    assert refusal(parse_completion, {**COMPLETION, "logprobs": 99}).param == "logprobs"
    assert refusal(parse_completion, {**COMPLETION, "logprobs": True}).param == "logprobs"


def test_a_body_that_is_not_an_object_is_refused():
    for body in ([], "x", 3, None):
        assert refusal(parse_chat, body).code == "invalid_json"


def test_limits_bound_n_and_max_tokens():
    limits = Limits(max_n=2, max_tokens=100)
    assert refusal(parse_chat, {**CHAT, "n": 3}, limits).param == "n"
    assert refusal(parse_chat, {**CHAT, "max_tokens": 101}, limits).param == "max_tokens"


def test_a_full_chat_request_parses():
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "temperature": 0,
        "n": 2,
        "stop": "x",
        "seed": 3,
        "logit_bias": {"5": -100},
        "logprobs": True,
        "top_logprobs": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": -1,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 2,
        "user": "u",
    }
    request = parse_chat(body)
    params = request.sampling_params(request.max_tokens)
    assert request.messages[1]["content"] == "a\nb"
    assert request.stream and request.include_usage
    assert params.max_tokens == 7  # max_completion_tokens wins
    assert params.n == 2 and params.stop == ("x",) and params.seed == 3
    assert params.logit_bias == {5: -100.0} and params.logprobs == 3
    assert params.top_k == 0 and params.min_tokens == 2 and params.ignore_eos


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_every_prompt_shape_parses(prompt, expected):
    request = parse_completion({**COMPLETION, "prompt": prompt})
    assert request.prompts == expected
    assert request.max_tokens == 16  # the legacy default


def test_error_body_has_openai_shape():
    error = refusal(parse_chat, {**CHAT, "temperature": -1})
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and "temperature" in body["message"]
