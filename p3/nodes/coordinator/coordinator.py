"""The coordinator: membership, epochs, failure detection, fencing, the routing table.

One ROUTER socket. Nodes and edges connect DEALERs whose identity is their id. The
coordinator is off the token path: it hears Hello/Ready/Heartbeat/Fatal/Goodbye from nodes
and EdgeHello from edges, and publishes Routes (every ready node, with its latest load) to
every edge it knows, on every change and at least once per heartbeat interval.

Placement with tensor or pipeline parallelism (tp x pp > 1): nodes are welcomed unplaced;
once tp x pp of one model wait, they become a replica. Its rank 0 gets Place and answers
Rendezvous (its torch.distributed store's host:port); the others then get Place with it. A
replica is routed (through rank 0) once all its members are ready; when one dies, the
others are told to shut down, and the model's waiting nodes (spares, restarted ones) form a
new replica as soon as tp x pp of them wait (tests/e2e/test_reform_replica.py).

Restarts: a coordinator keeps no state on disk. A restarted one (on the same address, which
nodes and edges keep dialling) hears heartbeats from nodes it does not know and answers
Reregister: they say Hello again, carrying their old epoch (the new one is higher), and
Ready at once, streaming on meanwhile. It publishes nothing until it has something to
route (or someone to list dead), so edges keep routing on the table they have rather than
on the empty one of a coordinator that has not heard from its nodes yet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from p3.log import get_logger
from p3.nodes.actor.base import Actor
from p3.nodes.coordinator.membership import Member, Membership, NodeStatus, Verdict
from p3.nodes.coordinator.placement import why_unfit
from p3.nodes.coordinator.threads import thread_grants
from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.security import COORDINATOR, Door, Gate, Keyring
from p3.status import CoordinatorMetrics, StatusServer, start_status

log = get_logger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    bind: str = "tcp://127.0.0.1:0"
    heartbeat_interval_s: float = 0.1
    heartbeat_misses: int = 3
    hung_after_s: float = 30.0
    edge_timeout_s: float = 5.0  # an edge silent this long is forgotten (it says hello every 1 s)
    keys: str | None = None  # a `p3 keys generate` directory: CurveZMQ on every socket
    tp_size: int = 1  # tensor-parallel ranks per pipeline stage
    pp_size: int = 1  # pipeline stages per replica
    # a node dead this long lends its threads to the nodes left on its host (threads.py)
    lend_threads_after_s: float = 10.0
    status_host: str = "127.0.0.1"  # its status server (p3.status): /health, /ready, /metrics
    status_port: int | None = None  # None: none; 0: any free port

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat interval must be positive: {self.heartbeat_interval_s}")
        if self.heartbeat_misses < 1:
            raise ValueError(f"heartbeat misses must be at least 1, got {self.heartbeat_misses}")
        if self.hung_after_s <= 0:
            raise ValueError(f"hung-after must be positive, got {self.hung_after_s}")
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp and pp must be at least 1, got {self.tp_size}, {self.pp_size}")


class Coordinator(Actor):
    kind = "coordinator"

    def __init__(self, config: CoordinatorConfig | None = None, name: str = "coordinator"):
        super().__init__(name)
        self.config = cfg = config or CoordinatorConfig()
        self.membership = Membership(
            cfg.heartbeat_interval_s,
            cfg.heartbeat_misses,
            cfg.hung_after_s,
            replica_size=cfg.tp_size * cfg.pp_size,
        )
        self._forming: dict[str, list[Member]] = {}  # leader id -> its group, until Rendezvous
        self.edges: dict[bytes, float] = {}  # identity -> when last heard
        self.routes_version = 0
        self._has_published = False  # a table went out (an empty one is news from then on)
        self.address = ""
        self._decoder = wire.to_coordinator()
        self._changed_dead: list[str] = []
        self._changed = asyncio.Event()
        self._last_publish_at = 0.0
        self.metrics = CoordinatorMetrics()
        self.status_server: StatusServer | None = None

    async def setup(self) -> None:
        cfg = self.config
        self._ctx = zmq.asyncio.Context()
        keys = self.config.keys
        keyring = Keyring(keys, COORDINATOR, COORDINATOR) if keys else None
        self._gate = Gate(self._ctx, keyring, admits=("node", "edge")) if keyring else None
        self._door = Door(keyring) if keyring else None
        self._sock = wire.make_socket(
            self._ctx, zmq.ROUTER, bind=self.config.bind, keyring=keyring
        )
        self.address = wire.bound_address(self._sock)
        log.info("coordinator.listening", address=self.address)  # and so serving
        self.status_server = await start_status(
            self, cfg.status_host, cfg.status_port, self.serving.is_set, self.metrics
        )

    def ready_info(self) -> dict:
        status = {"status_url": self.status_server.url} if self.status_server else {}
        return {"address": self.address, **status}

    def loops(self):
        return [self.receive(), self.monitor(), self.publish_changes()]

    async def teardown(self) -> None:
        if self.status_server is not None:
            await self.status_server.stop()
        self._sock.close(linger=0)
        if self._gate is not None:
            self._gate.stop()
        self._ctx.term()

    # -- inbound ----------------------------------------------------------------------------

    async def receive(self) -> None:
        while True:
            identity, msg = await wire.recv_routed(self._sock, self._decoder, self._door)
            if msg is not None:
                self.dispatch(identity, msg)

    def dispatch(self, identity: bytes, msg: m.Msg) -> None:
        match msg:
            case m.Hello():
                self.on_hello(identity, msg)
            case m.Ready():
                self.on_ready(identity, msg)
            case m.Heartbeat():
                self.on_heartbeat(identity, msg)
            case m.Fatal():
                self.on_fatal(identity, msg)
            case m.Goodbye():
                self.on_goodbye(identity, msg)
            case m.EdgeHello():
                self.on_edge_hello(identity, msg)
            case m.Rendezvous():
                self.on_rendezvous(identity, msg)

    def on_hello(self, identity: bytes, hello: m.Hello) -> None:
        if hello.protocol_version != m.PROTOCOL_VERSION:
            reason = f"protocol version {hello.protocol_version} != {m.PROTOCOL_VERSION}"
            log.warning("coordinator.refused", node_id=hello.node_id, reason=reason)
            wire.send(self._sock, m.Refused(reason), identity)
            return
        unfit = why_unfit(hello.capacity, self.membership.replica_size, hello.model)
        if unfit is not None:
            log.warning("coordinator.refused", node_id=hello.node_id, reason=unfit)
            wire.send(self._sock, m.Refused(unfit), identity)
            return
        old = self.membership.members.get(hello.node_id)
        if old is not None and old.status is NodeStatus.READY:
            self._mark_changed()  # its old epoch leaves the table
        member = self.membership.register(identity, hello)
        if not member.placed and hello.replica >= 0 and hello.replica_size > 1:
            # a rank whose replica cannot be kept (declared down, or its rank taken): its
            # shard cannot join another, so it is shut down, to come back fresh as a spare
            log.warning("coordinator.rank_orphaned", node_id=hello.node_id, epoch=member.epoch)
            self.membership.declare_dead(member, "orphaned rank")
            wire.send(self._sock, m.Shutdown("abort"), identity)
            return
        log.info(
            "coordinator.node_welcomed",
            node_id=member.node_id,
            epoch=member.epoch,
            replica=member.replica,
            model=hello.model,
            address=hello.address,
            host=hello.host,
            pid=hello.pid,
            previous_epoch=hello.epoch,
        )
        welcome = m.Welcome(
            member.epoch,
            hello.model,
            member.replica,
            self.config.heartbeat_interval_s,
            placed=member.placed,
        )
        wire.send(self._sock, welcome, identity)
        self._lend_threads()  # a node back on its host takes its threads back from the others
        for group in self.membership.form_groups():
            self._place(group)

    def _place(self, group: list[Member]) -> None:
        leader = group[0]
        log.info(
            "coordinator.replica_formed",
            model=leader.hello.model,
            replica=leader.replica,
            nodes=[mb.node_id for mb in group],
        )
        self._forming[leader.node_id] = group
        tp, pp = self.config.tp_size, self.config.pp_size
        place = m.Place(leader.epoch, leader.replica, 0, tp, pp)
        wire.send(self._sock, place, leader.identity)

    def on_rendezvous(self, identity: bytes, rendezvous: m.Rendezvous) -> None:
        leader = self._current(identity, rendezvous.node_id, rendezvous.epoch)
        group = self._forming.pop(rendezvous.node_id, None) if leader is not None else None
        if group is None:
            return
        address = f"{rendezvous.host}:{rendezvous.port}"
        for member in group[1:]:
            if member.is_live:
                place = m.Place(
                    member.epoch,
                    member.replica,
                    member.replica_rank,
                    self.config.tp_size,
                    self.config.pp_size,
                    address,
                )
                wire.send(self._sock, place, member.identity)

    def on_ready(self, identity: bytes, ready: m.Ready) -> None:
        member = self._current(identity, ready.node_id, ready.epoch)
        if member is None or member.status is NodeStatus.READY:
            return
        self.membership.mark_ready(member, ready)
        log.info(
            "coordinator.node_ready",
            node_id=member.node_id,
            epoch=member.epoch,
            num_kv_blocks=ready.num_kv_blocks,
            kv_cache_dtype=ready.kv_cache_dtype,
            max_model_len=ready.max_model_len,
            load_time_s=round(ready.load_time_s, 3),
        )
        self._mark_changed()

    def on_heartbeat(self, identity: bytes, hb: m.Heartbeat) -> None:
        member = self._current(identity, hb.node_id, hb.epoch)
        if member is None:
            return
        before = self.membership.record_heartbeat(member, hb)
        if member.status is not before:
            log.info("coordinator.node_draining", node_id=member.node_id, epoch=member.epoch)
            self._mark_changed()
        if member.adapters_changed:  # edges route adapter requests by these: tell them now
            member.adapters_changed = False
            log.info("coordinator.adapters", node_id=member.node_id, adapters=hb.adapters)
            self._mark_changed()

    def on_fatal(self, identity: bytes, fatal: m.Fatal) -> None:
        member = self._current(identity, fatal.node_id, fatal.epoch)
        if member is not None:
            self._declare_dead(member, f"fatal: {fatal.reason}")

    def on_goodbye(self, identity: bytes, bye: m.Goodbye) -> None:
        member = self._current(identity, bye.node_id, bye.epoch)
        if member is None:
            return
        log.info("coordinator.node_left", node_id=member.node_id, epoch=member.epoch)
        self.membership.remove(member)
        self._mark_changed()

    def on_edge_hello(self, identity: bytes, hello: m.EdgeHello) -> None:
        if hello.protocol_version != m.PROTOCOL_VERSION:
            reason = f"protocol version {hello.protocol_version} != {m.PROTOCOL_VERSION}"
            log.warning("coordinator.edge_refused", edge_id=hello.edge_id, reason=reason)
            wire.send(self._sock, m.Refused(reason), identity)
            return
        is_new = identity not in self.edges
        self.edges[identity] = time.monotonic()
        if is_new:
            log.info("coordinator.edge_joined", edge_id=hello.edge_id)
            if (table := self._table(dead=[])) is not None:
                wire.send(self._sock, table, identity)

    def _current(self, identity: bytes, node_id: str, epoch: int) -> Member | None:
        """The member if this epoch is its live one; otherwise answer as the epoch deserves."""
        verdict, member = self.membership.classify(node_id, epoch)
        if verdict is Verdict.CURRENT:
            member.identity = identity
            return member
        if verdict is Verdict.FENCED:
            self._decoder.fenced()
            log.info("coordinator.fenced", node_id=node_id, epoch=epoch, cause=member.cause)
            wire.send(self._sock, m.Fence(epoch, member.cause), identity)
        elif verdict is Verdict.UNKNOWN:
            log.info("coordinator.unknown_node", node_id=node_id, epoch=epoch)
            wire.send(self._sock, m.Reregister(epoch, "unknown node or epoch"), identity)
        return None

    # -- failure detection and publishing -----------------------------------------------------

    async def monitor(self) -> None:
        """Every quarter interval: declare the dead (a check every half interval added up to
        50 ms to detection: 253-342 ms were seen after a kill -9 with 300 ms of silence
        allowed); every interval: refresh the edges' load."""
        interval_s = self.config.heartbeat_interval_s
        period_s = interval_s / 4
        woke_at, excused = time.monotonic(), False
        while True:
            await asyncio.sleep(period_s)
            slept_at, woke_at = woke_at, time.monotonic()
            stalled_s = woke_at - slept_at - period_s
            if stalled_s > interval_s and not excused:
                # this process did not run: the heartbeats of that time may wait unread in
                # its socket, so judge no one until the receive loop has had its turn (one
                # pass at most: a coordinator late every pass still judges)
                log.warning("coordinator.stalled", stalled_s=round(stalled_s, 3))
                self.membership.excuse(stalled_s)
                excused = True
                continue
            excused = False
            for member, cause in self.membership.find_dead():
                self._declare_dead(member, cause)
            for node_id in self.membership.forget_dead():
                log.info("coordinator.dead_forgotten", node_id=node_id)
            self._forget_silent_edges()
            self._lend_threads()  # a node dead long enough lends its threads
            if time.monotonic() - self._last_publish_at >= interval_s:
                self._publish()

    async def publish_changes(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            self._publish()

    def _declare_dead(self, member: Member, cause: str) -> None:
        group = self.membership.group_of(member)
        self.metrics.observe_death(cause, self.membership.clock() - member.last_heard_at)
        self.membership.declare_dead(member, cause)
        log.warning(
            "coordinator.node_dead", node_id=member.node_id, epoch=member.epoch, cause=cause
        )
        for other in group:
            if other is not member:  # its shard cannot run without this one
                log.warning(
                    "coordinator.replica_down", replica=other.replica, node_id=other.node_id
                )
                wire.send(self._sock, m.Shutdown("abort"), other.identity)
        self._changed_dead.append(member.node_id)
        self._mark_changed()

    def _mark_changed(self) -> None:
        self._changed.set()
        self._lend_threads()

    def _lend_threads(self) -> None:
        """Tell each live node whose share of its host's threads changed (thread_grants)."""
        members, after_s = self.membership.members.values(), self.config.lend_threads_after_s
        for node_id, num_threads in thread_grants(members, time.monotonic(), after_s).items():
            member = self.membership.members[node_id]
            if num_threads != member.threads_granted:
                member.threads_granted = num_threads
                log.info("coordinator.threads", node_id=node_id, num_threads=num_threads)
                wire.send(self._sock, m.Threads(member.epoch, num_threads), member.identity)

    def _publish(self) -> None:
        self._last_publish_at = time.monotonic()
        table = self._table(dead=self._changed_dead)
        if table is None:
            return
        self._changed_dead = []
        for identity in list(self.edges):
            wire.send(self._sock, table, identity)

    def _table(self, dead: list[str]) -> m.Routes | None:
        """The routing table; None while it would be the first and says nothing (no route,
        no one dead): edges keep the table they have until then (after a restart, the old
        coordinator's, whose nodes are registering again)."""
        routes = self.membership.routes()
        if not (routes or dead or self._has_published):
            return None
        self._has_published = True
        self.routes_version += 1
        return m.Routes(self.routes_version, routes, list(dead))

    def _forget_silent_edges(self) -> None:
        now = time.monotonic()
        for identity, heard_at in list(self.edges.items()):
            if now - heard_at > self.config.edge_timeout_s:
                log.info("coordinator.edge_forgotten", edge_id=identity.decode(errors="replace"))
                del self.edges[identity]
