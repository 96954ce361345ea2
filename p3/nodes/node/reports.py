"""What a node tells the coordinator about itself: Hello, Ready, and Heartbeat with progress.

A heartbeat's progress is what catches a hung compute thread: while the node is busy
(requests in flight, or a step under way), last_step_age_s counts from the later of the last
finished step and the moment work arrived; it grows without bound if the step thread hangs.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from p3.engine.engine import Engine
from p3.nodes.node.config import NodeConfig
from p3.protocol import messages as m

if TYPE_CHECKING:
    from p3.nodes.node.node import Node


def hello(node: Node) -> m.Hello:
    """Who the node is; once placed, where (so a restarted coordinator keeps its replica)."""
    cfg = node.config
    num_threads, max_threads = threads(cfg)
    place = node.place
    return m.Hello(
        protocol_version=m.PROTOCOL_VERSION,
        node_id=node.name,
        host=socket.gethostname(),
        pid=os.getpid(),
        address=node.address,
        capacity=m.Capacity(
            device=cfg.engine.device or "cpu",
            memory_bytes=node.memory_bytes,
            num_threads=num_threads,
            model_bytes=node.model_bytes,
            kv_cache_bytes=cfg.engine.kv_cache_bytes,
            max_threads=max_threads,
        ),
        model=cfg.model_name,
        epoch=node.epoch,
        replica=place.replica if place is not None else -1,
        replica_rank=place.replica_rank if place is not None else 0,
        replica_size=place.tp_size * place.pp_size if place is not None else 1,
    )


def threads(config: NodeConfig) -> tuple[int, int]:
    """(its own threads, the most it may grow to while peers on its host are down)."""
    own = config.engine.num_threads or len(os.sched_getaffinity(0))
    return own, max(own, config.max_threads or 0)


def ready(
    node_id: str,
    epoch: int,
    config: NodeConfig,
    engine: Engine,
    tokenizer_hash: str = "",
    adapters: list[str] = (),
) -> m.Ready:
    return m.Ready(
        node_id=node_id,
        epoch=epoch,
        model=config.model_name,
        num_kv_blocks=engine.num_kv_blocks,
        block_size=engine.config.block_size,
        max_model_len=engine.max_model_len,
        load_time_s=engine.load_time_s,
        replica_rank=engine.shard.replica_rank,
        replica_size=engine.shard.world_size,
        kv_cache_dtype=engine.config.kv_cache_dtype,
        tokenizer_hash=tokenizer_hash,
        adapters=adapters,
    )


def heartbeat(node: Node) -> m.Heartbeat:
    engine, stepper = node.engine, node.stepper
    if engine is None or stepper is None:
        return m.Heartbeat(node.name, node.epoch, draining=node.draining)
    progress_at = max(stepper.last_step_at, node.inflight.busy_since)
    return m.Heartbeat(
        node_id=node.name,
        epoch=node.epoch,
        num_steps=engine.num_steps,
        last_step_age_s=time.monotonic() - progress_at,
        busy=bool(len(node.inflight)) or stepper.in_step,
        draining=node.draining,
        step_allowance_s=stepper.speed.allowance_s(engine.config.max_num_batched_tokens),
        adapters=node.adapters.names(),
        load=m.Load(
            num_free_blocks=engine.num_free_blocks,
            num_waiting=engine.num_waiting,
            num_running=engine.num_running,
            num_tokens_in_flight=node.inflight.num_tokens_in_flight,
            num_tokens_processed=engine.num_tokens_processed,
            num_tokens_to_do=node.inflight.num_tokens_to_do,
            num_threads=stepper.threads_in_use,
            num_prefix_cache_queries=engine.scheduler.num_prefix_cache_queries,
            num_prefix_cache_hits=engine.scheduler.num_prefix_cache_hits,
        ),
    )
