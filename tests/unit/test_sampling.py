"""The sampler on synthetic logits: processing order, truncation, seeded draws, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from p3.kernels.sampling import (
    NUCLEUS_PROBE_TOKENS,
    Sampler,
    SampleRow,
    apply_penalties,
    process_logits,
    sampling_weights,
)
from p3.sampling_params import SamplingParams
from p3.seeds import mix_seed

pytestmark = pytest.mark.timeout(60)

VOCAB = 64


def make_row(
    seed: int = 0,
    position: int = 0,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    eos: tuple[int, ...] = (),
    **params: object,
) -> SampleRow:
    return SampleRow(
        params=SamplingParams(**params),
        seed=seed,
        position=position,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=frozenset(eos),
    )


def random_logits(rows: int, vocab: int = VOCAB, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()[None, :]


def sample_many(logits_row: torch.Tensor, num_draws: int, **params: object) -> list[int]:
    """One call with `num_draws` copies of the row, each its own (seed, position)."""
    rows = [make_row(seed=draw, position=draw % 7, **params) for draw in range(num_draws)]
    return Sampler()(logits_row.expand(num_draws, -1), rows).token_ids


def reference_kept(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The kept set by the textbook recipe: sort, top_k, renormalise, nucleus, min_p."""
    probs = row.double().softmax(dim=-1)
    order = probs.argsort(descending=True)
    if top_k:
        order = order[:top_k]
    renormalised = probs[order] / probs[order].sum()
    num_kept = int((renormalised.cumsum(0) < top_p).sum()) + 1 if top_p < 1 else len(order)
    kept = order[:num_kept].tolist()
    return {t for t in kept if probs[t] >= min_p * probs.max()}


# --- greedy and processing -------------------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    logits = random_logits(5)
    result = Sampler()(logits, [make_row(temperature=0.0) for _ in range(5)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 5
    assert result.top_logprobs == [None] * 5


def test_bf16_logits_sample_like_their_fp32_cast() -> None:
    logits = random_logits(3).bfloat16()
    rows = [make_row(temperature=0.0), make_row(seed=1, temperature=0.7, logprobs=2)] * 2
    bf16_result = Sampler()(logits.repeat(2, 1)[:4], rows)
    fp32_result = Sampler()(logits.float().repeat(2, 1)[:4], rows)
    assert bf16_result == fp32_result


def test_logit_bias_forces_a_token_greedy_and_sampled() -> None:
    logits = random_logits(2)
    rows = [
        make_row(temperature=0.0, logit_bias={5: 100.0}),
        make_row(seed=3, temperature=1.0, logit_bias={9: 100.0}),
    ]
    assert Sampler()(logits, rows).token_ids == [5, 9]


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4], logits[0, 5] = 10.0, 9.0, 8.0  # eos, stop token, next best
    blocked = make_row(output=(1,), eos=(3,), temperature=0.0, min_tokens=2, stop_token_ids=[4])
    reached = make_row(output=(1, 2), eos=(3,), temperature=0.0, min_tokens=2, stop_token_ids=[4])
    assert Sampler()(logits.repeat(2, 1), [blocked, reached]).token_ids == [5, 3]


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 10.0, 9.0
    row = make_row(eos=(3,), temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    processed = process_logits(logits, [row])
    assert processed[0, 3] == 10.0
    assert processed[0, 4] == -math.inf


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    row = make_row(prompt=(0, 1), output=(1, 3), repetition_penalty=2.0)
    expected = torch.tensor([[1.0, -4.0, 3.0, -2.0, 0.5]])
    torch.testing.assert_close(apply_penalties(logits, [row]), expected, rtol=0, atol=0)


def test_frequency_and_presence_penalties_count_only_output_tokens() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    row = make_row(prompt=(0,), output=(1, 1, 1, 2), frequency_penalty=0.5, presence_penalty=0.25)
    expected = torch.tensor([[1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]])
    torch.testing.assert_close(apply_penalties(logits, [row]), expected)


def test_penalties_run_repetition_first_and_leave_other_rows_alone() -> None:
    logits = torch.tensor([[4.0, -1.0, 2.0], [4.0, -1.0, 2.0]])
    penalised = make_row(
        prompt=(2,),
        output=(0, 0, 1),
        repetition_penalty=2.0,
        frequency_penalty=1.0,
        presence_penalty=0.5,
    )
    untouched = make_row(prompt=(0, 1, 2), output=(0,))
    expected = torch.tensor([[4.0 / 2 - 2 - 0.5, -1.0 * 2 - 1 - 0.5, 2.0 / 2], [4.0, -1.0, 2.0]])
    torch.testing.assert_close(apply_penalties(logits, [penalised, untouched]), expected)


def test_processing_order_is_bias_then_blocking_then_penalties() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    row = make_row(output=(0,), eos=(2,), min_tokens=3, logit_bias={0: 3.0}, repetition_penalty=2.0)
    expected = torch.tensor([[(1.0 + 3.0) / 2.0, 1.0, -math.inf]])
    torch.testing.assert_close(process_logits(logits, [row]), expected)


def test_out_of_vocab_ids_in_bias_stops_and_history_are_ignored() -> None:
    logits = random_logits(1)
    row = make_row(
        prompt=(VOCAB + 5, 1),
        output=(VOCAB,),
        eos=(VOCAB + 1,),
        temperature=0.0,
        min_tokens=4,
        logit_bias={VOCAB + 2: 50.0},
        presence_penalty=1.0,
    )
    assert Sampler()(logits, [row]).token_ids == [int(logits.argmax())]


def test_a_row_with_every_token_blocked_falls_back_to_the_raw_argmax() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(2, 1)
    blocked = dict(eos=(0, 1), min_tokens=1, stop_token_ids=[2, 3], logprobs=1)
    rows = [make_row(temperature=0.0, **blocked), make_row(seed=5, temperature=1.0, **blocked)]
    result = Sampler()(logits, rows)
    assert result.token_ids == [1, 1]
    assert result.logprobs[0] == pytest.approx(float(logits[0].log_softmax(dim=-1)[1]))


# --- truncation --------------------------------------------------------------------------------


def test_top_k_one_is_greedy() -> None:
    logits = random_logits(1, scale=0.3)
    assert set(sample_many(logits, 200, temperature=1.5, top_k=1)) == {int(logits.argmax())}


def test_tiny_top_p_is_greedy() -> None:
    logits = random_logits(1, scale=0.3)
    assert set(sample_many(logits, 200, temperature=1.5, top_p=1e-6)) == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_top_p() -> None:
    logits = logits_of([0.5, 0.25, 0.15, 0.1])
    assert set(sample_many(logits, 400, top_p=0.7)) == {0, 1}
    assert set(sample_many(logits, 400, top_p=0.8)) == {0, 1, 2}


def test_min_p_never_samples_tokens_below_min_p_times_the_best() -> None:
    logits = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])  # min_p 0.2: below 0.08 excluded
    assert set(sample_many(logits, 1000, min_p=0.2)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 0.6, 0.0), (5, 1.0, 0.0), (300, 0.9, 0.0), (0, 0.95, 0.01), (40, 0.5, 0.05)],
)
def test_kept_set_matches_the_textbook_recipe(top_k: int, top_p: float, min_p: float) -> None:
    # a flat distribution over 2048 tokens: top_p nuclei wider than the probe force a sort
    logits = random_logits(4, vocab=2048, scale=0.5, seed=top_k)
    rows = [make_row(top_k=top_k, top_p=top_p, min_p=min_p) for _ in range(4)]
    weights = sampling_weights(logits, rows)
    for row_logits, row_weights in zip(logits, weights, strict=True):
        kept = set(torch.nonzero(row_weights > 0).flatten().tolist())
        assert kept == reference_kept(row_logits, top_k, top_p, min_p)


@pytest.mark.parametrize(
    ("scale", "smallest", "largest"),
    [(2.0, 1, NUCLEUS_PROBE_TOKENS), (1.0, NUCLEUS_PROBE_TOKENS, 1024), (0.1, 1024, 4096)],
)
def test_top_p_is_exact_whichever_widening_stage_closes_the_nucleus(
    scale: float, smallest: int, largest: int
) -> None:
    logits = random_logits(1, vocab=4096, scale=scale)
    weights = sampling_weights(logits, [make_row(top_p=0.5)])
    num_kept = int((weights > 0).sum())
    assert smallest <= num_kept <= largest
    assert num_kept == len(reference_kept(logits[0], 0, 0.5, 0.0))


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    num_draws, temperature = 6000, 0.7
    tokens = torch.tensor(sample_many(logits, num_draws, temperature=temperature))
    observed = torch.bincount(tokens, minlength=6).double()
    expected = (logits[0] / temperature).double().softmax(dim=-1) * num_draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 30.0  # 5 degrees of freedom: p < 1e-5; the seeds are fixed


# --- seeded draws ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [dict(top_p=0.9, top_k=50), dict(top_p=0.9), dict(min_p=0.1), dict(temperature=1.3)],
)
def test_seeded_draw_ignores_batch_composition_order_and_sampler(params: dict) -> None:
    target_logits = random_logits(1, vocab=4096, scale=4.0, seed=1)
    crowd_logits = random_logits(4, vocab=4096, scale=0.2, seed=2)  # flat: forces a full sort
    crowd = [
        make_row(temperature=0.0),
        make_row(seed=11, temperature=0.9, top_p=0.95),
        make_row(seed=12, temperature=1.2, output=(1, 2, 2), presence_penalty=0.5),
        make_row(seed=13, top_k=7),
    ]
    for seed in range(10):
        target = make_row(seed=seed, position=100 + seed, **({"temperature": 0.8} | params))
        alone = Sampler()(target_logits, [target]).token_ids[0]
        first = Sampler()(torch.cat([crowd_logits, target_logits]), [*crowd, target])
        last = Sampler()(torch.cat([target_logits, crowd_logits.flip(0)]), [target, *crowd[::-1]])
        assert first.token_ids[-1] == alone == last.token_ids[0]


def test_different_seeds_draw_differently() -> None:
    logits = torch.zeros(1, 1000)
    rows_a = [make_row(seed=1, position=p) for p in range(64)]
    rows_b = [make_row(seed=2, position=p) for p in range(64)]
    draws_a = Sampler()(logits.expand(64, -1), rows_a).token_ids
    draws_b = Sampler()(logits.expand(64, -1), rows_b).token_ids
    assert sum(a != b for a, b in zip(draws_a, draws_b, strict=True)) >= 60
    assert len(set(draws_a)) >= 60  # and positions of one seed differ too


def test_mix_seed_gives_distinct_non_negative_int63_seeds() -> None:
    mixed = {mix_seed(seed, position) for seed in (-1, 0, 1, 2**40) for position in range(100)}
    assert len(mixed) == 400
    assert all(0 <= value < 2**63 for value in mixed)


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_those_of_the_raw_logits_with_a_sorted_top_k() -> None:
    logits = random_logits(3)
    rows = [
        make_row(seed=1, temperature=0.5, logprobs=5, logit_bias={0: 20.0}),
        make_row(temperature=0.0, logprobs=3, output=(1, 1), frequency_penalty=2.0),
        make_row(seed=2, temperature=1.0),
    ]
    result = Sampler()(logits, rows)
    raw_logprobs = logits.log_softmax(dim=-1)
    for index, k in [(0, 5), (1, 3)]:
        chosen = result.token_ids[index]
        assert result.logprobs[index] == pytest.approx(float(raw_logprobs[index, chosen]))
        top_values, top_ids = raw_logprobs[index].topk(k)
        top = result.top_logprobs[index]
        assert [token for token, _ in top] == top_ids.tolist()
        assert [value for _, value in top] == pytest.approx(top_values.tolist())
        assert [value for _, value in top] == sorted((value for _, value in top), reverse=True)
    assert result.token_ids[0] == 0
    assert result.logprobs[2] is None and result.top_logprobs[2] is None


def test_zero_logprobs_give_the_chosen_logprob_and_no_alternatives() -> None:
    logits = random_logits(1)
    result = Sampler()(logits, [make_row(temperature=0.0, logprobs=0)])
    assert result.logprobs[0] == pytest.approx(float(logits.log_softmax(dim=-1).max()))
    assert result.top_logprobs == [[]]


def test_a_grammar_row_that_min_tokens_blocks_entirely_takes_what_the_grammar_allows():
    """The grammar allows only its end (eos), min_tokens blocks eos: the row takes eos, not
    the raw argmax outside the grammar; a grammar that allows nothing falls back to raw."""
    from p3.kernels.sampling import Sampler, SampleRow

    logits = torch.zeros(2, 8)
    logits[:, 5] = 3.0  # the raw argmax
    rows = [
        SampleRow(SamplingParams(temperature=0.0, min_tokens=4), 0, 10, (), (), frozenset([2]))
        for _ in range(2)
    ]
    allowed = torch.zeros(2, 8, dtype=torch.bool)
    allowed[0, 2] = True  # row 0: only eos; row 1: nothing at all
    result = Sampler()(logits, rows, ([0, 1], allowed))
    assert result.token_ids == [2, 5]
