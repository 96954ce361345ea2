"""What the ranks of one replica send each other besides collectives (see p3.engine.parallel).

The step plan goes from the leader to every rank, msgspec in a uint8 tensor (no pickle); with
pipeline parallelism each stage sends its hidden state and residual stream to the next, and
the last stage's tp rank 0 sends the logits back to the leader. Sends between stages do not
wait (isend): the leader keeps one micro-batch per stage in flight (engine.py), so while the
last stage computes one, the first computes the next.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec
import torch
import torch.distributed as dist
from torch import Tensor

from p3.engine.parallel import Shard, timed

# -- the step plan ---------------------------------------------------------------------------


class StepPlan(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One step's packed batch as the leader scheduled it; `stop` ends the followers."""

    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    num_decode: int = 0
    decode_block_tables: list[list[int]] = []
    decode_context_lens: list[int] = []
    prefill_cu_seqlens: list[int] = msgspec.field(default_factory=lambda: [0])
    prefill_cached_lens: list[int] = []
    prefill_block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    lora_segments: list[list[int]] = []  # [adapter key, first token, token count]
    stop: bool = False


_plan_encoder = msgspec.msgpack.Encoder()
_plan_decoder = msgspec.msgpack.Decoder(StepPlan)


# Point-to-point tags: each kind of message is matched in order within its own stream.
PLAN_TAG, ACTIVATIONS_TAG, LOGITS_TAG = 1, 2, 3


class Outbox:
    """Sends under way (isend): each tensor lives until its send completes, so the sender
    goes on computing instead of waiting for a busy receiver."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, Tensor]] = deque()

    def send(self, tensor: Tensor, dst: int, tag: int) -> None:
        self._pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        self.reap()

    def reap(self, wait: bool = False) -> None:
        """Let go of completed sends (with wait: of all of them, waiting as needed)."""
        while self._pending and (wait or self._pending[0][0].is_completed()):
            work, _ = self._pending.popleft()
            timed("send", work.wait)


outbox = Outbox()


def send_plan(plan: StepPlan, shard: Shard) -> None:
    """Leader: this step's plan to every other rank of the replica, without waiting for any
    (a pipeline stage may still be busy with the previous micro-batch)."""
    payload = _plan_encoder.encode(plan)
    header = torch.tensor([len(payload)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    for rank in range(1, shard.world_size):
        outbox.send(header, rank, PLAN_TAG)
        outbox.send(data, rank, PLAN_TAG)


def receive_plan() -> StepPlan:
    """Follower: the leader's next plan."""
    header = torch.empty(1, dtype=torch.int64)
    timed("recv", dist.recv, header, src=0, tag=PLAN_TAG)
    data = torch.empty(int(header.item()), dtype=torch.uint8)
    timed("recv", dist.recv, data, src=0, tag=PLAN_TAG)
    return _plan_decoder.decode(data.numpy().tobytes())


# -- pipeline stages -------------------------------------------------------------------------


def send_activations(x: Tensor, residual: Tensor, shard: Shard) -> None:
    """To the next stage: the hidden state and the residual stream, as one tensor."""
    outbox.send(torch.stack([x, residual]), shard.peer(shard.stage + 1), ACTIVATIONS_TAG)


def receive_activations(
    num_tokens: int, dim: int, dtype: torch.dtype, device: torch.device, shard: Shard
) -> tuple[Tensor, Tensor]:
    both = torch.empty(2, num_tokens, dim, dtype=dtype, device=device)
    timed("recv", dist.recv, both, src=shard.peer(shard.stage - 1), tag=ACTIVATIONS_TAG)
    return both[0], both[1]


def send_logits(logits: Tensor) -> None:
    """The last stage's tp rank 0 to the leader (which posted the receive at launch)."""
    timed("send", dist.send, logits, dst=0, tag=LOGITS_TAG)


class PendingLogits:
    """The leader's receive of one micro-batch's logits, posted before the plan goes out."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device, shard: Shard):
        self.logits = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
        src = shard.world_size - shard.tp_size  # the last stage's tp rank 0
        self.work = dist.irecv(self.logits, src=src, tag=LOGITS_TAG)

    def wait(self) -> Tensor:
        timed("recv", self.work.wait)
        return self.logits


def close_shard(shard: Shard) -> None:
    """Leave the replica's groups together (a barrier first: no rank tears its connections
    down while a peer still uses them; a process that exits with its group alive can abort)."""
    if shard.world_size > 1 and dist.is_initialized():
        outbox.reap(wait=True)
        dist.barrier()
        dist.destroy_process_group()
