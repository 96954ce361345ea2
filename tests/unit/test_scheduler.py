"""The scheduler alone (no model): budgets, chunking, admission and preemption."""

from __future__ import annotations

from p3.engine.block_manager import BlockManager
from p3.engine.scheduler import Scheduler
from p3.engine.sequence import Request, Sequence, Status

BS = 4


def make(num_blocks=16, max_num_seqs=8, budget=32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget)


def add(s: Scheduler, rid: str, n: int) -> Sequence:
    seq = Sequence(Request(rid, list(range(1, n + 1))), BS, arrival=len(s.waiting))
    s.add(seq)
    return seq


def complete(s: Scheduler, batch, sample: bool = True) -> None:
    """What the engine does after the model ran: mark computed, append a token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        if sample and seq.num_computed_tokens == len(seq):
            seq.append_token(7)


def test_long_prompt_is_split_into_chunks_under_the_budget():
    s = make(budget=10)
    seq = add(s, "a", 25)
    sizes = []
    while seq.num_computed_tokens < 25:
        batch = s.schedule()
        sizes.append(batch.num_new_tokens[0])
        complete(s, batch, sample=False)
    assert sizes == [10, 10, 5]


def test_decodes_go_first_and_new_prompts_take_the_rest():
    s = make(budget=12)
    a = add(s, "a", 5)
    complete(s, s.schedule())
    add(s, "b", 20)
    batch = s.schedule()
    assert batch.seqs[0] is a and batch.num_new_tokens == [1, 11]


def test_max_num_seqs_caps_admission():
    s = make(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 3)
    assert len(s.schedule().seqs) == 2 and len(s.waiting) == 1


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    s = make(num_blocks=4, budget=64)
    a, b = add(s, "a", 8), add(s, "b", 8)  # two blocks each: the cache is full
    complete(s, s.schedule())
    batch = s.schedule()  # both need a third block: b is preempted
    assert batch.preempted == [b] and batch.seqs == [a]
    assert b.status is Status.WAITING and s.waiting[0] is b and b.block_table == []
    assert s.num_preemptions == 1


def test_finish_frees_blocks_wherever_the_sequence_is():
    s = make()
    a, b = add(s, "a", 6), add(s, "b", 6)
    s.schedule()
    s.finish(a, "abort")
    assert a.status is Status.FINISHED and a.block_table == []
    assert s.running == [b]


def test_a_stream_moved_here_mid_way_goes_ahead_of_fresh_prompts():
    s = make(budget=8)
    add(s, "fresh-1", 8)
    add(s, "fresh-2", 8)
    moved = Sequence(Request("moved", list(range(1, 7)), output_token_ids=(9, 9)), BS, arrival=2)
    s.add(moved)
    assert [seq.request_id for seq in s.waiting] == ["moved", "fresh-1", "fresh-2"]
    batch = s.schedule()
    assert batch.seqs[0] is moved and batch.num_new_tokens[0] == 8  # prompt and its 2 outputs
