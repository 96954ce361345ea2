"""Streams that outlive their edge: resumed on another edge (or the same one, restarted).

A streamed request of one sample is resumable anywhere: its Submit carries a stream id (its
response id) and a resume context (`ResumeContext`: the request body, the response's id and
creation time, and how many tokens each delta the edge applied carried). When its edge goes
away, the node keeps the sample going for its grace period, keeping every delta it made.

A client that POSTs again with `Last-Event-ID: <response id>.<n>` to an edge that never saw
the stream makes that edge Adopt it: the node holding it answers with its Submit and deltas.
The edge prepares the body again (same model, tokenizer, parameters), replays the tokens
through a fresh sample and responder in the very delta sizes the first edge applied them in
(the prefix from before any move, then the node's own deltas), which rebuilds the first
edge's events one for one, and serves events n+1.. from there, the rest live. So nothing is
lost or repeated. Streams of several samples resume only on their own edge (their samples
interleave in arrival order, which no one can replay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from p3.log import get_logger
from p3.nodes.cluster.generation import Generation
from p3.nodes.cluster.samples import Journal, Sample
from p3.nodes.edge.prompts import prepare
from p3.protocol import messages as m

if TYPE_CHECKING:
    from p3.nodes.edge.api import Api
    from p3.nodes.edge.replay import Replay
    from p3.nodes.edge.responses import Responder

log = get_logger(__name__)

MAX_RESUMABLE_BODY_BYTES = 64 * 1024  # a larger body's stream resumes on its own edge only


class ResumeContext(msgspec.Struct, array_like=True, frozen=True, gc=False):
    body: bytes  # the request's JSON body
    chat: bool
    response_id: str
    created: int
    delta_sizes: list[int] = []  # tokens of each delta applied before this Submit


def resume_context(
    body: Any, chat: bool, responder: Responder
) -> Callable[[list[int]], bytes] | None:
    """The context a Submit carries (given its delta sizes so far); None if not resumable."""
    raw = msgspec.json.encode(body)
    if len(raw) > MAX_RESUMABLE_BODY_BYTES:
        return None

    def encode(delta_sizes: list[int]) -> bytes:
        context = ResumeContext(raw, chat, responder.id, responder.created, list(delta_sizes))
        return msgspec.msgpack.encode(context)

    return encode


def emit(responder: Responder, delta, send: Callable[[dict[str, Any]], None]) -> None:
    """A delta's SSE chunks, as the first edge and a re-building one both make them."""
    if delta.text or delta.finish_reason or delta.logprobs:
        for chunk in responder.chunks(delta):
            send(chunk)


async def adopt(api: Api, response_id: str) -> tuple[Replay, Generation | None] | None:
    """Rebuild a stream another edge served from the node that holds it: its Replay, with
    every event the first edge made, and (unless it finished) its live Generation."""
    found = await api.cluster.adopt(response_id)
    if found is None:
        return None
    node_id, samples = found
    if len(samples) != 1:
        log.warning("edge.adopt_refused", response_id=response_id, num_samples=len(samples))
        return None
    adopted = samples[0]
    context = msgspec.msgpack.decode(adopted.submit.resume, type=ResumeContext)
    body = msgspec.json.decode(context.body)
    prepared = await prepare(api.edge, body, context.chat)
    responder = prepared.responder(chat=prepared.chat)
    responder.id, responder.created = context.response_id, context.created
    sample = _sample(adopted.submit, prepared)
    sample.journal.resume = resume_context(body, context.chat, responder)
    replay = api.replays.open(response_id)

    def send(body: dict[str, Any]) -> None:
        replay.append(msgspec.json.encode(body))

    for chunk in responder.first_chunks(1):
        send(chunk)
    for delta in _deltas(adopted, context.delta_sizes):
        out = sample.apply(delta)
        if out is not None:
            emit(responder, out, send)
    api.metrics.streams_adopted.inc()
    log.info("edge.stream_adopted", response_id=response_id, node_id=node_id,
             num_tokens=sample.num_output_tokens, finished=sample.finished)  # fmt: skip
    if sample.finished:
        if prepared.request.include_usage:
            send(responder.usage_chunk([sample]))
        replay.append(b"[DONE]")
        replay.finish()
        return replay, None
    generation = Generation(api.cluster, [sample], api.edge.config.token_timeout_s)
    api.cluster.attach(sample, generation.queue, node_id, adopted.submit.epoch)
    api.start_pump(prepared, responder, generation, replay, first_chunks=False)
    return replay, generation


def _sample(submit: m.Submit, prepared) -> Sample:
    journal = Journal(
        submit.request_id,
        prepared.model,
        list(submit.prompt_token_ids),
        submit.params,
        submit.seed,
        stream_id=submit.stream_id,
    )
    return Sample(0, journal, prepared.tokenizer, prepared.params)


def _deltas(adopted: m.AdoptedSample, prefix_sizes: list[int]) -> list[m.TokenDelta]:
    """The deltas the first edge applied: the prefix (tokens from before a move) in its
    sizes, then the node's own."""
    submit, deltas, at = adopted.submit, [], 0
    for size in prefix_sizes:
        tokens = list(submit.output_token_ids[at : at + size])
        deltas.append(m.TokenDelta(submit.request_id, tokens, at))
        at += size
    return [*deltas, *adopted.history]
