"""p3: a distributed LLM inference engine."""

from p3.lora import LoRARequest
from p3.outputs import CompletionOutput, RequestOutput
from p3.sampling_params import SamplingParams
from p3.structured import StructuredOutputsParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]


def __getattr__(name: str):
    if name == "LLM":  # imports torch: only on demand
        import p3.llm

        return getattr(p3.llm, name)
    raise AttributeError(f"module 'p3' has no attribute {name!r}")
