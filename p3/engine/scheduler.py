"""Continuous batching: every step admits, continues and finishes sequences under a token budget.

Running sequences go first (each decode costs one token; a prompt still being prefilled takes
what is left of the budget, so long prompts are split into chunks). Waiting sequences are then
admitted in arrival order (streams moved here mid-way ahead of fresh prompts) while budget,
sequence slots and KV blocks last. When KV runs out,
the most recently arrived running sequence is preempted: its blocks are freed and it goes back
to the head of the queue to be recomputed (cheaply, where its blocks stay in the prefix cache).

Under pipeline parallelism each sequence rides in one lane (micro-batch) and `schedule(lane)`
looks at that lane's sequences only, so one lane can be scheduled while another is still in
the pipeline: its sequences are never touched, preempted or rescheduled meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from p3.engine.block_manager import BlockManager
from p3.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: each sequence with how many of its uncomputed tokens to run."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Fresh prompts queue in arrival order. A sequence that comes with outputs (a stream
        moved here from a failed node) goes ahead of them: its client is mid-stream and
        stalled, where a fresh request has not seen its first token yet."""
        if seq.num_output_tokens:
            fresh = (k for k, s in enumerate(self.waiting) if not s.num_output_tokens)
            self.waiting.insert(next(fresh, len(self.waiting)), seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lane: int | None = None) -> ScheduledBatch:
        """The next step's batch: of one lane's sequences, or (None) of all of them."""
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens, lane)
        if not batch.preempted:
            self._schedule_waiting(batch, budget, lane)
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove seq wherever it is and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _schedule_running(self, batch: ScheduledBatch, budget: int, lane: int | None) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or not _in(seq, lane):  # preempted, or not ours
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, num_new, batch, lane):
                self.block_manager.allocate(seq, num_new)
                batch.add(seq, num_new)
                budget -= num_new
        return budget

    def _make_room(
        self, seq: Sequence, num_new: int, batch: ScheduledBatch, lane: int | None
    ) -> bool:
        """Preempt the newest running sequences (of this lane) until seq's next tokens fit;
        False if seq itself had to go."""
        bm = self.block_manager
        while not bm.can_allocate(bm.blocks_needed(seq, num_new)):
            victim = next(s for s in reversed(self.running) if _in(s, lane))  # seq at the latest
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, lane: int | None) -> None:
        bm = self.block_manager
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next((s for s in self.waiting if _in(s, lane)), None)
            if seq is None:
                break
            # prompt logprobs need every prompt position's logits: no cached prefix then
            hits = [] if seq.prompt_logprobs is not None else bm.find_cached_prefix(seq)
            num_new = min(len(seq) - len(hits) * bm.block_size, budget)
            uncached_blocks = -(-(len(hits) * bm.block_size + num_new) // bm.block_size) - len(hits)
            if not bm.can_allocate(bm.num_revived(hits) + uncached_blocks):
                break
            self.waiting.remove(seq)
            bm.share_prefix(seq, hits)
            bm.allocate(seq, num_new)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new


def _in(seq: Sequence, lane: int | None) -> bool:
    return lane is None or seq.lane == lane
