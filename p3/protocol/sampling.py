"""SamplingParams <-> WireSamplingParams: what a node needs to sample, nothing more.

Stop strings, n, and detokenization options stay on the edge (it sends Cancel when a stop
string hits and n Submits for n samples), so they do not travel. Every wire field has the
same name in SamplingParams.
"""

from __future__ import annotations

from typing import Any

from p3.protocol.messages import WireSamplingParams
from p3.sampling_params import SamplingParams

WIRE_FIELDS = WireSamplingParams.__struct_fields__


def to_wire(params: SamplingParams) -> WireSamplingParams:
    return WireSamplingParams(**{name: _plain(getattr(params, name)) for name in WIRE_FIELDS})


def from_wire(wire: WireSamplingParams) -> SamplingParams:
    """ValueError (from SamplingParams' own checks) if a field is out of range."""
    return SamplingParams(**{name: getattr(wire, name) for name in WIRE_FIELDS})


def _plain(value: Any) -> Any:
    """Tuples travel as lists, and a dict is copied, so to_wire(p) equals what the peer decodes."""
    if isinstance(value, tuple):
        return list(value)
    return dict(value) if isinstance(value, dict) else value
