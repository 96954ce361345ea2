"""From an OpenAI request body to what the cluster runs, in four steps, each in one place:

1. parse: the body into a validated ChatRequest / CompletionRequest (schemas.py);
2. resolve: its model to the routed model string and tokenizer (Edge.model_for, models.py;
   404 unknown, 503 no ready replica);
3. render: the chat template and the encoding into prompt ids (here), each prompt checked
   against the context: prompt + max_tokens beyond max_model_len is a 400 naming
   "messages"/"prompt" (the prompt alone is too long) or "max_tokens";
4. params: SamplingParams, with the effective max_tokens (CommonRequest.sampling_params).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from p3.sampling_params import SamplingParams
from p3.tokenizer import Tokenizer

if TYPE_CHECKING:
    from p3.nodes.edge.edge import Edge


@dataclass
class Prepared:
    request: ChatRequest | CompletionRequest | None
    chat: bool
    model: str  # the routed model string
    model_name: str  # as the API shows it
    tokenizer: Tokenizer
    prompt_ids: list[list[int]]
    params: SamplingParams | None = None

    def responder(self, chat: bool) -> Responder:
        request = self.request
        echo = echo_ids = None
        if isinstance(request, CompletionRequest) and request.echo:
            echo_ids = [ids for ids in self.prompt_ids for _ in range(request.n)]
            echo = [self.tokenizer.decode(ids) for ids in echo_ids]
        logprobs = request.params.get("logprobs") if request is not None else None
        responder = Responder(chat, self.model_name, self.tokenizer, logprobs, echo, echo_ids)
        if self.params is not None:
            responder.skip_special_tokens = self.params.skip_special_tokens
        return responder


async def prepare(edge: Edge, body: Any, chat: bool | None) -> Prepared:
    """chat None: /tokenize, which takes either a prompt or messages and generates nothing."""
    if chat is None:
        return await _prepare_tokenize(edge, body)
    request = parse_chat(body, edge.limits) if chat else parse_completion(body, edge.limits)
    model, tokenizer = await edge.model_for({"model": request.model})
    if not edge.cluster.replicas(model):
        raise ApiError(503, f"no ready replica of model {request.model!r}", code="no_replica")
    prompt_ids = _render(tokenizer, request)
    prepared = Prepared(request, chat, model, edge.models.api_name(model), tokenizer, prompt_ids)
    max_tokens = _check_context(edge, prepared)
    prepared.params = request.sampling_params(max_tokens)
    _check_logit_bias(tokenizer, prepared.params)
    return prepared


async def _prepare_tokenize(edge: Edge, body: Any) -> Prepared:
    f = Fields(body)
    model, tokenizer = await edge.model_for(body)
    if "messages" in body:
        request = parse_chat({**body, "model": model})
        ids = _chat_ids(tokenizer, request.messages, f.bool("add_generation_prompt", True))
    else:
        prompt = f.str("prompt")
        if prompt is None:
            raise bad_request("prompt", "give a prompt (string) or messages")
        ids = tokenizer.encode(prompt, add_special_tokens=f.bool("add_special_tokens", True))
    return Prepared(None, False, model, edge.models.api_name(model), tokenizer, [ids])


def _render(tokenizer: Tokenizer, request: ChatRequest | CompletionRequest) -> list[list[int]]:
    if isinstance(request, ChatRequest):
        return [_chat_ids(tokenizer, request.messages, request.add_generation_prompt)]
    return [_completion_ids(tokenizer, p) for p in request.prompts]


def _chat_ids(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt)
    except Exception as exc:  # the template's own raise_exception, or a bad message shape
        raise bad_request("messages", f"the chat template refused the messages: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _completion_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if any(t >= tokenizer.vocab_size for t in prompt):
        raise bad_request("prompt", f"prompt token ids must be below {tokenizer.vocab_size}")
    return prompt


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
    if any(t >= tokenizer.vocab_size for t in params.logit_bias):
        raise bad_request(
            "logit_bias", f"logit_bias token ids must be below {tokenizer.vocab_size}"
        )
