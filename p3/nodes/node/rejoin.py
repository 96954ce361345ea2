"""When a fenced node may say Hello again: once the step it was fenced in has ended, and
after a delay that doubles with each fence in a row (a node too slow for the cluster's
patience must not loop through deaths)."""

from __future__ import annotations

import time

FENCE_WINDOW_S = 120.0  # fences this close together count as in a row
REJOIN_BASE_S, REJOIN_MAX_S = 0.5, 30.0  # the 2nd fence in a row waits 1 s, the 3rd 2 s...


class Rejoin:
    def __init__(self) -> None:
        self._fences: list[float] = []  # when we were fenced in our live epoch, lately
        self._at = 0.0
        self._after_step = False

    def fenced(self) -> float:
        """Fenced in the live epoch, in a step: the delay before it may say Hello again."""
        now = time.monotonic()
        self._fences = [t for t in self._fences if now - t < FENCE_WINDOW_S] + [now]
        delay_s = 0.0
        if len(self._fences) > 1:
            delay_s = min(REJOIN_MAX_S, REJOIN_BASE_S * 2 ** (len(self._fences) - 1))
        self._at, self._after_step = now + delay_s, True
        return delay_s

    def may(self, in_step: bool) -> bool:
        """in_step: a step runs (the one it was fenced in, if it has not ended)."""
        if time.monotonic() < self._at:
            return False
        if self._after_step and in_step:
            return False  # the fenced epoch's step still runs: registering now is dying again
        self._after_step = False
        return True
