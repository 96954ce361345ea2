"""A bounded workload of streaming clients that records every event as a history.

`clients` streams run at once, each going through its own seeded list of requests until the
deadline (no new request after it) or its count; every request is a streamed
/v1/completions with per-token logprobs, so each SSE event names its tokens and their text
offset. The client is raw aiohttp rather than the openai SDK because the checker needs what
the SDK hides: the SSE `id:` of every event and the exact event order. The edge is on
loopback.

History: one JSON object per line, `t` wall-clock seconds, `req` "c<client>.<k>", `attempt`:
- `invoke`: the request (its body) goes out; with `resume` (an SSE id), the same attempt
  resumed after a broken stream (its edge died): POSTed again with that Last-Event-ID;
- `event`: one SSE event: `sid` (its id), `choices` [{index, text, tokens, offset, finish}];
- `usage`: the final usage chunk;
- `error`: an error event inside the stream (`after_tokens`: how many came before it);
- `done`: `data: [DONE]`; `extra` after it: anything that came after [DONE] (a stream
  with an `error` event fails, [DONE] or not);
- `fail`: the attempt ended without [DONE] (HTTP status, error, tokens so far);
- `ok` / `gave_up`: the request's end (a failed attempt with no token is retried: definite).
A stream that breaks after events came (no [DONE], no error event) is resumed from its last
event id, again every RESUME_PAUSE_S while the edge is not there, for up to RESUME_FOR_S.
The nemesis writes `fault` and `heal` lines into the same history.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

WORDS = [
    "river", "harbor", "lantern", "orchard", "engine", "copper", "winter", "signal", "meadow",
    "archive", "falcon", "quiet", "granite", "tide", "compass", "ember", "violet", "thunder",
    "pocket", "silver", "canyon", "whistle", "marble", "cedar", "beacon", "ladder", "saffron",
    "glacier", "ribbon",
]  # fmt: skip
RETRIES = 3  # a definite failure (no token yet) is retried, as any client would
RETRY_PAUSE_S = 0.5
RETRY_FOR_S = 20.0  # ... and while the edge does not answer (restarting), for this long
RESUME_PAUSE_S = 0.2  # a broken stream is resumed from its last event id, every this often
RESUME_FOR_S = 20.0  # for this long (a node keeps an orphaned stream for 30 s)
# constrained requests (Workload.constrained): JSON under this schema, as a completion's
# text ("json") or as the arguments of a required tool call in a chat ("tool"); bounded, so
# an answer ends inside CONSTRAINED_MAX_TOKENS whatever is sampled
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"enum": ["sea", "city", "night"]}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["title", "tags", "score"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "file_story", "parameters": SCHEMA}}]
CONSTRAINED_MAX_TOKENS = 500  # the schema bounds it below (24 whitespace a gap at most)


@dataclass
class Outcome:
    """What one POST of an attempt ended with."""

    num_tokens: int = 0  # tokens it delivered
    done: bool = False  # [DONE] came and no error event did
    last_sid: str | None = None  # the id of the last event it delivered
    broken: bool = False  # the connection failed or closed early (not an answer)


@dataclass(frozen=True)
class Spec:
    req: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    n: int
    stop: str | None
    kind: str = "story"  # "json": a completion under SCHEMA; "tool": a chat's tool call

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "tool" else "/v1/completions"

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "n": self.n,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.kind == "tool":
            messages = [{"role": "user", "content": self.prompt}]
            return {**body, "messages": messages, "logprobs": True, "tools": TOOLS,
                    "tool_choice": "required", "parallel_tool_calls": False}  # fmt: skip
        body.update(prompt=self.prompt, logprobs=1)
        if self.kind == "json":
            body["structured_outputs"] = {"json": SCHEMA}
        elif self.stop is None:
            body["ignore_eos"] = True
        else:
            body["stop"] = [self.stop]
        return body


def make_spec(
    seed: int, client: int, k: int, max_tokens: tuple[int, int], constrained: bool = False
) -> Spec:
    spec = _story_spec(seed, client, k, max_tokens)
    if not constrained:
        return spec
    draw = random.Random(f"{seed}/{client}/{k}/constrained").random()
    if draw >= 0.5:
        return spec
    kind = "json" if draw < 0.25 else "tool"
    prompt = f"File this story as JSON: {spec.prompt}"
    return replace(spec, kind=kind, prompt=prompt, max_tokens=CONSTRAINED_MAX_TOKENS, stop=None)


def _story_spec(seed: int, client: int, k: int, max_tokens: tuple[int, int]) -> Spec:
    rng = random.Random(f"{seed}/{client}/{k}")
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 160)))
    prompt = f"Write a story about {words}. Story {client}.{k}: once upon a time,"
    kind = rng.random()
    return Spec(
        req=f"c{client}.{k}",
        prompt=prompt,
        max_tokens=rng.randint(*max_tokens),
        temperature=0.0 if kind < 0.5 else 0.8,
        seed=rng.getrandbits(31),
        n=2 if rng.random() < 0.15 else 1,
        stop="." if rng.random() < 0.2 else None,
    )


@dataclass
class Workload:
    url: str
    model: str
    seed: int
    clients: int = 8
    requests_per_client: int = 1000
    duration_s: float = 10.0  # no new request after this
    max_tokens: tuple[int, int] = (24, 64)
    constrained: bool = False  # half the requests under a JSON schema or a tool call
    request_timeout_s: float = 120.0
    record: Callable[[dict], None] = print
    specs_run: list[Spec] = field(default_factory=list)
    first_token = None  # asyncio.Event set at the first token of any stream

    async def run(self, only: list[Spec] | None = None) -> None:
        """Every client's requests until the deadline; or exactly `only`, `clients` at once."""
        self.first_token = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            if only is None:
                deadline = time.monotonic() + self.duration_s
                clients = (self._client(session, c, deadline) for c in range(self.clients))
                await asyncio.gather(*clients)
            else:
                queue = list(reversed(only))
                await asyncio.gather(*(self._drain(session, queue) for _ in range(self.clients)))

    async def _client(self, session, client: int, deadline: float) -> None:
        for k in range(self.requests_per_client):
            if time.monotonic() >= deadline:
                return
            spec = make_spec(self.seed, client, k, self.max_tokens, self.constrained)
            self.specs_run.append(spec)
            await self.request(session, spec)

    async def _drain(self, session, queue: list[Spec]) -> None:
        while queue:
            await self.request(session, queue.pop())

    async def request(self, session: aiohttp.ClientSession, spec: Spec) -> None:
        started, attempt = time.monotonic(), -1
        while True:
            attempt += 1
            got = await self._attempt(session, spec, attempt)
            resumed_at = time.monotonic()
            while not got.done and got.broken and got.last_sid is not None:
                if time.monotonic() - resumed_at > RESUME_FOR_S:
                    break
                await asyncio.sleep(RESUME_PAUSE_S)
                more = await self._attempt(session, spec, attempt, resume=got.last_sid)
                got = Outcome(got.num_tokens + more.num_tokens, more.done,
                              more.last_sid or got.last_sid, more.broken)  # fmt: skip
            if got.done:
                self.record({"t": time.time(), "req": spec.req, "type": "ok"})
                return
            if got.num_tokens > 0:
                break  # indefinite (tokens were sent): a retry would start the text again
            edge_away = got.broken and time.monotonic() - started < RETRY_FOR_S
            if attempt >= RETRIES and not edge_away:
                break
            await asyncio.sleep(RETRY_PAUSE_S)
        self.record({"t": time.time(), "req": spec.req, "type": "gave_up"})

    async def _attempt(
        self, session, spec: Spec, attempt: int, resume: str | None = None
    ) -> Outcome:
        base = {"req": spec.req, "attempt": attempt}
        invoke = {"t": time.time(), **base, "type": "invoke", "body": spec.body(self.model)}
        self.record({**invoke, "resume": resume} if resume is not None else invoke)
        got, errored = Outcome(), False
        headers = {"Last-Event-ID": resume} if resume is not None else None
        url = self.url + spec.path
        try:
            async with session.post(url, json=spec.body(self.model), headers=headers) as r:
                if r.status != 200:
                    error = (await r.text())[:300]
                    self._fail(base, got.num_tokens, status=r.status, error=error)
                    return got
                async for sid, data in sse_events(r):
                    now = time.time()
                    if got.done:
                        self.record({"t": now, **base, "type": "extra", "data": data[:200]})
                        continue
                    got.last_sid = sid or got.last_sid
                    if data == "[DONE]":
                        got.done = True
                        self.record({"t": now, **base, "type": "done", "sid": sid})
                        continue
                    chunk = json.loads(data)
                    errored = errored or "error" in chunk
                    got.num_tokens += self._chunk(base, now, sid, chunk)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            self._fail(base, got.num_tokens, error=repr(exc)[:300])
            got.broken = not isinstance(exc, json.JSONDecodeError)
            return got
        if not got.done:
            self._fail(base, got.num_tokens, error="stream ended without [DONE]")
            got.broken = True
            return got
        got.done = not errored  # an error event: the attempt failed
        return got

    def _chunk(self, base: dict, now: float, sid: str | None, chunk: dict) -> int:
        if "error" in chunk:
            self.record({"t": now, **base, "type": "error", "sid": sid, "error": chunk["error"]})
            return 0
        choices = [_choice(c) for c in chunk.get("choices") or []]
        if choices:
            self.record({"t": now, **base, "type": "event", "sid": sid, "choices": choices})
        if chunk.get("usage"):
            self.record({"t": now, **base, "type": "usage", "sid": sid, "usage": chunk["usage"]})
        num_tokens = sum(len(c["tokens"]) for c in choices)
        if num_tokens and self.first_token is not None:
            self.first_token.set()
        return num_tokens

    def _fail(self, base: dict, num_tokens: int, **what) -> None:
        self.record({"t": time.time(), **base, "type": "fail", "tokens": num_tokens, **what})


def _choice(c: dict) -> dict:
    """A completion's choice, or a chat's (its text: the content and the tool calls' argument
    fragments; its tokens from the logprobs; no text offsets in chat)."""
    logprobs = c.get("logprobs") or {}
    if "delta" not in c:
        return {
            "index": c["index"],
            "text": c["text"],
            "tokens": logprobs.get("tokens") or [],
            "offset": (logprobs.get("text_offset") or [None])[0],
            "finish": c.get("finish_reason"),
        }
    delta = c["delta"]
    calls = delta.get("tool_calls") or []
    text = (delta.get("content") or "") + "".join(
        (call.get("function") or {}).get("arguments") or "" for call in calls
    )
    return {
        "index": c["index"],
        "text": text,
        "tokens": [entry["token"] for entry in logprobs.get("content") or []],
        "offset": None,
        "finish": c.get("finish_reason"),
    }


async def sse_events(response: aiohttp.ClientResponse):
    """(id, data) of each server-sent event."""
    sid, data = None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield sid, "\n".join(data)
            sid, data = None, []
        elif line.startswith("id:"):
            sid = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield sid, "\n".join(data)
