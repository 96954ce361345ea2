"""Structured outputs: what a request's text must match, in vLLM's shape, compiled for llguidance.

`StructuredOutputsParams` takes one of json (a JSON schema), json_object, regex, choice or
grammar (Lark or GBNF), as vLLM's `SamplingParams(structured_outputs=...)` does. It compiles
to one llguidance grammar (a TopLevelGrammar, JSON text): that is what travels to a node
(`WireSamplingParams.grammar`), where the engine's matcher masks the logits at every step
(p3/engine/grammar.py). Torch-free: the edge validates with it.

Why llguidance (over xgrammar and outlines-core): a small abi3 wheel with no dependencies,
for x86-64 and aarch64; masks computed lazily per step in ~0.3-2 ms for a batch of 32 (so no
up-front compile of the whole vocabulary against the grammar, which outlines pays per schema);
JSON schema, regex, Lark and GBNF in one engine; and a matcher that consumes a token list, so a
stream moved to another node replays its tokens and goes on inside the grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

MAX_GRAMMAR_BYTES = 1 << 20  # a compiled grammar travels in every Submit of its request
# JSON's whitespace between tokens: as much as pretty-printing takes, never without end (with
# llguidance's default, `[ \n\r\t]+`, a model may write newlines until max_tokens: seen
# with SmolLM2 at temperature 0.8). A schema's own "x-guidance" options override it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,24}"}
KINDS = ("json", "json_object", "regex", "choice", "grammar")


class InvalidGrammar(ValueError):
    """A constraint that does not compile; `name` is the StructuredOutputsParams field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the constraints. json: a schema (dict, or its JSON text); json_object:
    any JSON object; regex; choice: one of these strings; grammar: Lark or GBNF text.
    compiled: an llguidance grammar as it travels (the others compile to it); it is checked
    where it is used, by the matcher the engine makes of it, not again here."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    compiled: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [f.name for f in fields(self) if is_set(getattr(self, f.name))]
        if len(given) != 1:
            names = ", ".join(KINDS)
            raise InvalidGrammar(
                "structured_outputs", f"structured_outputs takes exactly one of {names}"
            )
        self.llguidance  # compile now: a bad constraint is refused where it is made  # noqa: B018

    @cached_property
    def llguidance(self) -> str:
        """The llguidance grammar (TopLevelGrammar JSON text); InvalidGrammar if it does not
        compile."""
        from llguidance import LLMatcher, grammar_from

        kind = next(f.name for f in fields(self) if is_set(getattr(self, f.name)))
        try:
            grammar = _compile(kind, getattr(self, kind), grammar_from)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidGrammar(kind, f"{kind}: {exc}") from None
        if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
            raise InvalidGrammar(kind, f"{kind} compiles to over {MAX_GRAMMAR_BYTES} bytes")
        if kind == "compiled":  # a node's copy: Engine.add's matcher compiles it (once)
            return grammar
        error = LLMatcher.validate_grammar(grammar, None)
        if error:
            raise InvalidGrammar(kind, f"{kind} is not a valid constraint: {error.strip()}")
        return grammar


def _compile(kind: str, value: Any, grammar_from) -> str:
    if kind == "compiled":
        return value
    if kind == "json_object":
        value = {"type": "object"}
    if kind in ("json", "json_object"):
        from llguidance import LLMatcher

        if isinstance(value, str):
            value = json.loads(value)  # a JSONDecodeError is a ValueError
        if not isinstance(value, dict | bool):
            raise ValueError("a JSON schema is an object (or true/false)")
        return LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_OPTIONS)
    if kind == "regex":
        return grammar_from("regex", value)
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return grammar_from("choice", list(value))
    return grammar_from("grammar", value)  # Lark or GBNF


def is_set(value: Any) -> bool:
    """Whether a constraint field (or a body's field) is given: None and False are not."""
    return value is not None and value is not False
