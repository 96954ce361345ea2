"""A node: one replica's engine behind a ROUTER for edges, a DEALER to the coordinator.

    Hello -> Welcome(epoch) -> load the engine (in a thread; heartbeats keep flowing)
          -> Ready(KV blocks, max length) -> Heartbeat every interval, carrying progress.

The engine steps on its own thread (stepper.py); the event loop only does I/O. Each step's
outputs become one Tokens message per edge. Fence: abort that epoch's requests (their
edges have moved them) and register again. Reregister (the coordinator restarted): register
again, keep streaming. Stop "drain" finishes in-flight requests (bounded), "abort" ends them
with finish_reason "abort"; both end with Goodbye. An error in a step sends Fatal and fails.

A tensor-parallel shard is welcomed unplaced and loads once Place says its rank: rank 0
hosts the replica's torch.distributed store (telling the coordinator where, in Rendezvous)
and serves; the other ranks join it and follow rank 0's steps until it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from enum import StrEnum
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from p3 import tracing
from p3.engine.engine import Engine
from p3.engine.parallel import host_rendezvous, init_shard
from p3.engine.sequence import Request, StepOutput
from p3.log import get_logger
from p3.nodes.actor.base import Actor
from p3.nodes.coordinator import placement
from p3.nodes.node import reports
from p3.nodes.node.adapters import NodeAdapters
from p3.nodes.node.config import NodeConfig, advertised_address
from p3.nodes.node.inflight import InFlight, InFlightTable
from p3.nodes.node.rejoin import Rejoin
from p3.nodes.node.stepper import StepFaults, StepThread
from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.sampling import from_wire
from p3.protocol.security import COORDINATOR, Door, Gate, Keyring, Member, routing_name
from p3.status import NodeMetrics, StatusServer, start_status
from p3.tokenizer import read_tokenizer_files, tokenizer_files_hash

log = get_logger(__name__)


class NodeFailed(RuntimeError):
    pass


class NodeState(StrEnum):
    """Where a node's engine is; whether the coordinator knows it is `registered`, apart.

    unplaced -> loading -> serving -> draining, and failed from any of them.
    """

    UNPLACED = "unplaced"  # no Place yet: not told which shard of which replica to load
    LOADING = "loading"  # the engine is being built on the step thread
    SERVING = "serving"  # takes Submits
    DRAINING = "draining"  # stopping: finishes in-flight requests, takes no new ones
    FAILED = "failed"  # a step or the load raised; Fatal sent, the actor ends


class Node(Actor):
    kind = "node"
    serves_after_setup = False  # serving once the engine is loaded (on_loaded)

    def __init__(self, config: NodeConfig, faults: StepFaults | None = None):
        super().__init__(config.node_id)
        self.config = config
        self.faults = faults or StepFaults.from_env()
        self.epoch = 0  # the latest epoch we were welcomed under
        self.fenced_epoch = 0  # the highest epoch we were fenced under
        self.registered = False  # the coordinator knows us under self.epoch
        self.state = NodeState.UNPLACED
        self.heartbeat_interval_s = 0.1
        self.engine: Engine | None = None
        self.stepper: StepThread | None = None
        self.inflight = InFlightTable()
        self.address = ""
        self.memory_bytes = 0  # what Hello reports (set in setup)
        self.model_bytes = 0
        self.place: m.Place | None = None  # this node's shard of its replica
        self._placed = asyncio.Event()
        self._kick = asyncio.Event()
        self._idle = asyncio.Event()
        self._tokenizer: tuple[str, dict[str, bytes]] | None = None  # (hash, files) once loaded
        self._rejoin = Rejoin()
        self._failure: BaseException | None = None  # set with state FAILED
        self._failed = asyncio.Event()
        self.adapters = NodeAdapters(config.node_id, self._send_edge)
        self.traces = tracing.SampleTraces()
        self.metrics = NodeMetrics(config.model_name)
        self.status_server: StatusServer | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def setup(self) -> None:
        cfg = self.config
        self.memory_bytes = placement.available_memory(cfg.engine.device)
        engine = cfg.engine
        self.model_bytes = placement.model_bytes(
            cfg.model, engine.torch_dtype.itemsize, engine.quantization
        )
        self._ctx = zmq.asyncio.Context()
        keyring = Keyring(cfg.keys, "node", cfg.node_id) if cfg.keys else None
        self._gate = Gate(self._ctx, keyring, admits=("edge",)) if keyring else None
        self._door = Door(keyring) if keyring else None
        self._edges = wire.make_socket(self._ctx, zmq.ROUTER, bind=cfg.bind, keyring=keyring)
        self._coordinator = wire.make_socket(
            self._ctx,
            zmq.DEALER,
            connect=cfg.coordinator,
            identity=cfg.node_id,
            immediate=True,
            keyring=keyring,
            server=Member(COORDINATOR, COORDINATOR),
        )
        self.address = advertised_address(
            wire.bound_address(self._edges), cfg.advertise_host, cfg.advertise_port
        )
        self._edge_decoder = wire.node_from_edge()
        self._coordinator_decoder = wire.node_from_coordinator()
        log.info("node.listening", node_id=cfg.node_id, address=self.address)
        if os.environ.get("P3_FAULT_SIGNALS") == "1":
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, self.faults.raise_next)
            loop.add_signal_handler(signal.SIGUSR2, self.faults.hang)
        self.status_server = await start_status(
            self, cfg.status_host, cfg.status_port, self._serves, self.metrics
        )

    def _serves(self) -> bool:
        """Ready for /ready: the engine is loaded and the coordinator knows us."""
        return self.state is NodeState.SERVING and self.registered

    def loops(self):
        return [
            self.receive_edges(),
            self.receive_coordinator(),
            self.tick(),
            self.load_engine(),
            self.watch_failure(),
        ]

    @property
    def draining(self) -> bool:
        return self.state is NodeState.DRAINING

    async def drain(self) -> None:
        if self.state is not NodeState.FAILED:
            self.state = NodeState.DRAINING
        self._kick.set()  # tell the coordinator now, so routes drop us
        log.info("node.draining", node_id=self.name, num_in_flight=len(self.inflight))
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                while len(self.inflight):
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            log.warning("node.drain_timeout", num_in_flight=len(self.inflight))

    async def teardown(self) -> None:
        if self.state is not NodeState.FAILED:
            self._abort_all("stop")
            if self.registered:
                wire.send(self._coordinator, m.Goodbye(self.name, self.epoch))
        if self.stepper is not None:
            await asyncio.to_thread(self.stepper.stop)
        await asyncio.to_thread(tracing.shutdown)  # its samples' spans, ended above
        if self.status_server is not None:
            await self.status_server.stop()
        self._edges.close(linger=500)  # let the last Tokens and Goodbye leave
        self._coordinator.close(linger=500)
        if self._gate is not None:
            self._gate.stop()
        await asyncio.to_thread(self._ctx.term)

    # -- the coordinator ------------------------------------------------------------------

    async def tick(self) -> None:
        """Hello with backoff until welcomed, then a Heartbeat every interval. Fenced, the node
        says Hello again only once the step it was fenced in has ended, and after a delay that
        doubles with each fence in a row: a node too slow for the cluster's patience must not
        loop through deaths."""
        backoff_s = 0.05
        while True:
            self._expire_orphans()
            if self.registered:
                wire.send(self._coordinator, reports.heartbeat(self))
                delay_s, backoff_s = self.heartbeat_interval_s, 0.05
            elif self.stop_requested:
                delay_s = 0.05  # going: no Hello (a lost replica's rank must not be placed)
            elif self._rejoin.may(self.stepper is not None and self.stepper.in_step):
                wire.send(self._coordinator, reports.hello(self))
                delay_s, backoff_s = backoff_s, min(backoff_s * 2, self.config.hello_backoff_max_s)
            else:
                delay_s = 0.05
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._kick.wait()
            self._kick.clear()
            if (late_s := time.monotonic() - started - delay_s) > self.heartbeat_interval_s:
                log.warning("node.heartbeat_late", node_id=self.name, late_s=round(late_s, 3))

    async def receive_coordinator(self) -> None:
        while True:
            match await wire.recv_dealt(self._coordinator, self._coordinator_decoder):
                case m.Welcome() as welcome:
                    self.on_welcome(welcome)
                case m.Fence() as fence:
                    self.on_fence(fence)
                case m.Reregister() as again:
                    self.on_reregister(again)
                case m.Place() as place:
                    self.on_place(place)
                case m.Threads(epoch=epoch, num_threads=num) if epoch == self.epoch:
                    if self.stepper is not None:
                        self.stepper.set_threads(min(num, reports.threads(self.config)[1]))
                case m.Refused(reason=reason):
                    log.error("node.refused", node_id=self.name, reason=reason)
                    self._fail(NodeFailed(f"refused by the coordinator: {reason}"))
                case m.Shutdown(mode=mode):
                    log.info("node.shutdown_requested", node_id=self.name, mode=mode)
                    self.stop(mode if mode in ("drain", "abort") else "drain")

    def on_welcome(self, welcome: m.Welcome) -> None:
        if welcome.epoch <= self.epoch:
            return  # an answer to an older Hello
        self.epoch, self.registered = welcome.epoch, True
        self.heartbeat_interval_s = welcome.heartbeat_interval_s
        log.info("node.welcomed", node_id=self.name, epoch=self.epoch, replica=welcome.replica)
        self._kick.set()
        if self.stepper is not None:  # registered anew: back to its own threads
            self.stepper.set_threads(reports.threads(self.config)[0])
        if welcome.placed and self.place is None:
            self.on_place(m.Place(welcome.epoch, welcome.replica, 0, 1))
        if self.engine is not None:
            self._send_ready()

    def on_place(self, place: m.Place) -> None:
        if place.epoch != self.epoch or self.place is not None:
            return  # for an older registration, or placed already (the engine is built)
        log.info(
            "node.placed", node_id=self.name, replica=place.replica,
            replica_rank=place.replica_rank, tp=place.tp_size, pp=place.pp_size,
        )  # fmt: skip
        self.place = place
        self.state = NodeState.LOADING
        self._placed.set()

    def on_fence(self, fence: m.Fence) -> None:
        live = fence.epoch >= self.epoch and self.registered  # fenced in our live epoch
        delay_s = self._rejoin.fenced() if live else 0.0
        self.fenced_epoch = max(self.fenced_epoch, fence.epoch)
        aborted = self.inflight.remove_where(lambda e: e.epoch <= fence.epoch)
        aborted += self.inflight.expire_orphans(float("inf"))  # their epoch is over too
        self._cancel_in_engine(aborted)
        log.warning(
            "node.fenced", node_id=self.name, epoch=fence.epoch, reason=fence.reason,
            num_aborted=len(aborted), rejoin_after_s=delay_s,
        )  # fmt: skip
        if live and self._in_group():
            # its shard is joined to peers the coordinator has shut down: it cannot serve a
            # replica formed anew (it would ignore the Place), so it goes, to be started fresh
            log.warning("node.replica_lost", node_id=self.name, epoch=fence.epoch)
            self.registered = False
            self.stop("abort")
        elif live:
            self.registered = False
            self._kick.set()

    def _in_group(self) -> bool:
        return self.place is not None and self.place.tp_size * self.place.pp_size > 1

    def on_reregister(self, again: m.Reregister) -> None:
        if again.epoch != self.epoch or not self.registered:
            return
        log.info("node.reregistering", node_id=self.name, epoch=self.epoch, reason=again.reason)
        self.registered = False
        self._kick.set()

    def _send_ready(self) -> None:
        hashed = self._tokenizer[0] if self._tokenizer else ""
        ready = reports.ready(
            self.name, self.epoch, self.config, self.engine, hashed, self.adapters.names()
        )
        wire.send(self._coordinator, ready)

    # -- the engine -------------------------------------------------------------------------

    async def load_engine(self) -> None:
        await self._placed.wait()
        place = self.place
        log.info("node.loading", node_id=self.name, model=self.config.model_name)
        build = functools.partial(Engine, self.config.model, self.config.engine)
        if place.tp_size * place.pp_size > 1:
            build = self._shard_builder(place)

        def build_and_read_tokenizer() -> Engine:  # on the step thread, off the loop
            engine = build()
            self.adapters.preload(engine, self.config.loras)
            skip = self.config.skip_tokenizer_init
            self._tokenizer = None if skip else _tokenizer_files(engine.model_dir)
            if engine.shard.is_leader:  # it samples: grammars' tokenizer now, not mid-serve
                engine.grammars.warm()
            return engine

        self.stepper = StepThread(
            build_and_read_tokenizer,
            asyncio.get_running_loop(),
            self.on_loaded,
            self.on_step,
            self._fail,
            on_released=lambda: self.stop("drain"),
            faults=self.faults,
        )
        self.stepper.start()

    def _shard_builder(self, place: m.Place):
        """Join the replica's process group (rank 0 hosts it), then load this rank's slice:
        both on the step thread, which is where this process's torch work belongs."""
        device = self.config.engine.torch_device
        host = urlsplit(self.address).hostname or "127.0.0.1"  # the address peers reach us at
        if place.replica_rank == 0:
            store = host_rendezvous(host, place.tp_size * place.pp_size)
            wire.send(self._coordinator, m.Rendezvous(self.name, self.epoch, host, store.port))
            join = functools.partial(
                init_shard, 0, place.tp_size, place.pp_size, device, store=store, host=host
            )
        else:
            leader, _, port = place.rendezvous.rpartition(":")
            join = functools.partial(
                init_shard,
                place.replica_rank,
                place.tp_size,
                place.pp_size,
                device,
                address=(leader, int(port)),
                host=host,
            )

        def build() -> Engine:
            return Engine(self.config.model, self.config.engine, join())

        return build

    def on_loaded(self, engine: Engine) -> None:
        self.engine = engine  # its tokenizer's files were read as it was built
        self.metrics.queue_times_s = engine.scheduler.queue_times_s
        if self.state is NodeState.LOADING:
            self.state = NodeState.SERVING
        if self.registered:
            self._send_ready()
        self.mark_serving()  # loaded (Ready goes out once welcomed)

    def ready_info(self) -> dict:
        info = {"node_id": self.name, "address": self.address, "epoch": self.epoch}
        info["state"] = str(self.state)
        if self.engine is not None:  # serving: the engine is built
            info["kv_cache_dtype"] = self.engine.config.kv_cache_dtype
            info["num_kv_blocks"] = self.engine.num_kv_blocks
        if self.status_server is not None:
            info["status_url"] = self.status_server.url
        return info

    def on_step(self, step: int, outputs: list[StepOutput], started_at: float) -> None:
        self.traces.on_step(outputs, started_at, self.inflight)
        for (edge, epoch), deltas in self.inflight.batch(outputs).items():
            if not self._send_edge(edge, m.Tokens(self.name, epoch, step, deltas)):
                self._forget_edge(edge)
        self._note_if_idle()

    async def watch_failure(self) -> None:
        await self._failed.wait()
        raise self._failure

    def _fail(self, exc: BaseException) -> None:
        """Node-fatal: a last Fatal to the coordinator, then the actor fails (exit non-zero)."""
        if self.state is NodeState.FAILED:
            return
        self.state, self._failure = NodeState.FAILED, exc
        log.error("node.fatal", node_id=self.name, epoch=self.epoch, error=repr(exc))
        wire.send(self._coordinator, m.Fatal(self.name, self.epoch, repr(exc)[:500]))
        self._failed.set()

    # -- edges ------------------------------------------------------------------------------

    async def receive_edges(self) -> None:
        while True:
            edge, msg = await wire.recv_routed(self._edges, self._edge_decoder, self._door)
            match msg:
                case m.Submit():
                    self.on_submit(edge, msg)
                case m.Cancel(request_id=request_id):
                    self.on_cancel(edge, request_id)
                case m.Ping(nonce=nonce):
                    self._send_edge(edge, m.Pong(nonce, self.name, self.epoch))
                case m.Adopt(stream_id=stream_id):
                    self.on_adopt(edge, stream_id)
                case m.LoadAdapter():
                    self.adapters.on_load(edge, msg, self.engine)
                case m.UnloadAdapter():
                    self.adapters.on_unload(edge, msg, self.engine)
                case m.GetTokenizer(tokenizer_hash=wanted):
                    ours = self._tokenizer is not None and self._tokenizer[0] == wanted
                    files = self._tokenizer[1] if ours else {}
                    self._send_edge(edge, m.TokenizerFiles(wanted, files))

    def on_submit(self, edge: bytes, submit: m.Submit) -> None:
        refusal = self._refusal(submit)
        if refusal is None:
            try:
                params = from_wire(submit.params)
                lora = self.adapters.request_for(submit.lora) if submit.lora else None
                if submit.lora and lora is None:
                    raise ValueError(f"LoRA adapter {submit.lora!r} is not loaded on this node")
                request = Request(
                    submit.request_id,
                    submit.prompt_token_ids,
                    params,
                    submit.seed,
                    tuple(submit.output_token_ids),
                    embed=submit.embed,
                    lora=lora,
                )
                self.engine.add(request)
            except (ValueError, TypeError, OverflowError) as exc:  # a peer's numbers, not ours
                refusal = ("bad_request", f"{type(exc).__name__}: {exc}"[:500])
        if refusal is not None:
            code, reason = refusal
            log.info("node.rejected", request_id=submit.request_id, code=code, reason=reason)
            self.traces.rejected(submit, edge, code, reason)
            self._send_edge(edge, m.Rejected(submit.request_id, reason, code))
            return
        num_prompt = len(submit.prompt_token_ids)
        entry = InFlight(
            submit.request_id,
            edge,
            submit.epoch,
            num_prompt,
            len(submit.output_token_ids),  # delta indices continue after them
            submit.params.max_tokens,
            submit if submit.stream_id else None,
        )
        self.inflight.add(entry)
        self.traces.submitted(submit, edge)
        self.stepper.wake()

    def _refusal(self, submit: m.Submit) -> tuple[m.RejectCode, str] | None:
        if self.state is not NodeState.SERVING or not self.is_running:
            if self.state in (NodeState.UNPLACED, NodeState.LOADING):
                return "overloaded", "node is still loading its model"
            return "draining", "node is stopping"
        if not self.fenced_epoch < submit.epoch <= self.epoch:  # older: not fenced, re-registered
            self._edge_decoder.fenced()
            return "stale_epoch", f"epoch {submit.epoch} is not a live epoch of this node"
        if submit.request_id in self.inflight or self.engine.holds(submit.request_id):
            # a sample moved back here before its cancel took effect (a hung step): the edge
            # tries elsewhere; the client's request is not at fault
            return "busy", f"request_id {submit.request_id!r} is still running here"
        if len(self.inflight) >= self.config.max_in_flight:
            return "overloaded", f"{len(self.inflight)} requests in flight"
        return None

    def on_cancel(self, edge: bytes, request_id: str) -> None:
        """Only the edge that submitted a request may cancel it."""
        entry = self.inflight.get(request_id)
        if entry is None:
            return
        if entry.edge != edge:
            log.warning("node.cancel_refused", request_id=request_id, edge=routing_name(edge))
            return
        self.inflight.cancel(request_id)
        self._cancel_in_engine([entry])
        log.debug("node.cancelled", request_id=request_id)

    def _send_edge(self, edge: bytes, msg: m.Msg) -> bool:
        return wire.send(self._edges, msg, edge)

    def _forget_edge(self, edge: bytes) -> None:
        """Its resumable streams go on as orphans (for another edge to adopt within
        orphan_grace_s); the rest stop."""
        kept, gone = self.inflight.orphan(edge, time.monotonic())
        log.warning(
            "node.edge_unreachable", edge=routing_name(edge), num_stopped=len(gone),
            num_orphaned=len(kept),
        )  # fmt: skip
        self._cancel_in_engine(gone)

    def on_adopt(self, edge: bytes, stream_id: str) -> None:
        adopted, taken = self.inflight.adopt(stream_id, edge)
        samples = [m.AdoptedSample(e.submit, list(e.history), e.finished) for e in adopted]
        if adopted:
            log.info("node.adopted", stream_id=stream_id, edge=routing_name(edge),
                     taken_from=[routing_name(e) for e in taken])  # fmt: skip
        self._send_edge(edge, m.Adopted(stream_id, samples))
        for old_edge, request_ids in taken.items():
            self._send_edge(old_edge, m.TakenOver(stream_id, request_ids))

    def _expire_orphans(self) -> None:
        expired = self.inflight.expire_orphans(time.monotonic() - self.config.orphan_grace_s)
        if expired:
            log.info("node.orphans_expired", num=len(expired))
            self._cancel_in_engine([e for e in expired if not e.finished])

    def _abort_all(self, cause: str) -> None:
        """End every in-flight request with finish_reason "abort", telling its edge."""
        self._cancel_in_engine(self.inflight.expire_orphans(float("inf")))
        batches = self.inflight.abort_deltas()
        step = self.engine.num_steps if self.engine is not None else 0
        for (edge, epoch), deltas in batches.items():
            self._send_edge(edge, m.Tokens(self.name, epoch, step, deltas))
            self._cancel_in_engine(deltas)
        if batches:
            log.info("node.aborted", cause=cause, num=sum(map(len, batches.values())))
        self._note_if_idle()

    def _cancel_in_engine(self, entries) -> None:
        self.traces.cancelled(entries)
        if self.engine is None or not entries:
            return
        for entry in entries:
            self.engine.cancel(entry.request_id)
        self.stepper.wake()
        self._note_if_idle()

    def _note_if_idle(self) -> None:
        if not len(self.inflight):
            self._idle.set()


def _tokenizer_files(model_dir) -> tuple[str, dict[str, bytes]] | None:
    """(hash, files) of the model's tokenizer, for edges to fetch; None without one (edges
    then send token ids only)."""
    try:
        files = read_tokenizer_files(model_dir)
    except OSError as exc:
        log.warning("node.no_tokenizer", model_dir=str(model_dir), error=str(exc))
        return None
    return tokenizer_files_hash(files), files
