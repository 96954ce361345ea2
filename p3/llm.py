"""The offline Python API, in the shape vLLM users know: LLM(...).generate / .chat."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request, StepOutput
from p3.sampling_params import SamplingParams
from p3.tokenizer import OutputText, Tokenizer

PromptType = str | dict[str, Any]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token; None where not among the top k
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # with SamplingParams(prompt_logprobs=k), as vLLM gives them: None for the first prompt
    # token, then each one's {token id: Logprob} (its own and the top k)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class _Child:
    """One of a request's n samples as it streams out of the engine."""

    def __init__(
        self,
        request_id: str,
        index: int,
        params: SamplingParams,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
    ):
        self.request_id = request_id
        self.params = params
        self.tokenizer = tokenizer
        self.out = CompletionOutput(index, logprobs=[] if params.logprobs is not None else None)
        self.text = OutputText(tokenizer, prompt_ids, params)

    def update(self, step: StepOutput) -> str:
        """Apply one step; returns the text that became final (stop strings held back)."""
        self.out.token_ids += step.new_token_ids
        if step.logprobs is not None:
            self._add_logprobs(step)
        text, hit = self.text.push(step.new_token_ids, len(self.out.token_ids), step.finished)
        if hit is not None:
            self.out.finish_reason, self.out.stop_reason = "stop", hit
        elif step.finished:
            self.out.finish_reason = step.finish_reason
            if step.finish_reason == "stop":
                self.out.stop_reason = self.params.stop_token_at_end(step.new_token_ids)
        self.out.text += text
        return text

    def _add_logprobs(self, step: StepOutput) -> None:
        for token, lp, top in zip(
            step.new_token_ids, step.logprobs, step.top_logprobs, strict=True
        ):
            self.out.logprobs.append(logprob_entry(self.tokenizer, token, lp, top))
            self.out.cumulative_logprob = (self.out.cumulative_logprob or 0.0) + lp


def logprob_entry(
    tokenizer: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None
) -> dict[int, Logprob]:
    """vLLM's shape: the top k by rank, and the token itself (rank None if not among them)."""
    entry = {
        t: Logprob(v, rank + 1, tokenizer.decode([t], False))
        for rank, (t, v) in enumerate(top or [])
    }
    entry.setdefault(token, Logprob(logprob, None, tokenizer.decode([token], False)))
    return entry


def child_seed(seed: int | None, index: int) -> int | None:
    """Sample i of a seeded n > 1 request gets its own, reproducible stream."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & ((1 << 63) - 1)


class LLM:
    def __init__(
        self, model: str | Path | None = None, dtype: str = "auto", **engine_options: Any
    ):
        self.engine = Engine(model, EngineConfig(dtype=dtype, **engine_options))
        self.tokenizer = Tokenizer.from_dir(self.engine.model_dir)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        outputs = self._add_all(prompts, sampling_params)
        for _ in self._run(outputs):
            pass
        return list(outputs.values())

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations
        ]
        return self.generate(
            [{"prompt": p, "prompt_token_ids": self._encode_chat(p)} for p in prompts],
            sampling_params,
        )

    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
    ) -> Iterator[str]:
        """Text of the first sample as it is generated."""
        outputs = self._add_all([prompt], sampling_params)
        for child, text in self._run(outputs):
            if child.out.index == 0 and text:
                yield text

    def _encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _add_all(self, prompts, sampling_params) -> dict[str, RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        pairs = list(zip(map(self._prompt_ids, prompts), params_list, strict=True))
        for (_, ids), p in pairs:
            self.engine.validate(Request("", ids, p))  # refuse the call before anything runs
        self._children: dict[str, tuple[RequestOutput, _Child]] = {}
        outputs = [self._add_one(text, ids, p) for (text, ids), p in pairs]
        return {out.request_id: out for out in outputs}

    def _add_one(self, text: str | None, ids: list[int], params: SamplingParams) -> RequestOutput:
        out = RequestOutput(str(next(self._ids)), text, ids, [])
        for i in range(params.n):
            child = _Child(f"{out.request_id}-{i}", i, params, self.tokenizer, ids)
            out.outputs.append(child.out)
            self._children[child.request_id] = (out, child)
            self.engine.add(Request(child.request_id, ids, params, child_seed(params.seed, i)))
        return out

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'")

    def _run(self, outputs: dict[str, RequestOutput]) -> Iterator[tuple[_Child, str]]:
        while self.engine.has_unfinished():
            for step in self.engine.step():
                entry = self._children.get(step.request_id)
                if entry is None:
                    continue
                out, child = entry
                text = child.update(step)
                if step.prompt_logprobs is not None and out.prompt_logprobs is None:
                    out.prompt_logprobs = [None] + [
                        logprob_entry(self.tokenizer, t, lp, top)
                        for t, lp, top in step.prompt_logprobs
                    ]
                if step.num_cached_tokens:
                    out.num_cached_tokens = max(out.num_cached_tokens, step.num_cached_tokens)
                if child.out.finish_reason is not None:
                    del self._children[step.request_id]
                    if not step.finished:  # a stop string ended it: free its KV now
                        self.engine.cancel(step.request_id)
                yield child, text
