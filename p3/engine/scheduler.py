"""Continuous batching: every step admits, continues and finishes sequences under a token budget.

A step's budget goes, in this order, to:
1. decodes: every running sequence whose prompt is computed costs one token;
2. moved streams (continuations): a sequence that came with outputs (a stream moved here from
   a failed node, or one preempted mid-stream) re-prefills its prompt and outputs before any
   fresh prompt. They queue ahead of fresh prompts, first come first served among themselves,
   and go one after another: a step prefills the first one's tokens (a chunk of the budget
   if they do not fit), and the next ones only while they fit whole within
   MOVED_PACK_TOKENS. Each moved client is mid-stream and stalled, and one prefill costs the
   same per token alone or batched here, so in turn each resumes as early as the work before
   it allows, where batched they would all resume at the end; the survivor's own streams get
   a token every step meanwhile;
3. fresh prompts, only in a step that has no moved stream to prefill: prompts being chunked
   first, then waiting ones admitted in arrival order while budget, sequence slots and KV
   blocks last.
When KV runs out, the most recently arrived running sequence not in the step already is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed
(cheaply, where its blocks stay in the prefix cache). The order never changes a token: a
sequence's tokens do not depend on its batch (docs/design.md, Batch invariance).

Under pipeline parallelism each sequence rides in one lane (micro-batch) and `schedule(lane)`
looks at that lane's sequences only, so one lane can be scheduled while another is still in
the pipeline: its sequences are never touched, preempted or rescheduled meanwhile.

Benchmark switch, not a setting: $P3_BENCH_MOVE_SCHEDULE (read when a Scheduler is made)
brings back an earlier order for scripts/bench_move_pause.py to measure against: `queue`
(moved streams queue ahead of fresh prompts but are batched with them, running sequences
take the budget in arrival order) or `fifo` (arrival order for all). Unset, or `serial`:
the order above.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from p3.engine.block_manager import BlockManager
from p3.engine.sequence import Sequence, Status

MOVED_PACK_TOKENS = 64  # moved streams after the first share a step while they fit in this
MOVE_SCHEDULES = ("serial", "queue", "fifo")
MOVE_SCHEDULE_ENV = "P3_BENCH_MOVE_SCHEDULE"
QUEUE_TIMES_KEPT = 4096


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
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        move_schedule: str | None = None,
    ):
        """move_schedule: None reads $P3_BENCH_MOVE_SCHEDULE (default "serial"); the others
        exist to be measured against (see the module's docstring)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.move_schedule = move_schedule or os.environ.get(MOVE_SCHEDULE_ENV) or "serial"
        if self.move_schedule not in MOVE_SCHEDULES:
            raise ValueError(f"move_schedule must be one of {MOVE_SCHEDULES}")
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_cache_queries = 0  # prompt tokens looked up at admission, ever
        self.num_prefix_cache_hits = 0  # of those, found in the prefix cache
        # how long each sequence waited before its first admission, for the node's metrics
        # to take (bounded: the oldest go when no one takes them)
        self.queue_times_s: deque[float] = deque(maxlen=QUEUE_TIMES_KEPT)

    def add(self, seq: Sequence) -> None:
        """Fresh prompts queue in arrival order. A sequence that comes with outputs (a stream
        moved here from a failed node) goes ahead of them, behind those moved before it: its
        client is mid-stream and stalled, where a fresh request has not seen its first token
        yet."""
        if _moved(seq) and self.move_schedule != "fifo":
            fresh = (k for k, s in enumerate(self.waiting) if not _moved(s))
            self.waiting.insert(next(fresh, len(self.waiting)), seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lane: int | None = None) -> ScheduledBatch:
        """The next step's batch: of one lane's sequences, or (None) of all of them."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.move_schedule != "serial":  # as before moved streams went one by one
            budget = self._schedule_running(batch, budget, lane, list(self.running))
            if not batch.preempted:
                self._schedule_waiting(batch, budget, lane)
            return batch
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        budget = self._schedule_running(batch, budget, lane, decodes)
        if batch.preempted:
            return batch
        budget, num_moved = self._schedule_moved(batch, budget, lane)
        if batch.preempted or num_moved:
            return batch
        chunked = [s for s in self.running if s.num_uncomputed_tokens > 1]
        budget = self._schedule_running(batch, budget, lane, chunked)
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

    def rewindow(self, seq: Sequence) -> None:
        """A streaming sequence whose window's view dropped back: its KV goes, and it waits
        at the head of the queue to compute its new view (a moved stream's priority)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.apply_window()
        seq.reset_for_recompute(preempted=False)
        self.waiting.appendleft(seq)

    def _schedule_running(
        self, batch: ScheduledBatch, budget: int, lane: int | None, seqs: list[Sequence]
    ) -> int:
        """Give running seqs (in this order) their next tokens while the budget lasts."""
        for seq in seqs:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or not _in(seq, lane):  # preempted, or not ours
                continue
            budget -= self._continue(seq, budget, batch, lane)
        return budget

    def _continue(self, seq: Sequence, budget: int, batch: ScheduledBatch, lane: int | None) -> int:
        """Schedule up to budget of running seq's tokens; how many (0: it was preempted)."""
        num_new = min(seq.num_uncomputed_tokens, budget)
        if not self._make_room(seq, num_new, batch, lane):
            return 0
        self.block_manager.allocate(seq, num_new)
        batch.add(seq, num_new)
        return num_new

    def _schedule_moved(
        self, batch: ScheduledBatch, budget: int, lane: int | None
    ) -> tuple[int, int]:
        """Moved streams' prefill, one after another: the first as far as the budget goes,
        the next ones only whole and within MOVED_PACK_TOKENS. (budget left, tokens given)"""
        prefilling = [s for s in self.running if _moved(s) and s.num_uncomputed_tokens > 1]
        queued = [s for s in self.waiting if _moved(s)]
        num_moved = 0
        for seq in prefilling + queued:
            if budget == 0:
                break
            if not _in(seq, lane):
                continue
            room = min(budget, MOVED_PACK_TOKENS - num_moved)
            if num_moved and seq.num_uncomputed_tokens > room:
                break  # the first ones resume before it: a step of their own
            if seq.status is Status.RUNNING:
                num_new = self._continue(seq, budget, batch, lane)
                if batch.preempted:  # no room: nothing more this step
                    break
            else:
                num_new = self._admit(seq, budget, batch, whole=num_moved > 0)
                if not num_new:
                    break
            budget -= num_new
            num_moved += num_new
        return budget, num_moved

    def _make_room(
        self, seq: Sequence, num_new: int, batch: ScheduledBatch, lane: int | None
    ) -> bool:
        """Preempt the newest running sequences (of this lane, not in the batch yet) until
        seq's next tokens fit; False if seq itself had to go."""
        bm = self.block_manager
        while not bm.can_allocate(bm.blocks_needed(seq, num_new)):
            victim = next(  # seq at the latest
                s for s in reversed(self.running)
                if _in(s, lane) and (s is seq or not any(s is b for b in batch.seqs))
            )  # fmt: skip
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
        while budget > 0:
            seq = next((s for s in self.waiting if _in(s, lane)), None)
            if seq is None:
                break
            num_new = self._admit(seq, budget, batch)
            if not num_new:
                break
            budget -= num_new

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch, whole: bool = False) -> int:
        """Start waiting seq with up to budget of its tokens (all of them, if whole); how
        many, or 0 when it cannot start now (no sequence slot, too few KV blocks)."""
        bm = self.block_manager
        if len(self.running) >= self.max_num_seqs:
            return 0
        # prompt logprobs need every prompt position's logits: no cached prefix then
        hits = [] if seq.prompt_logprobs is not None else bm.find_cached_prefix(seq)
        num_left = len(seq) - len(hits) * bm.block_size
        num_new = min(num_left, budget)
        if whole and num_new < num_left:
            return 0
        uncached_blocks = -(-(len(hits) * bm.block_size + num_new) // bm.block_size) - len(hits)
        if not bm.can_allocate(bm.num_revived(hits) + uncached_blocks):
            return 0
        self.waiting.remove(seq)
        bm.share_prefix(seq, hits)
        bm.allocate(seq, num_new)
        self._count_admission(seq, len(hits) * bm.block_size)
        seq.status = Status.RUNNING
        self.running.append(seq)
        batch.add(seq, num_new)
        return num_new

    def _count_admission(self, seq: Sequence, num_hit_tokens: int) -> None:
        if seq.prompt_logprobs is None:  # these never read the prefix cache
            self.num_prefix_cache_queries += len(seq)
            self.num_prefix_cache_hits += num_hit_tokens
        if seq.queued_at is not None:  # its first admission
            self.queue_times_s.append(time.monotonic() - seq.queued_at)
            seq.queued_at = None


def _moved(seq: Sequence) -> bool:
    """A stream under way whose prompt and outputs need computing (again): its client waits
    mid-stream."""
    return seq.num_output_tokens > 0


def _in(seq: Sequence, lane: int | None) -> bool:
    return lane is None or seq.lane == lane
