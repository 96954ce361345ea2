"""p3: a distributed LLM inference engine."""

from p3.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
