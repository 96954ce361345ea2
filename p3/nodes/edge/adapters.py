"""vLLM's run-time LoRA routes: POST /v1/load_lora_adapter {"lora_name", "lora_path"} has
every replica of the base model load the adapter (a PEFT directory on the nodes' hosts), and
POST /v1/unload_lora_adapter {"lora_name"} has those holding it drop it (their running
requests finish under it). Both answer once the routing table says so, so the next request
naming the adapter finds it (or does not). Behind the API key, like every /v1 route."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from p3.nodes.edge.schemas import ApiError, Fields, bad_request
from p3.protocol import messages as m

if TYPE_CHECKING:
    from p3.nodes.edge.edge import Edge

ANSWER_TIMEOUT_S = 120.0  # a node loads and checks the adapter before it answers
ROUTED_TIMEOUT_S = 10.0  # then its heartbeat carries it to the coordinator's table


async def load_lora_adapter(edge: Edge, body: Any) -> web.Response:
    f = Fields(body)
    name, path = _required(f, "lora_name"), _required(f, "lora_path")
    if edge.models.resolve(name) is not None:
        raise bad_request("lora_name", f"{name!r} names a model already")
    base = _base_model(edge, f)
    routes = edge.cluster.replicas(base)
    if not routes:
        raise ApiError(503, f"no ready replica of model {base!r}", code="no_replica")
    answers = await edge.cluster.tell_adapter(routes, m.LoadAdapter(name, path), ANSWER_TIMEOUT_S)
    if failed := [a for a in answers if not a.ok]:
        held = [r for r, a in zip(routes, answers, strict=True) if a.ok]
        if held:  # some loaded it, some could not: none keeps it
            await edge.cluster.tell_adapter(held, m.UnloadAdapter(name), ANSWER_TIMEOUT_S)
        why = "; ".join(f"{a.node_id}: {a.error}" for a in failed)
        raise bad_request("lora_path", f"LoRA adapter {name!r} could not be loaded: {why}")
    await _routed(edge, lambda: all(name in r.adapters for r in edge.cluster.replicas(base)))
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(edge: Edge, body: Any) -> web.Response:
    name = _required(Fields(body), "lora_name")
    routes = [r for r in edge.cluster.routes.values() if name in r.adapters]
    if not routes:
        raise ApiError(404, f"the LoRA adapter {name!r} is not loaded", "lora_name",
                       "model_not_found")  # fmt: skip
    await edge.cluster.tell_adapter(routes, m.UnloadAdapter(name), ANSWER_TIMEOUT_S)
    await _routed(edge, lambda: name not in edge.cluster.adapters())
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _required(f: Fields, name: str) -> str:
    value = f.get(name, str)
    if not value:
        raise bad_request(name, f"{name} is required", "missing_required_parameter")
    return value


def _base_model(edge: Edge, f: Fields) -> str:
    """The model the adapter goes on: base_model_name, else the one model served."""
    named = f.get("base_model_name", str)
    if named:
        model = edge.models.resolve(named)
        if model is None:
            raise bad_request("base_model_name", f"the model {named!r} does not exist")
        return model
    served = sorted({r.model for r in edge.cluster.routes.values()})
    if len(served) != 1:
        raise bad_request(
            "base_model_name", f"several models are served ({', '.join(served)}): name one"
        )
    return served[0]


async def _routed(edge: Edge, done, timeout_s: float = ROUTED_TIMEOUT_S) -> None:
    """Wait until the routing table shows the change (done() true), for at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not done():
        changed = edge.cluster.routes_changed
        left = deadline - time.monotonic()
        if left <= 0:
            raise ApiError(503, "the change did not reach the routing table in time",
                           code="no_replica")  # fmt: skip
        try:
            await asyncio.wait_for(changed.wait(), left)
        except TimeoutError:
            continue
