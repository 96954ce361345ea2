"""What a node is told at start, and how it names itself and its address to the cluster."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from p3.config import EngineConfig
from p3.weights.files import DEFAULT_MODEL


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class NodeConfig:
    coordinator: str
    node_id: str = field(default_factory=default_node_id)
    bind: str = "tcp://127.0.0.1:0"
    advertise_host: str | None = None  # None: the bind host (the hostname if it is a wildcard)
    advertise_port: int | None = None  # None: the bound port (set: a proxy or NAT in between)
    model: str | None = None  # None: the embedded default model
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_in_flight: int = 1024  # Submits beyond this are Rejected "overloaded"
    drain_timeout_s: float = 30.0
    hello_backoff_max_s: float = 2.0
    orphan_grace_s: float = 30.0  # a resumable stream whose edge went away goes on this long
    keys: str | None = None  # a `p3 keys generate` directory: CurveZMQ on every socket
    max_threads: int | None = None  # may compute with up to this many while host peers are down
    skip_tokenizer_init: bool = False  # announce no tokenizer: edges send token ids only
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters held from the start: (name, path)
    status_host: str = "127.0.0.1"  # its status server (p3.status): /health, /ready, /metrics
    status_port: int | None = None  # None: none; 0: any free port

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL


def advertised_address(
    bound: str, advertise_host: str | None, advertise_port: int | None = None
) -> str:
    """tcp://0.0.0.0:PORT as the edges should dial it: the advertised host and port (by
    default the bound ones; the hostname for a wildcard host)."""
    parts = urlsplit(bound)
    host = advertise_host or parts.hostname
    if host in (None, "0.0.0.0", "*", "::"):
        host = socket.gethostname()
    return f"{parts.scheme}://{host}:{advertise_port or parts.port}"
