"""One request inside the engine: its tokens, its KV blocks, how far it has been computed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

from p3.lora import LoRARequest
from p3.outputs import FinishReason
from p3.sampling_params import SamplingParams
from p3.seeds import effective_seed


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(frozen=True)
class Request:
    """What a caller asks of the engine: one sequence (n > 1 is split above the engine)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # overrides params.seed (a child of an n > 1 request); None: draw one
    # outputs generated elsewhere already (a request moved off a failed node): the sequence
    # continues after them, at their positions, counting them against max_tokens/min_tokens
    output_token_ids: tuple[int, ...] = ()
    # an embedding, not a generation: the prompt's last hidden state, pooled (normalized),
    # once the prompt is computed; nothing is sampled
    embed: bool = False
    lora: LoRARequest | None = None  # the adapter it runs under; None: the base model


@dataclass(slots=True)
class StepOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: FinishReason | None = None  # None while running
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # prompt tokens 1.. as (token, logprob, top k), with the first sampled token
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    embedding: list[float] | None = None  # an embed request's, at its end

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    def __init__(self, request: Request, block_size: int, arrival: int):
        self.request_id = request.request_id
        self.params = request.params
        self.seed = _effective_seed(request)
        self.all_token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.all_token_ids)
        self.all_token_ids += request.output_token_ids
        # what the model sees: every token, or under a streaming window its view of them
        self.token_ids = self.all_token_ids
        self.window: tuple[int, int] | None = None  # (sinks, window) when streaming
        self.view_start: int | None = None  # the view: sinks, then tokens from here on
        self.block_size = block_size
        self.arrival = arrival
        self.queued_at: float | None = time.monotonic()  # None once first admitted
        self.lane = 0  # the pipeline micro-batch it rides in (engine.py)
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        self.block_hashes: list[int] = []  # chain hashes of the leading full, computed blocks
        self.num_preemptions = 0
        self.matcher = None  # an llguidance LLMatcher when params carry a grammar (grammar.py)
        self.embed = request.embed
        self.lora = request.lora
        self.lora_key: int | None = None  # its adapter's key in the engine, once acquired
        # the root of its prefix-cache hash chain: an adapter's KV is not the base's
        self.hash_root = (
            -1
            if request.lora is None
            else hash(("lora", request.lora.lora_int_id, request.lora.lora_path))
        )
        self.embedding: list[float] | None = None  # pooled at the end of its prompt
        # (token, logprob, top k) of prompt tokens 1.. as prefill computes them
        self.prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = (
            [] if request.params.prompt_logprobs is not None else None
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and outputs, all of them (len(seq) is what the model sees of them)."""
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def is_windowed(self) -> bool:
        return self.token_ids is not self.all_token_ids

    def stream_within(self, sinks: int, window: int) -> None:
        """StreamingLLM: from now on the model sees at most sinks + window tokens (see
        window_view); the view is applied now if the tokens already exceed it."""
        self.window = (sinks, window)
        self.apply_window()

    def needs_rewindow(self) -> bool:
        """Its view has just dropped back (its KV must be computed again, at new positions)."""
        if self.window is None:
            return False
        view = window_view(len(self.all_token_ids), *self.window)
        return (view[1] if view else None) != self.view_start

    def apply_window(self) -> None:
        """Take the view of the tokens so far (its KV must be computed again from scratch)."""
        if self.window is not None:
            view = window_view(len(self.all_token_ids), *self.window)
            if view is not None:
                sinks, self.view_start = view
                self.token_ids = self.all_token_ids[:sinks] + self.all_token_ids[self.view_start :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.is_windowed:
            self.token_ids.append(token_id)

    def reset_for_recompute(self, preempted: bool = True) -> None:
        """Preempted (or its window's view dropped back): its blocks are gone; it starts
        again from its tokens so far."""
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = []  # computed again with the prompt
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = self.num_cached_tokens = 0
        self.status = Status.WAITING
        self.num_preemptions += preempted


def window_view(num_tokens: int, sinks: int, window: int) -> tuple[int, int] | None:
    """StreamingLLM's view of num_tokens tokens: None while they fit in sinks + window; else
    the first `sinks` tokens and the tokens from `start` on. Each time the view fills up it
    drops back to sinks + window // 2 (the KV is computed again then, at the view's own
    positions: so RoPE never sees a position past sinks + window), hence between window // 2
    and window latest tokens: a function of num_tokens alone, so a stream moved to another
    node, which rebuilds its view from its tokens, sees exactly what it saw before."""
    if num_tokens < sinks + window:
        return None
    half = max(1, window // 2)
    tail = half + (num_tokens - sinks - half) % (window - half)
    return min(sinks, num_tokens), num_tokens - tail


def _effective_seed(request: Request) -> int:
    if request.seed is not None:
        return request.seed
    return effective_seed(request.params.seed)
