"""OpenAI request bodies -> validated requests; every refusal is an ApiError naming its field.

Pure: no sockets, no tokenizer. `parse_chat` / `parse_completion` take the decoded JSON body and
return a `ChatRequest` / `CompletionRequest` whose `sampling_params()` builds SamplingParams
(whose InvalidParam names the field the 400 names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from p3.nodes.edge.constraints import structured_outputs
from p3.nodes.edge.errors import ApiError, bad_request
from p3.nodes.edge.tools import Tools, parse_tools, validate_messages
from p3.sampling_params import InvalidParam, SamplingParams

__all__ = ["ApiError", "bad_request", "parse_chat", "parse_completion", "Limits", "Fields"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # each; a stop string's cost is its length, in the matcher and in memory
MAX_STOP_TOTAL_CHARS = 4096
MAX_STOP_TOKEN_IDS = 1024  # looked up at every step of every sample
MAX_LOGIT_BIAS = 1024  # entries, applied at every step of every sample
MAX_TOP_LOGPROBS = 20
INT64 = 1 << 63
TOKEN_ID_LIMIT = 1 << 31  # above any vocabulary; bigger ids (and top_k) overflow int64 later


@dataclass(frozen=True)
class Limits:
    """What one edge accepts, beyond what the model's context allows."""

    max_n: int = 16
    max_tokens: int = 1 << 20
    max_prompt_tokens: int = 1 << 20
    max_prompts: int = 64  # in one completion request's batch
    max_samples: int = 64  # prompts x n: what one request may fan out to


@dataclass
class CommonRequest:
    model: str
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    user: str | None = None

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        try:
            return SamplingParams(n=self.n, max_tokens=max_tokens, **self.params)
        except InvalidParam as exc:
            raise bad_request(exc.name, str(exc)) from None


@dataclass
class ChatRequest(CommonRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Tools | None = None


@dataclass
class CompletionRequest(CommonRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False  # vLLM's: each choice's prompt and output token ids


class Fields:
    """Typed reads from a JSON object; a wrong type or range is a 400 naming the field."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise bad_request(None, "the request body must be a JSON object", "invalid_json")
        self.body = body

    def get(self, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in _as_tuple(kinds):
            raise bad_request(name, f"{name} must be {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise bad_request(name, f"{name} must be {_kind_name(kinds)}, got {_json_type(value)}")
        return value

    def int(self, name: str, default: int | None = None, lo=None, hi=None) -> int | None:
        value = self.get(name, int, default)
        if self.body.get(name) is not None:
            _check_range(name, value, lo, hi)
        return value

    def float(self, name: str, default: float | None = None, lo=None, hi=None) -> float | None:
        value = self.get(name, (int, float), default)
        if value is None:
            return None
        if not math.isfinite(value):
            raise bad_request(name, f"{name} must be a finite number")
        _check_range(name, value, lo, hi)
        return float(value)

    def bool(self, name: str, default: bool = False) -> bool:
        return self.get(name, bool, default)

    def str(self, name: str, default: str | None = None) -> str | None:
        return self.get(name, str, default)


def parse_chat(body: Any, limits: Limits = Limits()) -> ChatRequest:
    f = Fields(body)
    request = ChatRequest(**_common(f, limits), messages=_messages(f.body.get("messages")))
    _check_samples(1, request.n, limits)
    request.logprobs = f.bool("logprobs")
    request.top_logprobs = f.int("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs", "top_logprobs requires logprobs to be true")
    if request.logprobs:
        request.params["logprobs"] = request.top_logprobs or 0
    request.add_generation_prompt = f.bool("add_generation_prompt", True)
    request.tools = parse_tools(f.body)
    validate_messages(request.messages)
    if request.tools is not None and (constraint := request.tools.constraint()) is not None:
        if request.params["structured_outputs"] is not None:
            raise bad_request(
                "tool_choice",
                "tool_choice 'required' or a named function takes no other constraint",
            )
        request.params["structured_outputs"] = constraint
    return request


def parse_completion(body: Any, limits: Limits = Limits()) -> CompletionRequest:
    f = Fields(body)
    request = CompletionRequest(**_common(f, limits), prompts=_prompts(f.body.get("prompt")))
    _check_samples(len(request.prompts), request.n, limits)
    request.echo = f.bool("echo")
    request.return_token_ids = f.bool("return_token_ids")
    request.logprobs = f.int("logprobs", None, 0, MAX_TOP_LOGPROBS)
    if request.logprobs is not None:
        request.params["logprobs"] = request.logprobs
        if request.echo:  # the echoed prompt's tokens get logprobs too (the first: null)
            request.params["prompt_logprobs"] = request.logprobs
    if request.max_tokens is None and "max_tokens" not in f.body:
        request.max_tokens = 16  # the legacy completions default, as OpenAI and vLLM
    return request


def _common(f: Fields, limits: Limits) -> dict[str, Any]:
    model = f.str("model")
    if not model:
        raise bad_request("model", "model is required", "missing_required_parameter")
    stream = f.bool("stream")
    options = f.get("stream_options", dict)
    if options is not None and not stream:
        raise bad_request("stream_options", "stream_options is only allowed when stream is true")
    include_usage = Fields(options or {}).bool("include_usage") if options else False
    max_tokens = f.int("max_completion_tokens", None, 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = f.int("max_tokens", None, 1, limits.max_tokens)
    return {
        "model": model,
        "stream": stream,
        "include_usage": include_usage,
        "n": f.int("n", 1, 1, limits.max_n),
        "max_tokens": max_tokens,
        "params": _sampling_fields(f, limits),
        "user": f.str("user"),
    }


def _check_samples(num_prompts: int, n: int, limits: Limits) -> None:
    """Every prompt gets n samples, each a sequence on a node: bound the fan-out."""
    if num_prompts > limits.max_prompts:
        raise bad_request(
            "prompt", f"prompt allows at most {limits.max_prompts} prompts, got {num_prompts}"
        )
    if num_prompts * n > limits.max_samples:
        raise bad_request(
            "n" if n > 1 else "prompt",
            f"{num_prompts} prompts x n={n} is {num_prompts * n} samples; this edge takes at "
            f"most {limits.max_samples} in one request",
        )


def _sampling_fields(f: Fields, limits: Limits) -> dict[str, Any]:
    params: dict[str, Any] = {
        "temperature": f.float("temperature", 1.0, 0.0),
        "top_p": f.float("top_p", 1.0),
        "top_k": f.int("top_k", 0, -1, TOKEN_ID_LIMIT - 1),
        "min_p": f.float("min_p", 0.0),
        "presence_penalty": f.float("presence_penalty", 0.0),
        "frequency_penalty": f.float("frequency_penalty", 0.0),
        "repetition_penalty": f.float("repetition_penalty", 1.0),
        "ignore_eos": f.bool("ignore_eos"),
        "min_tokens": f.int("min_tokens", 0, 0, limits.max_tokens),
        "seed": f.int("seed", None, -INT64, INT64 - 1),
        "stop": _stop(f.body.get("stop")),
        "logit_bias": _logit_bias(f.get("logit_bias", dict, {})),
        "include_stop_str_in_output": f.bool("include_stop_str_in_output"),
        "skip_special_tokens": f.bool("skip_special_tokens", True),
        "structured_outputs": structured_outputs(f.body),
    }
    params["stop_token_ids"] = _stop_token_ids(f.get("stop_token_ids", list, []))
    return params


def _stop_token_ids(value: list[Any]) -> tuple[int, ...]:
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise bad_request("stop_token_ids", f"stop_token_ids allows at most {MAX_STOP_TOKEN_IDS}")
    if not all(map(_is_token_id, value)):
        raise bad_request(
            "stop_token_ids", f"stop_token_ids must be a list of token ids below {TOKEN_ID_LIMIT}"
        )
    return tuple(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request("stop", f"stop allows at most {MAX_STOP_STRINGS} strings")
    if not all(stops):
        raise bad_request("stop", "stop strings must not be empty")
    if max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise bad_request("stop", f"stop strings are at most {MAX_STOP_CHARS} characters each")
    if sum(map(len, stops)) > MAX_STOP_TOTAL_CHARS:
        raise bad_request("stop", f"stop strings total at most {MAX_STOP_TOTAL_CHARS} characters")
    return tuple(stops)


def _logit_bias(value: dict[str, Any]) -> dict[int, float]:
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request("logit_bias", f"logit_bias allows at most {MAX_LOGIT_BIAS} tokens")
    bias: dict[int, float] = {}
    for key, weight in value.items():
        token = _bias_token(key)
        ok_number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not ok_number or not -100 <= weight <= 100:
            raise bad_request("logit_bias", f"logit_bias[{key!r}] must be in [-100, 100]")
        bias[token] = float(weight)
    return bias


def _bias_token(key: str) -> int:
    try:
        token = int(key)
    except ValueError:
        token = -1
    if not 0 <= token < TOKEN_ID_LIMIT:
        raise bad_request("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
    return token


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise bad_request("messages", "messages is required", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise bad_request("messages", "messages must be a non-empty list")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, message: Any) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(param, f"{param} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{param}.role", f"{param}.role must be one of {sorted(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        content = _join_parts(f"{param}.content", content)
    elif content is not None and not isinstance(content, str):
        raise bad_request(f"{param}.content", f"{param}.content must be a string or parts")
    return {**message, "content": content or ""}


def _join_parts(param: str, parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad_request(param, f"{param}: only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise bad_request(param, f"{param}: a text part needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompts(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if value is None:
        raise bad_request("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_token_id(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(map(_is_token_id, p)) for p in value):
            return [list(p) for p in value]
    raise bad_request(
        "prompt", "prompt must be a string, a list of strings, token ids or token-id lists"
    )


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < TOKEN_ID_LIMIT


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise bad_request(name, f"{name} must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise bad_request(name, f"{name} must be at most {hi}, got {value}")


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    if kinds == (int, float):
        return "a number"
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in _as_tuple(kinds))


def _json_type(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}
