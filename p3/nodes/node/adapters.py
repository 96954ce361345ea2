"""The LoRA adapters a node holds, by name: those it was started with (--lora NAME=PATH) and
those edges load and unload at run time (LoadAdapter / UnloadAdapter, answered AdapterDone).
Its heartbeats name them, so the coordinator's routes do, so edges send an adapter's
requests only to replicas that hold it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from p3.log import get_logger
from p3.lora import LoRARequest
from p3.protocol import messages as m

if TYPE_CHECKING:
    from p3.engine.engine import Engine

log = get_logger(__name__)


class NodeAdapters:
    def __init__(self, node_id: str, reply: Callable[[bytes, m.Msg], bool]):
        self.node_id, self.reply = node_id, reply
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)  # lora_int_id: a reloaded name gets a new one
        self._tasks: set[asyncio.Task] = set()

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def preload(self, engine: Engine, loras: Iterable[tuple[str, str]]) -> None:
        """The adapters the node was started with, loaded with its engine (blocking)."""
        for name, path in loras:
            request = self._request(name, path)
            engine.load_lora(request)
            self.by_name[name] = request

    def request_for(self, name: str) -> LoRARequest | None:
        return self.by_name.get(name)

    def on_load(self, edge: bytes, msg: m.LoadAdapter, engine: Engine | None) -> None:
        task = asyncio.get_running_loop().create_task(self._load(edge, msg, engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, edge: bytes, msg: m.LoadAdapter, engine: Engine | None) -> None:
        try:
            if engine is None:
                raise ValueError("the node is still loading its model")
            held = self.by_name.get(msg.name)
            if held is not None and held.lora_path != msg.path:
                raise ValueError(f"adapter {msg.name!r} is already loaded from {held.lora_path}")
            if held is None:
                request = self._request(msg.name, msg.path)
                await asyncio.to_thread(engine.load_lora, request)  # reads and checks it
                self.by_name[msg.name] = request
                log.info("node.adapter_loaded", name=msg.name, path=msg.path)
        except ValueError as exc:
            log.info("node.adapter_refused", name=msg.name, error=str(exc))
            self.reply(edge, m.AdapterDone(msg.name, False, str(exc)[:500], self.node_id))
            return
        self.reply(edge, m.AdapterDone(msg.name, True, node_id=self.node_id))

    def on_unload(self, edge: bytes, msg: m.UnloadAdapter, engine: Engine | None) -> None:
        request = self.by_name.pop(msg.name, None)
        if request is None:
            error = f"adapter {msg.name!r} is not loaded"
            self.reply(edge, m.AdapterDone(msg.name, False, error, self.node_id, loaded=False))
            return
        if engine is not None:
            engine.retire_lora(request.lora_int_id)  # its running requests finish first
        log.info("node.adapter_unloaded", name=msg.name)
        self.reply(edge, m.AdapterDone(msg.name, True, node_id=self.node_id, loaded=False))

    def _request(self, name: str, path: str) -> LoRARequest:
        return LoRARequest(name, next(self._ids), path)
