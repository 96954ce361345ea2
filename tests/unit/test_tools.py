"""Tool calls: reading tools and tool_choice, the prompt a template gets, and the parser that
turns a model's text (whole or streamed in any cut) into content, call headers and argument
fragments that add up to the whole call."""

from __future__ import annotations

import json

import pytest

from p3.nodes.edge.errors import ApiError
from p3.nodes.edge.tools import ToolCallParser, for_template, parse_tools, scan_calls

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


def run(parser: ToolCallParser, text: str, step: int) -> tuple[str, list, dict[int, str]]:
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    headers = [(e[1], e[3]) for e in events if e[0] == "call"]
    arguments: dict[int, str] = {}
    for event in events:
        if event[0] == "arguments":
            assert event[1] in dict(headers), "a call's header comes before its arguments"
            arguments[event[1]] = arguments.get(event[1], "") + event[2]
    return content, headers, arguments


HERMES_LIST = (
    'Let me see. <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", '
    '"days": [1, 2]}}, {"name": "get_time", "arguments": {}}]</tool_call>'
)
HERMES_BLOCKS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"tz": "UTC"}, "name": "get_time"}\n</tool_call>'
)


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_hermes_calls_in_any_cut_add_up_to_the_whole(step):
    content, headers, arguments = run(ToolCallParser("auto", response_id="r"), HERMES_LIST, step)
    assert content == "Let me see. "
    assert [name for _, name in headers] == ["get_weather", "get_time"]
    assert json.loads(arguments[0]) == {"city": 'Paris, "FR"', "days": [1, 2]}
    assert arguments[1] == "{}"
    content, headers, arguments = run(ToolCallParser("auto"), HERMES_BLOCKS, step)
    assert content.strip() == ""
    assert [name for _, name in headers] == ["get_weather", "get_time"]  # name after arguments
    assert [json.loads(arguments[i]) for i in (0, 1)] == [{"city": "Oslo"}, {"tz": "UTC"}]


def test_required_and_named_modes_read_the_whole_text_as_calls():
    _, headers, arguments = run(
        ToolCallParser("required"), '[{"name": "get_time", "arguments": {"tz": "CET"}}]', 3
    )
    assert headers[0][1] == "get_time" and json.loads(arguments[0]) == {"tz": "CET"}
    parser = ToolCallParser("get_weather")
    assert parser.feed("") == [("call", 0, parser.calls[0].id, "get_weather")]  # name first
    _, headers, arguments = run(ToolCallParser("get_weather"), '{"city": "Rome"}', 4)
    assert headers[0][1] == "get_weather" and arguments[0] == '{"city": "Rome"}'


def test_llama3_json_calls_use_parameters():
    text = '{"name": "get_weather", "parameters": {"city": "Lima"}}'
    _, headers, arguments = run(ToolCallParser("auto", "llama3"), text, 7)
    assert headers[0][1] == "get_weather" and json.loads(arguments[0]) == {"city": "Lima"}
    content, headers, _ = run(ToolCallParser("auto", "llama3"), "Just text.", 3)
    assert content == "Just text." and not headers


def test_text_that_only_looks_like_a_call_stays_content():
    content, headers, _ = run(ToolCallParser("auto"), "a <tool_call> not json", 2)
    assert content == "a <tool_call> not json" and not headers
    content, headers, _ = run(ToolCallParser("auto"), "x < y, and <tool_ca", 1)
    assert content == "x < y, and <tool_ca" and not headers


def test_call_ids_are_derived_from_the_response_so_a_rebuilt_stream_has_the_same():
    a, b = (
        ToolCallParser("auto", response_id="chatcmpl-1"),
        ToolCallParser("auto", response_id="chatcmpl-1"),
    )
    run(a, HERMES_LIST, 3)
    run(b, HERMES_LIST, 11)
    assert [c.id for c in a.calls] == [c.id for c in b.calls]
    c = ToolCallParser("auto", response_id="chatcmpl-2")
    run(c, HERMES_LIST, 3)
    assert c.calls[0].id != a.calls[0].id and a.calls[0].id != a.calls[1].id


def test_scan_calls_on_cut_text():
    assert scan_calls('[{"name": "f", "argu') == [("f", "", False)]
    assert scan_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}') == [("f", '{"a": 1}', True)]
    assert scan_calls('{"na') == [(None, "", False)]


def test_tools_and_tool_choice_are_checked():
    tools = parse_tools({"tools": TOOLS})
    assert tools.choice == "auto" and tools.parallel
    assert tools.functions[1]["parameters"] == {"type": "object", "properties": {}}
    assert parse_tools({}) is None and parse_tools({"tool_choice": "none"}) is None
    named = parse_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert named.named == "get_time" and named.constraint() is not None
    assert parse_tools({"tools": TOOLS, "tool_choice": "auto"}).constraint() is None
    bad = [
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": "x"}, "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice"),
    ]
    for body, param in bad:
        with pytest.raises(ApiError) as refused:
            parse_tools(body)
        assert refused.value.body()["error"]["param"] == param


def test_a_template_that_renders_tools_gets_them_and_object_arguments():
    tools = parse_tools({"tools": TOOLS})
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
    }
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    out, template_tools = for_template(messages, tools, "{% if tools %}{{ tools }}{% endif %}")
    assert template_tools[0]["function"]["name"] == "get_weather"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}
    out, template_tools = for_template(messages, tools, "{{ messages }}")  # knows no tools
    assert template_tools is None and out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert (
        out[2]["content"]
        == '<tool_call>[{"name": "get_time", "arguments": {"tz": "UTC"}}]</tool_call>'
    )
    none = parse_tools({"tools": TOOLS, "tool_choice": "none"})
    out, template_tools = for_template(messages[:1], none, "{{ messages }}")
    assert template_tools is None and out == messages[:1]
