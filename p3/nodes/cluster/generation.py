"""One request's life on the cluster: submit its samples, stream their Deltas, end exactly once.

`Generation` is an async iterator of Deltas over all its samples. A Rejected sample is
resubmitted to another replica (definite: nothing was generated) unless the request itself
is bad. A sample whose node is declared dead, or whose tokens stop for `timeout_s`, moves:
its prompt and the tokens already streamed go to another ready replica, which continues at
the same positions with the same seed, so the client sees the stream it would have seen (the
journal drops anything repeated; tokens from the node it left are ignored). Moved streams
are spread over the replicas left by the work of the moves before them (the cluster's
`MovesUnderWay`), since a node prefills them ahead of fresh prompts. The request
fails (RequestFailed) only when no replica can take it, or after MAX_IDLE_MOVES moves in a row
with no token in between (a request that kills every node it lands on). Leaving the
iteration early (client gone) cancels every sample still running on its node.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from enum import StrEnum

from p3.log import get_logger
from p3.nodes.cluster.links import Cluster, Event, NodeLost
from p3.nodes.cluster.samples import Delta, Sample
from p3.protocol import messages as m

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 60.0
QUEUED_ROUNDS = 3  # token timeouts a sample may wait queued on a node that progresses
MAX_IDLE_MOVES = 3  # moves in a row without a new token: a request that kills every node it
# lands on stops moving; a stream that progresses between faults survives any number of them
BUSY_RETRIES, BUSY_RETRY_S = 10, 0.2  # a node where an earlier submission of it still runs


class RetryBusy:
    """Queued BUSY_RETRY_S after a busy refusal: submit the sample again (the Cancel sent for
    its earlier submission has taken effect by then)."""


class FailureCode(StrEnum):
    """Why a request could not finish; the HTTP status the edge answers with is beside it."""

    BAD_REQUEST = "bad_request"  # 400: a node refused it as invalid (every node would)
    NO_REPLICA = "no_replica"  # 503: no ready replica serves its model, or none would take it
    OVERLOADED = "overloaded"  # 503: every replica refused it as full
    TIMEOUT = "timeout"  # 504: no token for --token-timeout on every replica it tried
    NODE_DEAD = "node_dead"  # its node died and no other replica could take it over:
    LINK_LOST = "link_lost"  # its link failed, likewise: 503 if nothing was sent, else 500


FAILURE_HTTP_STATUS = {
    FailureCode.BAD_REQUEST: 400,
    FailureCode.NO_REPLICA: 503,
    FailureCode.OVERLOADED: 503,
    FailureCode.TIMEOUT: 504,
}


class RequestFailed(Exception):
    """A request that cannot finish. definite: nothing was generated (safe to retry)."""

    def __init__(self, message: str, code: FailureCode, definite: bool):
        super().__init__(message)
        self.message = message
        self.code = FailureCode(code)
        self.definite = definite

    @property
    def http_status(self) -> int:
        return FAILURE_HTTP_STATUS.get(self.code, 503 if self.definite else 500)


class HandedOver(Exception):
    """Another edge adopted the request's stream (its client resumed there): this edge stops
    serving it, and leaves its samples alone on their nodes."""


class Generation:
    def __init__(
        self, cluster: Cluster, samples: list[Sample], timeout_s: float = DEFAULT_TIMEOUT_S
    ):
        self.cluster = cluster
        self.samples = samples
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.started = time.perf_counter()
        self.first_token_s: float | None = None  # time to the first token of any sample
        self.last_token_at: float | None = None
        self.inter_token_s: list[float] = []
        self.submitted_at: float | None = None  # when the last sample's Submit left
        self.received_at = 0.0  # when the frame of the latest Delta arrived from its node
        self._quiet: dict[int, int] = {}  # sample index -> token timeouts in a row on its node
        self._busy: dict[int, int] = {}  # sample index -> busy refusals it waited out
        self.handed_over = False  # another edge adopted the stream
        self.moves: list[FailureCode] = []  # why each sample that moved did, one per move
        self._moves = cluster.moves

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.samples]

    async def start(self) -> None:
        """Submit every sample; RequestFailed(no_replica) if the model has no ready replica."""
        for sample in self.samples:
            if not self.cluster.submit(sample, self.queue):
                self.close()
                raise RequestFailed(
                    f"no ready replica of model {sample.journal.model!r}",
                    FailureCode.NO_REPLICA,
                    True,
                )
        self.submitted_at = time.perf_counter()

    async def stream(self) -> AsyncIterator[Delta]:
        """Deltas of every sample as they come; use with contextlib.aclosing."""
        try:
            while not all(s.finished for s in self.samples):
                sample, msg, self.received_at = await self._next_event()
                delta = self._handle(sample, msg)
                if delta is not None:
                    self._timing(delta)
                    yield delta
        finally:
            self.close()

    def close(self) -> None:
        """Cancel every sample that has not finished on its node (none, once handed over)."""
        for sample in self.samples:
            if not sample.finished and not self.handed_over:
                sample.finish_reason = "abort"
                self.cluster.cancel(sample)
            self.cluster.forget(sample)
            self._moves.drop(sample.request_id)

    async def _next_event(self) -> Event:
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    event = await self.queue.get()
            except TimeoutError:
                log.warning(
                    "edge.request_timeout", request_ids=self.request_ids, after_s=self.timeout_s
                )
                for sample in self.samples:
                    if sample.finished:
                        continue
                    self._quiet[sample.index] = self._quiet.get(sample.index, 0) + 1
                    if self._only_queued(sample):
                        continue
                    self.cluster.cancel(sample)  # the stuck node: stop it there
                    sample.journal.stuck_nodes.add(sample.journal.node_id or "")
                    self._move(sample, f"no tokens for {self.timeout_s:g} s", FailureCode.TIMEOUT)
            else:
                self._quiet.clear()
                return event

    def _only_queued(self, sample: Sample) -> bool:
        """Its node works on (tokens come for other requests, or its reports show progress),
        so the sample is waiting its turn there: moving it would start its prompt again
        behind another queue. Up to QUEUED_ROUNDS timeouts in a row; then it moves anyway."""
        recent = self.cluster.progressed_within(sample.journal.node_id or "", self.timeout_s)
        return recent and self._quiet.get(sample.index, 0) < QUEUED_ROUNDS

    def _handle(
        self, sample: Sample, msg: m.TokenDelta | m.Rejected | m.TakenOver | NodeLost
    ) -> Delta | None:
        match msg:
            case m.TokenDelta() if msg.index > sample.num_output_tokens and not sample.finished:
                # tokens between were lost on the link: what the node holds is no use
                gap = f"tokens {sample.num_output_tokens}..{msg.index - 1} lost on the link"
                self._leave_live_node(sample, gap)
            case m.TokenDelta():
                delta = sample.apply(msg)
                if delta is not None:
                    self._moves.drop(sample.request_id)  # prefilled (or never moved)
                if sample.finished:
                    self._finished(sample, msg)
                return delta
            case m.Rejected():
                self._rejected(sample, msg)
            case RetryBusy() if not sample.finished and not self.cluster.holds(sample):
                if not self.cluster.submit(sample, self.queue, set()):  # any replica now
                    definite = sample.num_output_tokens == 0
                    raise RequestFailed("no replica left", FailureCode.NO_REPLICA, definite)
            case m.TakenOver():
                self.handed_over = True
                raise HandedOver(f"stream {msg.stream_id} was resumed on another edge")
            case NodeLost() if msg.node_id == sample.journal.node_id:  # not one it left
                if msg.alive:
                    self._leave_live_node(sample, f"{msg.reason} ({msg.node_id})")
                else:
                    self.cluster.forget(sample)
                    cause = f"node {msg.node_id} died ({msg.reason})"
                    self._move(sample, cause, FailureCode.NODE_DEAD)
        return None

    def _leave_live_node(self, sample: Sample, cause: str) -> None:
        """Its link lost frames, but the node lives: cancel it there, move it on."""
        self.cluster.cancel(sample)
        self._move(sample, cause, FailureCode.LINK_LOST, may_stay=True)

    def _move(self, sample: Sample, cause: str, code: FailureCode, may_stay: bool = False) -> None:
        """Resubmit an unfinished sample elsewhere, continuing after the tokens it has.
        may_stay: the node it leaves is alive (its link failed), so when no other replica
        is there, it may go back to the same one."""
        journal = sample.journal
        left = journal.node_id
        progressed = len(journal.token_ids) > journal.tokens_at_move
        journal.num_idle_moves = 1 if progressed else journal.num_idle_moves + 1
        if journal.num_idle_moves > MAX_IDLE_MOVES:
            raise RequestFailed(
                f"{cause}; moved {MAX_IDLE_MOVES} times in a row with no token", code,
                len(journal.token_ids) == 0,
            )  # fmt: skip
        journal.tokens_at_move = len(journal.token_ids)
        self._quiet.pop(sample.index, None)
        dead = set(self.cluster.dead_nodes) | journal.stuck_nodes  # stuck: may still hold it
        exclude = {left} | dead if left else dead
        self._moves.drop(sample.request_id)
        if not self._submit_moved(sample, exclude) and not (
            may_stay and left not in dead and self.cluster.submit(sample, self.queue, dead)
        ):
            definite = sample.num_output_tokens == 0
            log.warning("edge.request_failed", request_id=sample.request_id, cause=cause)
            raise RequestFailed(f"{cause}, and no other replica can take it", code, definite)
        log.warning(
            "edge.request_moved",
            request_id=sample.request_id,
            cause=cause,
            left=left,
            to=journal.node_id,
            num_tokens=sample.num_output_tokens,
        )
        self.moves.append(code)
        if sample.num_output_tokens:
            num_tokens = len(journal.prompt_token_ids) + sample.num_output_tokens
            self._moves.add(journal.node_id or "", sample.request_id, num_tokens)

    def _submit_moved(self, sample: Sample, exclude: set[str]) -> bool:
        """A stream under way goes to the replica not excluded with the least moved work
        under way (MovesUnderWay), then the least loaded; one with no token yet, like a
        fresh request (the cluster's pick). False if no replica took it."""
        if sample.num_output_tokens:
            journal = sample.journal
            replicas = self.cluster.replicas(journal.model, journal.lora)
            candidates = [r for r in replicas if r.node_id not in exclude]
            if candidates:
                target = min(candidates, key=lambda r: (
                    self._moves.tokens(r.node_id), self.cluster.load(r), random.random()
                ))  # fmt: skip
                others = {r.node_id for r in candidates} - {target.node_id}
                if self.cluster.submit(sample, self.queue, exclude | others):
                    return True
        return self.cluster.submit(sample, self.queue, exclude)

    def _finished(self, sample: Sample, delta: m.TokenDelta) -> None:
        if delta.finish_reason is None:  # a stop string ended it: free the node's KV now
            self.cluster.cancel(sample)
        else:
            self.cluster.forget(sample)

    def _rejected(self, sample: Sample, rejected: m.Rejected) -> None:
        log.info(
            "edge.request_rejected",
            request_id=sample.request_id,
            node_id=sample.journal.node_id,
            code=rejected.code,
            reason=rejected.reason,
        )
        self._moves.drop(sample.request_id)
        if rejected.code == "bad_request":
            raise RequestFailed(rejected.reason, FailureCode.BAD_REQUEST, True)
        if self.cluster.submit(sample, self.queue):
            return
        if rejected.code == "busy" and self._busy.get(sample.index, 0) < BUSY_RETRIES:
            # an earlier submission of it still runs there, its Cancel lost with a link that
            # reset; and no other replica is left: stop it again, and come back once it is
            self._busy[sample.index] = self._busy.get(sample.index, 0) + 1
            self.cluster.cancel(sample)
            retry = (sample, RetryBusy(), time.perf_counter())
            asyncio.get_running_loop().call_later(BUSY_RETRY_S, self.queue.put_nowait, retry)
            return
        full = rejected.code == "overloaded"
        code = FailureCode.OVERLOADED if full else FailureCode.NO_REPLICA
        definite = sample.num_output_tokens == 0  # a moved sample has sent tokens
        raise RequestFailed(f"every replica refused: {rejected.reason}", code, definite)

    def _timing(self, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
        elif self.last_token_at is not None:
            self.inter_token_s.append((now - self.last_token_at) / len(delta.token_ids))
        self.last_token_at = now
