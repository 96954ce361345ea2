"""Tensor and pipeline parallelism over torch.distributed: sharded layers, stages, the step plan.

A replica of tp ranks holds one model. Each rank builds the same Transformer with local sizes
and loads only its slice of every checkpoint tensor (see p3.engine.model_loader.weight_slots):

    ColumnParallelLinear   qkv (this rank's query heads and their KV heads), gate_up
    RowParallelLinear      o_proj, down: partial sums, then one all-reduce in forward
    VocabParallelEmbedding rows [v0, v1) of the vocabulary; ids outside give 0; all-reduce
    ParallelLMHead         logits for [v0, v1); gathered to the leader, which samples

Query heads split evenly. KV heads split evenly when tp <= num_kv_heads; when tp is larger,
each KV head is replicated on the tp / num_kv_heads ranks whose query heads read it.

Pipeline parallelism splits the layers into stages, one per group of tp ranks: the first
stage embeds, the last normalises and computes the logits; between stages the hidden state
and the residual stream go by send/recv, and the last stage sends the logits back to the
leader. Replica rank r is stage r // tp, tp rank r % tp.

Only the leader (replica rank 0) has a scheduler, a block manager and a sampler. Every step it
sends each rank a StepPlan (the packed batch as plain lists: token ids, positions, KV slots,
block tables; msgspec in a uint8 tensor, no pickle) and all ranks run the same forward; the
block tables index every rank's own cache of its own heads. Followers run `follow()` until
the leader sends a stop plan. Sends between stages do not wait (isend): with pipeline
parallelism the leader keeps one micro-batch per stage in flight (engine.py), so while the
last stage computes one, the first computes the next.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from p3.engine.layers import Linear
from p3.kernels.quant import QuantWeight, quant_embedding

# Seconds this process spent inside collectives and point-to-point calls, by kind (waiting
# for a slower peer included): what scripts/bench_parallel.py reports as communication.
comm_seconds: dict[str, float] = {}


def _timed(kind: str, call, *args, **kwargs) -> None:
    started = time.perf_counter()
    call(*args, **kwargs)
    comm_seconds[kind] = comm_seconds.get(kind, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class Shard:
    """This process's place in its replica: tp rank and size within its pipeline stage, the
    group of that stage's tp ranks, and the stage among num_stages."""

    rank: int = 0
    size: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # the stage's tp group
    stage: int = 0
    num_stages: int = 1

    @property
    def replica_rank(self) -> int:
        return self.stage * self.size + self.rank

    @property
    def world_size(self) -> int:
        return self.size * self.num_stages

    @property
    def is_leader(self) -> bool:
        """The replica's leader (first stage, tp rank 0): it schedules and samples."""
        return self.replica_rank == 0

    @property
    def tp_leader(self) -> int:
        """The replica rank of this stage's tp rank 0 (where the stage's logits gather)."""
        return self.stage * self.size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def peer(self, stage: int) -> int:
        """The replica rank of this tp rank in another stage."""
        return stage * self.size + self.rank

    def layers(self, num_layers: int) -> tuple[int, int]:
        """This stage's [start, end) of the layers: an even split, earlier stages take the
        remainder."""
        if num_layers < self.num_stages:
            raise ValueError(f"{num_layers} layers cannot fill {self.num_stages} pipeline stages")
        return _share(num_layers, self.num_stages, self.stage)

    def split(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n things: as even as can be, earlier ranks take the
        remainder (SmolLM2's 3 KV heads over 2 ranks: 2 and 1)."""
        return _share(n, self.size, self.rank)

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """Rows of the vocabulary on this rank; the last rank's may pass vocab_size (padding)."""
        width = math.ceil(vocab_size / self.size)
        return self.rank * width, (self.rank + 1) * width

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """This rank's query heads [q0, q1) and the KV heads they read [kv0, kv1). With
        tp <= num_kv_heads the KV heads split and each takes its whole query group along;
        with more ranks, each KV head is replicated on the ranks sharing its group."""
        group = num_heads // num_kv_heads
        if self.size <= num_kv_heads:
            kv0, kv1 = self.split(num_kv_heads)
            return kv0 * group, kv1 * group, kv0, kv1
        if self.size % num_kv_heads or num_heads % self.size:
            raise ValueError(
                f"tensor parallel size {self.size} must be at most num_key_value_heads "
                f"({num_kv_heads}), or a multiple of it that divides num_attention_heads "
                f"({num_heads})"
            )
        width = num_heads // self.size
        head = self.rank // (self.size // num_kv_heads)
        return self.rank * width, (self.rank + 1) * width, head, head + 1


def _share(n: int, parts: int, index: int) -> tuple[int, int]:
    """Part index's [start, end) of n things cut into parts as even as can be, the remainder
    going one each to the first parts."""
    width, extra = divmod(n, parts)
    start = index * width + min(index, extra)
    return start, start + width + (index < extra)


def host_rendezvous(host: str, size: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """The leader's side of a replica's rendezvous: a TCPStore on host at a free port (its
    .port is what the other ranks are told, through the coordinator)."""
    return dist.TCPStore(
        host, 0, size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def interface_for(host: str) -> str | None:
    """The name of the local network interface whose IPv4 address host resolves to, if any."""
    try:
        address = socket.inet_aton(socket.gethostbyname(host))
    except OSError:
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), siocgifaddr, request)
            except OSError:  # no IPv4 address on this interface
                continue
            if reply[20:24] == address:
                return name
    return None


def init_shard(
    replica_rank: int,
    tp_size: int,
    pp_size: int,
    device: torch.device,
    store: dist.Store | None = None,
    address: tuple[str, int] | None = None,
    timeout_s: float = 60.0,
    host: str | None = None,
) -> Shard:
    """Join the replica's process group (the leader passes its store, the others its address)
    and make one tp group per stage. host: the address this node advertises; gloo then uses
    the interface that carries it (not whatever the machine's hostname resolves to, which on
    a multi-homed host or in a network namespace may be unreachable from the peers), unless
    GLOO_SOCKET_IFNAME says otherwise."""
    size = tp_size * pp_size
    if size == 1:
        return Shard()
    if host and "GLOO_SOCKET_IFNAME" not in os.environ and (name := interface_for(host)):
        os.environ["GLOO_SOCKET_IFNAME"] = name
    if store is None:
        if address is None:
            raise ValueError("a follower needs the leader's rendezvous address")
        host, port = address
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=store,
        rank=replica_rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
    stage = replica_rank // tp_size
    group = dist.group.WORLD
    if pp_size > 1:  # every rank creates every group, in the same order
        groups = [
            dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)
        ]
        group = groups[stage]
    return Shard(replica_rank % tp_size, tp_size, group, stage, pp_size)


def close_shard(shard: Shard) -> None:
    """Leave the replica's groups together (a barrier first: no rank tears its connections
    down while a peer still uses them; a process that exits with its group alive can abort)."""
    if shard.world_size > 1 and dist.is_initialized():
        outbox.reap(wait=True)
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: Tensor, shard: Shard) -> Tensor:
    if shard.size > 1:
        _timed("all_reduce", dist.all_reduce, x, group=shard.group)
    return x


# -- layers --------------------------------------------------------------------------------


class ColumnParallelLinear(Linear):
    """Output features split across ranks: each computes its own columns, no communication."""


class RowParallelLinear(Linear):
    """Input features split across ranks: each computes a partial sum of every output; the
    all-reduce adds them. (No bias: none of the supported models has one here.)"""

    def __init__(self, in_features: int, out_features: int, shard: Shard):
        super().__init__(in_features, out_features)
        self.shard = shard

    def forward(self, x: Tensor) -> Tensor:
        return all_reduce(super().forward(x), self.shard)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, shard: Shard):
        super().__init__()
        self.shard = shard
        self.start, self.end = shard.vocab_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, dim))
        self.quant: QuantWeight | None = None  # blocks instead of weight (see use_blocks)
        self.dtype = self.weight.dtype

    def use_blocks(self, kind: str) -> QuantWeight:
        rows, cols = self.weight.shape
        self.quant = QuantWeight.empty(kind, rows, cols, self.weight.device)
        self.weight = None
        return self.quant

    def forward(self, ids: Tensor) -> Tensor:
        if self.shard.size == 1:
            return self._rows(ids)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        x = self._rows(local).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(x, self.shard)  # one rank holds each row: the sum is exact

    def _rows(self, ids: Tensor) -> Tensor:
        if self.quant is not None:
            return quant_embedding(ids, self.quant, self.dtype)
        return F.embedding(ids, self.weight)


class ParallelLMHead(Linear):
    """Logits of this rank's vocabulary rows; `gather` assembles all of them on the leader."""

    def __init__(self, dim: int, vocab_size: int, shard: Shard):
        start, end = shard.vocab_range(vocab_size)
        super().__init__(dim, end - start)
        self.shard = shard
        self.vocab_size = vocab_size

    def gather(self, local: Tensor) -> Tensor | None:
        """[N, V] float logits on the stage's tp rank 0; None on the other ranks."""
        if self.shard.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.shard.size)]
        mine = self.shard.rank == 0
        dst = self.shard.tp_leader
        _timed(
            "gather", dist.gather, local, parts if mine else None, dst=dst, group=self.shard.group
        )
        if not mine:
            return None
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


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
            _timed("send", work.wait)


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
    _timed("recv", dist.recv, header, src=0, tag=PLAN_TAG)
    data = torch.empty(int(header.item()), dtype=torch.uint8)
    _timed("recv", dist.recv, data, src=0, tag=PLAN_TAG)
    return _plan_decoder.decode(data.numpy().tobytes())


# -- pipeline stages -------------------------------------------------------------------------


def send_activations(x: Tensor, residual: Tensor, shard: Shard) -> None:
    """To the next stage: the hidden state and the residual stream, as one tensor."""
    outbox.send(torch.stack([x, residual]), shard.peer(shard.stage + 1), ACTIVATIONS_TAG)


def receive_activations(
    num_tokens: int, dim: int, dtype: torch.dtype, device: torch.device, shard: Shard
) -> tuple[Tensor, Tensor]:
    both = torch.empty(2, num_tokens, dim, dtype=dtype, device=device)
    _timed("recv", dist.recv, both, src=shard.peer(shard.stage - 1), tag=ACTIVATIONS_TAG)
    return both[0], both[1]


def send_logits(logits: Tensor) -> None:
    """The last stage's tp rank 0 to the leader (which posted the receive at launch)."""
    _timed("send", dist.send, logits, dst=0, tag=LOGITS_TAG)


class PendingLogits:
    """The leader's receive of one micro-batch's logits, posted before the plan goes out."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device, shard: Shard):
        self.logits = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
        src = shard.world_size - shard.size  # the last stage's tp rank 0
        self.work = dist.irecv(self.logits, src=src, tag=LOGITS_TAG)

    def wait(self) -> Tensor:
        _timed("recv", self.work.wait)
        return self.logits
