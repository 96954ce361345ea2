"""What a generation gives back, in vLLM's shapes, for the offline API (p3.llm) and the native
client (p3.client) alike; and how either reads a prompt. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from p3.tokenizer import Tokenizer

PromptType = str | dict[str, Any]
# why a sample ended: a stop token or string, max_tokens or the context, or it was aborted
FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token; None where not among the top k
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # with SamplingParams(prompt_logprobs=k), as vLLM gives them: None for the first prompt
    # token, then each one's {token id: Logprob} (its own and the top k)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # the last token's final hidden state, L2-normalized


@dataclass
class EmbeddingRequestOutput:
    """vLLM's shape for LLM.embed: one per prompt."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


def logprob_entry(
    tokenizer: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None
) -> dict[int, Logprob]:
    """vLLM's shape: the top k by rank, and the token itself (rank None if not among them);
    decoded_token None without a tokenizer."""
    entry = {
        t: Logprob(v, rank + 1, tokenizer.token_text(t)) for rank, (t, v) in enumerate(top or [])
    }
    entry.setdefault(token, Logprob(logprob, None, tokenizer.token_text(token)))
    return entry


def prompt_ids(tokenizer: Tokenizer, prompt: PromptType) -> tuple[str | None, list[int]]:
    """(text if any, token ids) of a prompt: a string, or {"prompt": ...} or
    {"prompt_token_ids": [...]} (the ids win when both are given)."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if "prompt_token_ids" in prompt:
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"], tokenizer.encode(prompt["prompt"])
    raise ValueError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'")
