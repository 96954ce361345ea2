"""The models an edge serves: API names -> the routed model string, and each one's tokenizer.

A model is named in the API by its route's `model` string (e.g. "SmolLM2-135M-Instruct"),
by the last part of that string when it is a path, or by an alias given at start. An edge
reads no path a peer names: a routed model's tokenizer comes from one of its nodes, as the
bytes whose hash the node's route announced (`fetch`, p3.nodes.cluster.links), so an edge on
another host needs no copy of the model. Only models named on the edge's own command line
load from this host's disk. Tokenizers load once, off the event loop. A model whose node
announced no tokenizer (its directory has no tokenizer.json, or it runs with
--skip-tokenizer-init), or any model with skip_tokenizer_init here, gets a NoTokenizer: it
serves token-id prompts only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from p3.log import get_logger
from p3.protocol import messages as m
from p3.tokenizer import NoTokenizer, Tokenizer, load_tokenizer
from p3.weights.files import resolve_model

log = get_logger(__name__)

RETRY_AFTER_S = 5.0  # a tokenizer that failed to arrive is asked for again after this long

Fetch = Callable[[m.Route], Awaitable[dict[str, bytes]]]


class Models:
    def __init__(
        self,
        aliases: dict[str, str] | None = None,
        fetch: Fetch | None = None,
        skip_tokenizer_init: bool = False,
    ):
        self.aliases = dict(aliases or {})  # alias -> routed model string
        self.fetch = fetch  # a routed model's tokenizer files, from its node
        self.skip_tokenizer_init = skip_tokenizer_init  # every model: token ids only
        self.tokenizers: dict[str, Tokenizer | NoTokenizer] = {}
        self._loading: dict[str, asyncio.Task[Tokenizer]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # (when, why) a tokenizer did not come

    def preload(self, model: str) -> None:
        """Load now from this host's disk, blocking: for the entry point's own --model."""
        self.tokenizers[model] = load_tokenizer(resolve_model(model), self.skip_tokenizer_init)

    def resolve(self, name: str) -> str | None:
        """The routed model string the API name stands for, or None if unknown."""
        if name in self.aliases:
            return self.aliases[name]
        for model in [*self.tokenizers, *self._loading, *self._failed]:
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

    def learn(self, routed: dict[str, m.Route]) -> None:
        """Start fetching the tokenizer of every routed model not seen before (or that
        failed to arrive a while ago)."""
        now = asyncio.get_running_loop().time()
        for model, route in routed.items():
            if model in self.tokenizers or model in self._loading or self.fetch is None:
                continue
            if now - self._failed.get(model, (-RETRY_AFTER_S, ""))[0] < RETRY_AFTER_S:
                continue
            if self.skip_tokenizer_init or not route.tokenizer_hash:
                self.tokenizers[model] = _untokenized(route, self.skip_tokenizer_init)
                continue
            task = asyncio.create_task(self._fetch(route))
            self._loading[model] = task
            task.add_done_callback(lambda t, model=model: self._loaded(model, t))

    async def _fetch(self, route: m.Route) -> Tokenizer:
        files = await self.fetch(route)
        return await asyncio.to_thread(Tokenizer.from_files, files, route.model)

    async def tokenizer(self, model: str) -> Tokenizer | NoTokenizer:
        """ValueError saying why when it failed to arrive (a file it lacks, or malformed)."""
        if model in self.tokenizers:
            return self.tokenizers[model]
        if model in self._loading:
            return await asyncio.shield(self._loading[model])
        raise ValueError(self._failed[model][1])

    def _loaded(self, model: str, task: asyncio.Task[Tokenizer]) -> None:
        self._loading.pop(model, None)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self._failed[model] = (asyncio.get_running_loop().time(), str(exc))
            log.error("edge.tokenizer_failed", model=model, error=str(exc))
            return
        self._failed.pop(model, None)
        self.tokenizers[model] = task.result()
        log.info("edge.tokenizer_loaded", model=model)


def _untokenized(route: m.Route, skipped: bool) -> NoTokenizer:
    why = (
        "this edge runs with --skip-tokenizer-init"
        if skipped
        else f"its node {route.node_id!r} serves it without one: its directory has no "
        "tokenizer.json, or the node runs with --skip-tokenizer-init"
    )
    return NoTokenizer(f"the model {route.model!r} has no tokenizer ({why})")
