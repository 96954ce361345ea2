"""An edge's view of the cluster: routes from the coordinator, one DEALER per node, routing.

`Cluster` is the part of an edge that has no HTTP in it, shared by p3.nodes.edge.edge and
p3.client. It says EdgeHello to the coordinator every second, keeps the latest routing
table, connects a DEALER to every routed node, picks the least-loaded replica of a model
(the table's load plus what this edge sent since that table, so a burst does not herd onto
one replica), and hands each Tokens/Rejected message to the request that owns the sample.
A node listed dead fails its samples; Tokens under another epoch than the one the sample
was submitted under drop.

The coordinator is off the token path: while it is away no table comes, and the edge routes
on its last one (it says hello often then, so a restarted coordinator knows it at once). A
node that registers again with a restarted coordinator is routed under a new epoch, but it
was not fenced: it streams on under the epoch its samples were submitted under, so those
epochs stay accepted until the node is listed dead. A node routed from another process
(a new address or pid: it died and was started again) lost the samples of the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import monitor as zmq_monitor

from p3.log import get_logger, log_exception
from p3.nodes.cluster.adopting import AdoptedAt, Adopting
from p3.nodes.cluster.moves import MovesUnderWay
from p3.nodes.cluster.samples import Sample
from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.security import COORDINATOR, Keyring, Member

log = get_logger(__name__)

HELLO_INTERVAL_S = 1.0
QUIET_AFTER_S = 2.0  # no table this long (it comes every heartbeat): the coordinator is away
LOAD_GRAIN = 256  # tokens of work left below which two replicas count as equally loaded
FIRST_HELLO_INTERVAL_S = 0.05
LINK_PING_S = 0.2  # ZMTP heartbeat on every edge->node link
LINK_TIMEOUT_S = 1.0  # no traffic (pongs included) this long: the link is down
ADOPT_RETRY_S = 0.1  # how often an edge asks again for a stream to adopt
MAX_HELD_DELTAS = 4096  # of a sample being adopted, before it is attached
DEAD_LISTED_S = 300.0  # a node declared dead stays listed (/cluster) this long


@dataclass(frozen=True)
class NodeLost:
    """Put on a request's queue when the node serving one of its samples is declared dead."""

    node_id: str
    reason: str
    alive: bool = False  # the link broke, not the node: cancel the sample there too


# (sample, what happened, perf_counter when its frame arrived: the edge's egress time starts)
Event = tuple[Sample, m.TokenDelta | m.Rejected | NodeLost, float]


class NodeLink:
    """One DEALER to one node, and the task that reads it."""

    def __init__(self, cluster: Cluster, route: m.Route):
        self.node_id = route.node_id
        self.address = route.address
        self.pid = route.pid  # the process behind the address, as last routed
        self.socket = wire.make_socket(
            cluster.ctx,
            zmq.DEALER,
            identity=cluster.edge_id,
            keyring=cluster.keyring,
            server=Member("node", route.node_id),  # only that node's key answers here
        )
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, int(LINK_PING_S * 1000))
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LINK_TIMEOUT_S * 1000))
        self.socket.setsockopt(zmq.HEARTBEAT_TTL, int(LINK_TIMEOUT_S * 1000))
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(route.address)
        self.reader = asyncio.create_task(cluster.read_node(self), name=f"read.{self.node_id}")
        self.watcher = asyncio.create_task(cluster.watch_link(self), name=f"link.{self.node_id}")
        for task in (self.reader, self.watcher):  # they run forever: an end is a failure
            task.add_done_callback(lambda t: cluster.link_task_ended(self, t))

    def close(self) -> None:
        self.reader.cancel()
        self.watcher.cancel()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


class Cluster:
    def __init__(
        self,
        coordinator: str,
        edge_id: str,
        keyring: Keyring | None = None,
        # called with each table's routed models (model -> a route of it)
        on_models: Callable[[dict[str, m.Route]], Any] | None = None,
    ):
        self.coordinator = coordinator
        self.edge_id = edge_id
        self.keyring = keyring  # this edge's member keys, when the cluster has keys
        self.ctx = zmq.asyncio.Context()
        self.routes: dict[str, m.Route] = {}  # READY replicas' rank 0 nodes, by node id
        self.shards: list[m.Route] = []  # their other ranks: listed, never routed to
        self.epochs: dict[str, set[int]] = {}  # per node: the epochs we may hear from it under
        self.links: dict[str, NodeLink] = {}
        self.sent_load: dict[str, int] = {}  # work this edge sent since the last table
        self.moves = MovesUnderWay()  # streams moved to each node, not heard from since
        self.progress_at: dict[str, float] = {}  # node id -> when its work last advanced
        self.inflight: dict[str, tuple[Sample, asyncio.Queue[Event]]] = {}
        self.routes_version = -1
        self.routes_at = 0.0  # when the last table came (monotonic)
        self.dead_nodes: dict[str, float] = {}  # declared dead and not routed since: when
        self._unlinkable: set[str] = set()  # routed nodes whose key this edge has not
        self._tokenizer_waiters: dict[tuple[str, str], asyncio.Future[dict[str, bytes]]] = {}
        self._adapter_waiters: dict[tuple[str, str], asyncio.Future[m.AdapterDone]] = {}
        self._adopting: dict[str, Adopting] = {}  # stream id -> what its nodes sent so far
        # adopted samples' deltas that came before the sample was attached here
        self._held: dict[str, list[tuple[m.TokenDelta, str, float, int]]] = {}
        self.routes_changed = asyncio.Event()
        self.on_models = on_models
        self.on_tokens: Callable[[m.Tokens], Any] | None = None
        self._coordinator_socket: zmq.asyncio.Socket | None = None
        self._decode_coordinator = wire.edge_from_coordinator()
        self._decode_node = wire.edge_from_node()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self._coordinator_socket = wire.make_socket(
            self.ctx,
            zmq.DEALER,
            connect=self.coordinator,
            identity=self.edge_id,
            immediate=True,
            keyring=self.keyring,
            server=Member(COORDINATOR, COORDINATOR),
        )

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._coordinator_socket is not None:
            self._coordinator_socket.close(linger=0)
        self.ctx.term()

    def loops(self) -> list:
        return [self.hello_loop(), self.coordinator_loop()]

    async def hello_loop(self) -> None:
        hello = m.EdgeHello(m.PROTOCOL_VERSION, self.edge_id)
        heard = False
        while True:
            wire.send(self._coordinator_socket, hello)
            # until the first table, or while tables do not come, say it often
            was_heard, heard = heard, time.monotonic() - self.routes_at < QUIET_AFTER_S
            if was_heard and not heard:
                log.warning("edge.coordinator_quiet", routing_on_version=self.routes_version)
            await asyncio.sleep(HELLO_INTERVAL_S if heard else FIRST_HELLO_INTERVAL_S)

    async def coordinator_loop(self) -> None:
        while True:
            match await wire.recv_dealt(self._coordinator_socket, self._decode_coordinator):
                case m.Routes() as routes:
                    self.on_routes(routes)
                case m.Refused(reason=reason):
                    log.error("edge.refused", coordinator=self.coordinator, reason=reason)

    async def read_node(self, link: NodeLink) -> None:
        while True:
            match await wire.recv_dealt(link.socket, self._decode_node):
                case m.Tokens() as tokens:
                    self.on_node_tokens(link.node_id, tokens)
                case m.Rejected() as rejected:
                    self._deliver(rejected.request_id, rejected, link.node_id)
                case m.TakenOver() as taken:
                    for request_id in taken.request_ids:
                        self._deliver(request_id, taken, link.node_id)
                case m.Adopted() as adopted:
                    self.on_adopted(link.node_id, adopted)
                case m.AdapterDone() as done:
                    waiter = self._adapter_waiters.pop((link.node_id, done.name), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(done)
                case m.TokenizerFiles() as files:
                    waiter = self._tokenizer_waiters.pop((link.node_id, files.tokenizer_hash), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(files.files)

    async def watch_link(self, link: NodeLink) -> None:
        while True:
            event = zmq_monitor.parse_monitor_message(await link.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.link_lost(link.node_id)

    def link_task_ended(self, link: NodeLink, task: asyncio.Task) -> None:
        """A link's reader or watcher ended other than by close(): log why, treat the link as
        lost (its samples move) and drop it, so the next routes table links the node anew."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            log.error("edge.link_task_failed", node_id=link.node_id, task=task.get_name(),
                      error_type=None, error="returned")  # fmt: skip
        else:
            log_exception(log, "edge.link_task_failed", exc, node_id=link.node_id,
                          task=task.get_name())  # fmt: skip
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
            link.close()
            self.link_lost(link.node_id)

    def link_lost(self, node_id: str) -> None:
        """Frames to or from node_id may be lost: its samples move (and are cancelled there)."""
        num = self._lose_samples(node_id, "link to the node lost", alive=True)
        log.warning("edge.link_lost", node_id=node_id, num_samples=num)

    # -- the routing table -----------------------------------------------------------------

    def on_routes(self, table: m.Routes) -> None:
        members = {(r.node_id, r.epoch) for r in table.routes}
        members_ids = {node_id for node_id, _ in members}
        known = {(r.node_id, r.epoch) for r in [*self.routes.values(), *self.shards]}
        if members != known or table.dead:
            log.info("edge.routes", version=table.version, nodes=sorted(members), dead=table.dead)
        self.routes_version, self.routes_at = table.version, time.monotonic()
        for node_id in table.dead:
            self._node_dead(node_id)
        previous = self.routes
        self.routes = {r.node_id: r for r in table.routes if r.replica_rank == 0}
        self.shards = [r for r in table.routes if r.replica_rank > 0]
        now = time.monotonic()
        for node_id, dead_at in list(self.dead_nodes.items()):  # listed for a while, not forever
            if node_id in members_ids or now - dead_at > DEAD_LISTED_S:
                del self.dead_nodes[node_id]
        self.sent_load.clear()
        for route in list(self.routes.values()):
            old = previous.get(route.node_id)
            if old is not None and route.load.num_tokens_processed > old.load.num_tokens_processed:
                self.progress_at[route.node_id] = time.monotonic()  # its queue moves
            if not self._link(route):
                del self.routes[route.node_id]
        self.routes_changed.set()
        self.routes_changed = asyncio.Event()
        if self.on_models is not None:
            self.on_models({r.model: r for r in self.routes.values()})

    async def fetch_tokenizer(self, route: m.Route, timeout_s: float = 60.0) -> dict[str, bytes]:
        """The tokenizer files route's node announced, from the node itself (over the link,
        authenticated with keys), checked against the announced hash."""
        from p3.tokenizer import tokenizer_files_hash

        link = self.links.get(route.node_id)
        if link is None or not route.tokenizer_hash:
            raise ValueError(f"node {route.node_id!r} announced no tokenizer")
        key = (route.node_id, route.tokenizer_hash)
        waiter = self._tokenizer_waiters.get(key)
        if waiter is None:
            waiter = self._tokenizer_waiters[key] = asyncio.get_running_loop().create_future()
            wire.send(link.socket, m.GetTokenizer(route.tokenizer_hash))
        try:
            async with asyncio.timeout(timeout_s):
                files = await asyncio.shield(waiter)
        finally:
            if self._tokenizer_waiters.get(key) is waiter and not waiter.done():
                del self._tokenizer_waiters[key]
        if not files or tokenizer_files_hash(files) != route.tokenizer_hash:
            raise ValueError(f"node {route.node_id!r} sent tokenizer files that fail their hash")
        return files

    async def adopt(
        self,
        stream_id: str,
        complete: Callable[[list[AdoptedAt]], bool] = bool,
        timeout_s: float = 2.0,
    ) -> list[AdoptedAt] | None:
        """Ask every linked node for the orphaned samples of stream_id until what they sent
        is complete(found) (a stream's samples may be on several nodes): (node id, sample)
        of each; None if not so within timeout_s, after cancelling what did come. Asked
        again every ADOPT_RETRY_S: a node orphans a stream only once a send to its dead edge
        fails, which a client quick to resume elsewhere can beat."""
        adopting = Adopting(complete)
        self._adopting[stream_id] = adopting
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for link in self.links.values():
                        wire.send(link.socket, m.Adopt(stream_id))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(adopting.complete.wait(), ADOPT_RETRY_S)
                        return list(adopting.found.values())
        except TimeoutError:
            self.release(list(adopting.found.values()))
            return None
        finally:
            self._adopting.pop(stream_id, None)

    def on_adopted(self, node_id: str, adopted: m.Adopted) -> None:
        """A node's answer to Adopt: its samples stream here from now on. Their deltas are
        held until the stream is rebuilt (attach), and heard under the epochs the samples
        were submitted in: a node that registered again with a restarted coordinator keeps
        its streams under their old epochs, which an edge started since was never routed."""
        adopting = self._adopting.get(adopted.stream_id)
        if adopting is None:
            return
        adopting.add(node_id, adopted.samples)
        epochs = self.epochs.setdefault(node_id, set())
        for sample in adopted.samples:
            self._held.setdefault(sample.submit.request_id, [])
            epochs.add(sample.submit.epoch)

    def release(self, found: list[AdoptedAt]) -> None:
        """Adopted samples this edge will not serve after all: stopped on their nodes."""
        for node_id, sample in found:
            self._held.pop(sample.submit.request_id, None)
            if not sample.finished and (link := self.links.get(node_id)) is not None:
                wire.send(link.socket, m.Cancel(sample.submit.request_id))

    def attach(self, sample: Sample, queue: asyncio.Queue[Event], node_id: str, epoch: int):
        """An adopted sample, already running on node_id under epoch: its tokens come here."""
        journal = sample.journal
        journal.node_id, journal.epoch = node_id, epoch
        journal.tried_nodes.add(node_id)
        self.epochs.setdefault(node_id, set()).add(epoch)
        self.inflight[sample.request_id] = (sample, queue)
        for delta, node, received_at, delta_epoch in self._held.pop(sample.request_id, []):
            self._deliver(sample.request_id, delta, node, received_at, delta_epoch)

    def _link(self, route: m.Route) -> bool:
        """Link route's node (again, if it moved); False if it cannot be (no key for it)."""
        link = self.links.get(route.node_id)
        if link is not None and (link.address, link.pid) != (route.address, route.pid):
            self._lose_samples(route.node_id, "node restarted")  # the old process is gone
            self.epochs.pop(route.node_id, None)
        epochs = self.epochs.setdefault(route.node_id, set())
        if route.epoch not in epochs:  # registered again: older epochs live while used
            epochs &= {s.journal.epoch for s, _ in self._samples_on(route.node_id)}
            epochs.add(route.epoch)
        if link is not None and link.address == route.address:
            link.pid = route.pid
            return True
        if link is not None:
            link.close()
            del self.links[route.node_id]
        try:
            self.links[route.node_id] = NodeLink(self, route)
        except ValueError as exc:  # a node the coordinator admitted, whose key we lack
            if route.node_id not in self._unlinkable:
                self._unlinkable.add(route.node_id)
                log.error("edge.node_unlinkable", node_id=route.node_id, error=str(exc))
            return False
        self._unlinkable.discard(route.node_id)
        return True

    def _node_dead(self, node_id: str) -> None:
        log.warning("edge.node_dead", node_id=node_id)
        self.dead_nodes[node_id] = time.monotonic()
        self.epochs.pop(node_id, None)
        if (link := self.links.pop(node_id, None)) is not None:
            link.close()
        self._lose_samples(node_id, "node declared dead")

    def _samples_on(self, node_id: str) -> list[tuple[Sample, asyncio.Queue[Event]]]:
        return [(s, q) for s, q in self.inflight.values() if s.journal.node_id == node_id]

    def _lose_samples(self, node_id: str, reason: str, alive: bool = False) -> int:
        """Every sample on node_id moves (its request gets NodeLost); how many there were."""
        lost = self._samples_on(node_id)
        for sample, queue in lost:
            queue.put_nowait((sample, NodeLost(node_id, reason, alive), time.perf_counter()))
        return len(lost)

    def progressed_within(self, node_id: str, seconds: float) -> bool:
        """Whether node_id's work advanced in the last `seconds`: Tokens came from it, or its
        reports count more tokens processed (a busy node's queue moves: it is not stuck)."""
        return time.monotonic() - self.progress_at.get(node_id, float("-inf")) < seconds

    def replicas(self, model: str, lora: str = "") -> list[m.Route]:
        """The routed replicas of model (holding the LoRA adapter lora, if one is named)."""
        return [
            r for r in self.routes.values() if r.model == model and (not lora or lora in r.adapters)
        ]

    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> the model its replicas serve it on."""
        return {name: r.model for r in self.routes.values() for name in r.adapters}

    async def tell_adapter(
        self, routes: list[m.Route], msg: m.LoadAdapter | m.UnloadAdapter, timeout_s: float
    ) -> list[m.AdapterDone]:
        """Send an adapter load or unload to these nodes; their answers (a node that does not
        answer in time counts as a failure)."""
        waiters = []
        for route in routes:
            future = asyncio.get_running_loop().create_future()
            self._adapter_waiters[(route.node_id, msg.name)] = future
            link = self.links.get(route.node_id)
            if link is None or not wire.send(link.socket, msg):
                future.set_result(m.AdapterDone(msg.name, False, "unreachable", route.node_id))
            waiters.append((route.node_id, future))
        answers = []
        for node_id, future in waiters:
            try:
                answers.append(await asyncio.wait_for(future, timeout_s))
            except TimeoutError:
                answers.append(m.AdapterDone(msg.name, False, "no answer in time", node_id))
            finally:
                self._adapter_waiters.pop((node_id, msg.name), None)
        return answers

    def load(self, route: m.Route) -> int:
        """Tokens of work the replica has left: its last report (every edge's requests) plus
        what this edge sent it since (optimistic local increments between tables)."""
        return route.load.num_tokens_to_do + self.sent_load.get(route.node_id, 0)

    def pick(
        self, model: str, exclude: set[str] = frozenset(), lora: str = ""
    ) -> m.Route | None:
        """The least-loaded ready replica of model, or None. Loads within LOAD_GRAIN tokens
        of each other count as equal (a request's worth: finer differences are noise of
        timing); among those, the replica given the least work in all (processed + left), so
        that over time the work evens out too; then at random."""
        candidates = [r for r in self.replicas(model, lora) if r.node_id not in exclude]
        if not candidates:
            return None
        return min(
            candidates, key=lambda r: (self.load(r) // LOAD_GRAIN, self.work(r), random.random())
        )

    def work(self, route: m.Route) -> int:
        """Every token of work this replica was given, done or not (as far as we know)."""
        return route.load.num_tokens_processed + self.load(route)

    # -- requests --------------------------------------------------------------------------

    def submit(
        self, sample: Sample, queue: asyncio.Queue[Event], exclude: set[str] | None = None
    ) -> bool:
        """Send a sample to the least-loaded replica not excluded (default: not tried yet);
        False if none is left."""
        journal = sample.journal
        tried = journal.tried_nodes if exclude is None else exclude
        route = self.pick(journal.model, tried, journal.lora)
        if route is None:
            return False
        journal.node_id, journal.epoch = route.node_id, route.epoch
        journal.tried_nodes.add(route.node_id)
        journal.num_attempts += 1
        # registered only once sent (nothing can answer before this returns to the loop), so
        # a send that raises leaves no entry behind
        if not wire.send(self.links[route.node_id].socket, journal.submit_message()):
            return self.submit(sample, queue, (exclude or set()) | {route.node_id})
        self.inflight[sample.request_id] = (sample, queue)
        cost = len(journal.prompt_token_ids) + m.expected_output_tokens(journal.params.max_tokens)
        self.sent_load[route.node_id] = self.sent_load.get(route.node_id, 0) + cost
        return True

    def holds(self, sample: Sample) -> bool:
        """Whether the sample is submitted to a node (its tokens come here)."""
        return sample.request_id in self.inflight

    def cancel(self, sample: Sample) -> None:
        """Forget a sample; tell its node to stop it (unknown ids are ignored there)."""
        self.inflight.pop(sample.request_id, None)
        link = self.links.get(sample.journal.node_id or "")
        if link is not None:
            wire.send(link.socket, m.Cancel(sample.request_id))

    def forget(self, sample: Sample) -> None:
        self.inflight.pop(sample.request_id, None)

    def on_node_tokens(self, node_id: str, tokens: m.Tokens) -> None:
        if tokens.epoch not in self.epochs.get(node_id, ()) or tokens.node_id != node_id:
            self._decode_node.fenced()
            log.warning(
                "edge.tokens_dropped",
                node_id=node_id,
                epoch=tokens.epoch,
                routed_epochs=sorted(self.epochs.get(node_id, ())),
            )
            return
        self.progress_at[node_id] = time.monotonic()
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        received_at = time.perf_counter()
        for delta in tokens.deltas:
            self._deliver(delta.request_id, delta, node_id, received_at, tokens.epoch)

    def _deliver(
        self,
        request_id: str,
        msg: m.TokenDelta | m.Rejected | m.TakenOver,
        node_id: str,
        received_at: float | None = None,
        epoch: int | None = None,
    ) -> None:
        entry = self.inflight.get(request_id)
        if entry is None:
            held = self._held.get(request_id)
            if held is not None and isinstance(msg, m.TokenDelta) and len(held) < MAX_HELD_DELTAS:
                held.append((msg, node_id, received_at or time.perf_counter(), epoch or 0))
            return  # being adopted (attach() delivers what is held), or nothing waits for it
        sample, queue = entry
        if sample.journal.node_id != node_id:
            return  # from a node the sample has moved away from: the new one speaks for it
        if epoch is not None and epoch != sample.journal.epoch:
            return  # from an older submission to this node (it moved away and came back)
        queue.put_nowait((sample, msg, received_at or time.perf_counter()))

