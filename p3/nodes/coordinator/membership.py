"""The coordinator's membership table: who is in the cluster, under which epoch, how alive.

Pure bookkeeping (no sockets, a clock passed in), so every rule here is testable as plain
Python. Epochs only grow: every Hello gets a new one, higher than any this table issued and
than the one the node says it held before (so a restarted coordinator never reissues one).
A member declared dead keeps its dead epochs: anything it later says under one is fenced.

With tensor or pipeline parallelism a replica is a group of replica_size (tp x pp) members
of one model: a member joins unplaced, and `form_groups` makes a replica of replica_size
unplaced members in the order they joined (ranks 0..replica_size-1). Only rank 0 of a group
whose every member is ready is routed; a group with a dead member is down.

A node that registers again after a coordinator restart says where it was placed (replica,
rank): its engine is built and joined to its replica's, so it keeps that place (under the
same replica number, unless a replica formed since has it: then under the one its replica's
other members got), rather than waiting as a spare to be formed anew.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from p3.protocol import messages as m


class NodeStatus(Enum):
    JOINING = "joining"  # welcomed, loading its engine
    READY = "ready"  # routable
    DRAINING = "draining"  # finishing in-flight work, not routable
    DEAD = "dead"  # declared dead; its epoch is fenced


class Verdict(Enum):
    CURRENT = "current"  # the member's live epoch: accept
    FENCED = "fenced"  # an epoch declared dead: answer with Fence
    STALE = "stale"  # an epoch superseded by a newer Hello: ignore
    UNKNOWN = "unknown"  # never heard of it (we restarted): ask it to register again


@dataclass
class Member:
    node_id: str
    identity: bytes
    epoch: int
    hello: m.Hello
    replica: int
    last_heard_at: float
    status: NodeStatus = NodeStatus.JOINING
    ready: m.Ready | None = None
    heartbeat: m.Heartbeat | None = None
    dead_epochs: set[int] = field(default_factory=set)
    cause: str = ""
    replica_rank: int = 0  # its rank in its replica: stage rank // tp_size, tp rank % tp_size
    group_size: int = 1
    placed: bool = True  # False: waiting for a replica to be formed around it
    dead_at: float = 0.0
    threads_granted: int = 0  # as last told (Threads); at Hello, its own
    adapters_changed: bool = False  # its heartbeat names other LoRA adapters than before
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=JITTER_WINDOW))

    @property
    def is_live(self) -> bool:
        return self.status is not NodeStatus.DEAD

    def route(self) -> m.Route:
        ready = self.ready or m.Ready(self.node_id, self.epoch)
        # before its first heartbeat a node is idle, with all its blocks free
        load = self.heartbeat.load if self.heartbeat else m.Load(ready.num_kv_blocks)
        return m.Route(
            node_id=self.node_id,
            epoch=self.epoch,
            address=self.hello.address,
            model=ready.model or self.hello.model,
            replica=self.replica,
            max_model_len=ready.max_model_len,
            num_kv_blocks=ready.num_kv_blocks,
            host=self.hello.host,
            pid=self.hello.pid,
            replica_rank=self.replica_rank,
            load=load,
            tokenizer_hash=ready.tokenizer_hash,
            adapters=list(self.heartbeat.adapters if self.heartbeat else ready.adapters),
        )


JOINING_TIMEOUT_S = 10.0  # silence allowed between Welcome and Ready
JITTER_WINDOW = 32  # heartbeat gaps a member's allowance is judged on (~3 s at 0.1 s)
JITTER_FACTOR = 1.5  # silence allowed, as a multiple of the longest recent gap ...
JITTER_CAP = 2.0  # ... at most this many times the configured timeout
MAX_STEP_ALLOWANCE_S = 600.0  # what a node may claim its step needs, at most
FORGET_DEAD_AFTER_S = 300.0  # a dead member's fence outlives any step it could still finish


class Membership:
    def __init__(
        self,
        heartbeat_interval_s: float,
        heartbeat_misses: int,
        hung_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        replica_size: int = 1,
    ):
        self.replica_size = replica_size
        self.heartbeat_timeout_s = heartbeat_interval_s * heartbeat_misses
        self.hung_after_s = hung_after_s
        self.clock = clock
        self.members: dict[str, Member] = {}
        self.last_epoch = 0

    # -- changes ----------------------------------------------------------------------------

    def register(self, identity: bytes, hello: m.Hello) -> Member:
        """A Hello: a new epoch, and the lowest replica index free for its model."""
        self.last_epoch = max(self.last_epoch, hello.epoch) + 1
        old = self.members.get(hello.node_id)
        kept = self._kept_replica(hello, old)
        placed = kept is not None or self.replica_size == 1
        if kept is None and placed:
            kept = self._free_replica(hello.model, hello.node_id)
        member = Member(
            node_id=hello.node_id,
            identity=identity,
            epoch=self.last_epoch,
            hello=hello,
            replica=kept if placed else -1,
            last_heard_at=self.clock(),
            dead_epochs=old.dead_epochs if old else set(),
            placed=placed,
            threads_granted=hello.capacity.num_threads,
        )
        if placed and self.replica_size > 1:  # it registers again, already in a replica
            member.replica_rank, member.group_size = hello.replica_rank, self.replica_size
        self.members[hello.node_id] = member
        return member

    def _kept_replica(self, hello: m.Hello, old: Member | None) -> int | None:
        """The replica number of a node that says it is placed already (registering again
        after a coordinator restart), or None: not placed, or its place cannot be kept."""
        size = self.replica_size
        if hello.replica < 0 or hello.replica_size != size or not 0 <= hello.replica_rank < size:
            return None
        if old is not None and not old.is_live:
            return None  # declared dead: its replica is down
        if old is not None and old.placed and old.hello.replica == hello.replica:
            return old.replica  # its Hello again
        others = [
            mb
            for mb in self.members.values()
            if mb.is_live and mb.placed and mb.node_id != hello.node_id
            and mb.hello.model == hello.model
        ]  # fmt: skip
        if size > 1:
            for mb in others:  # a member of the same replica registered again before it
                if mb.hello.replica == hello.replica and mb.hello.replica_size == size:
                    return None if mb.hello.replica_rank == hello.replica_rank else mb.replica
        if hello.replica not in {mb.replica for mb in others}:
            return hello.replica
        return self._free_replica(hello.model, hello.node_id)

    def form_groups(self) -> list[list[Member]]:
        """New replicas of replica_size unplaced live members of one model, ranks in join
        order."""
        waiting: dict[str, list[Member]] = {}
        for member in sorted(self.members.values(), key=lambda mb: mb.epoch):
            if member.is_live and not member.placed:
                waiting.setdefault(member.hello.model, []).append(member)
        groups = []
        for model, members in waiting.items():
            size = self.replica_size
            while len(members) >= size:
                group, members = members[:size], members[size:]
                replica = self._free_replica(model, "")
                for rank, member in enumerate(group):
                    member.replica, member.replica_rank, member.group_size = replica, rank, size
                    member.placed = True
                groups.append(group)
        return groups

    def group_of(self, member: Member) -> list[Member]:
        """The live members of member's replica, member included."""
        if member.group_size == 1 or not member.placed:
            return [member] if member.is_live else []
        return [
            mb
            for mb in self.members.values()
            if mb.is_live
            and mb.placed
            and mb.hello.model == member.hello.model
            and mb.replica == member.replica
        ]

    def mark_ready(self, member: Member, ready: m.Ready) -> None:
        member.ready = ready
        member.status = NodeStatus.READY
        member.last_heard_at = self.clock()

    def record_heartbeat(self, member: Member, hb: m.Heartbeat) -> NodeStatus:
        """Note a heartbeat; returns the status before it (draining changes are a change)."""
        before = member.status
        if member.heartbeat is not None and member.heartbeat.adapters != hb.adapters:
            member.adapters_changed = True
        member.heartbeat = hb
        now = self.clock()
        if before is not NodeStatus.JOINING:  # loading starves heartbeats: no evidence
            member.gaps.append(now - member.last_heard_at)
        member.last_heard_at = now
        if hb.draining and member.status is NodeStatus.READY:
            member.status = NodeStatus.DRAINING
        return before

    def declare_dead(self, member: Member, cause: str) -> None:
        member.status = NodeStatus.DEAD
        member.dead_epochs.add(member.epoch)
        member.cause = cause
        member.dead_at = self.clock()

    def excuse(self, stalled_s: float) -> None:
        """The coordinator itself did not run for stalled_s (its loop was late): silence over
        that time says nothing of the members, and heartbeats sent meanwhile may still wait
        in its socket. Every live member's silence restarts that much later."""
        now = self.clock()
        for member in self.members.values():
            if member.is_live:
                member.last_heard_at = min(now, member.last_heard_at + stalled_s)

    def forget_dead(self) -> list[str]:
        """Drop members dead for FORGET_DEAD_AFTER_S (the table must not grow with every id
        that ever registered); one that speaks again is asked to register anew."""
        now = self.clock()
        gone = [
            mb.node_id
            for mb in self.members.values()
            if not mb.is_live and now - mb.dead_at > FORGET_DEAD_AFTER_S
        ]
        for node_id in gone:
            del self.members[node_id]
        return gone

    def remove(self, member: Member) -> None:
        del self.members[member.node_id]

    # -- questions --------------------------------------------------------------------------

    def classify(self, node_id: str, epoch: int) -> tuple[Verdict, Member | None]:
        member = self.members.get(node_id)
        if member is None:
            return Verdict.UNKNOWN, None
        if epoch in member.dead_epochs:
            return Verdict.FENCED, member
        if epoch == member.epoch:
            return Verdict.CURRENT, member
        if epoch < member.epoch:
            return Verdict.STALE, member
        return Verdict.UNKNOWN, member

    def find_dead(self) -> list[tuple[Member, str]]:
        """Live members that missed too many heartbeats, or are busy with no step progress."""
        now = self.clock()
        found = []
        for member in self.members.values():
            if not member.is_live:
                continue
            silence_s = now - member.last_heard_at
            hb = member.heartbeat
            if silence_s > self._silence_allowed_s(member):
                found.append((member, f"heartbeat-timeout ({silence_s:.3f}s silent)"))
            elif hb is not None and hb.busy and hb.last_step_age_s > self._step_allowed_s(hb):
                found.append((member, f"no-progress ({hb.last_step_age_s:.3f}s without a step)"))
        return found

    def _step_allowed_s(self, hb: m.Heartbeat) -> float:
        """hung_after_s, or longer if the node's own speed says its step needs it (capped):
        slow is not dead."""
        return max(self.hung_after_s, min(hb.step_allowance_s, MAX_STEP_ALLOWANCE_S))

    def _silence_allowed_s(self, member: Member) -> float:
        """A node still loading its model serves no one, so waiting for it costs no client
        anything, while loading can starve its heartbeats for a few intervals on a small host.
        A serving node gets the configured timeout, or more on a host that has shown it late:
        JITTER_FACTOR x its longest recent gap, capped at JITTER_CAP x the timeout (a 2-core
        host running five processes showed gaps of 0.5 s against 0.3 s allowed, and a node
        declared dead for it takes its replica down)."""
        timeout_s = self.heartbeat_timeout_s
        if member.status is NodeStatus.JOINING:
            return max(timeout_s, JOINING_TIMEOUT_S)
        jitter_s = JITTER_FACTOR * max(member.gaps, default=0.0)
        return min(max(timeout_s, jitter_s), JITTER_CAP * timeout_s)

    def routes(self) -> list[m.Route]:
        """Every member of every whole, ready replica (edges route to rank 0 only)."""
        leaders = [
            mb
            for mb in self.members.values()
            if mb.status is NodeStatus.READY and mb.replica_rank == 0 and self._whole(mb)
        ]
        members = [mb for leader in leaders for mb in self.group_of(leader)]
        order = sorted(members, key=lambda mb: (mb.hello.model, mb.replica, mb.replica_rank))
        return [mb.route() for mb in order]

    def _whole(self, leader: Member) -> bool:
        """Every member of the leader's replica is alive and ready."""
        group = self.group_of(leader)
        return len(group) == leader.group_size and all(
            mb.status is NodeStatus.READY for mb in group
        )

    def _free_replica(self, model: str, node_id: str) -> int:
        taken = {
            mb.replica
            for mb in self.members.values()
            if mb.is_live and mb.placed and mb.hello.model == model and mb.node_id != node_id
        }
        return next(i for i in range(len(taken) + 1) if i not in taken)
