"""SamplingParams <-> WireSamplingParams: what a node needs to sample, nothing more.

Stop strings, n, and detokenization options stay on the edge (it sends Cancel when a stop
string hits and n Submits for n samples), so they do not travel.
"""

from __future__ import annotations

from p3.protocol.messages import WireSamplingParams
from p3.sampling_params import SamplingParams


def to_wire(params: SamplingParams) -> WireSamplingParams:
    return WireSamplingParams(
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias),
        logprobs=params.logprobs,
    )


def from_wire(wire: WireSamplingParams) -> SamplingParams:
    """ValueError (from SamplingParams' own checks) if a field is out of range."""
    return SamplingParams(
        max_tokens=wire.max_tokens,
        min_tokens=wire.min_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        min_p=wire.min_p,
        seed=wire.seed,
        stop_token_ids=tuple(wire.stop_token_ids),
        ignore_eos=wire.ignore_eos,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
        repetition_penalty=wire.repetition_penalty,
        logit_bias=dict(wire.logit_bias),
        logprobs=wire.logprobs,
    )
