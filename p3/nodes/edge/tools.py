"""Tool calling: `tools` and `tool_choice` read and checked, rendered into the prompt, and the
model's calls parsed out of its text, whole or as it streams.

- `tool_choice` "required" and a named function are constrained by the grammar (p3/structured):
  required, to a JSON list of calls `[{"name": ..., "arguments": {...}}]` whose names are the
  tools' and whose arguments validate against their parameters (one call unless
  parallel_tool_calls); a named function, to its arguments alone. "auto" lets the model choose
  and parses its own format; "none" renders no tools and parses nothing.
- Formats, chosen per model from its chat template: `hermes` (Qwen2.5 and others:
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, one call a block; SmolLM2 puts a
  list in one block, read the same way), and `llama3` (the whole answer is a JSON call with
  "parameters"). A template that does not render tools gets them in a system message that
  asks for the hermes format (SmolLM2-135M's template is one).
- `ToolCallParser` turns text deltas into content, a call's header (index, id, name) and its
  argument fragments; the fragments of a call add up to its `arguments` in the whole answer.
  Ids are derived from the response id, so an edge that rebuilds a stream makes the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from p3.nodes.edge.constraints import compile_constraint
from p3.nodes.edge.errors import bad_request
from p3.structured import StructuredOutputsParams

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class Tools:
    functions: list[dict[str, Any]]  # each {"name", "description", "parameters"}
    choice: str  # "auto", "none", "required", or a function's name
    parallel: bool = True

    @property
    def named(self) -> str | None:
        return None if self.choice in ("auto", "none", "required") else self.choice

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def parser(self, chat_template: str | None, response_id: str, index: int = 0):
        """The parser of one choice's calls: the grammar's shape for required and named
        choices, the model's own format (from its template) for auto."""
        mode = self.named or ("required" if self.choice == "required" else "auto")
        return ToolCallParser(mode, tool_format(chat_template), response_id, index)

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar of "required" and of a named choice; None for auto and none."""
        if self.named is not None:
            function = next(f for f in self.functions if f["name"] == self.named)
            return compile_constraint("tools", "json", function["parameters"])
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions
        ]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return compile_constraint("tools", "json", schema)


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """tools, tool_choice and parallel_tool_calls, checked; None when there are no tools and
    tool_choice allows that. 400s name the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("tool_choice", f"tool_choice {_shown(choice)} needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request("tools", f"tools must be a list of at most {MAX_TOOLS} tools")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("tools", "tools must have distinct function names")
    return Tools(functions, _choice(choice, names), parallel)


def _function(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad_request(f"{where}.type", f"{where} must be an object of type 'function'")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"{where}.function", f"{where}.function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise bad_request(
            f"{where}.function.name",
            f"{where}.function.name must be 1-64 letters, digits, _, . or -",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.function.description", "a description is a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    compile_constraint(f"{where}.function.parameters", "json", parameters)  # a 400 if not
    out = {"name": name, "parameters": parameters}
    return out if description is None else {**out, "description": description}


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name in names:
            return name
        raise bad_request("tool_choice", f"tool_choice names {name!r}, which is not in tools")
    raise bad_request(
        "tool_choice",
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
    )


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


# -- the prompt ----------------------------------------------------------------------------------


def tool_format(chat_template: str | None) -> str:
    template = chat_template or ""
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"


def renders_tools(chat_template: str | None) -> bool:
    return "tools" in (chat_template or "")


def for_template(
    messages: list[dict[str, Any]], tools: Tools | None, chat_template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the tools as the chat template takes them. Assistant tool calls get
    their arguments as objects (what templates index); a template that knows no tools gets
    the calls as hermes text, tool results as "tool" turns, and the tools in a system turn."""
    shown = tools is not None and tools.active
    template_tools = (
        [{"type": "function", "function": f} for f in tools.functions] if shown else None
    )
    if renders_tools(chat_template):
        return [_with_object_arguments(m) for m in messages], template_tools
    out = [_as_text(m) for m in messages]
    if shown:
        out = _with_tools_prompt(out, tools)
    return out, None


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [_call_with_object(c) for c in calls]}


def _call_with_object(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # else as the client wrote it
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    listed = [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in map(_call_with_object, calls)
    ]
    text = (message.get("content") or "") + f"{OPEN_TAG}{json.dumps(listed)}{CLOSE_TAG}"
    return {"role": message["role"], "content": text}


def _with_tools_prompt(messages: list[dict[str, Any]], tools: Tools) -> list[dict[str, Any]]:
    listed = json.dumps([{"type": "function", "function": f} for f in tools.functions])
    prompt = (
        "You may call one or more functions to answer. The functions, as JSON schemas:\n"
        f"<tools>{listed}</tools>\n"
        f'To call functions, answer with {OPEN_TAG}[{{"name": <name>, "arguments": '
        f"<arguments as a JSON object>}}, ...]{CLOSE_TAG}, and nothing else."
    )
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def validate_messages(messages: list[dict[str, Any]]) -> None:
    """An assistant turn's tool_calls and a tool turn's fields, before any template sees them."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is not None and message.get("role") == "assistant":
            ok = isinstance(calls, list) and all(
                isinstance(c, dict)
                and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments"), str | dict)
                for c in calls
            )
            if not ok:
                raise bad_request(
                    f"messages[{i}].tool_calls",
                    f"messages[{i}].tool_calls must be a list of "
                    '{"id", "type": "function", "function": {"name", "arguments"}}',
                )
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise bad_request(f"messages[{i}].tool_call_id", "tool_call_id must be a string")


# -- the answer ----------------------------------------------------------------------------------


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """One choice's text -> events: ("content", text), ("call", index, id, name) and
    ("arguments", index, fragment). mode: "auto", "required" or a function's name."""

    mode: str
    format: str = "hermes"
    response_id: str = ""
    choice_index: int = 0
    calls: list[Call] = field(default_factory=list)
    _text: str = ""
    _done: int = 0  # characters of _text fully turned into events
    _region: int | None = None  # where the calls' text under way starts (None: in content)
    _sent: list[int] = field(default_factory=list)  # argument characters sent, per call
    _block_base: int = 0  # the index of the first call of the block under way

    def feed(self, text: str) -> list[tuple]:
        self._text += text
        return self._advance(final=False)

    def finish(self) -> list[tuple]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        if self.mode != "auto":  # constrained: the whole text is calls
            self._scan(self._text, events, named=self.mode != "required")
            return events
        if self.format == "llama3":
            return self._advance_llama3(final, events)
        while True:
            if self._region is None:
                at = self._text.find(OPEN_TAG, self._done)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._text, OPEN_TAG, self._done)
                    end = len(self._text) - keep
                    if end > self._done:
                        events.append(("content", self._text[self._done : end]))
                        self._done = end
                    return events
                if at > self._done:
                    events.append(("content", self._text[self._done : at]))
                self._region = at + len(OPEN_TAG)
                self._done = self._region
                self._block_base = len(self.calls)
            close = self._text.find(CLOSE_TAG, self._region)
            block = self._text[self._region : close if close >= 0 else len(self._text)]
            self._emit(scan_calls(block), self._block_base, events)
            if close < 0:
                if final and len(self.calls) == self._block_base and block.strip():
                    events.append(("content", OPEN_TAG + block))  # not calls after all
                return events
            self._region = None
            self._done = close + len(CLOSE_TAG)

    def _advance_llama3(self, final: bool, events: list[tuple]) -> list[tuple]:
        stripped = self._text.lstrip()
        if not stripped:
            return events
        if not stripped.startswith("{"):
            if self._done < len(self._text):
                events.append(("content", self._text[self._done :]))
                self._done = len(self._text)
            return events
        self._emit(scan_calls(self._text), 0, events)
        if final and not self.calls:
            events.append(("content", self._text))
        return events

    # -- scanning -------------------------------------------------------------------------------

    def _scan(self, text: str, events: list[tuple], named: bool) -> None:
        found = [(self.mode, text, False)] if named else scan_calls(text)
        self._emit(found, 0, events)

    def _emit(self, found: list[tuple[str | None, str, bool]], base: int, events) -> None:
        for k, (name, arguments, _) in enumerate(found):
            index = base + k
            if name is None:
                return  # its name is still coming: nothing after it either
            if index == len(self.calls):
                call = Call(self._call_id(index), name)
                self.calls.append(call)
                self._sent.append(0)
                events.append(("call", index, call.id, name))
            sent = self._sent[index]
            if len(arguments) > sent:
                fragment = arguments[sent:]
                self.calls[index].arguments += fragment
                self._sent[index] = len(arguments)
                events.append(("arguments", index, fragment))

    def _call_id(self, index: int) -> str:
        seed = f"{self.response_id}/{self.choice_index}/{index}".encode()
        return "call_" + hashlib.sha256(seed).hexdigest()[:24]


def _partial_suffix(text: str, tag: str, start: int) -> int:
    """How many characters at the end of text (after start) could begin tag."""
    for n in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def scan_calls(text: str) -> list[tuple[str | None, str, bool]]:
    """Calls in JSON text that may be cut short: an object {"name": ..., "arguments" or
    "parameters": ...}, a list of them, or several objects one after another. Each: its name
    (None while its string is incomplete), the raw text of its arguments so far, and
    whether that value is complete. Arguments given as a JSON string are unwrapped once
    complete."""
    calls: list[tuple[str | None, str, bool]] = []
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "[":
        i += 1
    while i < len(text):
        i = _skip_ws(text, i)
        if i >= len(text):
            break
        if text[i] in ",;":
            i += 1
            continue
        if text[i] != "{":
            break
        i = _scan_object(text, i, calls)
        if i is None:
            break
    return calls


def _scan_object(text: str, i: int, calls: list) -> int | None:
    name, arguments, complete = None, "", False
    calls.append((None, "", False))
    slot = len(calls) - 1
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return None
        if text[i] == "}":
            calls[slot] = (name, arguments, complete)
            return i + 1
        if text[i] == ",":
            i += 1
            continue
        key_end = _string_end(text, i)
        if key_end is None:
            return None
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return None
        i = _skip_ws(text, i + 1)
        end = _value_end(text, i)
        value = text[i : len(text) if end is None else end]
        if key == "name":
            if end is not None and value.startswith('"'):
                name = json.loads(value)
        elif key in ARGUMENT_KEYS:
            complete = end is not None
            arguments = value
            if value.startswith('"'):  # arguments as a JSON string: whole once it ends
                arguments = json.loads(value) if complete else ""
        calls[slot] = (name, arguments, complete)
        if end is None:
            return None
        i = end


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    if i >= len(text) or text[i] != '"':
        return None
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value at i ends; None if it is cut short."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None
