"""Structured outputs in the engine, on the real default model: every output matches its
constraint (JSON schema, any JSON object, regex, choice, grammar), greedy and sampled; a
moved request replays its tokens through the grammar and goes on inside it; rows without a
constraint are untouched by the others' masks."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from p3 import LLM, SamplingParams
from p3.engine.sequence import Request
from p3.structured import InvalidGrammar, StructuredOutputsParams

from .test_continuation import run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {
            "type": "array",
            "items": {"enum": ["cat", "dog", "fish"]},
            "maxItems": 3,
        },
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Ann, aged 31, who has a cat, as JSON."}]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", kv_cache_bytes=128 * 2**20)


def constrained(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kind)


def test_json_schema_output_validates_greedy_and_sampled(llm):
    greedy = SamplingParams(
        max_tokens=120, temperature=0.0, structured_outputs=constrained(json=PERSON)
    )
    sampled = [
        SamplingParams(
            max_tokens=120, temperature=1.2, seed=s, structured_outputs=constrained(json=PERSON)
        )
        for s in range(6)
    ]
    outs = [r.outputs[0] for r in llm.chat([ASK] * 7, [greedy, *sampled])]
    for out in outs:
        assert out.finish_reason == "stop", out.text  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({out.text for out in outs}) > 1  # sampling still samples inside the grammar


def test_the_same_prompt_without_a_constraint_is_not_json(llm):
    """What the constraint changes: asked the same, the model alone answers in prose."""
    out = llm.chat(ASK, SamplingParams(max_tokens=60, temperature=0.0))[0].outputs[0]
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(out.text), PERSON)


def test_json_object_regex_choice_and_grammar(llm):
    cases = [
        (constrained(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (
            constrained(regex=r"[A-Z][a-z]{2,8}, \d{1,3}"),
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,8}, \d{1,3}", t),
        ),
        (
            constrained(choice=["cat", "dog", "no pets at all"]),
            lambda t: t in ("cat", "dog", "no pets at all"),
        ),
        (
            constrained(grammar='root ::= "Ann is " [0-9] [0-9] " years old."'),
            lambda t: re.fullmatch(r"Ann is \d\d years old\.", t),
        ),
        (constrained(grammar='start: "yes" | "no"'), lambda t: t in ("yes", "no")),
    ]
    params = [
        SamplingParams(max_tokens=200, temperature=0.0, structured_outputs=c) for c, _ in cases
    ]
    for (_, ok), result in zip(cases, llm.chat([ASK] * len(cases), params), strict=True):
        out = result.outputs[0]
        assert out.finish_reason == "stop" and ok(out.text), out.text


def test_a_streamed_constrained_answer_is_the_whole_one(llm):
    params = SamplingParams(
        max_tokens=120, temperature=0.8, seed=11, structured_outputs=constrained(json=PERSON)
    )
    whole = llm.chat(ASK, params)[0].outputs[0].text
    streamed = "".join(llm.stream({"prompt_token_ids": chat_ids(llm)}, params))
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def chat_ids(llm) -> list[int]:
    text = llm.tokenizer.apply_chat_template(ASK, True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_a_moved_request_replays_its_tokens_through_the_grammar(llm):
    """As failover resubmits it: the tokens so far, then the rest, equal to the run that was
    never interrupted, and the whole inside the schema."""
    prompt = chat_ids(llm)
    params = SamplingParams(
        max_tokens=120, temperature=1.0, seed=5, structured_outputs=constrained(json=PERSON)
    )
    whole, reason = run(llm.engine, Request("whole", prompt, params))
    assert reason == "stop"
    for cut in (1, len(whole) // 2, len(whole) - 1):
        moved = Request(f"moved-{cut}", prompt, params, output_token_ids=tuple(whole[:cut]))
        rest, reason = run(llm.engine, moved)
        assert whole[:cut] + rest == whole, cut
        assert reason == "stop"
    text = llm.tokenizer.decode(whole)
    jsonschema.validate(json.loads(text), PERSON)


def test_tokens_outside_the_grammar_are_refused_when_added(llm):
    """A resubmit whose outputs so far leave its grammar (a peer's bug, never a client's):
    refused at add, so a node answers bad_request and nothing runs."""
    prompt = chat_ids(llm)
    params = SamplingParams(max_tokens=20, structured_outputs=constrained(choice=["cat", "dog"]))
    stray = tuple(llm.tokenizer.encode("fish", add_special_tokens=False))
    with pytest.raises(ValueError, match="leaves its grammar"):
        llm.engine.add(Request("stray", prompt, params, output_token_ids=stray))
    assert not llm.engine.holds("stray")


def test_rows_without_a_constraint_are_untouched_by_the_masks_beside_them(llm):
    free = SamplingParams(max_tokens=24, temperature=0.7, seed=9)
    alone = llm.chat(ASK, free)[0].outputs[0].token_ids
    json_rows = SamplingParams(
        max_tokens=24, temperature=0.0, structured_outputs=constrained(json=PERSON)
    )
    batch = llm.chat([ASK] * 4, [json_rows, free, json_rows, free])
    assert batch[1].outputs[0].token_ids == alone == batch[3].outputs[0].token_ids


@pytest.mark.parametrize(
    "kind, value, field",
    [
        ("json", {"type": "objectx"}, "json"),
        ("json", "not json {", "json"),
        ("json", ["a list"], "json"),
        ("regex", "[a-", "regex"),
        ("choice", [], "choice"),
        ("grammar", "root ::= missing", "grammar"),
        ("grammar", "start: ((", "grammar"),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_naming_its_field(kind, value, field):
    with pytest.raises(InvalidGrammar) as refused:
        StructuredOutputsParams(**{kind: value})
    assert refused.value.name == field


def test_exactly_one_constraint():
    with pytest.raises(InvalidGrammar, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidGrammar, match="exactly one"):
        StructuredOutputsParams()


def test_vllm_shaped_dict_is_accepted_by_sampling_params():
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.grammar is not None


def test_json_whitespace_is_bounded_so_a_model_cannot_pad_to_max_tokens(llm):
    """llguidance alone allows any run of whitespace between JSON tokens (SmolLM2 sampled
    newlines until max_tokens under it); p3 allows at most 24 characters a gap."""
    grammar = constrained(json=PERSON).llguidance
    ids = llm.tokenizer.encode
    llm.engine.grammars.matcher(grammar, ids("{" + " " * 20 + '"name"', add_special_tokens=False))
    with pytest.raises(ValueError, match="leaves its grammar"):
        llm.engine.grammars.matcher(
            grammar, ids("{" + " " * 30 + '"name"', add_special_tokens=False)
        )
