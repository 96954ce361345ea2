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


@pytest.mark.parametrize("value", [1 << 63, 1 << 64, 1 << 70])
@pytest.mark.parametrize(
    ("field", "wrap"),
    [
        ("top_k", lambda v: v),
        ("seed", lambda v: v),
        ("min_tokens", lambda v: v),
        ("max_tokens", lambda v: v),
        ("max_completion_tokens", lambda v: v),
        ("n", lambda v: v),
        ("stop_token_ids", lambda v: [5, v]),
        ("logit_bias", lambda v: {str(v): 1}),
    ],
)
def test_an_integer_beyond_its_range_is_named(field, wrap, value):
    """Nothing wider than its use gets past the parse (an int64 on the wire, torch's ints)."""
    for parse, body in ((parse_chat, CHAT), (parse_completion, COMPLETION)):
        assert refusal(parse, {**body, field: wrap(value)}).param == field


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", 1 << 31), ("stop_token_ids", [1 << 31]), ("logit_bias", {str(1 << 31): 1})],
)
def test_token_ids_and_top_k_are_below_2_to_the_31(field, value):
    assert refusal(parse_chat, {**CHAT, field: value}).param == field


def test_integers_in_range_pass():
    body = {
        **COMPLETION,
        "top_k": (1 << 31) - 1,
        "seed": -(1 << 63),
        "min_tokens": 100,
        "max_tokens": 100,
        "stop_token_ids": [(1 << 31) - 1],
        "logit_bias": {str((1 << 31) - 1): 1},
        "prompt": [0, (1 << 31) - 1],
    }
    params = parse_completion(body).sampling_params(100)
    assert params.top_k == (1 << 31) - 1 and params.seed == -(1 << 63)


def test_min_tokens_is_bounded_by_the_max_tokens_limit():
    limits = Limits(max_tokens=100)
    assert refusal(parse_chat, {**CHAT, "min_tokens": 101}, limits).param == "min_tokens"


@pytest.mark.parametrize(
    "stop",
    [
        "x" * 1025,
        ["x" * 1025],
        ["x" * 1000] * 5,  # 5,000 characters in all
        ["x" * 100_000] * 16,  # the body that froze an edge for 45 s
    ],
)
def test_stop_strings_are_bounded_in_size(stop):
    assert refusal(parse_completion, {**COMPLETION, "stop": stop}).param == "stop"


def test_the_largest_stop_strings_allowed_parse():
    stops = ["x" * 1024] * 4
    params = parse_completion({**COMPLETION, "stop": stops}).sampling_params(16)
    assert params.stop == tuple(stops)


def test_stop_token_ids_and_logit_bias_are_bounded_in_count():
    ids = list(range(1025))
    assert refusal(parse_chat, {**CHAT, "stop_token_ids": ids}).param == "stop_token_ids"
    bias = {str(i): 1 for i in ids}
    assert refusal(parse_chat, {**CHAT, "logit_bias": bias}).param == "logit_bias"


@pytest.mark.parametrize("prompt", [[1 << 31], [[1], [1 << 64]]])
def test_prompt_token_ids_beyond_any_vocabulary_are_refused(prompt):
    assert refusal(parse_completion, {**COMPLETION, "prompt": prompt}).param == "prompt"


def test_fan_out_is_bounded():
    """1,000 prompts x n=16 in 6 KB made 16,000 samples; now prompts and prompts x n are capped."""
    error = refusal(parse_completion, {**COMPLETION, "prompt": ["a"] * 1000, "n": 16})
    assert error.param == "prompt" and "64" in error.message
    error = refusal(parse_completion, {**COMPLETION, "prompt": ["a"] * 5, "n": 16})
    assert error.param == "n" and "80 samples" in error.message and "64" in error.message
    assert len(parse_completion({**COMPLETION, "prompt": ["a"] * 4, "n": 16}).prompts) == 4
    assert len(parse_completion({**COMPLETION, "prompt": [[1]] * 64}).prompts) == 64
    limits = Limits(max_n=16, max_samples=8)
    assert refusal(parse_chat, {**CHAT, "n": 9}, limits).param == "n"
    assert refusal(parse_completion, {**COMPLETION, "prompt": ["a"] * 9}, limits).param == (
        "prompt"
    )
