"""One engine step's logits to tokens: logit processing, greedy or seeded sampling, logprobs.

Order (vLLM / OpenAI): logit_bias, min_tokens blocking, repetition penalty, frequency and
presence penalties; then greedy rows take the argmax and the others go through temperature,
top_k, top_p, min_p and an exponential race (Gumbel-max) keyed on (seed, position), so a
seeded request draws the same tokens alone, in any batch, or resumed on another node.
Logprobs are those of the raw logits (the model's distribution).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from p3.sampling_params import SamplingParams
from p3.seeds import mix_seed

NEG_INF = float("-inf")
# top_p first looks at this many best tokens, and sorts a row's whole vocab only when its
# nucleus is wider (a flat distribution); the kept set is the same either way.
NUCLEUS_PROBE_TOKENS = 128
NUCLEUS_WIDENING = 8  # then this many times more, then the whole vocab


@dataclass(slots=True)
class SampleRow:
    params: SamplingParams
    seed: int  # effective seed (the engine draws one when params.seed is None)
    position: int  # absolute position of the token being sampled in its sequence
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: frozenset[int]  # blocked (with stop_token_ids) until min_tokens outputs


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # the chosen token's; None where params.logprobs is None
    top_logprobs: list[list[tuple[int, float]] | None]  # k = params.logprobs, best first


class Sampler:
    """Called once per step with the logits `[len(rows), vocab]` of every sampling sequence."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SampleRow],
        constrained: tuple[list[int], torch.Tensor] | None = None,
    ) -> SampleResult:
        """constrained: rows under a grammar and the tokens each may take ([len, vocab]
        booleans, p3/engine/grammar.py); the others are -inf before anything else is done."""
        raw = logits.float()
        if constrained is None and all(_is_plain_greedy(row) for row in rows):
            return _plain_result(argmax_rows(raw).tolist())
        processed = process_logits(raw, rows) if _needs_processing(rows) else raw
        if constrained is not None:
            copy = processed if processed is not raw else _float_copy(raw)
            processed = _masked(copy, constrained)
        token_ids = self._choose_tokens(processed, rows)
        if processed is not raw:
            token_ids = _fall_back_where_all_blocked(token_ids, processed, raw, constrained)
        return _result_with_logprobs(raw, rows, token_ids)

    def _choose_tokens(self, processed: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not sampled:
            return argmax_rows(processed)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=processed.device)
        if greedy:
            token_ids[greedy] = argmax_rows(processed[greedy]).to(processed.device)
        sampled_rows = [rows[i] for i in sampled]
        sampled_ids = self._sample(_rows_of(processed, sampled), sampled_rows)
        token_ids[sampled] = sampled_ids.to(processed.device)
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        weights = sampling_weights(logits, rows)
        races = weights.div_(self._exponential_noise(weights.shape, rows, weights.device))
        return argmax_rows(races)

    def _exponential_noise(
        self, shape: torch.Size, rows: list[SampleRow], device: torch.device
    ) -> torch.Tensor:
        """Exp(1) per (row, token), each row's draws a function of (seed, position) only."""
        uniform = torch.empty(shape, device=device)
        generator = self._generator(device)
        for index, row in enumerate(rows):
            generator.manual_seed(mix_seed(row.seed, row.position))
            uniform[index].uniform_(generator=generator)  # [0, 1): E > 0, E = inf loses
        # -log(U) rather than Tensor.exponential_, which is ~5x slower on CPU
        return uniform.log_().neg_()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim; on CPU through numpy, whose argmax is ~10x faster."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


# --- processing: bias, min_tokens, penalties -------------------------------------------------


def process_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """logit_bias, min_tokens blocking, then penalties, on a copy of `logits` `[rows, vocab]`."""
    processed = _float_copy(logits)
    _add_logit_bias(processed, rows)
    _block_stop_tokens(processed, rows)
    _penalise_history(processed, rows)
    return processed


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties alone, on a copy of `logits`."""
    penalised = _float_copy(logits)
    _penalise_history(penalised, rows)
    return penalised


def _is_plain_greedy(row: SampleRow) -> bool:
    params = row.params
    return (
        params.greedy
        and params.logprobs is None
        and not params.logit_bias
        and not params.needs_history
        and len(row.output_token_ids) >= params.min_tokens
    )


def _needs_processing(rows: Sequence[SampleRow]) -> bool:
    return any(
        row.params.logit_bias
        or row.params.needs_history
        or len(row.output_token_ids) < row.params.min_tokens
        for row in rows
    )


def _add_logit_bias(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    vocab = logits.shape[-1]
    entries = [
        (index, token_id, bias)
        for index, row in enumerate(rows)
        for token_id, bias in row.params.logit_bias.items()
        if 0 <= token_id < vocab
    ]
    if not entries:
        return
    row_ids, token_ids, biases = zip(*entries, strict=True)
    where = _long_tensor(row_ids, logits.device), _long_tensor(token_ids, logits.device)
    logits.index_put_(where, torch.tensor(biases, device=logits.device), accumulate=True)


def _block_stop_tokens(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    vocab = logits.shape[-1]
    entries = [
        (index, token_id)
        for index, row in enumerate(rows)
        for token_id in _blocked_token_ids(row)
        if 0 <= token_id < vocab
    ]
    if not entries:
        return
    row_ids, token_ids = zip(*entries, strict=True)
    where = _long_tensor(row_ids, logits.device), _long_tensor(token_ids, logits.device)
    logits.index_put_(where, torch.tensor(NEG_INF, device=logits.device))


def _blocked_token_ids(row: SampleRow) -> Iterable[int]:
    """Stop tokens (and eos unless ignored, as vLLM) while fewer than min_tokens outputs."""
    params = row.params
    if len(row.output_token_ids) >= params.min_tokens:
        return ()
    if params.ignore_eos:
        return params.stop_token_ids
    return chain(row.eos_token_ids, params.stop_token_ids)


def _penalise_history(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """In place, touching only the (row, token) pairs seen: cost follows history, not vocab."""
    history = [i for i, row in enumerate(rows) if row.params.needs_history]
    if not history:
        return
    vocab, device = logits.shape[-1], logits.device
    output_keys = _history_keys([rows[i].output_token_ids for i in history], history, vocab)
    prompt_keys = _history_keys([rows[i].prompt_token_ids for i in history], history, vocab)
    penalties = _penalty_table(rows, device)  # [3, rows]: repetition, frequency, presence
    flat = logits.view(-1)  # keys index flat as row * vocab + token
    _apply_repetition(flat, torch.cat([prompt_keys, output_keys]).to(device), penalties[0], vocab)
    _apply_frequency_presence(flat, output_keys.to(device), penalties[1], penalties[2], vocab)


def _history_keys(
    token_lists: Sequence[Sequence[int]], row_ids: Sequence[int], vocab: int
) -> torch.Tensor:
    """`row * vocab + token` for every in-vocab token of each row's list (CPU, int64)."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=total)
    rows = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)
    in_vocab = (tokens >= 0) & (tokens < vocab)
    return torch.from_numpy(rows[in_vocab] * vocab + tokens[in_vocab])


def _penalty_table(rows: Sequence[SampleRow], device: torch.device) -> torch.Tensor:
    table = [
        (row.params.repetition_penalty, row.params.frequency_penalty, row.params.presence_penalty)
        for row in rows
    ]
    return torch.tensor(table, dtype=torch.float32, device=device).T


def _apply_repetition(
    flat_logits: torch.Tensor, keys: torch.Tensor, penalty: torch.Tensor, vocab: int
) -> None:
    """HF/vLLM: positive logits of seen tokens divided by the penalty, negative multiplied."""
    seen = torch.unique(keys)
    values, row_penalty = flat_logits[seen], penalty[seen // vocab]
    flat_logits[seen] = torch.where(values > 0, values / row_penalty, values * row_penalty)


def _apply_frequency_presence(
    flat_logits: torch.Tensor,
    keys: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    vocab: int,
) -> None:
    seen, counts = torch.unique(keys, return_counts=True)
    row_ids = seen // vocab
    flat_logits[seen] -= frequency[row_ids] * counts + presence[row_ids]


# --- sampling: temperature, top_k, top_p, min_p ---------------------------------------------


def sampling_weights(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """What a sampled row draws from: softmax(logits / temperature), zeroed outside top_k,
    top_p and min_p. Not renormalised: the exponential race needs only proportions.

    Rows must all sample (temperature above the greedy threshold). Returns a new tensor.
    """
    table = torch.tensor(
        [(r.params.temperature, r.params.top_k, r.params.top_p, r.params.min_p) for r in rows],
        dtype=torch.float32,
        device=logits.device,
    ).T
    temperature, top_k, top_p, min_p = table
    scaled = logits / temperature[:, None]
    probs = scaled.softmax(dim=-1)
    if not any(_truncates(row.params) for row in rows):
        return probs
    # min_p: prob < min_p * max prob  <=>  logit < max logit + log(min_p)
    cutoff = scaled.amax(dim=-1) + min_p.log()
    first_width = _first_probe_width(rows, vocab=scaled.shape[-1])
    if first_width:
        top_k_top_p = _top_k_top_p_cutoff(scaled, probs, top_k, top_p, first_width)
        cutoff = torch.maximum(cutoff, top_k_top_p)
    return probs.masked_fill_(scaled < cutoff[:, None], 0.0)


def _truncates(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _first_probe_width(rows: Sequence[SampleRow], vocab: int) -> int:
    """How many best tokens top_k/top_p look at first; 0 when no row uses either."""
    width = max(row.params.top_k for row in rows)
    if any(row.params.top_p < 1.0 for row in rows):
        width = max(width, NUCLEUS_PROBE_TOKENS)
    return min(width, vocab)


def _top_k_top_p_cutoff(
    scaled: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int
) -> torch.Tensor:
    """The lowest logit each row keeps after top_k then top_p; -inf for rows using neither.

    Looks at the `width` best tokens of every row, then at 8x more, then sorts the whole row,
    each time only for the top_p rows whose nucleus did not close. Every sum is a row-local
    softmax or cumsum of a prefix, so a row keeps the same set whatever else is in the batch.
    """
    cutoff, still_open = _cutoff_within(scaled, probs, top_k, top_p, width)
    pending = still_open.nonzero().squeeze(1)
    for wider in (width * NUCLEUS_WIDENING, scaled.shape[-1]):
        if pending.numel() == 0:
            break
        pending_cutoff, still_open = _cutoff_within(
            scaled[pending], probs[pending], top_k[pending], top_p[pending], wider
        )
        cutoff[pending] = pending_cutoff
        pending = pending[still_open]
    return cutoff


def _cutoff_within(
    scaled: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top_k/top_p cutoff from its `width` best tokens, and which rows' nuclei
    reach past them (their cutoff is not final)."""
    vocab = scaled.shape[-1]
    width = min(width, vocab)
    if width < vocab:
        best, best_ids = scaled.topk(width, dim=-1)  # sorted, best first
    else:
        best, best_ids = scaled.sort(dim=-1, descending=True)
    num_kept = _num_kept(probs.gather(1, best_ids), top_k, top_p)
    cutoff = best.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    uses_top_p = top_p < 1.0
    cutoff = torch.where((top_k > 0) | uses_top_p, cutoff, NEG_INF)
    still_open = uses_top_p & (top_k == 0) & (num_kept == width) & (width < vocab)
    return cutoff, still_open


def _num_kept(best_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many of the best tokens (probabilities, sorted) each row keeps: top_k, then the
    smallest prefix whose probability (renormalised over the top_k set) reaches top_p; the
    best token always stays."""
    ranks = torch.arange(best_probs.shape[-1], device=best_probs.device)
    in_top_k = (top_k[:, None] == 0) | (ranks[None, :] < top_k[:, None])
    mass = best_probs.cumsum(dim=-1)
    last_of_top_k = (top_k.long() - 1).clamp(0, best_probs.shape[-1] - 1)
    top_k_mass = mass.gather(1, last_of_top_k[:, None]).squeeze(1)
    total = torch.where(top_k > 0, top_k_mass, 1.0)
    mass_before = (mass - best_probs) / total[:, None]
    limit = torch.where(top_p < 1.0, top_p, math.inf)
    kept = in_top_k & (mass_before < limit[:, None])
    return kept.sum(dim=-1).clamp_min(1)


# --- results ----------------------------------------------------------------------------------


def _fall_back_where_all_blocked(
    token_ids: torch.Tensor,
    processed: torch.Tensor,
    raw: torch.Tensor,
    constrained: tuple[list[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A row left with every logit -inf takes the raw argmax rather than an arbitrary id;
    under a grammar, the argmax of what the grammar allows (min_tokens may have blocked the
    end it requires), and the raw one only if the grammar allows nothing (never seen)."""
    all_blocked = processed.amax(dim=-1) == NEG_INF
    if not bool(all_blocked.any()):
        return token_ids
    fallback = raw
    if constrained is not None:
        fallback = _masked(_float_copy(raw), constrained)
        grammar_blocked = fallback.amax(dim=-1) == NEG_INF
        fallback = torch.where(grammar_blocked[:, None], raw, fallback)
    best = argmax_rows(fallback).to(token_ids.device)
    return torch.where(all_blocked.to(token_ids.device), best, token_ids)


def _masked(logits: torch.Tensor, constrained: tuple[list[int], torch.Tensor]) -> torch.Tensor:
    """In place: -inf where the constrained rows' grammars forbid a token."""
    where, allowed = constrained
    forbidden = ~allowed[:, : logits.shape[-1]]
    if len(where) == logits.shape[0]:  # every row (where is ascending): no gather
        return logits.masked_fill_(forbidden, NEG_INF)
    index = _long_tensor(where, logits.device)
    logits[index] = logits[index].masked_fill_(forbidden, NEG_INF)
    return logits


def _plain_result(token_ids: list[int]) -> SampleResult:
    nothing = [None] * len(token_ids)
    return SampleResult(token_ids=token_ids, logprobs=list(nothing), top_logprobs=list(nothing))


def _result_with_logprobs(
    raw: torch.Tensor, rows: Sequence[SampleRow], token_ids: torch.Tensor
) -> SampleResult:
    result = _plain_result(token_ids.tolist())
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    logprobs = _rows_of(raw, wanted).log_softmax(dim=-1)
    chosen_ids = token_ids.to(raw.device)[wanted]
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
    num_top = min(max(rows[i].params.logprobs for i in wanted), raw.shape[-1])
    top_values, top_ids = (t.tolist() for t in logprobs.topk(num_top, dim=-1))
    for slot, index in enumerate(wanted):
        k = rows[index].params.logprobs
        result.logprobs[index] = chosen[slot]
        result.top_logprobs[index] = list(zip(top_ids[slot][:k], top_values[slot][:k], strict=True))
    return result


def _rows_of(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The rows at `indices` (ascending), without a copy when that is every row."""
    return tensor if len(indices) == tensor.shape[0] else tensor[indices]


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _long_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
