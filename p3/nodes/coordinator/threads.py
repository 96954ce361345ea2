"""Cores lent by the dead: once a node has been down for a while (`lend_after_s`, 10 s by
default), the nodes left on its host may compute with its threads (up to what each said it
may use, `Capacity.max_threads`), and give them back once it is registered again.

A node that is restarted at once (p3 serve does) needs its cores itself for a few seconds:
its Python, torch and weights load on them. Lending them in that window made moved streams
wait longer, not shorter (scripts/bench_move_pause.py, 2 cores, fp32: p99 5.37 s lending at
once against 2.13 s not lending); lending while nothing else runs there cut it (1.29 against
1.89 s, the restart held back 6 s). So the threads go to the survivors only when the dead
one is not coming back soon (one that keeps crashing, whose restarts p3 serve gave up on).
Outputs do not change with the thread count (the matrix products split rows, not sums).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from p3.nodes.coordinator.membership import Member


def thread_grants(
    members: Iterable[Member], now: float, lend_after_s: float = 0.0
) -> dict[str, int]:
    """node id -> the threads each live node should compute with: its own, plus an even
    share of the threads of its host's nodes dead for lend_after_s when it may grow (capped
    at its max_threads)."""
    hosts: dict[str, list[Member]] = defaultdict(list)
    for member in members:
        hosts[member.hello.host].append(member)
    grants: dict[str, int] = {}
    for on_host in hosts.values():
        live = sorted((mb for mb in on_host if mb.is_live), key=lambda mb: mb.node_id)
        gone = [mb for mb in on_host if not mb.is_live and now - mb.dead_at >= lend_after_s]
        free = sum(mb.hello.capacity.num_threads for mb in gone)
        growing = [mb for mb in live if _ceiling(mb) > mb.hello.capacity.num_threads]
        shares = {mb.node_id: free // len(growing) + (k < free % len(growing))
                  for k, mb in enumerate(growing)}  # fmt: skip
        for mb in live:
            own = mb.hello.capacity.num_threads
            grants[mb.node_id] = min(max(own, _ceiling(mb)), own + shares.get(mb.node_id, 0))
    return grants


def _ceiling(member: Member) -> int:
    return member.hello.capacity.max_threads or member.hello.capacity.num_threads
