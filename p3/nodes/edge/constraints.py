"""What a request's output must match, from its body: OpenAI's `response_format`, vLLM's
`structured_outputs` object and its older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` fields. At most one may be given; each becomes a StructuredOutputsParams,
compiled here so a constraint that does not compile is a 400 naming the field it came from.
"""

from __future__ import annotations

import re
from typing import Any

from p3.nodes.edge.errors import bad_request
from p3.structured import KINDS, InvalidGrammar, StructuredOutputsParams, is_set

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
MAX_CHOICES = 1024


def structured_outputs(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The body's one constraint, compiled; None when it has none. 400 naming the field."""
    given = [n for n in ("response_format", "structured_outputs", *GUIDED) if is_set(body.get(n))]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(given[1], f"give one of {', '.join(given)}, not several")
    name = given[0]
    value = body[name]
    if name == "response_format":
        param, kind, value = _response_format(value)
    elif name == "structured_outputs":
        param, kind, value = _vllm_object(value)
    else:
        param, kind = name, GUIDED[name]
    return compile_constraint(param, kind, value)


def compile_constraint(param: str, kind: str, value: Any) -> StructuredOutputsParams | None:
    """StructuredOutputsParams(kind=value); a 400 naming param if it does not compile."""
    if kind == "text":
        return None
    _check_shape(param, kind, value)
    try:
        return StructuredOutputsParams(**{kind: value})
    except InvalidGrammar as exc:
        raise bad_request(param, f"{param}: {exc}") from None


def _response_format(value: Any) -> tuple[str, str, Any]:
    if not isinstance(value, dict):
        raise bad_request("response_format", "response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        return "response_format", "text", None
    if kind == "json_object":
        return "response_format", "json_object", True
    if kind != "json_schema":
        raise bad_request(
            "response_format.type",
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            "response_format.json_schema", "response_format.json_schema must be an object"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise bad_request(
            "response_format.json_schema.name",
            "response_format.json_schema.name must be 1-64 letters, digits, _ or -",
        )
    schema = spec.get("schema", {"type": "object"})
    return "response_format.json_schema.schema", "json", schema


def _vllm_object(value: Any) -> tuple[str, str, Any]:
    if not isinstance(value, dict):
        raise bad_request("structured_outputs", "structured_outputs must be an object")
    kinds = [k for k in KINDS if is_set(value.get(k))]
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise bad_request(
            f"structured_outputs.{unknown[0]}",
            f"structured_outputs.{unknown[0]} is not supported here ({', '.join(KINDS)})",
        )
    if len(kinds) != 1:
        raise bad_request(
            "structured_outputs", f"structured_outputs takes exactly one of {', '.join(KINDS)}"
        )
    return f"structured_outputs.{kinds[0]}", kinds[0], value[kinds[0]]


def _check_shape(param: str, kind: str, value: Any) -> None:
    ok = {
        "json": isinstance(value, dict | str | bool),
        "json_object": value is True,
        "regex": isinstance(value, str) and value != "",
        "choice": isinstance(value, list)
        and 0 < len(value) <= MAX_CHOICES
        and all(isinstance(c, str) and c for c in value),
        "grammar": isinstance(value, str) and value.strip() != "",
    }[kind]
    if not ok:
        what = {
            "json": "a JSON schema (an object)",
            "json_object": "true",
            "regex": "a non-empty string",
            "choice": f"a list of 1-{MAX_CHOICES} non-empty strings",
            "grammar": "a Lark or GBNF grammar (a non-empty string)",
        }[kind]
        raise bad_request(param, f"{param} must be {what}")
