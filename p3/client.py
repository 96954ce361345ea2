"""The native client: an edge without HTTP, talking to the cluster over ZeroMQ directly.

    async with Client("tcp://coordinator:5555") as client:
        out = await client.generate("The capital of France is", SamplingParams(max_tokens=8))
        async for delta in client.stream({"prompt_token_ids": [...]}, params):
            print(delta.text, end="")

It gets the routing table from the coordinator, tokenizes locally with the model's tokenizer,
submits straight to the least-loaded replica and detokenizes the streamed tokens: the same
p3.nodes.cluster code (links, samples, generation) the HTTP edge runs. Results have the shape
of p3.outputs.RequestOutput; failures raise p3.nodes.cluster.generation.RequestFailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace

from p3.nodes.cluster.generation import (
    DEFAULT_TIMEOUT_S,
    FailureCode,
    Generation,
    RequestFailed,
)
from p3.nodes.cluster.links import Cluster
from p3.nodes.cluster.samples import Delta, make_samples
from p3.nodes.edge.edge import new_edge_id
from p3.nodes.edge.models import Models
from p3.nodes.edge.responses import Choice
from p3.outputs import CompletionOutput, PromptType, RequestOutput, logprob_entry, prompt_ids
from p3.protocol.security import Keyring
from p3.sampling_params import SamplingParams
from p3.tokenizer import Tokenizer

DEFAULT_CLIENT_NAME = "client-0"

__all__ = ["Client", "RequestFailed"]


class Client:
    def __init__(
        self,
        coordinator: str,
        model: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = 30.0,
        keys: str | None = None,
        name: str = DEFAULT_CLIENT_NAME,
    ):
        """keys: the cluster's `p3 keys` directory, when its sockets use CurveZMQ; the client
        runs as its edge member `name` (`p3 serve` makes a key named client-0)."""
        keyring = Keyring(keys, "edge", name) if keys else None
        edge_id = name if keys else new_edge_id("client")
        self.models = Models(fetch=lambda route: self.cluster.fetch_tokenizer(route))
        self.cluster = Cluster(coordinator, edge_id, keyring, on_models=self.models.learn)
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()

    async def __aenter__(self) -> Client:
        self.cluster.open()
        self._tasks = [asyncio.create_task(loop) for loop in self.cluster.loops()]
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                while not self.cluster.routes:
                    await self.cluster.routes_changed.wait()
        except TimeoutError:
            await self.close()
            message = "no ready replica in the cluster"
            raise RequestFailed(message, FailureCode.NO_REPLICA, True) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.cluster.close()

    async def generate(
        self, prompt: PromptType, params: SamplingParams | None = None, model: str | None = None
    ) -> RequestOutput:
        """Run one prompt (n samples) to the end."""
        params = params or SamplingParams()
        generation, tokenizer, text = await self._start(prompt, params, model)
        choices = [Choice(s.index) for s in generation.samples]
        async with contextlib.aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                choices[delta.index].add(delta)
        sample = generation.samples[0]
        return RequestOutput(
            request_id=sample.request_id.rsplit("-", 1)[0],
            prompt=text,
            prompt_token_ids=sample.journal.prompt_token_ids,
            outputs=[_completion_output(c, tokenizer) for c in choices],
            num_cached_tokens=max(s.num_cached_tokens for s in generation.samples),
        )

    async def stream(
        self, prompt: PromptType, params: SamplingParams | None = None, model: str | None = None
    ) -> AsyncIterator[Delta]:
        """Deltas (index, text, token_ids, logprobs, finish_reason) of every sample as they come."""
        generation, _, _ = await self._start(prompt, params or SamplingParams(), model)
        async with contextlib.aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                yield delta

    async def _start(
        self, prompt: PromptType, params: SamplingParams, model: str | None
    ) -> tuple[Generation, Tokenizer, str | None]:
        model = self._model(model)
        tokenizer = await self.models.tokenizer(model)
        text, ids = prompt_ids(tokenizer, prompt)
        tokenizer.check_params(params)  # without a tokenizer: nothing that needs text
        params = self._fit(model, ids, params)
        request_id = f"{self.cluster.edge_id}-{next(self._ids)}"
        samples = make_samples(request_id, model, [ids], params, tokenizer)
        generation = Generation(self.cluster, samples, self.timeout_s)
        await generation.start()
        return generation, tokenizer, text

    def _model(self, name: str | None) -> str:
        name = name or self.model
        if name is None:
            models = sorted({r.model for r in self.cluster.routes.values()})
            if len(models) != 1:
                raise ValueError(f"the cluster serves {models}: name the model")
            return models[0]
        model = self.models.resolve(name)
        if model is None:
            raise ValueError(f"the cluster does not serve model {name!r}")
        return model

    def _fit(self, model: str, ids: list[int], params: SamplingParams) -> SamplingParams:
        """max_tokens defaults to the rest of the context; a prompt that cannot fit is refused."""
        max_len = min((r.max_model_len for r in self.cluster.replicas(model)), default=0)
        if max_len and len(ids) >= max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this model's context is {max_len}")
        if params.max_tokens is None and max_len:
            return replace(params, max_tokens=max_len - len(ids))
        return params


def _completion_output(choice: Choice, tokenizer: Tokenizer) -> CompletionOutput:
    out = CompletionOutput(
        choice.index, choice.text, choice.token_ids, None, None, choice.finish_reason
    )
    out.stop_reason = choice.stop_reason
    if choice.logprobs:
        out.logprobs = [
            logprob_entry(tokenizer, e.token_id, e.logprob, e.top) for e in choice.logprobs
        ]
        out.cumulative_logprob = sum(e.logprob for e in choice.logprobs)
    return out
