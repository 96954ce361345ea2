"""The models an edge serves: API names -> the routed model string, and each one's tokenizer.

A model is named in the API by its route's `model` string (e.g. "SmolLM2-135M-Instruct"),
by the last part of that string when it is a path, or by an alias given at start. Tokenizers
load once, off the event loop: at start for models named on the command line, and as soon
as a new model shows up in the routing table.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from p3.log import get_logger
from p3.tokenizer import Tokenizer
from p3.weights.files import resolve_model

log = get_logger(__name__)


def load_tokenizer(model: str) -> Tokenizer:
    return Tokenizer.from_dir(resolve_model(model))


class Models:
    def __init__(self, aliases: dict[str, str] | None = None):
        self.aliases = dict(aliases or {})  # alias -> routed model string
        self.tokenizers: dict[str, Tokenizer] = {}
        self._loading: dict[str, asyncio.Task[Tokenizer]] = {}

    def preload(self, model: str) -> None:
        """Load now, blocking: for the entry point, before the event loop serves."""
        self.tokenizers[model] = load_tokenizer(model)

    def resolve(self, name: str) -> str | None:
        """The routed model string the API name stands for, or None if unknown."""
        if name in self.aliases:
            return self.aliases[name]
        for model in [*self.tokenizers, *self._loading]:
            if name == model or name == Path(model).name:
                return model
        return None

    def api_name(self, model: str) -> str:
        for alias, target in self.aliases.items():
            if target == model:
                return alias
        return model

    def names(self) -> list[str]:
        return sorted({self.api_name(model) for model in self.tokenizers})

    def learn(self, models: set[str]) -> None:
        """Start loading the tokenizer of every routed model not seen before."""
        for model in models - self.tokenizers.keys() - self._loading.keys():
            task = asyncio.create_task(asyncio.to_thread(load_tokenizer, model))
            self._loading[model] = task
            task.add_done_callback(lambda t, model=model: self._loaded(model, t))

    async def tokenizer(self, model: str) -> Tokenizer:
        if model in self.tokenizers:
            return self.tokenizers[model]
        return await asyncio.shield(self._loading[model])

    def _loaded(self, model: str, task: asyncio.Task[Tokenizer]) -> None:
        self._loading.pop(model, None)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("edge.tokenizer_failed", model=model, error=str(exc))
            return
        self.tokenizers[model] = task.result()
        log.info("edge.tokenizer_loaded", model=model)
