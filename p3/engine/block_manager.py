"""The paged KV cache's bookkeeping: block ids, reference counts, prefix caching. No torch.

A full block whose tokens are computed is registered under a hash of its tokens and of every
token before it (a hash chain). A later sequence with the same prefix shares those blocks
instead of computing them again. A block whose last user is gone keeps its hash and waits in
the free pool (least recently freed first to be reused), so it can still be revived.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from p3.engine.sequence import Sequence

NO_HASH = -1


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()


def chain_hash(token_ids: tuple[int, ...], prefix_hash: int) -> int:
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give seq fresh blocks for its next num_new_tokens (call can_allocate first)."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def find_cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block id, chain hash) of seq's leading full blocks already in the cache, always
        leaving one token to compute so that the step yields logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[int, int]] = []
        prefix_hash = seq.hash_root
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.block_tokens(i))
            prefix_hash = chain_hash(tokens, prefix_hash)
            block_id = self.hash_to_block.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append((block_id, prefix_hash))
        return hits

    def num_revived(self, hits: list[tuple[int, int]]) -> int:
        """How many of these cached blocks sit in the free pool (sharing them uses it up)."""
        return sum(1 for block_id, _ in hits if block_id in self.free)

    def share_prefix(self, seq: Sequence, hits: list[tuple[int, int]]) -> None:
        for block_id, _ in hits:
            self.free.pop(block_id, None)
            self.blocks[block_id].ref_count += 1
        seq.block_table = [block_id for block_id, _ in hits]
        seq.block_hashes = [h for _, h in hits]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put seq's newly completed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            prefix_hash = seq.block_hashes[-1] if seq.block_hashes else seq.hash_root
            tokens = tuple(seq.block_tokens(i))
            prefix_hash = chain_hash(tokens, prefix_hash)
            seq.block_hashes.append(prefix_hash)
            block = self.blocks[seq.block_table[i]]
            if block.hash == NO_HASH and prefix_hash not in self.hash_to_block:
                block.hash, block.token_ids = prefix_hash, tokens
                self.hash_to_block[prefix_hash] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail is freed first, reused first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = NO_HASH, (), 1
        return block_id
