"""Resumable SSE: every streamed response's events, kept so that a client can reconnect.

Each event goes out as `id: <response id>.<n>` with n counting from 1; a stream of several
choices adds how many events of each choice it has sent so far: `<response id>.<n>.<e0>-<e1>..`
(an edge that rebuilds the stream from its nodes needs that, since the choices' events
interleave in the order they happened to arrive). A client that lost its connection POSTs
again with `Last-Event-ID: <the last id it got>` and receives events n+1.. (then the rest as
they come), nothing lost or repeated.

The generation does not live in the HTTP handler that started it: it runs as a task writing
into a Replay, and handlers (the first, and any resumed one) only read. With no reader left,
the generation goes on for `grace_s` (time to reconnect) and is then cancelled, so a client
that left for good still frees its node's KV. A finished Replay stays for `window_s`. A
Replay an edge rebuilt for a stream another edge began holds the events after the one the
client resumed from, only (`base`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_NUMBER_DIGITS = 12  # int() refuses 4300+ digits; no stream has 10^12 events
MAX_CHOICES = 4096  # in one event id's per-choice counts


@dataclass(frozen=True)
class EventId:
    response_id: str
    number: int  # the n-th event of the stream
    seen: tuple[int, ...] | None  # events of each choice up to it (streams of several choices)


class Replay:
    def __init__(
        self, response_id: str, num_choices: int = 1, base: int = 0,
        seen: tuple[int, ...] | None = None,
    ):  # fmt: skip
        self.response_id = response_id
        self.base = base  # events 1..base are not here (a stream rebuilt from event base on)
        self.seen = list(seen) if seen is not None else [0] * num_choices
        self.events: list[bytes] = []
        self.done = False
        self.done_at = 0.0
        self.readers = 0
        self.orphaned_at: float | None = None  # when the last reader left
        self._changed = asyncio.Event()

    @property
    def last(self) -> int:
        """The number of the latest event."""
        return self.base + len(self.events)

    def append(self, data: bytes, choice: int | None = None) -> None:
        """One SSE event (the bytes after `data: `, without the blank line); choice: the
        index of the choice it belongs to (None: the stream's, as usage or [DONE])."""
        if choice is not None:
            self.seen[choice] += 1
        seen = tuple(self.seen) if len(self.seen) > 1 else None
        eid = event_id(self.response_id, self.last + 1, seen)
        self.events.append(b"id: %s\ndata: %s\n\n" % (eid.encode(), data))
        self._wake()

    def finish(self) -> None:
        """The stream's end: its `[DONE]` event, and nothing after it."""
        self.append(b"[DONE]")
        self.done, self.done_at = True, time.monotonic()
        self._wake()

    async def read(self, after: int):
        """Events after the n-th, as they come, until the stream is done."""
        self.readers += 1
        self.orphaned_at = None
        try:
            sent = max(0, after - self.base)
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

    def open(self, response_id: str, num_choices: int = 1) -> Replay:
        return self.add(Replay(response_id, num_choices))

    def add(self, replay: Replay) -> Replay:
        self._expire()
        self._replays[replay.response_id] = replay
        return replay

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._replays

    def find(self, last_event_id: str) -> tuple[Replay, int] | None:
        """The replay a Last-Event-ID belongs to and the event number in it, or None (unknown,
        malformed, or not an event this replay holds)."""
        self._expire()
        eid = parse_event_id(last_event_id)
        replay = self._replays.get(eid.response_id) if eid is not None else None
        if replay is None or not replay.base <= eid.number <= replay.last:
            return None
        return replay, eid.number

    def _expire(self) -> None:
        now = time.monotonic()
        for response_id, replay in list(self._replays.items()):
            expired = replay.done and now - replay.done_at > self.window_s
            if expired or (len(self._replays) > self.max_streams and replay.done):
                del self._replays[response_id]


def event_id(response_id: str, number: int, seen: tuple[int, ...] | None = None) -> str:
    if seen is None:
        return f"{response_id}.{number}"
    return f"{response_id}.{number}.{'-'.join(map(str, seen))}"


def parse_event_id(value: str) -> EventId | None:
    """`<response id>.<n>[.<e0>-<e1>..]` -> EventId; None unless well formed."""
    parts = value.strip().split(".")
    if len(parts) not in (2, 3) or not parts[0]:
        return None
    number = _count(parts[1])
    if number is None:
        return None
    if len(parts) == 2:
        return EventId(parts[0], number, None)
    fields = parts[2].split("-", MAX_CHOICES)
    seen = tuple(_count(f) for f in fields)
    if len(fields) > MAX_CHOICES or None in seen or sum(seen) > number:
        return None
    return EventId(parts[0], number, seen)


def _count(text: str) -> int | None:
    # ASCII digits only, and few: str.isdigit takes "²"
    ok = text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS
    return int(text) if ok else None
