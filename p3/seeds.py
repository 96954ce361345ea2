"""The seed rule, in one place: failover depends on it. A request's tokens are a function of
(seed, position) alone, so a stream resumed on another replica, or run in any batch, draws
what it would have drawn. No torch here (the edge and the client pick seeds too).

- effective_seed: the client's seed folded into 63 bits, or a fresh random one; the edge
  gives every Submit one, the engine draws one for a request that came without.
- child_seed: sample i > 0 of an n > 1 request gets its own reproducible seed.
- mix_seed: what seeds the generator for one (seed, position) draw (p3.kernels.sampling).
"""

from __future__ import annotations

import random

SEED_BITS = 63
_MASK63 = (1 << SEED_BITS) - 1
_MASK64 = (1 << 64) - 1


def effective_seed(seed: int | None) -> int:
    """The client's seed (folded into 63 bits), or a fresh random one."""
    if seed is None:
        return random.getrandbits(SEED_BITS)
    return seed & _MASK63


def child_seed(seed: int | None, index: int) -> int | None:
    """Sample i of a seeded n > 1 request gets its own, reproducible stream (None stays None:
    the engine draws)."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & _MASK63  # ints hash the same in every process


def mix_seed(seed: int, position: int) -> int:
    """A splitmix64 mix of (seed, position), masked to the int63 that manual_seed accepts."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) & _MASK63


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)
