"""One sample of an in-flight request: its journal, and the text it streams.

A request with n samples (or several prompts) becomes one `Sample` per stream. The `Journal`
holds everything needed to submit it to any replica (prompt ids, wire params, effective
seed) and what came back so far; `Sample.apply` turns a node's TokenDelta into a `Delta`
(new text through the incremental detokenizer and the stop-string matcher, logprobs,
finish reason), the same way p3.llm does in-process. Shared by the edge and p3.client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from p3 import tracing
from p3.outputs import FinishReason
from p3.protocol import messages as m
from p3.protocol.sampling import to_wire
from p3.sampling_params import SamplingParams
from p3.seeds import child_seed, effective_seed
from p3.tokenizer import OutputText, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # best first; empty when only the sampled token was asked


@dataclass
class Delta:
    """What one sample added: text (final, stop strings cut), tokens, logprobs, the finish."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.., with the first token
    embedding: list[float] | None = None  # an embedding request's, with its finish


@dataclass
class Journal:
    """One sample as the cluster sees it: enough to (re)submit it anywhere, and its progress."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: m.WireSamplingParams
    seed: int
    node_id: str | None = None
    epoch: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_attempts: int = 0
    tried_nodes: set[str] = field(default_factory=set)
    num_idle_moves: int = 0  # moves in a row with no new token between them
    tokens_at_move: int = -1  # how many tokens it had at its latest move
    stuck_nodes: set[str] = field(default_factory=set)  # left after a token timeout: not again
    stream_id: str = ""  # a resumable stream's id (its response id), "" if not resumable
    resume: Callable[[Journal], bytes] | None = None  # its context, made from this journal
    delta_sizes: list[int] = field(default_factory=list)  # tokens of each delta applied
    # each token's logprob and top logprobs as applied (when asked for: a resumed stream's
    # events from before a move carry them as the first edge sent them)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    embed: bool = False  # the prompt's embedding, not a generation
    lora: str = ""  # the LoRA adapter it runs under: only replicas holding it take it
    traceparent: str = ""  # its request's span (p3.tracing), where every node's span goes

    def submit_message(self) -> m.Submit:
        """Submit, or resubmit after a move: the outputs so far travel along, so the new node
        continues at the same positions with the same seeded draws."""
        return m.Submit(
            self.request_id,
            self.prompt_token_ids,
            self.params,
            self.seed,
            self.epoch,
            list(self.token_ids),
            self.stream_id,
            self.resume(self) if self.resume is not None else b"",
            self.embed,
            self.lora,
            self.traceparent,
        )


class Sample:
    """One stream of one request: TokenDeltas in, Deltas out; remembers how it finished."""

    def __init__(
        self,
        index: int,
        journal: Journal,
        tokenizer: Tokenizer,
        params: SamplingParams,
    ):
        self.index = index
        self.journal = journal
        self.tokenizer = tokenizer
        self.params = params
        self.text = OutputText(tokenizer, journal.prompt_token_ids, params)
        self.finish_reason: FinishReason | None = None
        self.num_prompt_tokens = len(journal.prompt_token_ids)
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.embedding: list[float] | None = None

    @property
    def request_id(self) -> str:
        return self.journal.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.journal.token_ids)

    def apply(self, delta: m.TokenDelta) -> Delta | None:
        """The Delta this step's tokens make; None for a repeat or anything after the end."""
        if delta.embedding is not None and not self.finished and self.journal.embed:
            self.embedding, self.finish_reason = delta.embedding, "stop"
            self.num_cached_tokens = delta.num_cached_tokens
            return Delta(self.index, "", [], finish_reason="stop", embedding=delta.embedding)
        if self.finished or delta.index + len(delta.token_ids) <= self.num_output_tokens:
            return None
        skip = max(0, self.num_output_tokens - delta.index)  # overlap already seen
        token_ids = delta.token_ids[skip:]
        self.journal.token_ids += token_ids
        self.journal.delta_sizes.append(len(token_ids))
        if delta.logprobs is not None and self.journal.resume is not None:
            self.journal.logprobs += delta.logprobs[skip:]
            tops = delta.top_logprobs or [[] for _ in delta.logprobs]
            self.journal.top_logprobs += [list(map(tuple, top)) for top in tops[skip:]]
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        out = Delta(self.index, "", token_ids, _logprobs(delta, skip))
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:  # once, moved or not
            self.prompt_logprobs = out.prompt_logprobs = [
                TokenLogprob(t, lp, [tuple(pair) for pair in top])
                for t, lp, top in delta.prompt_logprobs
            ]
        self._add_text(out, delta.finish_reason is not None)
        if out.finish_reason is None and delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.stop_reason = self.params.stop_token_at_end(token_ids)
        self.finish_reason = out.finish_reason
        return out

    def fail(self) -> Delta:
        """The sample ends without its node: nothing more will come."""
        self.finish_reason = "abort"
        return Delta(self.index, "", [], finish_reason="abort")

    def _add_text(self, out: Delta, last: bool) -> None:
        out.text, hit = self.text.push(out.token_ids, self.num_output_tokens, last)
        if hit is not None:
            out.finish_reason, out.stop_reason = "stop", hit


def _logprobs(delta: m.TokenDelta, skip: int) -> list[TokenLogprob] | None:
    if delta.logprobs is None:
        return None
    tops = delta.top_logprobs or [[] for _ in delta.logprobs]
    return [
        TokenLogprob(t, lp, [tuple(pair) for pair in top])
        for t, lp, top in zip(delta.token_ids, delta.logprobs, tops, strict=False)
    ][skip:]


def make_samples(
    request_id: str,
    model: str,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Tokenizer,
    lora: str = "",
) -> list[Sample]:
    """n samples per prompt, ids `<id>-<i>`, seeds child_seed(seed, i) from one effective seed;
    lora: the adapter they run under ("": the base). Traced, they carry the current span (the
    edge's for this request), which is given their request id and model."""
    seed = effective_seed(params.seed)
    wire = to_wire(params)
    traceparent = tracing.traceparent()  # the request's span, when traced
    tracing.annotate(request_id=request_id, model=model)
    samples = []
    for p, prompt_ids in enumerate(prompts):
        for i in range(params.n):
            index = p * params.n + i
            journal = Journal(
                f"{request_id}-{index}",
                model,
                prompt_ids,
                wire,
                child_seed(seed, i),
                lora=lora,
                traceparent=traceparent,
            )
            samples.append(Sample(index, journal, tokenizer, params))
    return samples
