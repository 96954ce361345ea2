"""The edge's HTTP routes: OpenAI completions and chat, models, tokenize, health, metrics.

Every refusal is an OpenAI-shaped error; a streamed failure ends the stream with an error
event and `data: [DONE]`. Streams are resumable (p3.nodes.edge.replay): every event has an id,
and a POST with `Last-Event-ID` continues the stream it names. Anything unexpected becomes a
500 of the same shape, logged with its traceback (bad input must never get there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from p3 import tracing
from p3.log import get_logger, log_exception
from p3.nodes.cluster.generation import Generation, HandedOver, RequestFailed
from p3.nodes.cluster.samples import Sample, make_samples
from p3.nodes.edge import adapters
from p3.nodes.edge.adoption import adopt, append_chunk, emit, resume_context
from p3.nodes.edge.bodies import failure_error, json_response, key_ok, read_json
from p3.nodes.edge.embeddings import embeddings
from p3.nodes.edge.metrics import kv_usage
from p3.nodes.edge.prompts import NO_TOKENIZER, Prepared, prepare, refuse_text
from p3.nodes.edge.replay import Replay, ReplayStore, parse_event_id
from p3.nodes.edge.responses import Choice, Responder, new_id
from p3.nodes.edge.responses_api import serve as serve_responses
from p3.nodes.edge.schemas import ApiError, bad_request
from p3.tokenizer import NoTokenizerError

if TYPE_CHECKING:
    from p3.nodes.edge.edge import Edge

log = get_logger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status)


def make_app(edge: Edge) -> web.Application:
    api = Api(edge)
    app = web.Application(
        client_max_size=edge.config.max_body_bytes,
        middlewares=[*tracing.edge_middlewares(), api.errors, api.auth],
    )
    app.router.add_post("/v1/chat/completions", api.on_chat)
    app.router.add_post("/v1/completions", api.on_completions)
    app.router.add_post("/v1/embeddings", api.on_embeddings)
    app.router.add_post("/v1/responses", api.on_responses)
    app.router.add_get("/v1/models", api.on_models)
    app.router.add_get("/v1/models/{model:.+}", api.on_model)
    app.router.add_post("/v1/load_lora_adapter", api.on_load_lora)
    app.router.add_post("/v1/unload_lora_adapter", api.on_unload_lora)
    app.router.add_post("/tokenize", api.on_tokenize)
    app.router.add_post("/detokenize", api.on_detokenize)
    app.router.add_get("/health", api.on_health)
    app.router.add_get("/ready", api.on_ready)
    app.router.add_get("/metrics", api.on_metrics)
    app.router.add_get("/cluster", api.on_cluster)
    return app


class Api:
    def __init__(self, edge: Edge):
        self.edge = edge
        self.cluster = edge.cluster
        self.metrics = edge.metrics
        self.num_pending = 0
        self.num_samples = 0  # of the requests past prepare(), counted against max_pending too
        self.replays = ReplayStore(edge.config.resume_window_s)
        self._pumps: set[asyncio.Task] = set()

    # -- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except NoTokenizerError as exc:  # text asked of a model without a tokenizer
            return error_response(bad_request(None, str(exc), NO_TOKENIZER))
        except web.HTTPRequestEntityTooLarge:
            limit = self.edge.config.max_body_bytes
            return error_response(
                ApiError(413, f"request body over {limit} bytes", code="too_large")
            )
        except web.HTTPException as exc:
            return error_response(
                ApiError(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"))
            )
        except Exception:
            log.exception("edge.internal_error", path=request.path)
            return error_response(
                ApiError(500, "internal error in the edge", code="internal_error")
            )

    @web.middleware
    async def auth(self, request: web.Request, handler) -> web.StreamResponse:
        keys = self.edge.config.api_keys
        if keys and request.path not in OPEN_PATHS and not key_ok(request, keys):
            raise ApiError(401, "missing or wrong API key", code="invalid_api_key")
        return await handler(request)

    # -- generation ------------------------------------------------------------------------

    async def on_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def on_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if (last_event_id := request.headers.get("Last-Event-ID")) is not None:
            return await self._resume(request, last_event_id)
        async with self._pending():
            return await self._generate_held(request, chat)

    async def _generate_held(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived_at = time.perf_counter()
        num_samples = 0
        try:
            body = await self.read_json(request)
            prepared = await prepare(self.edge, body, chat)
            samples = make_samples(
                new_id("req"),
                prepared.model,
                prepared.prompt_ids,
                prepared.params,
                prepared.tokenizer,
                prepared.lora,
            )
            num_samples = self._admit(len(samples))
            responder = prepared.responder(chat=prepared.chat)
            if prepared.request.stream:  # resumable on any edge
                for sample in samples:
                    sample.journal.stream_id = responder.id
                    sample.journal.resume = resume_context(
                        body, chat, responder, sample.index, len(samples)
                    )
            generation = Generation(self.cluster, samples, self.edge.config.token_timeout_s)
            try:
                await generation.start()
            except RequestFailed as failure:
                raise failure_error(failure) from None
            if prepared.request.stream:
                self.metrics.edge_overhead.labels("ingress").observe(
                    generation.submitted_at - arrived_at
                )
                return await self._stream(request, prepared, responder, generation)
            return await self._whole(prepared, responder, generation)
        finally:
            self.num_samples -= num_samples

    async def on_embeddings(self, request: web.Request) -> web.Response:
        async with self._pending():
            body = await self.read_json(request)
            return json_response(await embeddings(self.edge, body))

    async def on_responses(self, request: web.Request) -> web.StreamResponse:
        async with self._pending():
            return await serve_responses(self, request)

    @contextlib.asynccontextmanager
    async def _pending(self):
        """A request held against max_pending (429 beyond it) while it runs."""
        if self.num_pending >= self.edge.config.max_pending:
            raise ApiError(429, "too many requests in this edge; retry later", code="queue_full")
        self.num_pending += 1
        self.metrics.edge_pending.inc()
        try:
            yield
        finally:
            self.num_pending -= 1
            self.metrics.edge_pending.dec()

    def _admit(self, num_samples: int) -> int:
        """A request's samples, counted against max_pending with the others' (n and a batch of
        prompts make one request many sequences); a request alone always gets in."""
        limit = self.edge.config.max_pending
        if self.num_samples and self.num_samples + num_samples > limit:
            raise ApiError(
                429,
                f"this edge holds at most {limit} samples at once and has {self.num_samples}; "
                "retry later",
                code="queue_full",
            )
        self.num_samples += num_samples
        return num_samples

    async def _whole(
        self, prepared: Prepared, responder: Responder, generation: Generation
    ) -> web.Response:
        choices = [Choice(s.index) for s in generation.samples]
        try:
            async with contextlib.aclosing(generation.stream()) as deltas:
                async for delta in deltas:
                    choices[delta.index].add(delta)
        except RequestFailed as failure:
            self._failed(failure)
            raise failure_error(failure) from None
        finally:
            self.metrics.observe_moves(generation.moves)
        self._finished(generation)
        return json_response(responder.response(choices, generation.samples))

    async def _stream(
        self, request: web.Request, prepared: Prepared, responder: Responder, generation
    ) -> web.StreamResponse:
        replay = self.replays.open(responder.id, len(generation.samples))
        self.start_pump(prepared, responder, generation, replay)
        return await self._serve(request, replay, 0)

    def start_pump(
        self, prepared: Prepared, responder: Responder, generation: Generation, replay: Replay,
        first_chunks: bool = True,
    ) -> None:  # fmt: skip
        pump = asyncio.create_task(
            self._pump(prepared, responder, generation, replay, first_chunks)
        )
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)

    async def _resume(self, request: web.Request, last_event_id: str) -> web.StreamResponse:
        found = self.replays.find(last_event_id)
        last = parse_event_id(last_event_id)
        unknown = found is None and last is not None and last.response_id not in self.replays
        result = "replayed"
        if unknown and await adopt(self, last) is not None:  # another edge's: from its nodes
            found, result = self.replays.find(last_event_id), "adopted"
        self.metrics.stream_resumes.labels(result if found is not None else "not_found").inc()
        if found is None:
            raise ApiError(
                404,
                f"no stream to resume after event {last_event_id!r} here (unknown, or expired)",
                code="stream_not_found",
            )
        replay, after = found
        log.info("edge.stream_resumed", response_id=replay.response_id, after=after)
        return await self._serve(request, replay, after)

    async def _serve(self, request: web.Request, replay: Replay, after: int) -> web.StreamResponse:
        """Write a stream's events after the after-th to this client as they come."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            async for event in replay.read(after):
                await response.write(event)
        except ConnectionError:
            log.info("edge.client_gone", response_id=replay.response_id)
            return response
        await response.write_eof()
        return response

    async def _pump(
        self,
        prepared: Prepared,
        responder: Responder,
        generation: Generation,
        replay: Replay,
        first_chunks: bool = True,
    ) -> None:
        """The generation, into the replay; cancelled once no client has read it for the
        grace period. first_chunks: False for an adopted stream (its replay has them)."""
        first_text, grace_s = True, self.edge.config.resume_grace_s

        def send(body: dict[str, Any]) -> None:
            append_chunk(replay, body)

        try:
            for chunk in responder.first_chunks(len(generation.samples)) if first_chunks else []:
                send(chunk)
            async with contextlib.aclosing(generation.stream()) as deltas:
                async for delta in deltas:
                    emit(responder, delta, send)
                    if first_text and delta.text:
                        first_text = False
                        egress_s = time.perf_counter() - generation.received_at
                        self.metrics.edge_overhead.labels("first_token").observe(egress_s)
                    gone = replay.orphaned_at
                    if gone is not None and time.monotonic() - gone > grace_s:
                        log.info("edge.stream_abandoned", request_ids=generation.request_ids)
                        self.metrics.request_failure.labels("abandoned").inc()
                        return  # leaving the iteration cancels the samples on their nodes
            if prepared.request.include_usage:
                send(responder.usage_chunk(generation.samples))
            self._finished(generation)
        except RequestFailed as failure:
            self._failed(failure)
            send(failure_error(failure).body())
        except HandedOver as handed:
            log.info("edge.stream_handed_over", response_id=replay.response_id)
            self.metrics.streams_handed_over.inc()
            send(ApiError(409, str(handed), code="stream_resumed_elsewhere").body())
        except Exception as exc:  # a bug here: the client hears it, the log shows it
            log_exception(log, "edge.stream_failed", exc, request_ids=generation.request_ids)
            self.metrics.request_failure.labels("internal").inc()
            send(ApiError(500, f"internal error: {type(exc).__name__}", code="internal").body())
        finally:
            self.metrics.observe_moves(generation.moves)
            replay.finish()

    def _finished(self, generation: Generation) -> None:
        samples = generation.samples
        num_prompt_tokens = _num_prompt_tokens(samples)
        tracing.annotate(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=sum(s.num_output_tokens for s in samples),
        )
        m, model = self.metrics, samples[0].journal.model
        m.observe_finished(samples, num_prompt_tokens)
        if generation.first_token_s is not None:
            m.ttft.labels(model).observe(generation.first_token_s)
        itl = m.itl.labels(model)
        for gap in generation.inter_token_s:
            itl.observe(gap)
        m.e2e.labels(model).observe(time.perf_counter() - generation.started)

    def _failed(self, failure: RequestFailed) -> None:
        tracing.annotate(failure=failure.code)
        self.metrics.request_failure.labels(failure.code).inc()
        log.warning("edge.request_failed", code=failure.code, message=failure.message)

    # -- the rest --------------------------------------------------------------------------

    async def read_json(self, request: web.Request) -> Any:
        return await read_json(request, self.edge.config.body_timeout_s)

    async def on_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": self.edge.model_cards()})

    async def on_load_lora(self, request: web.Request) -> web.Response:
        return await adapters.load_lora_adapter(self.edge, await self.read_json(request))

    async def on_unload_lora(self, request: web.Request) -> web.Response:
        return await adapters.unload_lora_adapter(self.edge, await self.read_json(request))

    async def on_model(self, request: web.Request) -> web.Response:
        card = self.edge.model_card(request.match_info["model"])
        if card is None:
            name = request.match_info["model"]
            raise ApiError(404, f"the model {name!r} does not exist", code="model_not_found")
        return json_response(card)

    async def on_tokenize(self, request: web.Request) -> web.Response:
        prepared = await prepare(self.edge, await self.read_json(request), chat=None)
        ids = prepared.prompt_ids[0]
        max_len = self.edge.max_model_len(prepared.model)
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": max_len})

    async def on_detokenize(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        model, tokenizer = await self.edge.model_for(body)
        refuse_text(tokenizer, "tokens", "detokenizing needs one")
        tokens = body.get("tokens")
        ok = isinstance(tokens, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size
            for t in tokens
        )
        if not ok:
            raise bad_request("tokens", "tokens must be a list of token ids in the vocabulary")
        return json_response({"prompt": tokenizer.decode(tokens)})

    async def on_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def on_ready(self, request: web.Request) -> web.Response:
        if self.cluster.routes:
            return json_response({"status": "ready", "replicas": len(self.cluster.routes)})
        return json_response({"status": "not ready", "replicas": 0}, 503)

    async def on_metrics(self, request: web.Request) -> web.Response:
        self.metrics.observe_routes(list(self.cluster.routes.values()))
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def on_cluster(self, request: web.Request) -> web.Response:
        listed = [*self.cluster.routes.values(), *self.cluster.shards]
        nodes = [_node_json(self.cluster, r) for r in listed]
        nodes += [
            {"id": n, "status": "dead"}
            for n in self.cluster.dead_nodes
            if n not in {r.node_id for r in listed}
        ]
        edge = {"id": self.edge.edge_id, "num_pending": self.num_pending}
        return json_response({"version": self.cluster.routes_version, "nodes": nodes, "edge": edge})


def _node_json(cluster, route) -> dict[str, Any]:
    return {
        "id": route.node_id,
        "host": route.host,
        "pid": route.pid,
        "status": "ready",
        "epoch": route.epoch,
        "address": route.address,
        "model": route.model,
        "replica": route.replica,
        "replica_rank": route.replica_rank,
        "max_model_len": route.max_model_len,
        "adapters": route.adapters,
        "load": {
            **msgspec.structs.asdict(route.load),
            "num_kv_blocks": route.num_kv_blocks,
            "kv_cache_usage": kv_usage(route),
            "edge_load": cluster.load(route),
        },
    }


def _num_prompt_tokens(samples: list[Sample]) -> int:
    return sum(
        len(p)
        for p in {
            id(s.journal.prompt_token_ids): s.journal.prompt_token_ids for s in samples
        }.values()
    )
