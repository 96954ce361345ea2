"""SamplingParams <-> WireSamplingParams: what a node needs to sample, nothing more.

Stop strings, n, and detokenization options stay on the edge (it sends Cancel when a stop
string hits and n Submits for n samples), so they do not travel. Every wire field has the
same name in SamplingParams but `grammar`: structured_outputs travels compiled, as the
llguidance grammar the node's matcher takes.
"""

from __future__ import annotations

from typing import Any

from p3.protocol.messages import WireSamplingParams
from p3.sampling_params import SamplingParams
from p3.structured import StructuredOutputsParams

WIRE_FIELDS = tuple(f for f in WireSamplingParams.__struct_fields__ if f != "grammar")


def to_wire(params: SamplingParams) -> WireSamplingParams:
    fields = {name: _plain(getattr(params, name)) for name in WIRE_FIELDS}
    return WireSamplingParams(**fields, grammar=params.grammar or "")


def from_wire(wire: WireSamplingParams) -> SamplingParams:
    """ValueError (from SamplingParams' own checks, or a grammar that does not compile) if a
    field is out of range."""
    so = StructuredOutputsParams(compiled=wire.grammar) if wire.grammar else None
    return SamplingParams(
        **{name: getattr(wire, name) for name in WIRE_FIELDS}, structured_outputs=so
    )


def _plain(value: Any) -> Any:
    """Tuples travel as lists, and a dict is copied, so to_wire(p) equals what the peer decodes."""
    if isinstance(value, tuple):
        return list(value)
    return dict(value) if isinstance(value, dict) else value
