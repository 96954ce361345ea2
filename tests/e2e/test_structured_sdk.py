"""Structured outputs and tool calls through the official SDK, against a real cluster (p3
serve, the default model): JSON that parses and validates, streamed and not; the SDK's
parse() with a pydantic model; regex and choice in vLLM's extra fields; tool calls required,
named and auto, streamed as deltas that add up to the whole answer; a follow-up turn with the
tool's result; /v1/models/{id}; and the 400s, each naming its field."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import jsonschema
import openai
import pydantic
import pytest

pytestmark = pytest.mark.timeout(120)

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe Ann, aged 31, who has a cat, as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "maxLength": 20}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


class Person(pydantic.BaseModel):
    name: str
    age: int


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def streamed(stream) -> tuple[str, dict[int, dict], str | None]:
    """A chat stream's content, its tool calls by index (id, name, arguments joined), and
    the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                assert entry["id"] is None, "a call's id comes once, in its first delta"
                entry["id"], entry["name"] = call.id, call.function.name
            else:
                assert entry["id"] is not None, "id and name come before the arguments"
            entry["arguments"] += call.function.arguments or ""
    return content, calls, finish


# -- structured outputs ----------------------------------------------------------------------


def test_json_schema_whole_and_streamed_validate_and_agree(client):
    fmt = json_schema(PERSON)
    whole = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=120
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=120, stream=True
    )
    content, calls, finish = streamed(stream)
    assert content == text and not calls and finish == "stop"


def test_sampled_json_schema_answers_all_validate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=json_schema(PERSON), n=4, seed=3,
        temperature=1.2, max_tokens=120,
    )  # fmt: skip
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, temperature=0, max_tokens=80
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, temperature=0,
        max_tokens=200,
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_extra_fields_regex_and_choice(client):
    r = client.completions.create(
        model=MODEL, prompt="Ann's phone number:", max_tokens=20,
        extra_body={"guided_regex": r"\d{3}-\d{4}"},
    )  # fmt: skip
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["cat", "dog", "none"]}},
    )  # fmt: skip
    assert r.choices[0].message.content in ("cat", "dog", "none")


# -- tools -----------------------------------------------------------------------------------


def check_calls(calls: list[tuple[str, str]]) -> None:
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize(
    "tool_choice, parallel",
    [
        ("required", True),
        ("required", False),
        ({"type": "function", "function": {"name": "get_time"}}, True),
    ],
    ids=["required", "required-one", "named"],
)
def test_constrained_tool_calls_whole_and_streamed(client, tool_choice, parallel):
    kwargs = dict(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
        max_tokens=120, parallel_tool_calls=parallel,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls and all(c.id.startswith("call_") for c in choice.message.tool_calls)
    check_calls(calls)
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["get_time"]
    if not parallel:
        assert len(calls) == 1
    content, streamed_calls, finish = streamed(
        client.chat.completions.create(**kwargs, stream=True)
    )
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed_calls.values()] == calls


AUTO_CALL = (
    r'Checking\. <tool_call>\[\{"name": "get_weather", "arguments": '
    r'\{"city": "Paris", "unit": "celsius"\}\}\]</tool_call>'
)


def test_auto_parses_the_models_own_format_whole_and_streamed(client):
    """auto: the model's text is parsed for calls. SmolLM2-135M rarely calls on its own, so a
    regex makes it write one, in the format its tools prompt asks for."""
    kwargs = dict(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="auto", temperature=0,
        max_tokens=80, extra_body={"structured_outputs": {"regex": AUTO_CALL}},
    )  # fmt: skip
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    content, calls, finish = streamed(client.chat.completions.create(**kwargs, stream=True))
    assert finish == "tool_calls" and content.strip() == "Checking."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_weather", call.function.arguments)
    ]


def test_auto_without_a_call_is_plain_content_and_none_calls_nothing(client):
    for tool_choice in ("auto", "none"):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
            tool_choice=tool_choice, temperature=0, max_tokens=30,
        )  # fmt: skip
        message = r.choices[0].message
        assert message.content and not message.tool_calls
        assert r.choices[0].finish_reason in ("stop", "length")


def test_a_follow_up_turn_with_the_tools_result(client, url):
    """The call and the tool's result are rendered into the next prompt by the chat template
    (SmolLM2's knows no tools: the call as <tool_call> text, the result as a tool turn), and
    the turn is answered."""
    first = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=80, parallel_tool_calls=False,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    turns = [
        *WEATHER_ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    body = {"model": MODEL, "messages": turns, "tools": TOOLS}
    ids = post(url, "/tokenize", body)["tokens"]
    prompt = post(url, "/detokenize", {"model": MODEL, "tokens": ids})["prompt"]
    assert "<tools>" in prompt and '"get_weather"' in prompt
    assert f'<tool_call>[{{"name": "{call.function.name}", "arguments": {{' in prompt
    assert "tool\n18 degrees and sunny" in prompt
    r = client.chat.completions.create(
        model=MODEL, messages=turns, tools=TOOLS, temperature=0, max_tokens=20
    )
    assert r.choices[0].message.content


def refused_param(url: str, path: str, body: dict) -> str:
    """POST body (with the model) to path: it must be a 400; the param it names."""
    request = urllib.request.Request(
        url + path, json.dumps({"model": MODEL, **body}).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    return json.loads(refused.value.read())["error"]["param"]


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# -- models ----------------------------------------------------------------------------------


def test_models_by_id(client):
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- embeddings ------------------------------------------------------------------------------


SENTENCES = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock prices fell."]


def test_embeddings_through_the_sdk_equal_the_offline_api(client):
    """The SDK asks for base64 and decodes it; the vectors are the offline LLM.embed's."""
    from p3 import LLM

    r = client.embeddings.create(model=MODEL, input=SENTENCES)
    got = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == MODEL
    want = [o.outputs.embedding for o in LLM().embed(SENTENCES)]
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) == 576
        assert max(abs(a - b) for a, b in zip(g, w, strict=True)) < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    floats = client.embeddings.create(model=MODEL, input=SENTENCES[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, got[0], strict=True)) < 1e-6


def test_embeddings_of_token_ids_and_fewer_dimensions(client, url):
    ids = post(url, "/tokenize", {"model": MODEL, "prompt": SENTENCES[0]})["tokens"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    by_text = client.embeddings.create(model=MODEL, input=SENTENCES[0]).data[0].embedding
    assert max(abs(a - b) for a, b in zip(by_ids, by_text, strict=True)) < 1e-6
    short = client.embeddings.create(model=MODEL, input=SENTENCES[0], dimensions=64).data[0]
    assert len(short.embedding) == 64
    assert abs(sum(v * v for v in short.embedding) - 1.0) < 1e-5


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 100000}, "dimensions"),
    ],
)
def test_bad_embedding_requests_are_400s_naming_the_field(url, body, param):
    assert refused_param(url, "/v1/embeddings", body) == param


# -- the Responses API -----------------------------------------------------------------------

RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]


def test_responses_text_whole_and_streamed_with_the_sdks_events(client):
    kwargs = dict(
        model=MODEL, input="Say hello in French.", instructions="Answer in one line.",
        max_output_tokens=30, temperature=0,
    )  # fmt: skip
    whole = client.responses.create(**kwargs)
    assert whole.object == "response" and whole.output_text
    assert whole.status in ("completed", "incomplete")
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    kinds, numbers, text, final = [], [], "", None
    for event in client.responses.create(**kwargs, stream=True):
        kinds.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]  # fmt: skip
    assert text == whole.output_text == final.output_text
    assert numbers == list(range(len(kinds)))


def test_responses_function_call_and_its_output_in_the_next_input(client):
    r = client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=RESPONSE_TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_output_tokens=60,
    )  # fmt: skip
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    streamed, added = "", []
    for event in client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=RESPONSE_TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_output_tokens=60, stream=True,
    ):  # fmt: skip
        if event.type == "response.output_item.added":
            added.append((event.item.type, event.item.name))
        if event.type == "response.function_call_arguments.delta":
            streamed += event.delta
    assert added == [("function_call", "get_weather")] and streamed == call.arguments
    follow = client.responses.create(
        model=MODEL, tools=RESPONSE_TOOLS, max_output_tokens=20, temperature=0,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"},
        ],
    )  # fmt: skip
    assert follow.output_text


def test_responses_json_schema_and_max_output_tokens(client):
    r = client.responses.create(
        model=MODEL, input="Describe Ann, aged 31, who has a cat.", max_output_tokens=120,
        temperature=0, text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), PERSON)
    cut = client.responses.create(model=MODEL, input="Tell a long story.", max_output_tokens=5)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
        (
            {
                "input": "x",
                "text": {
                    "format": {"type": "json_schema", "name": "p", "schema": {"type": "objectx"}}
                },
            },
            "text.format.schema",
        ),
        ({"input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_bad_responses_requests_are_400s_naming_the_responses_field(url, body, param):
    assert refused_param(url, "/v1/responses", body) == param


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": json_schema({"type": "objectx"})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": json_schema("not a schema")}, "response_format.json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
            "response_format.json_schema.name",
        ),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_json": PERSON, "guided_regex": "a"}}, "guided_regex"),
        ({"extra_body": {"structured_outputs": {"xml": "a"}}}, "structured_outputs.xml"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "objectx"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_constraints_and_tools_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **body)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param, refused.value.body
