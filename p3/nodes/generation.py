"""One request's life on the cluster: submit its samples, stream their Deltas, end exactly once.

`Generation` is an async iterator of Deltas over all its samples. A Rejected sample is
resubmitted to another replica (definite: nothing was generated) unless the request itself
is bad; a sample whose node dies, or whose tokens stop for `timeout_s`, fails the request
with `RequestFailed`. Leaving the iteration early (client gone) cancels every sample still
running on its node, so the node frees its KV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from p3.log import get_logger
from p3.nodes.requests import Delta, Sample
from p3.nodes.router import Cluster, Event, NodeLost
from p3.protocol import messages as m

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 60.0


class RequestFailed(Exception):
    """A request that cannot finish. definite: nothing was generated (safe to retry)."""

    def __init__(self, message: str, code: str, definite: bool):
        super().__init__(message)
        self.message = message
        self.code = code  # "bad_request" | "no_replica" | "node_dead" | "timeout" | "overloaded"
        self.definite = definite


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

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.samples]

    async def start(self) -> None:
        """Submit every sample; RequestFailed(no_replica) if the model has no ready replica."""
        for sample in self.samples:
            if not self.cluster.submit(sample, self.queue):
                self.close()
                raise RequestFailed(
                    f"no ready replica of model {sample.journal.model!r}", "no_replica", True
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
        """Cancel every sample that has not finished on its node."""
        for sample in self.samples:
            if not sample.finished:
                sample.finish_reason = "abort"
                self.cluster.cancel(sample)
            self.cluster.forget(sample)

    async def _next_event(self) -> Event:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.queue.get()
        except TimeoutError:
            definite = not any(s.num_output_tokens for s in self.samples)
            log.warning(
                "edge.request_timeout", request_ids=self.request_ids, after_s=self.timeout_s
            )
            raise RequestFailed(
                f"no tokens from the node for {self.timeout_s:g} s", "timeout", definite
            ) from None

    def _handle(self, sample: Sample, msg: m.TokenDelta | m.Rejected | NodeLost) -> Delta | None:
        match msg:
            case m.TokenDelta():
                delta = sample.apply(msg)
                if sample.finished:
                    self._finished(sample, msg)
                return delta
            case m.Rejected():
                self._rejected(sample, msg)
            case NodeLost():
                definite = sample.num_output_tokens == 0
                log.warning(
                    "edge.request_failed",
                    request_id=sample.request_id,
                    node_id=msg.node_id,
                    cause="node_dead",
                    num_tokens=sample.num_output_tokens,
                )
                raise RequestFailed(
                    f"node {msg.node_id} serving this request died ({msg.reason})",
                    "node_dead",
                    definite,
                )
        return None

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
        if rejected.code == "bad_request":
            raise RequestFailed(rejected.reason, "bad_request", True)
        if not self.cluster.submit(sample, self.queue):
            code = "overloaded" if rejected.code == "overloaded" else "no_replica"
            raise RequestFailed(f"every replica refused: {rejected.reason}", code, True)

    def _timing(self, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
        elif self.last_token_at is not None:
            self.inter_token_s.append((now - self.last_token_at) / len(delta.token_ids))
        self.last_token_at = now
