"""The block manager alone: allocation, reference counts, prefix caching, eviction."""

from __future__ import annotations

from p3.engine.block_manager import BlockManager
from p3.engine.sequence import Request, Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(Request(rid, tokens), BS, arrival=0)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Admit s as the scheduler would and mark every token computed."""
    hits = bm.find_cached_prefix(s)
    bm.share_prefix(s, hits)
    bm.allocate(s, len(s) - s.num_computed_tokens)
    s.num_computed_tokens = len(s)
    bm.register_full_blocks(s)
    return s


def test_allocate_rounds_up_to_whole_blocks():
    bm = BlockManager(8, BS)
    s = seq(list(range(9)))
    assert bm.blocks_needed(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5


def test_free_returns_every_block():
    bm = BlockManager(8, BS)
    s = computed(bm, seq(list(range(10))))
    bm.free_sequence(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_shared_prefix_reuses_full_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(8, BS)
    a = computed(bm, seq(list(range(8)), "a"))
    b = seq(list(range(8)), "b")  # identical 2-block prompt: only block 0 may be shared
    hits = bm.find_cached_prefix(b)
    assert [h[0] for h in hits] == a.block_table[:1]
    bm.share_prefix(b, hits)
    assert b.num_computed_tokens == b.num_cached_tokens == BS
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_prefix_differs_in_second_block_shares_only_the_first():
    bm = BlockManager(8, BS)
    computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    hits = bm.find_cached_prefix(seq([1, 2, 3, 4, 5, 6, 7, 0, 9], "b"))
    assert len(hits) == 1


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(3, BS)
    a = computed(bm, seq(list(range(9)), "a"))
    bm.free_sequence(a)
    b = seq(list(range(9)), "b")
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2 and bm.num_revived(hits) == 2


def test_reusing_a_free_block_evicts_its_hash():
    bm = BlockManager(2, BS)
    a = computed(bm, seq(list(range(8)), "a"))
    bm.free_sequence(a)
    computed(bm, seq([9] * 8, "b"))  # takes both blocks for new content
    assert bm.find_cached_prefix(seq(list(range(9)), "c")) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    computed(bm, seq(list(range(9)), "a"))
    assert bm.find_cached_prefix(seq(list(range(9)), "b")) == []
    assert bm.hash_to_block == {}
