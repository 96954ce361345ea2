"""One request inside the engine: its tokens, its KV blocks, how far it has been computed."""

from __future__ import annotations

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
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.token_ids += request.output_token_ids
        self.block_size = block_size
        self.arrival = arrival
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
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; it starts again from its tokens so far."""
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = []  # computed again with the prompt
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = self.num_cached_tokens = 0
        self.status = Status.WAITING
        self.num_preemptions += 1


def _effective_seed(request: Request) -> int:
    if request.seed is not None:
        return request.seed
    return effective_seed(request.params.seed)
