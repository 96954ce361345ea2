"""The node's in-flight requests: who asked (edge identity), under which epoch, how far along.

Turns one engine step's outputs into one Tokens message per (edge, epoch): an edge gets a
single message per step carrying all of its requests' new tokens. A request is stamped with
the epoch it was submitted under, so a node that re-registers (coordinator restart) keeps
streaming its older requests under the epoch the edge knows them by.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p3.engine.sequence import StepOutput
from p3.protocol import messages as m


@dataclass(slots=True)
class InFlight:
    request_id: str
    edge: bytes
    epoch: int
    num_prompt_tokens: int
    num_output_tokens: int = 0
    max_tokens: int | None = None
    submit: m.Submit | None = None  # a resumable stream's Submit (its stream_id set)
    history: list[m.TokenDelta] = field(default_factory=list)  # its deltas, for an adopter
    orphaned_at: float | None = None  # when its edge went away
    finished: bool = False
    finished_at: float = 0.0

    @property
    def stream_id(self) -> str:
        return self.submit.stream_id if self.submit is not None else ""

    @property
    def num_tokens_to_do(self) -> int:
        """Work left, as a router weighs it: the prompt until the first token, then the
        outputs still allowed (m.expected_output_tokens when there is no max_tokens)."""
        prompt = self.num_prompt_tokens if not self.num_output_tokens else 0
        return prompt + max(1, m.expected_output_tokens(self.max_tokens) - self.num_output_tokens)


MAX_ENDED = 10_000  # finished samples of resumable streams kept for an adopter, at most


class InFlightTable:
    """Requests whose edge is there, and orphans: resumable streams whose edge went away,
    still generating (or finished) for a grace period, until an edge adopts them. A
    resumable stream's samples that finished while their edge was there are kept as long
    (`ended`): a stream of several samples resumes elsewhere only with all of them."""

    def __init__(self) -> None:
        self._requests: dict[str, InFlight] = {}
        self.orphans: dict[str, InFlight] = {}
        self.ended: dict[str, InFlight] = {}
        self.busy_since = time.monotonic()  # when the table last went from empty to not

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, entry: InFlight) -> None:
        if not self._requests:
            self.busy_since = time.monotonic()
        self._requests[entry.request_id] = entry

    def get(self, request_id: str) -> InFlight | None:
        return self._requests.get(request_id)

    def pop(self, request_id: str) -> InFlight | None:
        return self._requests.pop(request_id, None)

    def cancel(self, request_id: str) -> InFlight | None:
        """Its edge cancelled it (a stop string ended it there, or its client left): gone,
        but a resumable stream's sample is kept as ended, for an adopter of its stream."""
        entry = self._requests.pop(request_id, None)
        if entry is not None and entry.submit is not None:
            self._ended(entry)
        return entry

    def remove_where(self, matches: Callable[[InFlight], bool]) -> list[InFlight]:
        """Remove (and return) every entry for which matches(entry) is true."""
        gone = [e for e in self._requests.values() if matches(e)]
        for entry in gone:
            del self._requests[entry.request_id]
        return gone

    @property
    def num_tokens_in_flight(self) -> int:
        return sum(e.num_prompt_tokens + e.num_output_tokens for e in self._requests.values())

    @property
    def num_tokens_to_do(self) -> int:
        return sum(e.num_tokens_to_do for e in self._requests.values())

    def batch(self, outputs: list[StepOutput]) -> dict[tuple[bytes, int], list[m.TokenDelta]]:
        """Deltas grouped by (edge, epoch); outputs of requests no longer here are dropped,
        orphans' are kept in their history."""
        batches: dict[tuple[bytes, int], list[m.TokenDelta]] = {}
        for out in outputs:
            entry = self._requests.get(out.request_id) or self.orphans.get(out.request_id)
            if entry is None:  # cancelled, fenced or aborted: its edge no longer wants it
                continue
            delta = self._delta(entry, out)
            if entry.submit is not None:
                entry.history.append(delta)
            if entry.orphaned_at is not None:
                entry.finished = entry.finished or out.finished
                continue
            batches.setdefault((entry.edge, entry.epoch), []).append(delta)
            if out.finished:
                del self._requests[out.request_id]
                if entry.submit is not None:
                    self._ended(entry)
        return batches

    def _ended(self, entry: InFlight) -> None:
        entry.finished, entry.finished_at = True, time.monotonic()
        self.ended[entry.request_id] = entry
        if len(self.ended) > MAX_ENDED:
            del self.ended[next(iter(self.ended))]

    def orphan(self, edge: bytes, now: float) -> tuple[list[InFlight], list[InFlight]]:
        """Edge went away: its resumable streams become orphans, the rest are removed.
        (orphaned, removed)"""
        gone = self.remove_where(lambda e: e.edge == edge)
        kept = [e for e in gone if e.submit is not None]
        for entry in kept:
            entry.orphaned_at = now
            self.orphans[entry.request_id] = entry
        return kept, [e for e in gone if e.submit is None]

    def adopt(
        self, stream_id: str, edge: bytes
    ) -> tuple[list[InFlight], dict[bytes, list[str]]]:
        """The samples of stream_id, now edge's: unfinished ones stream to it from here on.
        Orphans, and samples another edge still has (its client resumed here: that edge
        loses them, named in the dict, edge -> request ids). Its samples that had ended come
        along (kept, for another adopter too): only reading them, whoever had them."""
        ended = [e for e in self.ended.values() if e.stream_id == stream_id]
        found = [e for e in self.orphans.values() if e.stream_id == stream_id]
        for entry in found:
            del self.orphans[entry.request_id]
            entry.edge, entry.orphaned_at = edge, None
            if entry.finished:  # while an orphan: kept for the next adopter too
                self._ended(entry)
            else:
                self.add(entry)
        taken: dict[bytes, list[str]] = {}
        for entry in self._requests.values():
            if entry.stream_id == stream_id and entry.edge != edge:
                taken.setdefault(entry.edge, []).append(entry.request_id)
                entry.edge = edge
                found.append(entry)
        return found + ended, taken

    def expire_orphans(self, older_than: float) -> list[InFlight]:
        """Orphans no edge adopted since older_than: removed (the caller cancels them); ended
        samples finished before it are forgotten."""
        gone = [e for e in self.orphans.values() if e.orphaned_at < older_than]
        for entry in gone:
            del self.orphans[entry.request_id]
        for entry in [e for e in self.ended.values() if e.finished_at < older_than]:
            del self.ended[entry.request_id]
        return gone

    def _delta(self, entry: InFlight, out: StepOutput) -> m.TokenDelta:
        index = entry.num_output_tokens
        entry.num_output_tokens += len(out.new_token_ids)
        return m.TokenDelta(
            request_id=out.request_id,
            token_ids=out.new_token_ids,
            index=index,
            logprobs=out.logprobs,
            top_logprobs=out.top_logprobs,
            finish_reason=out.finish_reason,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            prompt_logprobs=out.prompt_logprobs,
            embedding=out.embedding,
        )

    def abort_deltas(self) -> dict[tuple[bytes, int], list[m.TokenDelta]]:
        """Empty all entries; a final "abort" delta for each, grouped like batch()."""
        batches: dict[tuple[bytes, int], list[m.TokenDelta]] = {}
        for entry in self.remove_where(lambda _: True):
            delta = m.TokenDelta(
                request_id=entry.request_id,
                token_ids=[],
                index=entry.num_output_tokens,
                finish_reason="abort",
                num_prompt_tokens=entry.num_prompt_tokens,
            )
            batches.setdefault((entry.edge, entry.epoch), []).append(delta)
        return batches
