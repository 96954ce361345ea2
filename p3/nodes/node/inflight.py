"""The node's in-flight requests: who asked (edge identity), under which epoch, how far along.

Turns one engine step's outputs into one Tokens message per (edge, epoch): an edge gets a
single message per step carrying all of its requests' new tokens. A request is stamped with
the epoch it was submitted under, so a node that re-registers (coordinator restart) keeps
streaming its older requests under the epoch the edge knows them by.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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

    @property
    def num_tokens_to_do(self) -> int:
        """Work left, as a router weighs it: the prompt until the first token, then the
        outputs still allowed (m.expected_output_tokens when there is no max_tokens)."""
        prompt = self.num_prompt_tokens if not self.num_output_tokens else 0
        return prompt + max(1, m.expected_output_tokens(self.max_tokens) - self.num_output_tokens)


class InFlightTable:
    def __init__(self) -> None:
        self._requests: dict[str, InFlight] = {}
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
        """Deltas grouped by (edge, epoch); outputs of requests no longer here are dropped."""
        batches: dict[tuple[bytes, int], list[m.TokenDelta]] = {}
        for out in outputs:
            entry = self._requests.get(out.request_id)
            if entry is None:  # cancelled, fenced or aborted: its edge no longer wants it
                continue
            batches.setdefault((entry.edge, entry.epoch), []).append(self._delta(entry, out))
            if out.finished:
                del self._requests[out.request_id]
        return batches

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
