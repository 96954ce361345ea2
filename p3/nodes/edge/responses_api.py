"""POST /v1/responses, text in and text out, on the chat machinery.

The body becomes a chat request (`to_chat`): `input` (a string, or items: messages with text
content, `function_call` and `function_call_output`) and `instructions` the messages;
`max_output_tokens`, `temperature`, `top_p`; function `tools` and `tool_choice` in the
Responses shape; `text.format` the response_format. A refusal names the Responses field (the
chat field it came through is mapped back). The answer (`ResponseBuilder`) is the Response
object, or a stream of the SDK's events: response.created, response.in_progress, per output
item output_item.added / content_part.added / output_text.delta ... done (a message), or
output_item.added / function_call_arguments.delta ... done (a call), then
response.completed (or response.incomplete at max_output_tokens). Not stored: `store` is
taken as false, and `previous_response_id` is refused.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from p3.log import get_logger
from p3.nodes.cluster.generation import Generation, RequestFailed
from p3.nodes.cluster.samples import Delta, Sample, make_samples
from p3.nodes.edge.bodies import failure_error, json_response
from p3.nodes.edge.errors import ApiError, bad_request
from p3.nodes.edge.prompts import prepare
from p3.nodes.edge.responses import new_id
from p3.nodes.edge.tools import Tools

if TYPE_CHECKING:
    from p3.nodes.edge.api import Api

log = get_logger(__name__)


ROLES = {"user", "assistant", "system", "developer"}
TEXT_PARTS = {"input_text", "output_text", "text"}
PARAM_MAP = [  # chat field -> the Responses field it came from
    (re.compile(r"^messages(\[\d+\])?(\..*)?$"), "input"),
    (re.compile(r"^max_tokens$"), "max_output_tokens"),
    (re.compile(r"^response_format\.json_schema\.(\w+)$"), r"text.format.\1"),
    (re.compile(r"^response_format(\..*)?$"), "text.format"),
    (re.compile(r"^tools\[(\d+)\]\.function\.(\w+)$"), r"tools[\1].\2"),
]


def to_chat(body: Any) -> dict[str, Any]:
    """The chat completion body a Responses body asks for; 400s name the Responses field."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object", "invalid_json")
    if body.get("previous_response_id") is not None:
        raise bad_request(
            "previous_response_id", "responses are not stored here: send the whole input"
        )
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("instructions", "instructions must be a string")
        messages = [{"role": "system", "content": instructions}, *messages]
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    for theirs, ours in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"),
                         ("user", "user"), ("seed", "seed")):  # fmt: skip
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    if body.get("tools"):
        chat["tools"] = [_tool(i, t) for i, t in enumerate(_list(body, "tools"))]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        chat["response_format"] = _format(fmt)
    return chat


def responses_param(error: ApiError) -> ApiError:
    """The error with its param named as the Responses body names it."""
    for pattern, replacement in PARAM_MAP:
        if error.param is not None and pattern.match(error.param):
            theirs = pattern.sub(replacement, error.param)
            error.message = error.message.replace(error.param, theirs)
            error.param = theirs
            break
    return error


def _list(body: dict, name: str) -> list:
    value = body.get(name)
    if not isinstance(value, list):
        raise bad_request(name, f"{name} must be a list")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise bad_request("input", "input is required", "missing_required_parameter")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input", "input must be a string or a non-empty list of items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(where, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise bad_request(f"{where}.role", f"{where}.role must be one of {sorted(ROLES)}")
            messages.append({"role": item["role"], "content": _text(where, item.get("content"))})
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "type": "function", "function": function}
            if not all(isinstance(v, str) for v in (call["id"], *call["function"].values())):
                raise bad_request(where, f"{where} needs call_id, name and arguments (strings)")
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str) or not isinstance(item.get("call_id"), str):
                raise bad_request(where, f"{where} needs call_id and output (strings)")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise bad_request(f"{where}.type", f"{where}.type {kind!r} is not supported here")
    return messages


def _text(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad_request(f"{where}.content", f"{where}.content must be text (or text parts)")


def _tool(i: int, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"tools[{i}].type", f"tools[{i}]: only function tools are supported")
    function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict):
        raise bad_request("text.format", "text.format must be an object")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


# -- the answer ----------------------------------------------------------------------------------


class ResponseBuilder:
    """One response: its id and settings, the output items as the deltas build them, and the
    events a stream of it sends."""

    def __init__(self, body: dict[str, Any], model_name: str, tools: Tools | None, template):
        self.id = new_id("resp")
        self.created = int(time.time())
        self.body = body
        self.model_name = model_name
        self.sequence = 0
        active = tools is not None and tools.active
        self.parser = tools.parser(template, self.id) if active else None
        self.items: list[dict[str, Any]] = []  # output items, in order
        self._message: dict[str, Any] | None = None  # the text item under way
        self._calls: dict[int, dict[str, Any]] = {}  # call index -> its item
        self.status = "in_progress"
        self.incomplete: dict | None = None

    # -- events ---------------------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]  # fmt: skip

    def events(self, delta: Delta) -> list[dict[str, Any]]:
        """What one delta adds: text, a call's start and arguments, and the end."""
        out: list[dict[str, Any]] = []
        if self.parser is None:
            if delta.text:
                out += self._text(delta.text)
        else:
            parsed = self.parser.feed(delta.text) if delta.text else []
            if delta.finish_reason is not None:
                parsed += self.parser.finish()
            for event in parsed:
                out += self._parsed(event)
        if delta.finish_reason is not None:
            out += self._close(delta.finish_reason)
        return out

    def _parsed(self, event: tuple) -> list[dict[str, Any]]:
        if event[0] == "content":
            return self._text(event[1])
        if event[0] == "call":
            _, index, call_id, name = event
            out = self._end_message()
            item = {"type": "function_call", "id": f"fc_{call_id[5:]}", "call_id": call_id,
                    "name": name, "arguments": "", "status": "in_progress"}  # fmt: skip
            self._calls[index] = item
            self.items.append(item)
            return out + [
                self._event(
                    "response.output_item.added", output_index=len(self.items) - 1, item=dict(item)
                )
            ]
        _, index, fragment = event
        item = self._calls[index]
        item["arguments"] += fragment
        return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=self.items.index(item), delta=fragment)]  # fmt: skip

    def _text(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self._message is None:
            self._message = {"type": "message", "id": new_id("msg"), "status": "in_progress",
                             "role": "assistant", "content": []}  # fmt: skip
            self.items.append(self._message)
            index = len(self.items) - 1
            part = {"type": "output_text", "text": "", "annotations": []}
            self._message["content"].append(part)
            out += [
                self._event("response.output_item.added", output_index=index,
                            item={**self._message, "content": []}),
                self._event("response.content_part.added", item_id=self._message["id"],
                            output_index=index, content_index=0, part=dict(part)),
            ]  # fmt: skip
        self._message["content"][0]["text"] += text
        out.append(self._event("response.output_text.delta", item_id=self._message["id"],
                               output_index=self.items.index(self._message), content_index=0,
                               delta=text, logprobs=[]))  # fmt: skip
        return out

    def _end_message(self) -> list[dict[str, Any]]:
        message, self._message = self._message, None
        if message is None:
            return []
        index = self.items.index(message)
        message["status"] = "completed"
        part = message["content"][0]
        return [
            self._event("response.output_text.done", item_id=message["id"], output_index=index,
                        content_index=0, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", item_id=message["id"], output_index=index,
                        content_index=0, part=part),
            self._event("response.output_item.done", output_index=index, item=message),
        ]  # fmt: skip

    def _close(self, finish: str) -> list[dict[str, Any]]:
        out = self._end_message()
        for item in self._calls.values():
            item["status"] = "completed"
            index = self.items.index(item)
            out += [
                self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item),
            ]  # fmt: skip
        if finish == "length":
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
        elif finish == "abort":
            self.status = "failed"
        else:
            self.status = "completed"
        return out

    def closing(self, samples: list[Sample]) -> dict[str, Any]:
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
        return self._event(
            kind.get(self.status, "response.failed"), response=self.response(samples)
        )

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    # -- the object -----------------------------------------------------------------------------

    def response(self, samples: list[Sample] | None = None) -> dict[str, Any]:
        body = self.body
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model_name,
            "output": self.items,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": _usage(samples) if samples is not None else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }


def _usage(samples: list[Sample]) -> dict[str, Any]:
    prompt = sum(s.num_prompt_tokens for s in samples)
    output = sum(s.num_output_tokens for s in samples)
    cached = sum(s.num_cached_tokens for s in samples)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


# -- the route -----------------------------------------------------------------------------------


async def serve(api: Api, request: web.Request) -> web.StreamResponse:
    """One /v1/responses request, whole or streamed; the caller holds its pending slot."""
    body = await api.read_json(request)
    chat = to_chat(body)
    try:
        prepared = await prepare(api.edge, chat, True)
    except ApiError as exc:
        raise responses_param(exc) from None
    samples = make_samples(
        new_id("req"),
        prepared.model,
        prepared.prompt_ids,
        prepared.params,
        prepared.tokenizer,
        prepared.lora,
    )
    tools = prepared.request.tools
    builder = ResponseBuilder(body, prepared.model_name, tools, prepared.tokenizer.chat_template)
    generation = Generation(api.cluster, samples, api.edge.config.token_timeout_s)
    try:
        await generation.start()
    except RequestFailed as failure:
        raise failure_error(failure) from None
    if body.get("stream"):
        return await _stream(request, builder, generation)
    try:
        async with contextlib.aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                builder.events(delta)
    except RequestFailed as failure:
        raise failure_error(failure) from None
    return json_response(builder.response(samples))


async def _stream(request: web.Request, builder: ResponseBuilder, generation) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(event: dict[str, Any]) -> None:
        data = msgspec.json.encode(event)
        await response.write(b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n")

    try:
        for event in builder.opening():
            await send(event)
        try:
            async with contextlib.aclosing(generation.stream()) as deltas:
                async for delta in deltas:
                    for event in builder.events(delta):
                        await send(event)
        except RequestFailed as failure:
            error = failure_error(failure)
            await send(builder._event("error", code=error.code, message=error.message, param=None))
            builder.status = "failed"
        await send(builder.closing(generation.samples))
    except ConnectionError:
        log.info("edge.client_gone", response_id=builder.id)  # leaving cancels the samples
        return response
    await response.write_eof()
    return response
