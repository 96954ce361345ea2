"""Streams that outlive their edge: resumed on another edge (or the same one, restarted).

A streamed request is resumable anywhere: each of its samples' Submits carries a stream id
(its response id) and a resume context (`ResumeContext`: the request body, the response's id
and creation time, the sample's index and how many the stream has, and how many tokens each
delta the edge applied carried). When its edge goes away, the node keeps the sample going for
its grace period, keeping every delta it made (and the stream's samples that had finished).

A client that POSTs again with `Last-Event-ID` to an edge that never saw the stream makes
that edge Adopt it: the nodes holding its samples answer with their Submits and deltas. The
edge prepares the body again (same model, tokenizer, parameters) and replays each sample's
tokens through a fresh sample and responder in the very delta sizes the first edge applied
them in (the prefix from before any move, then the node's own deltas). That rebuilds each
choice's events as the first edge made them; the event id says how many of each choice the
client has (one choice: all the events but a final usage chunk), so the rest of each choice
goes out first, as events n+1.., then whatever the nodes make from there on. Nothing is lost
or repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from p3.log import get_logger
from p3.nodes.cluster.adopting import AdoptedAt
from p3.nodes.cluster.generation import Generation
from p3.nodes.cluster.samples import Journal, Sample
from p3.nodes.edge.prompts import prepare
from p3.nodes.edge.replay import EventId, Replay
from p3.protocol import messages as m

if TYPE_CHECKING:
    from p3.nodes.edge.api import Api
    from p3.nodes.edge.responses import Responder

log = get_logger(__name__)

MAX_RESUMABLE_BODY_BYTES = 64 * 1024  # a larger body's stream resumes on its own edge only


class ResumeContext(msgspec.Struct, array_like=True, frozen=True, gc=False):
    body: bytes  # the request's JSON body
    chat: bool
    response_id: str
    created: int
    delta_sizes: list[int] = []  # tokens of each delta applied before this Submit
    index: int = 0  # the sample's choice index
    num_samples: int = 1  # in the stream
    logprobs: list[float] | None = None  # of those tokens, when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None


def resume_context(
    body: Any, chat: bool, responder: Responder, index: int = 0, num_samples: int = 1
) -> Callable[[Journal], bytes] | None:
    """The context a Submit carries (given the sample's journal so far); None if not
    resumable."""
    raw = msgspec.json.encode(body)
    if len(raw) > MAX_RESUMABLE_BODY_BYTES:
        return None

    def encode(journal: Journal) -> bytes:
        has_logprobs = journal.params.logprobs is not None
        context = ResumeContext(
            raw, chat, responder.id, responder.created, list(journal.delta_sizes), index,
            num_samples, journal.logprobs if has_logprobs else None,
            journal.top_logprobs if has_logprobs else None,
        )  # fmt: skip
        return msgspec.msgpack.encode(context)

    return encode


def emit(responder: Responder, delta, send: Callable[[dict[str, Any]], None]) -> None:
    """A delta's SSE chunks, as the first edge and a re-building one both make them."""
    if delta.text or delta.finish_reason or delta.logprobs or responder.returns_ids:
        for chunk in responder.chunks(delta):
            send(chunk)


def append_chunk(replay: Replay, chunk: dict[str, Any]) -> None:
    """A chunk into a replay as an event of the choice it carries (none: the stream's)."""
    choices = chunk.get("choices")
    replay.append(msgspec.json.encode(chunk), choices[0]["index"] if choices else None)


async def adopt(api: Api, last: EventId) -> Replay | None:
    """Rebuild a stream another edge served, from the nodes that hold its samples: a Replay
    of the events after `last` (and, unless they all finished, a live Generation)."""
    found = await api.cluster.adopt(last.response_id, _all_samples)
    if found is None:
        return None
    pairs = sorted(((_context(a), (n, a)) for n, a in found), key=lambda p: p[0].index)
    contexts, found = [c for c, _ in pairs], [f for _, f in pairs]
    body = msgspec.json.decode(contexts[0].body)
    try:
        prepared = await prepare(api.edge, body, contexts[0].chat)
    except Exception:  # its model is no longer served here, say: the samples stop
        api.cluster.release(found)
        raise
    responder = prepared.responder(chat=prepared.chat)
    responder.id, responder.created = contexts[0].response_id, contexts[0].created
    num = len(found)
    samples, events = [], [[] for _ in range(num)]
    for chunk in responder.first_chunks(num):
        events[chunk["choices"][0]["index"]].append(chunk)
    for (_, adopted), context in zip(found, contexts, strict=True):
        sample = _sample(adopted.submit, prepared, context.index)
        sample.journal.resume = resume_context(body, context.chat, responder, context.index, num)
        samples.append(sample)
        for delta in _deltas(adopted, context):
            out = sample.apply(delta)
            if out is not None:
                emit(responder, out, events[sample.index].append)
    seen = last.seen if last.seen is not None else (min(last.number, len(events[0])),)
    if len(seen) != num or any(s > len(e) for s, e in zip(seen, events, strict=True)):
        log.warning("edge.adopt_refused", response_id=last.response_id, last=last.number,
                    num_samples=num)  # fmt: skip
        api.cluster.release(found)
        return None
    replay = Replay(last.response_id, num, base=last.number, seen=seen)
    for index, chunks in enumerate(events):
        for chunk in chunks[seen[index] :]:
            append_chunk(replay, chunk)
    api.metrics.streams_adopted.inc()
    log.info("edge.stream_adopted", response_id=last.response_id, num_samples=num,
             nodes=sorted({node_id for node_id, _ in found}),
             num_tokens=sum(s.num_output_tokens for s in samples))  # fmt: skip
    api.replays.add(replay)
    if all(s.finished for s in samples):
        if prepared.request.include_usage and last.number == sum(seen):  # not seen yet
            append_chunk(replay, responder.usage_chunk(samples))
        replay.finish()
        return replay
    generation = Generation(api.cluster, samples, api.edge.config.token_timeout_s)
    for sample, (node_id, adopted) in zip(samples, found, strict=True):
        if not sample.finished:
            api.cluster.attach(sample, generation.queue, node_id, adopted.submit.epoch)
    api.start_pump(prepared, responder, generation, replay, first_chunks=False)
    return replay


def _context(adopted: m.AdoptedSample) -> ResumeContext:
    return msgspec.msgpack.decode(adopted.submit.resume, type=ResumeContext)


def _all_samples(found: list[AdoptedAt]) -> bool:
    """Every sample of the stream is here (each one's context says how many there are)."""
    try:
        contexts = [_context(adopted) for _, adopted in found]
    except msgspec.DecodeError:
        return False
    indexes = {c.index for c in contexts}
    return all(c.num_samples == len(found) for c in contexts) and indexes == set(range(len(found)))


def _sample(submit: m.Submit, prepared, index: int) -> Sample:
    journal = Journal(
        submit.request_id,
        prepared.model,
        list(submit.prompt_token_ids),
        submit.params,
        submit.seed,
        stream_id=submit.stream_id,
        lora=submit.lora,
        traceparent=submit.traceparent,  # a move after adoption stays in the request's trace
    )
    return Sample(index, journal, prepared.tokenizer, prepared.params)


def _deltas(adopted: m.AdoptedSample, context: ResumeContext) -> list[m.TokenDelta]:
    """The deltas the first edge applied: the prefix (tokens from before a move) in its
    sizes, with their logprobs, then the node's own."""
    submit, deltas, at = adopted.submit, [], 0
    logprobs, tops = context.logprobs, context.top_logprobs
    for size in context.delta_sizes:
        tokens = list(submit.output_token_ids[at : at + size])
        if logprobs is not None and tops is not None:
            lps, top = logprobs[at : at + size], tops[at : at + size]
            deltas.append(m.TokenDelta(submit.request_id, tokens, at, lps, top))
        else:
            deltas.append(m.TokenDelta(submit.request_id, tokens, at))
        at += size
    return [*deltas, *adopted.history]
