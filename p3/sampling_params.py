"""How one request samples: the vLLM/OpenAI field set, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from p3.structured import StructuredOutputsParams

GREEDY_EPSILON = 1e-5  # temperatures below this mean argmax


class InvalidParam(ValueError):
    """A SamplingParams field out of its range; `name` is the field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # the text must match this (a JSON schema, regex, choice, grammar): p3/structured.py
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):  # as vLLM's JSON bodies give it
            so = StructuredOutputsParams(**self.structured_outputs)
            object.__setattr__(self, "structured_outputs", so)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(
            self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        )
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1, 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be non-negative"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "prompt_logprobs",
                "must be non-negative",
            ),
            (all(s for s in self.stop), "stop", "must not contain empty strings"),
            (
                all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias",
                "values must be in [-100, 100]",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise InvalidParam(name, f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar the output must match, if any (p3/structured.py)."""
        so = self.structured_outputs
        return so.llguidance if so is not None else None

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens generated (or prompted) so far."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def stop_token_at_end(self, token_ids: list[int]) -> int | None:
        """The stop token id that ended these tokens, if one did (OpenAI's stop_reason)."""
        if token_ids and token_ids[-1] in self.stop_token_ids:
            return token_ids[-1]
        return None
