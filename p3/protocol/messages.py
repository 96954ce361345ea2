"""Every message that crosses a cluster socket, and one tagged union per socket direction.

Rules (docs/design.md): msgspec Structs, array_like (positional: small and fast), frozen, gc=False,
tagged. Fields are only ever appended, each with a default, so an older peer's shorter message
still decodes. A Hello carries PROTOCOL_VERSION; a peer with another version is refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from p3.outputs import FinishReason
from p3.structured import MAX_GRAMMAR_BYTES

PROTOCOL_VERSION = 6  # 2: the load figures as one nested Load; 3: tokenizers over the wire;
# 4: streams taken over from a live edge (TakenOver), threads lent by dead peers (Threads);
# 5: structured outputs (WireSamplingParams.grammar: an older node would ignore it) and
# embeddings (Submit.embed, TokenDelta.embedding); 6: LoRA adapters (Submit.lora, the
# adapters a node holds in Ready/Heartbeat/Route, LoadAdapter/UnloadAdapter/AdapterDone)

# Why a node refused a Submit (Rejected.code). Nothing was generated, so the edge may retry:
# bad_request fails the request (HTTP 400: the client's fault, every node would refuse it);
# overloaded, busy (that request id still runs there), stale_epoch and draining send it to
# another replica, and when none takes it it fails as overloaded or no_replica (HTTP 503);
# busy with no other replica first cancels it there and comes back (BUSY_RETRIES).
RejectCode = Literal["bad_request", "overloaded", "busy", "stale_epoch", "draining"]
# How an actor stops: drain finishes in-flight work first (bounded), abort does not.
StopMode = Literal["drain", "abort"]


# Numbers a peer sends are bounded where they are decoded: a frame outside these ranges is
# dropped and counted like any malformed frame (the edge checks a client's numbers first).
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
Count = Annotated[int, Meta(ge=0, lt=1 << 31)]
AdapterName = Annotated[str, Meta(max_length=256)]
MAX_ADAPTERS = 1024  # names a node may announce


class Msg(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=True):
    pass


# -- sampling, as it travels --------------------------------------------------------------------


class WireSamplingParams(Msg, tag="sampling"):
    max_tokens: Count | None = 16
    min_tokens: Count = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Annotated[int, Meta(ge=-1, lt=1 << 31)] = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[TokenId, float] = {}
    logprobs: Count | None = None
    prompt_logprobs: Count | None = None
    # what the output must match: an llguidance grammar (TopLevelGrammar JSON), "" for none
    grammar: Annotated[str, Meta(max_length=MAX_GRAMMAR_BYTES)] = ""


# -- node -> coordinator -----------------------------------------------------------------------


class Capacity(Msg, tag="capacity"):
    device: str = "cpu"
    memory_bytes: int = 0  # available to this node at start (0: unknown)
    num_threads: int = 0
    model_bytes: int = 0  # its model's weights in the serving dtype, whole (0: unknown)
    kv_cache_bytes: int = 0  # the KV cache it will allocate
    max_threads: int = 0  # it may grow to this many while peers on its host are down (0: no)


class Hello(Msg, tag="hello"):
    protocol_version: int
    node_id: str
    host: str = ""
    pid: int = 0
    address: str = ""  # where edges reach this node (its ROUTER socket)
    capacity: Capacity = Capacity()
    model: str = ""  # the model this node was started with ("" = let the coordinator place)
    epoch: int = 0  # the epoch this node held before (0: none); a new epoch is always higher
    # registering again (the coordinator restarted): the replica it already serves in, as
    # placed (-1: none yet), its rank there and the replica's size; its engine is built
    replica: int = -1
    replica_rank: int = 0
    replica_size: int = 1


class Ready(Msg, tag="ready"):
    node_id: str
    epoch: int
    model: str = ""
    num_kv_blocks: int = 0
    block_size: int = 0
    max_model_len: int = 0
    load_time_s: float = 0.0
    replica_rank: int = 0  # this node's rank in its replica (only rank 0 is routed)
    replica_size: int = 1  # tp x pp nodes
    kv_cache_dtype: str = ""  # what its KV cache holds: "auto" (the model dtype) or "int8"
    tokenizer_hash: str = ""  # of its tokenizer files (edges fetch them with GetTokenizer)
    adapters: Annotated[list[AdapterName], Meta(max_length=MAX_ADAPTERS)] = []  # LoRA, by name


class Load(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """How busy a node is: its heartbeat says it, the routes repeat it, edges route on it."""

    num_free_blocks: int = 0  # KV blocks
    num_waiting: int = 0  # sequences queued in the engine
    num_running: int = 0  # sequences in the running batch
    num_tokens_in_flight: int = 0  # prompt and output tokens of its in-flight requests
    num_tokens_processed: int = 0  # prompt and output tokens run through the model, ever
    num_tokens_to_do: int = 0  # work left in flight: prompts not started, outputs still allowed
    num_threads: int = 0  # it computes with (more while peers on its host are down: Threads)
    # prompt tokens looked up in its prefix cache, and of those found there, ever (vLLM's
    # prefix_cache_queries / prefix_cache_hits)
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0


class Heartbeat(Msg, tag="heartbeat"):
    """Liveness with progress: a node whose compute thread hangs is caught too."""

    node_id: str
    epoch: int
    num_steps: int = 0
    last_step_age_s: float = 0.0
    busy: bool = False  # requests are in flight, so num_steps should be moving
    draining: bool = False  # stopping: finishing in-flight requests, accepting no new ones
    load: Load = Load()
    # how long the step under way may take, by the node's own measured speed and its token
    # budget (0: no measure yet): a step slower than hung_after_s is not a hang below this
    step_allowance_s: float = 0.0
    # the LoRA adapters it holds now (they come and go: load_lora_adapter), by name
    adapters: Annotated[list[AdapterName], Meta(max_length=MAX_ADAPTERS)] = []


def expected_output_tokens(max_tokens: int | None) -> int:
    """What a request will generate, as nodes count num_tokens_to_do and edges weigh routes:
    its max_tokens, or a typical answer's length."""
    return max_tokens if max_tokens is not None else 256


class Fatal(Msg, tag="fatal"):
    """A node's last word before it exits."""

    node_id: str
    epoch: int
    reason: str = ""


class Goodbye(Msg, tag="goodbye"):
    node_id: str
    epoch: int


class EdgeHello(Msg, tag="edge_hello"):
    protocol_version: int
    edge_id: str


class Rendezvous(Msg, tag="rendezvous"):
    """A replica leader's answer to Place: where its torch.distributed store listens."""

    node_id: str
    epoch: int
    host: str
    port: int


ToCoordinator = Hello | Ready | Heartbeat | Fatal | Goodbye | EdgeHello | Rendezvous


# -- coordinator -> node -----------------------------------------------------------------------


class Welcome(Msg, tag="welcome"):
    """Registration accepted: the epoch to stamp on everything, and what to load."""

    epoch: int
    model: str = ""
    replica: int = 0
    heartbeat_interval_s: float = 0.1
    placed: bool = True  # False: a tensor-parallel shard, wait for Place before loading


class Refused(Msg, tag="refused"):
    reason: str


class Fence(Msg, tag="fence"):
    """You were declared dead under this epoch: stop serving it and register again."""

    epoch: int
    reason: str = ""


class Shutdown(Msg, tag="shutdown"):
    mode: StopMode = "drain"


class Reregister(Msg, tag="reregister"):
    """I do not know you under this epoch (I restarted): say Hello again, keep your streams."""

    epoch: int = 0
    reason: str = ""


class Place(Msg, tag="place"):
    """A node's shard of a replica of tp_size x pp_size nodes: its replica_rank (stage
    replica_rank // tp_size, tp rank replica_rank % tp_size). Replica rank 0 (rendezvous "")
    hosts the store and answers Rendezvous; the others get the leader's "host:port" to join."""

    epoch: int
    replica: int
    replica_rank: int
    tp_size: int = 1
    pp_size: int = 1
    rendezvous: str = ""


class Threads(Msg, tag="threads"):
    """How many threads to compute with: more while nodes on its host are down (their cores
    are idle), its own again once they are back. A (re)registered node starts with its own."""

    epoch: int
    num_threads: int


ToNodeFromCoordinator = Welcome | Refused | Fence | Shutdown | Reregister | Place | Threads


# -- coordinator -> edge -----------------------------------------------------------------------


class Route(Msg, tag="route"):
    node_id: str
    epoch: int
    address: str
    model: str
    replica: int = 0
    max_model_len: int = 0
    num_kv_blocks: int = 0
    host: str = ""
    pid: int = 0
    replica_rank: int = 0  # > 0: a shard of rank 0's replica, listed but never routed to
    load: Load = Load()  # as its latest heartbeat said
    tokenizer_hash: str = ""  # as its Ready said
    adapters: list[str] = []  # the LoRA adapters it holds, as its latest heartbeat said


class Routes(Msg, tag="routes"):
    """The whole routing table; version grows with every change."""

    version: int
    routes: list[Route] = []
    dead: list[str] = []  # node ids declared dead since the previous table


ToEdgeFromCoordinator = Routes | Refused


# -- edge -> node ------------------------------------------------------------------------------


class Submit(Msg, tag="submit"):
    request_id: str
    prompt_token_ids: list[TokenId]
    params: WireSamplingParams = WireSamplingParams()
    seed: int = 0  # the effective seed (the edge draws one when the client gave none)
    epoch: int = 0  # the node's epoch as the edge's routing table knows it
    output_token_ids: list[TokenId] = []  # generated elsewhere already: continue after them
    # a resumable stream (p3.nodes.edge.adoption): if its edge goes away, the node keeps it
    # going for a grace period, for another edge to Adopt by stream_id and rebuild from
    # `resume` (the edge's own context, opaque here) and the deltas the node sent
    stream_id: str = ""
    resume: bytes = b""
    embed: bool = False  # the prompt's embedding (TokenDelta.embedding), nothing generated
    lora: AdapterName = ""  # the LoRA adapter it runs under, by name ("": the base model)
    # the W3C traceparent of the edge's span for its request (p3.tracing; "": not traced). An
    # older node ignores it (msgspec drops trailing fields it does not know), so no new version
    traceparent: Annotated[str, Meta(max_length=128)] = ""


class Cancel(Msg, tag="cancel"):
    request_id: str


class Ping(Msg, tag="ping"):
    nonce: int = 0


class GetTokenizer(Msg, tag="get_tokenizer"):
    """The files of the tokenizer whose hash the node's route announced: an edge reads no
    path a peer names, and needs no copy of the model."""

    tokenizer_hash: str


class Adopt(Msg, tag="adopt"):
    """An edge takes over the samples of a stream (a client resumed it there with
    Last-Event-ID: its edge went away, or the client lost its way to it): the node answers
    Adopted and streams them to this edge; an edge that still had them hears TakenOver."""

    stream_id: str


class LoadAdapter(Msg, tag="load_adapter"):
    """Hold this LoRA adapter (a PEFT directory on the node's host) under this name: the
    node loads and checks it, answers AdapterDone, and announces it in its heartbeats."""

    name: AdapterName
    path: Annotated[str, Meta(max_length=4096)]


class UnloadAdapter(Msg, tag="unload_adapter"):
    """Stop taking requests for this adapter (those running finish under it)."""

    name: AdapterName


ToNodeFromEdge = Submit | Cancel | Ping | GetTokenizer | Adopt | LoadAdapter | UnloadAdapter


# -- node -> edge ------------------------------------------------------------------------------


class TokenDelta(Msg, tag="delta"):
    request_id: str
    token_ids: list[int]
    index: int = 0  # output position of token_ids[0]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # with prompt_logprobs: (token, logprob, top k) of prompt tokens 1.. (the first has none)
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    embedding: list[float] | None = None  # an embed Submit's, with its finish


class Tokens(Msg, tag="tokens"):
    """Everything one engine step produced for one edge: one message per step, not per token."""

    node_id: str
    epoch: int
    step: int
    deltas: list[TokenDelta] = []


class Rejected(Msg, tag="rejected"):
    """Definite: nothing was generated; safe to retry elsewhere."""

    request_id: str
    reason: str
    code: RejectCode = "overloaded"


class Pong(Msg, tag="pong"):
    nonce: int = 0
    node_id: str = ""
    epoch: int = 0


class TokenizerFiles(Msg, tag="tokenizer_files"):
    """tokenizer.json and its companions (p3.tokenizer.TOKENIZER_FILES) by name; empty if the
    node has no tokenizer of that hash. The edge checks the bytes against the hash."""

    tokenizer_hash: str
    files: dict[str, bytes] = {}


class AdoptedSample(msgspec.Struct, array_like=True, frozen=True, gc=False):
    submit: Submit  # as the node got it (epoch, seed, params, prefix tokens, resume context)
    history: list[TokenDelta] = []  # every delta the node produced for it, in order
    finished: bool = False


class Adopted(Msg, tag="adopted"):
    stream_id: str
    samples: list[AdoptedSample] = []  # empty: no orphaned stream of that id here


class TakenOver(Msg, tag="taken_over"):
    """To the edge a stream's samples streamed to until another edge adopted them: they are
    that edge's now (its client resumed there), so this one stops serving them, and must
    neither cancel nor move them."""

    stream_id: str
    request_ids: list[str] = []


class AdapterDone(Msg, tag="adapter_done"):
    """A LoadAdapter or UnloadAdapter carried out (ok), or why not."""

    name: str
    ok: bool
    error: str = ""
    node_id: str = ""
    loaded: bool = True  # what was asked: load (True) or unload


ToEdgeFromNode = Tokens | Rejected | Pong | TokenizerFiles | Adopted | TakenOver | AdapterDone
