"""Actors on real sockets on 127.0.0.1 (ephemeral ports), in this test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from p3.config import EngineConfig
from p3.nodes.coordinator.coordinator import Coordinator, CoordinatorConfig
from p3.nodes.node.config import NodeConfig
from p3.nodes.node.node import Node
from p3.nodes.node.stepper import StepFaults
from tests.actors.harness import TestEdge
from tests.model.tiny import make_tiny_model

HEARTBEAT_INTERVAL_S = 0.1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models"), "llama-gqa-untied")


class Running:
    """Actors started in the test's loop; all stopped (abort) and awaited at the end."""

    def __init__(self):
        self.tasks: dict[object, asyncio.Task] = {}

    async def start(self, actor, serving: bool = True):
        """Run actor; with serving, until it serves."""
        self.tasks[actor] = asyncio.create_task(actor.run())
        if serving:
            await actor.wait_ready()
        return actor

    async def finish(self, actor, mode: str = "drain", timeout_s: float = 10.0) -> None:
        actor.stop(mode)
        async with asyncio.timeout(timeout_s):
            await self.tasks.pop(actor)

    async def close(self) -> None:
        for actor, task in self.tasks.items():
            actor.stop("abort")
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(10):
                    await task


@pytest.fixture
async def running():
    actors = Running()
    yield actors
    await actors.close()


@pytest.fixture
async def coordinator(running) -> Coordinator:
    config = CoordinatorConfig(heartbeat_interval_s=HEARTBEAT_INTERVAL_S, hung_after_s=0.5)
    return await running.start(Coordinator(config))


@pytest.fixture
def make_node(running, coordinator, tiny_model):
    """start a Node on the tiny model; `serving=True` waits until it sent Ready."""
    count = 0

    async def make(serving: bool = True, faults: StepFaults | None = None, **overrides) -> Node:
        nonlocal count
        count += 1
        options = dict(
            coordinator=coordinator.address,
            node_id=f"node-{count}",
            model=str(tiny_model),
            engine=EngineConfig(dtype="float32", kv_cache_bytes=1 << 20, max_num_seqs=8),
            drain_timeout_s=5.0,
        )
        node = Node(NodeConfig(**{**options, **overrides}), faults or StepFaults())
        await running.start(node, serving)
        return node

    return make


@pytest.fixture
def edge(coordinator):
    peer = TestEdge(coordinator.address)
    yield peer
    peer.close()
