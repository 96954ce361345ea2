"""The offline Python API, in the shape vLLM users know: LLM(...).generate / .chat."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.sequence import Request, StepOutput
from p3.lora import LoRARequest
from p3.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PromptType,
    RequestOutput,
    logprob_entry,
    prompt_ids,
)
from p3.sampling_params import SamplingParams
from p3.seeds import child_seed
from p3.tokenizer import OutputText, Tokenizer, load_tokenizer
from p3.weights.files import resolve_model

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput"]


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


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str = "auto",
        skip_tokenizer_init: bool = False,
        **engine_options: Any,
    ):
        """skip_tokenizer_init (vLLM's), or a model directory without tokenizer.json: prompts
        are token ids ({"prompt_token_ids": [...]}) and outputs have token ids and empty text.
        The tokenizer is read before the weights, so a malformed one fails at once."""
        model_dir = resolve_model(model)
        self.tokenizer = load_tokenizer(model_dir, skip_tokenizer_init)
        self.engine = Engine(model_dir, EngineConfig(dtype=dtype, **engine_options))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """lora_request: one adapter for every prompt, or one (or None: the base) per prompt;
        they run batched together (the engine needs enable_lora=True)."""
        outputs = self._add_all(prompts, sampling_params, lora_request)
        for _ in self._run(outputs):
            pass
        return list(outputs.values())

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations
        ]
        return self.generate(
            [{"prompt": p, "prompt_token_ids": self._encode_chat(p)} for p in prompts],
            sampling_params,
            lora_request,
        )

    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Iterator[str]:
        """Text of the first sample as it is generated."""
        outputs = self._add_all([prompt], sampling_params, lora_request)
        for child, text in self._run(outputs):
            if child.out.index == 0 and text:
                yield text

    def embed(self, prompts: PromptType | Sequence[PromptType]) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding: its last token's final hidden state, L2-normalized (the
        pooling vLLM's embed task gives a decoder model), batched like any request."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        read = [prompt_ids(self.tokenizer, prompt)[1] for prompt in prompts]
        requests = [Request(f"embed-{next(self._ids)}", ids, embed=True) for ids in read]
        for request in requests:
            self.engine.validate(request)  # refuse the call before anything runs
        for request in requests:
            self.engine.add(request)
        vectors: dict[str, list[float]] = {}
        while len(vectors) < len(requests):
            for step in self.engine.step():
                if step.embedding is not None:
                    vectors[step.request_id] = step.embedding
        return [
            EmbeddingRequestOutput(
                r.request_id, r.prompt_token_ids, EmbeddingOutput(vectors[r.request_id])
            )
            for r in requests
        ]

    def _encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _add_all(self, prompts, sampling_params, lora_request=None) -> dict[str, RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        loras = lora_request
        if loras is None or isinstance(loras, LoRARequest):
            loras = [loras] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("give one lora_request, or one (or None) per prompt")
        read = [prompt_ids(self.tokenizer, prompt) for prompt in prompts]
        triples = list(zip(read, params_list, loras, strict=True))
        for (_, ids), p, lora in triples:
            self.tokenizer.check_params(p)  # without a tokenizer: nothing that needs text
            self.engine.validate(Request("", ids, p, lora=lora))  # refuse before anything runs
        self._children: dict[str, tuple[RequestOutput, _Child]] = {}
        try:
            outputs = [self._add_one(text, ids, p, lora) for (text, ids), p, lora in triples]
        except ValueError:  # an adapter that cannot load, or none free: nothing of it runs
            for request_id in self._children:
                self.engine.cancel(request_id)
            while self.engine.has_unfinished():
                self.engine.step()
            raise
        return {out.request_id: out for out in outputs}

    def _add_one(
        self, text: str | None, ids: list[int], params: SamplingParams, lora=None
    ) -> RequestOutput:
        out = RequestOutput(str(next(self._ids)), text, ids, [])
        for i in range(params.n):
            child = _Child(f"{out.request_id}-{i}", i, params, self.tokenizer, ids)
            out.outputs.append(child.out)
            self._children[child.request_id] = (out, child)
            seed = child_seed(params.seed, i)
            self.engine.add(Request(child.request_id, ids, params, seed, lora=lora))
        return out

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
