"""The edge: the OpenAI HTTP API in front of the cluster (aiohttp, one Actor per process).

    client --HTTP/SSE--> edge --Submit/Cancel--> node leader
                          ^  <------Tokens------
                          +------ Routes ------- coordinator

The cluster side (routes, node links, least-loaded routing, journals) is p3.nodes.cluster.links,
shared with p3.client; the HTTP routes are p3.nodes.api. `python -m p3 edge` calls
`add_arguments` and `main`; `main` prints `P3_READY {"url": ...}` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from p3 import tracing
from p3.config import default_of
from p3.flags import add_security_args, add_tracing_args, cluster_keys
from p3.log import get_logger
from p3.nodes.actor.base import Actor
from p3.nodes.cluster.generation import DEFAULT_TIMEOUT_S
from p3.nodes.cluster.links import Cluster
from p3.nodes.edge.metrics import EdgeMetrics
from p3.nodes.edge.models import Models
from p3.nodes.edge.schemas import ApiError, Fields, Limits
from p3.protocol.security import Keyring
from p3.tokenizer import Tokenizer

log = get_logger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_EDGE_NAME = "edge-0"  # with keys: the member an edge runs as unless --edge-id says


@dataclass(frozen=True)
class EdgeConfig:
    coordinator: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # tokenizers to load at start (others load when routed)
    model_name: str | None = None  # an API alias for the first of models
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pending: int = 1024
    limits: Limits = field(default_factory=Limits)
    token_timeout_s: float = DEFAULT_TIMEOUT_S
    keys: str | None = None  # a `p3 keys generate` directory: CurveZMQ on every socket
    resume_grace_s: float = 3.0  # a stream with no client goes on this long, then is cancelled
    resume_window_s: float = 60.0  # a finished stream's events stay this long for a resume
    drain_timeout_s: float = 30.0
    edge_id: str = ""
    # a connection with no request under way (idle keep-alive, or headers that never end: a
    # slowloris) is closed after this long
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 30.0  # a request body that takes longer to arrive is a 408
    skip_tokenizer_init: bool = False  # serve every model without its tokenizer: token ids only

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {self.max_pending}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        for name in ("keepalive_timeout_s", "body_timeout_s", "token_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.model_name and not self.models:
            raise ValueError("model_name needs a model to name (--model)")


def new_edge_id(kind: str = "edge") -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Edge(Actor):
    kind = "edge"

    def __init__(self, config: EdgeConfig):
        self.edge_id = config.edge_id or (DEFAULT_EDGE_NAME if config.keys else new_edge_id())
        super().__init__(self.edge_id)
        self.config = config
        self.limits = config.limits
        self.started = int(time.time())
        aliases = {config.model_name: config.models[0]} if config.model_name else {}
        self.models = Models(
            aliases, lambda route: self.cluster.fetch_tokenizer(route), config.skip_tokenizer_init
        )
        self.metrics = EdgeMetrics()
        keyring = Keyring(config.keys, "edge", self.edge_id) if config.keys else None
        self.cluster = Cluster(config.coordinator, self.edge_id, keyring, self.models.learn)
        self.url = ""
        self._runner: web.AppRunner | None = None

    def preload(self) -> None:
        """Load the named models' tokenizers (blocking: call before the loop serves)."""
        for model in self.config.models:
            self.models.preload(model)

    async def model_for(self, body: Any) -> tuple[str, Tokenizer]:
        """The routed model string and tokenizer for body["model"]; 404 if unknown."""
        name = Fields(body).str("model")
        if not name:
            raise ApiError(400, "model is required", "model", "missing_required_parameter")
        model = self.models.resolve(name) or self.cluster.adapters().get(name)
        if model is None:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        try:
            return model, await self.models.tokenizer(model)
        except (ValueError, TimeoutError) as exc:  # its node's files did not arrive, or fail
            message = f"the tokenizer of model {name!r} is not available: {exc}"
            raise ApiError(503, message, code="no_replica") from None

    def adapter_of(self, name: str) -> str:
        """The LoRA adapter a request's model names ("" when it names a model)."""
        return name if self.models.resolve(name) is None and name in self.cluster.adapters() else ""

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models: every served model, then every LoRA adapter (its parent named)."""
        cards = [self.model_card(name) for name in self.models.names()]
        return cards + [self.model_card(name) for name in sorted(self.cluster.adapters())]

    def model_card(self, name: str) -> dict[str, Any] | None:
        """/v1/models' entry for a served model's name (or alias), or a LoRA adapter's (with
        its parent, as vLLM lists them); None if not served."""
        if base := self.cluster.adapters().get(name) if self.adapter_of(name) else None:
            return {
                "id": name,
                "object": "model",
                "created": self.started,
                "owned_by": "p3",
                "root": name,
                "parent": self.models.api_name(base),
                "max_model_len": self.max_model_len(base),
            }
        root = self.models.resolve(name)
        if root is None or self.models.api_name(root) not in self.models.names():
            return None
        return {
            "id": self.models.api_name(root),
            "object": "model",
            "created": self.started,
            "owned_by": "p3",
            "root": root,
            "max_model_len": self.max_model_len(root),
        }

    def max_model_len(self, model: str | None) -> int:
        """The smallest context among the model's ready replicas (0 with none ready)."""
        lengths = [r.max_model_len for r in self.cluster.replicas(model or "") if r.max_model_len]
        return min(lengths, default=0)

    # -- Actor -----------------------------------------------------------------------------

    async def setup(self) -> None:
        from p3.nodes.edge.api import make_app

        self.cluster.open()
        self._runner = web.AppRunner(
            make_app(self),
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self.config.keepalive_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{_url_host(host)}:{port}"
        log.info("edge.listening", url=self.url, edge_id=self.edge_id)  # and so serving

    def ready_info(self) -> dict[str, str]:
        return {"url": self.url, "edge_id": self.edge_id}

    def loops(self) -> list:
        return [*self.cluster.loops(), self.close_idle_connections()]

    async def close_idle_connections(self) -> None:
        """Close connections with no request under way for keepalive_timeout_s: idle
        keep-alives and headers that never end (a slowloris). aiohttp's own keep-alive timer
        misses a connection whose handler was not yet waiting when it fired."""
        timeout_s = self.config.keepalive_timeout_s
        idle_since: dict[Any, float] = {}
        while True:
            await asyncio.sleep(min(0.5, timeout_s / 4))
            now = time.monotonic()
            handlers = self._runner.server.connections if self._runner.server else []
            idle_since = {h: idle_since.get(h, now) for h in handlers if _is_idle(h)}
            for handler, since in idle_since.items():
                if now - since > timeout_s:
                    handler.force_close()

    async def drain(self) -> None:
        """Let in-flight requests finish, up to drain_timeout_s."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.cluster.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def teardown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.cluster.close()
        await asyncio.to_thread(tracing.shutdown)


def _is_idle(handler: Any) -> bool:
    """No request parsed and under way on this connection (aiohttp's RequestHandler)."""
    return getattr(handler, "_current_request", None) is None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- entry point -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def edge(name: str):
        return default_of(EdgeConfig, name)

    parser.add_argument("--coordinator", required=True, help="tcp://HOST:PORT of the coordinator")
    parser.add_argument("--host", default=edge("host"))
    parser.add_argument("--port", type=int, default=edge("port"), help="0: any free port")
    parser.add_argument("--api-key", action="append", default=[], dest="api_keys")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        help="load this model's tokenizer at start (others load when routed)",
    )
    parser.add_argument("--model-name", default=None, help="API name for the first --model")
    parser.add_argument("--max-body-bytes", type=int, default=edge("max_body_bytes"))
    parser.add_argument(
        "--max-pending",
        type=int,
        default=edge("max_pending"),
        help="requests, and samples (prompts x n), this edge holds at once; more get 429",
    )
    parser.add_argument("--max-n", type=int, default=Limits.max_n)
    parser.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens)
    parser.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    seconds = {  # flag -> (EdgeConfig field, help)
        "--token-timeout": ("token_timeout_s", "move a request whose tokens stop this long to "
                            "another replica (s)"),
        "--resume-grace": ("resume_grace_s", "seconds a stream whose client left goes on, "
                           "awaiting a Last-Event-ID resume"),
        "--resume-window": ("resume_window_s", "seconds a finished stream stays resumable"),
        "--keepalive-timeout": ("keepalive_timeout_s", "seconds a connection may sit with no "
                                "request under way (idle, or slow headers)"),
        "--body-timeout": ("body_timeout_s", "seconds a request body may take to arrive (408)"),
    }  # fmt: skip
    for flag, (name, text) in seconds.items():
        parser.add_argument(flag, type=float, default=edge(name), dest=name, help=text)
    parser.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="serve without tokenizers (vLLM's flag): prompts are token ids, outputs token ids",
    )
    parser.add_argument(
        "--edge-id",
        default="",
        help=f"with --keys: the edge key it runs as (default {DEFAULT_EDGE_NAME})",
    )
    add_security_args(parser)
    add_tracing_args(parser)


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    return EdgeConfig(
        coordinator=args.coordinator,
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_keys),
        models=tuple(args.models),
        model_name=args.model_name,
        max_body_bytes=args.max_body_bytes,
        max_pending=args.max_pending,
        limits=Limits(args.max_n, args.max_tokens_limit, args.max_prompt_tokens),
        token_timeout_s=args.token_timeout_s,
        keys=cluster_keys(args, "p3 edge"),
        resume_grace_s=args.resume_grace_s,
        resume_window_s=args.resume_window_s,
        edge_id=args.edge_id,
        keepalive_timeout_s=args.keepalive_timeout_s,
        body_timeout_s=args.body_timeout_s,
        skip_tokenizer_init=args.skip_tokenizer_init,
    )


def main(args: argparse.Namespace) -> int:
    """Run an edge until SIGTERM/SIGINT; prints `P3_READY {"kind": "edge", "url": ...}`."""
    from p3.nodes.actor.process import run_actor

    edge = Edge(config_from_args(args))
    tracing.configure(args.otlp_endpoint, "p3-edge", {"p3.edge_id": edge.edge_id})
    edge.preload()
    return run_actor(edge)
