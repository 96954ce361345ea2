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
the leader sends a stop plan. The plan, the activations between stages and the logits back
to the leader travel as p3.engine.stages sends them.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from p3.engine.layers import Linear
from p3.kernels.quant import QuantWeight, quant_embedding

# Seconds this process spent inside collectives and point-to-point calls, by kind (waiting
# for a slower peer included): what scripts/bench_parallel.py reports as communication.
comm_seconds: dict[str, float] = {}


def timed(kind: str, call, *args, **kwargs) -> None:
    started = time.perf_counter()
    call(*args, **kwargs)
    comm_seconds[kind] = comm_seconds.get(kind, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class Shard:
    """This process's place in its replica: tp rank and size within its pipeline stage, the
    group of that stage's tp ranks, and the stage among num_stages."""

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # the stage's tp group
    stage: int = 0
    num_stages: int = 1

    @property
    def replica_rank(self) -> int:
        return self.stage * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.num_stages

    @property
    def is_leader(self) -> bool:
        """The replica's leader (first stage, tp rank 0): it schedules and samples."""
        return self.replica_rank == 0

    @property
    def tp_leader(self) -> int:
        """The replica rank of this stage's tp rank 0 (where the stage's logits gather)."""
        return self.stage * self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def peer(self, stage: int) -> int:
        """The replica rank of this tp rank in another stage."""
        return stage * self.tp_size + self.tp_rank

    def layers(self, num_layers: int) -> tuple[int, int]:
        """This stage's [start, end) of the layers: an even split, earlier stages take the
        remainder."""
        if num_layers < self.num_stages:
            raise ValueError(f"{num_layers} layers cannot fill {self.num_stages} pipeline stages")
        return _share(num_layers, self.num_stages, self.stage)

    def split(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n things: as even as can be, earlier ranks take the
        remainder (SmolLM2's 3 KV heads over 2 ranks: 2 and 1)."""
        return _share(n, self.tp_size, self.tp_rank)

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """Rows of the vocabulary on this rank; the last rank's may pass vocab_size (padding)."""
        width = math.ceil(vocab_size / self.tp_size)
        return self.tp_rank * width, (self.tp_rank + 1) * width

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """This rank's query heads [q0, q1) and the KV heads they read [kv0, kv1). With
        tp <= num_kv_heads the KV heads split and each takes its whole query group along;
        with more ranks, each KV head is replicated on the ranks sharing its group."""
        group = num_heads // num_kv_heads
        if self.tp_size <= num_kv_heads:
            kv0, kv1 = self.split(num_kv_heads)
            return kv0 * group, kv1 * group, kv0, kv1
        if self.tp_size % num_kv_heads or num_heads % self.tp_size:
            raise ValueError(
                f"tensor parallel size {self.tp_size} must be at most num_key_value_heads "
                f"({num_kv_heads}), or a multiple of it that divides num_attention_heads "
                f"({num_heads})"
            )
        width = num_heads // self.tp_size
        head = self.tp_rank // (self.tp_size // num_kv_heads)
        return self.tp_rank * width, (self.tp_rank + 1) * width, head, head + 1


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


def all_reduce(x: Tensor, shard: Shard) -> Tensor:
    if shard.tp_size > 1:
        timed("all_reduce", dist.all_reduce, x, group=shard.group)
    return x


# -- layers --------------------------------------------------------------------------------


class ColumnParallelLinear(Linear):
    """Output features split across ranks: each computes its own columns, no communication."""


class RowParallelLinear(Linear):
    """Input features split across ranks: each computes a partial sum of every output; the
    all-reduce adds them, then the bias (whole on every rank) is added once. reduce=False
    leaves the partial sums (a mixture of experts adds up its experts first)."""

    def __init__(
        self, in_features: int, out_features: int, shard: Shard, bias: bool = False,
        reduce: bool = True,
    ):  # fmt: skip
        super().__init__(in_features, out_features, bias)
        self.shard, self.reduce = shard, reduce

    def forward(self, x: Tensor) -> Tensor:
        if self.shard.tp_size == 1:
            return super().forward(x)
        y = self.apply_to(x, None)
        if self.reduce:
            y = all_reduce(y, self.shard)
        return y if self.bias is None else y + self.bias


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
        if self.shard.tp_size == 1:
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

    def __init__(self, dim: int, vocab_size: int, shard: Shard, bias: bool = False):
        start, end = shard.vocab_range(vocab_size)
        super().__init__(dim, end - start, bias)
        self.shard = shard
        self.vocab_size = vocab_size

    def gather(self, local: Tensor) -> Tensor | None:
        """[N, V] float logits on the stage's tp rank 0; None on the other ranks."""
        if self.shard.tp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.shard.tp_size)]
        mine = self.shard.tp_rank == 0
        dst = self.shard.tp_leader
        timed(
            "gather", dist.gather, local, parts if mine else None, dst=dst, group=self.shard.group
        )
        if not mine:
            return None
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
