"""From an OpenAI request body to what the cluster runs, in four steps, each in one place:

1. parse: the body into a validated ChatRequest / CompletionRequest (schemas.py);
2. resolve: its model to the routed model string and tokenizer (Edge.model_for, models.py;
   404 unknown, 503 no ready replica). A model without a tokenizer (a NoTokenizer) takes
   token-id completions only: chat, a text prompt, echo, stop strings or a constraint is a
   400 saying the model has no tokenizer;
3. render: the chat template and the encoding into prompt ids (here), each prompt checked
   against the context: prompt + max_tokens beyond max_model_len is a 400 naming
   "messages"/"prompt" (the prompt alone is too long) or "max_tokens". A text of more than
   CHARS_PER_TOKEN characters per token the prompt may have is refused before it is
   rendered, and a big one is rendered and encoded in a thread, so the loop keeps serving;
4. params: SamplingParams, with the effective max_tokens (CommonRequest.sampling_params).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from p3.nodes.edge.responses import Responder
from p3.nodes.edge.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Fields,
    bad_request,
    parse_chat,
    parse_completion,
)
from p3.nodes.edge.tools import Tools, for_template
from p3.sampling_params import InvalidParam, SamplingParams
from p3.tokenizer import NoTokenizer, Tokenizer

if TYPE_CHECKING:
    from p3.nodes.edge.edge import Edge

CHARS_PER_TOKEN = 32  # far beyond any text's average (~4), so only hopeless prompts are refused
OFF_LOOP_CHARS = 16 * 1024  # texts above this are rendered and encoded off the event loop

T = TypeVar("T")


@dataclass
class Prepared:
    request: ChatRequest | CompletionRequest | None
    chat: bool
    model: str  # the routed model string
    model_name: str  # as the API shows it
    tokenizer: Tokenizer
    prompt_ids: list[list[int]]
    params: SamplingParams | None = None
    lora: str = ""  # the LoRA adapter the request names ("": the model itself)

    def responder(self, chat: bool) -> Responder:
        request = self.request
        echo = echo_ids = returned_ids = None
        if isinstance(request, CompletionRequest):
            choice_ids = [ids for ids in self.prompt_ids for _ in range(request.n)]
            if request.echo:
                echo_ids, echo = choice_ids, [self.tokenizer.decode(ids) for ids in choice_ids]
            returned_ids = choice_ids if request.return_token_ids else None
        logprobs = request.params.get("logprobs") if request is not None else None
        tools = request.tools if isinstance(request, ChatRequest) else None
        responder = Responder(
            chat, self.model_name, self.tokenizer, logprobs, echo, echo_ids, tools, returned_ids
        )
        if self.params is not None:
            responder.skip_special_tokens = self.params.skip_special_tokens
        return responder


async def prepare(edge: Edge, body: Any, chat: bool | None) -> Prepared:
    """chat None: /tokenize, which takes either a prompt or messages and generates nothing."""
    if chat is None:
        return await _prepare_tokenize(edge, body)
    request = parse_chat(body, edge.limits) if chat else parse_completion(body, edge.limits)
    model, tokenizer = await edge.model_for({"model": request.model})
    lora = edge.adapter_of(request.model)
    if not edge.cluster.replicas(model, lora):
        raise ApiError(503, f"no ready replica of model {request.model!r}", code="no_replica")
    _check_untokenized(tokenizer, request)
    prompt_ids = await _render(tokenizer, request, _max_chars(edge, model))
    name = request.model if lora else edge.models.api_name(model)
    prepared = Prepared(request, chat, model, name, tokenizer, prompt_ids, lora=lora)
    max_tokens = _check_context(edge, prepared)
    prepared.params = request.sampling_params(max_tokens)
    try:
        tokenizer.check_params(prepared.params)  # NoTokenizer: stop strings, constraints
    except InvalidParam as exc:
        raise bad_request(exc.name, str(exc), NO_TOKENIZER) from None
    _check_logit_bias(tokenizer, prepared.params)
    return prepared


NO_TOKENIZER = "no_tokenizer"  # the 400's code when a model without a tokenizer is sent text


def refuse_text(tokenizer: Tokenizer | NoTokenizer, param: str, what: str) -> None:
    """A 400 naming param when the model has no tokenizer: what (needs one) is said why."""
    if isinstance(tokenizer, NoTokenizer):
        raise bad_request(param, str(tokenizer.refuse(what)), NO_TOKENIZER)


def _check_untokenized(tokenizer: Tokenizer | NoTokenizer, request: Any) -> None:
    """Without a tokenizer: no chat, no text prompt, no echo (vLLM's skip_tokenizer_init)."""
    if isinstance(request, ChatRequest):
        what = "chat messages need one to be rendered; send token ids to /v1/completions"
        refuse_text(tokenizer, "messages", what)
    elif any(isinstance(p, str) for p in request.prompts):
        refuse_text(tokenizer, "prompt", "a text prompt needs one; give token ids instead")
    elif request.echo:
        refuse_text(tokenizer, "echo", "echo needs one to write the prompt's text")


async def _prepare_tokenize(edge: Edge, body: Any) -> Prepared:
    """Bounded by the edge's prompt limit alone: counting a text beyond the context is fair."""
    f = Fields(body)
    model, tokenizer = await edge.model_for(body)
    if "messages" in body:
        refuse_text(tokenizer, "messages", "chat messages need one to be rendered")
        request = parse_chat({**body, "model": model})
        param, text = "messages", request.messages
        add_generation_prompt = f.bool("add_generation_prompt", True)
        render = partial(
            _chat_ids, tokenizer, request.messages, add_generation_prompt, request.tools
        )
    else:
        param, text = "prompt", f.str("prompt")
        if text is None:
            raise bad_request("prompt", "give a prompt (string) or messages")
        refuse_text(tokenizer, "prompt", "a text prompt needs one to be tokenized")
        render = partial(_encode, tokenizer, text, f.bool("add_special_tokens", True))
    ids = await _render_text(_check_chars(param, text, _max_chars(edge, None)), render)
    return Prepared(None, False, model, edge.models.api_name(model), tokenizer, [ids])


def _max_chars(edge: Edge, model: str | None) -> int:
    """CHARS_PER_TOKEN for every token a prompt may have: the edge's limit, and the model's
    context when given."""
    tokens = edge.limits.max_prompt_tokens
    if model is not None and (max_len := edge.max_model_len(model)) > 0:
        tokens = min(tokens, max_len)
    return tokens * CHARS_PER_TOKEN


def _check_chars(param: str, text: Any, max_chars: int) -> int:
    """The characters of text (a prompt, or messages); a 400 if beyond max_chars."""
    num_chars = _num_chars(text)
    if num_chars > max_chars:
        raise bad_request(
            param,
            f"the prompt has {num_chars} characters; this edge takes at most {max_chars} "
            f"({CHARS_PER_TOKEN} for each of the {max_chars // CHARS_PER_TOKEN} tokens a "
            "prompt may have here)",
            "context_length_exceeded",
        )
    return num_chars


def _num_chars(value: Any) -> int:
    """Every string's characters in a JSON value: what a chat template may render of it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _num_chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(map(_num_chars, value))
    return 0


async def _render(
    tokenizer: Tokenizer, request: ChatRequest | CompletionRequest, max_chars: int
) -> list[list[int]]:
    if isinstance(request, ChatRequest):
        num_chars = _check_chars("messages", request.messages, max_chars)
        render = partial(
            _chat_ids, tokenizer, request.messages, request.add_generation_prompt, request.tools
        )
        return [await _render_text(num_chars, render)]
    num_chars = sum(_check_chars("prompt", p, max_chars) for p in request.prompts)
    return await _render_text(num_chars, partial(_completion_ids, tokenizer, request.prompts))


async def _render_text(num_chars: int, render: Callable[[bool], T]) -> T:
    """render(off_loop) here, or in a thread when the text is big: the loop keeps serving
    (the template's Python lets go of the GIL every few ms; the encoding releases it)."""
    if num_chars <= OFF_LOOP_CHARS:
        return render(False)
    return await asyncio.to_thread(render, True)


def _chat_ids(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    tools: Tools | None,
    off_loop: bool,
) -> list[int]:
    messages, template_tools = for_template(messages, tools, tokenizer.chat_template)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt, template_tools)
    except Exception as exc:  # the template's own raise_exception, or a bad message shape
        raise bad_request("messages", f"the chat template refused the messages: {exc}") from None
    return _encode(tokenizer, text, False, off_loop)


def _completion_ids(
    tokenizer: Tokenizer, prompts: list[str | list[int]], off_loop: bool
) -> list[list[int]]:
    vocab = tokenizer.vocab_size  # None: not known here (the node checks the ids)
    if vocab is not None and any(t >= vocab for p in prompts if not isinstance(p, str) for t in p):
        raise bad_request("prompt", f"prompt token ids must be below {vocab}")
    return [_encode(tokenizer, p, True, off_loop) if isinstance(p, str) else p for p in prompts]


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool, off_loop: bool) -> list[int]:
    """Off the loop through the backend's encode_batch, which releases the GIL while it works;
    its encode, behind Tokenizer.encode, holds it (3.8 MB took 5 s with the loop frozen)."""
    if not off_loop:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return tokenizer.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _check_context(edge: Edge, prepared: Prepared) -> int | None:
    """The effective max_tokens; 400 if a prompt or prompt + max_tokens does not fit."""
    request = prepared.request
    param = "messages" if prepared.chat else "prompt"
    max_len = edge.max_model_len(prepared.model)
    limit = edge.limits.max_prompt_tokens
    for ids in prepared.prompt_ids:
        if not ids:
            raise bad_request(param, "the prompt must contain at least one token")
        if len(ids) >= max_len or len(ids) > limit:
            raise bad_request(
                param,
                f"the prompt has {len(ids)} tokens; this model's context is {max_len} "
                f"(and this edge takes at most {limit} prompt tokens)",
                "context_length_exceeded",
            )
    longest = max(len(ids) for ids in prepared.prompt_ids)
    if request.max_tokens is None:
        return min(max_len - longest, edge.limits.max_tokens)
    if longest + request.max_tokens > max_len:
        raise bad_request(
            "max_tokens",
            f"prompt ({longest} tokens) + max_tokens ({request.max_tokens}) is beyond this "
            f"model's context of {max_len} tokens",
            "context_length_exceeded",
        )
    return request.max_tokens


def _check_logit_bias(tokenizer: Tokenizer, params: SamplingParams) -> None:
    vocab = tokenizer.vocab_size
    if vocab is not None and any(t >= vocab for t in params.logit_bias):
        raise bad_request("logit_bias", f"logit_bias token ids must be below {vocab}")
