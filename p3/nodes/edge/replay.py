"""Resumable SSE: every streamed response's events, kept so that a client can reconnect.

Each event goes out as `id: <response id>.<n>` with n counting from 1. A client that lost
its connection POSTs again with `Last-Event-ID: <response id>.<n>` (the last id it got) and
receives events n+1.. (then the rest as they come), nothing lost or repeated.

The generation does not live in the HTTP handler that started it: it runs as a task writing
into a Replay, and handlers (the first, and any resumed one) only read. With no reader left,
the generation goes on for `grace_s` (time to reconnect) and is then cancelled, so a client
that left for good still frees its node's KV. A finished Replay stays for `window_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict


class Replay:
    def __init__(self, response_id: str):
        self.response_id = response_id
        self.events: list[bytes] = []
        self.done = False
        self.done_at = 0.0
        self.readers = 0
        self.orphaned_at: float | None = None  # when the last reader left
        self._changed = asyncio.Event()

    def append(self, data: bytes) -> None:
        """One SSE event (the bytes after `data: `, without the blank line)."""
        n = len(self.events) + 1
        self.events.append(b"id: %s.%d\ndata: %s\n\n" % (self.response_id.encode(), n, data))
        self._wake()

    def finish(self) -> None:
        self.done, self.done_at = True, time.monotonic()
        self._wake()

    async def read(self, after: int):
        """Events after the n-th, as they come, until the stream is done."""
        self.readers += 1
        self.orphaned_at = None
        try:
            sent = after
            while True:
                while sent < len(self.events):
                    sent += 1
                    yield self.events[sent - 1]
                if self.done:
                    return
                changed = self._changed
                await changed.wait()
        finally:
            self.readers -= 1
            if not self.readers:
                self.orphaned_at = time.monotonic()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class ReplayStore:
    def __init__(self, window_s: float = 60.0, max_streams: int = 10_000):
        self.window_s = window_s
        self.max_streams = max_streams
        self._replays: OrderedDict[str, Replay] = OrderedDict()

    def open(self, response_id: str) -> Replay:
        self._expire()
        replay = self._replays[response_id] = Replay(response_id)
        return replay

    def find(self, last_event_id: str) -> tuple[Replay, int] | None:
        """The replay a Last-Event-ID belongs to and the event number in it, or None."""
        self._expire()
        response_id, number = split_event_id(last_event_id)
        replay = self._replays.get(response_id)
        # ASCII digits only, and few: str.isdigit takes "²", and int() refuses 4300+ digits
        well_formed = number.isascii() and number.isdigit() and len(number) <= 12
        if replay is None or not well_formed or int(number) > len(replay.events):
            return None
        return replay, int(number)

    def _expire(self) -> None:
        now = time.monotonic()
        for response_id, replay in list(self._replays.items()):
            expired = replay.done and now - replay.done_at > self.window_s
            if expired or (len(self._replays) > self.max_streams and replay.done):
                del self._replays[response_id]


def split_event_id(last_event_id: str) -> tuple[str, str]:
    """`<response id>.<n>` -> (response id, n as sent)."""
    response_id, _, number = last_event_id.strip().rpartition(".")
    return response_id, number
