"""An edge adopting a stream: its samples as the nodes holding them hand them over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from p3.protocol import messages as m

AdoptedAt = tuple[str, m.AdoptedSample]  # (the node holding it, the sample)


class Adopting:
    """One stream's samples as its nodes hand them over, until they are complete."""

    def __init__(self, complete: Callable[[list[AdoptedAt]], bool]):
        self.is_complete = complete
        self.found: dict[str, AdoptedAt] = {}  # request id -> (node id, sample)
        self.complete = asyncio.Event()

    def add(self, node_id: str, samples: list[m.AdoptedSample]) -> None:
        for sample in samples:  # a sample on two nodes (moving as it was adopted): the
            have = self.found.get(sample.submit.request_id)  # further one is the live one
            if have is None or num_tokens(sample) >= num_tokens(have[1]):
                self.found[sample.submit.request_id] = (node_id, sample)
        if self.found and self.is_complete(list(self.found.values())):
            self.complete.set()


def num_tokens(sample: m.AdoptedSample) -> int:
    return len(sample.submit.output_token_ids) + sum(len(d.token_ids) for d in sample.history)
