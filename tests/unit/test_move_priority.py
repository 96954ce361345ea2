"""Streams moved off a dead node resume first: the survivor's scheduler prefills them ahead of
fresh prompts, one after another, without holding up its running decodes; the edge spreads a
burst of moves over the replicas left by the moved work each already has; and none of it
changes a token."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from p3.engine.block_manager import BlockManager
from p3.engine.scheduler import MOVE_SCHEDULE_ENV, MOVED_PACK_TOKENS, Scheduler
from p3.engine.sequence import Request, Sequence, Status
from p3.nodes.cluster.generation import Generation
from p3.nodes.cluster.links import Cluster, NodeLost
from p3.nodes.cluster.samples import Journal
from p3.protocol import messages as m

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=256, schedule="serial") -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget, schedule)


def fresh(s: Scheduler, rid: str, n: int) -> Sequence:
    seq = Sequence(Request(rid, list(range(1, n + 1))), BS, arrival=len(s.waiting))
    s.add(seq)
    return seq


def moved(s: Scheduler, rid: str, n: int, outputs: int = 2) -> Sequence:
    """A stream moved here: a prompt of n tokens and `outputs` tokens it had already."""
    request = Request(rid, list(range(1, n + 1)), output_token_ids=(9,) * outputs)
    seq = Sequence(request, BS, arrival=len(s.waiting))
    s.add(seq)
    return seq


def run(s: Scheduler, lane: int | None = None) -> dict[str, int]:
    """One step: schedule, then what the engine does after the model ran (mark computed,
    sample a token where the sequence is computed); {request id: tokens run}."""
    batch = s.schedule(lane)
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == len(seq):
            seq.append_token(7)
    return {seq.request_id: n for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}


def decoding(s: Scheduler, rid: str, n: int = 6) -> Sequence:
    seq = fresh(s, rid, n)
    run(s)
    assert seq.num_uncomputed_tokens == 1
    return seq


# -- the queue ---------------------------------------------------------------------------


def test_moved_streams_queue_ahead_of_fresh_prompts_first_come_first_served():
    s = make()
    fresh(s, "fresh-1", 8)
    moved(s, "moved-1", 8)
    fresh(s, "fresh-2", 8)
    moved(s, "moved-2", 8)
    assert [q.request_id for q in s.waiting] == ["moved-1", "moved-2", "fresh-1", "fresh-2"]


# -- a step's budget -----------------------------------------------------------------------


def test_moved_streams_are_prefilled_one_after_another_before_any_fresh_prompt():
    s = make(num_blocks=256, budget=1024)
    a = decoding(s, "running")
    fresh(s, "fresh", 100)
    moved(s, "moved-1", 200)
    moved(s, "moved-2", 150, outputs=30)
    # each moved stream alone (prompt and outputs so far), the running decode every step
    assert run(s) == {"running": 1, "moved-1": 202}
    assert run(s) == {"running": 1, "moved-1": 1, "moved-2": 180}
    assert run(s) == {"running": 1, "moved-1": 1, "moved-2": 1, "fresh": 100}
    assert a.num_output_tokens == 4


def test_small_moved_streams_share_a_step_within_the_pack():
    s = make(budget=1024)
    small = MOVED_PACK_TOKENS // 4 - 2  # + 2 outputs each: four fit
    for k in range(5):
        moved(s, f"m{k}", small)
    assert run(s) == {f"m{k}": small + 2 for k in range(4)}
    assert run(s) == {"m0": 1, "m1": 1, "m2": 1, "m3": 1, "m4": small + 2}


def test_a_moved_stream_longer_than_the_budget_is_chunked_and_keeps_its_turn():
    s = make(budget=32)
    a = decoding(s, "running")
    moved(s, "moved", 60)
    fresh(s, "fresh", 8)
    moved(s, "moved-2", 8)
    assert run(s) == {"running": 1, "moved": 31}
    assert run(s) == {"running": 1, "moved": 31}  # its prefill goes on before the next one
    assert run(s) == {"running": 1, "moved": 1, "moved-2": 10}
    assert run(s) == {"running": 1, "moved": 1, "moved-2": 1, "fresh": 8}
    assert a.status is Status.RUNNING


def test_a_moved_stream_goes_before_a_fresh_prompt_being_chunked_and_decodes_before_both():
    s = make(budget=16)
    long = fresh(s, "fresh", 60)
    assert run(s) == {"fresh": 16}
    moved(s, "moved", 10)
    assert run(s) == {"moved": 12}
    # the moved stream now decodes behind the prompt in arrival order: it goes first
    assert run(s) == {"moved": 1, "fresh": 15}
    assert run(s) == {"moved": 1, "fresh": 15}
    assert long.num_uncomputed_tokens == 14


def test_a_moved_stream_with_no_room_does_not_stop_the_others():
    """KV is short: the moved stream waits (head of the queue) while running work goes on."""
    s = make(num_blocks=6, budget=64)
    long = fresh(s, "long", 16)  # 4 blocks
    run(s)
    moved(s, "moved", 14)  # needs 4 blocks: 2 are free
    assert run(s) == {"long": 1}  # a fifth block for long's next token
    assert s.waiting[0].request_id == "moved" and long.status is Status.RUNNING


def test_a_prefill_never_preempts_a_decode_already_in_the_step():
    s = make(num_blocks=10, budget=16)
    long = fresh(s, "fresh", 40)
    run(s)  # 4 blocks
    short = moved(s, "moved", 6)
    run(s)  # 2 blocks; its next token needs a third, then 3 are left for long's next 4
    batch = s.schedule()
    # the newest running sequence is the moved one, but it is in the step: long goes
    assert batch.seqs == [short] and batch.preempted == [long]
    assert long.status is Status.WAITING and short.status is Status.RUNNING


@pytest.mark.parametrize("schedule", ["queue", "fifo"])
def test_the_benchmark_switch_brings_back_the_earlier_orders(schedule, monkeypatch):
    monkeypatch.setenv(MOVE_SCHEDULE_ENV, schedule)
    s = Scheduler(BlockManager(64, BS), 8, 1024)
    assert s.move_schedule == schedule
    fresh(s, "fresh", 20)
    moved(s, "moved-1", 30)
    moved(s, "moved-2", 40)
    # batched in one step as the budget allows, moved ones first unless fifo
    ids = list(run(s))
    assert ids == (["fresh", "moved-1", "moved-2"] if schedule == "fifo"
                   else ["moved-1", "moved-2", "fresh"])  # fmt: skip
    monkeypatch.delenv(MOVE_SCHEDULE_ENV)
    assert Scheduler(BlockManager(64, BS), 8, 1024).move_schedule == "serial"
    with pytest.raises(ValueError, match="move_schedule"):
        Scheduler(BlockManager(64, BS), 8, 1024, "sideways")


def test_pipeline_lanes_are_scheduled_apart():
    s = make(budget=1024)
    one = moved(s, "moved-lane-1", 100)
    one.lane = 1
    fresh(s, "fresh-lane-0", 50)  # lane 0
    assert run(s, lane=0) == {"fresh-lane-0": 50}  # lane 1's moved stream is not lane 0's
    assert run(s, lane=1) == {"moved-lane-1": 102}


# -- the edge: a burst of moves spread over the replicas left -----------------------------


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames, flags=0) -> Future:
        self.sent.append(frames)
        done: Future = Future()
        done.set_result(None)
        return done


class FakeSample:
    def __init__(self, request_id: str, node_id: str, prompt: int, outputs: int):
        self.index = 0
        self.finished = False
        self.finish_reason = None
        self.journal = Journal(
            request_id, "tiny", list(range(prompt)), m.WireSamplingParams(max_tokens=64), 0,
            node_id, 1, token_ids=[5] * outputs, tried_nodes={node_id},
        )  # fmt: skip

    @property
    def request_id(self) -> str:
        return self.journal.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.journal.token_ids)

    def apply(self, delta: m.TokenDelta) -> object:
        self.journal.token_ids += delta.token_ids
        return delta


@pytest.fixture
def cluster():
    c = Cluster("tcp://127.0.0.1:1", "edge-test")
    yield c
    c.close()


def replicas(c: Cluster, loads: dict[str, tuple[int, int]]) -> None:
    """Routed replicas of model tiny: node id -> (tokens to do, tokens processed)."""
    c.routes = {
        node_id: m.Route(node_id, 1, f"tcp://h:{k}", "tiny",
                         load=m.Load(num_tokens_to_do=to_do, num_tokens_processed=done))
        for k, (node_id, (to_do, done)) in enumerate(loads.items())
    }  # fmt: skip
    c.links = {
        node_id: SimpleNamespace(socket=FakeSocket(), close=lambda: None) for node_id in loads
    }
    c.epochs = {node_id: {1} for node_id in loads}


LOADS = {"a": (0, 0), "b": (500, 10**5), "c": (100, 0)}


def moving(c: Cluster, sizes: list[tuple[int, int]]) -> list[tuple[Generation, FakeSample]]:
    """A request per (prompt, outputs) whose sample is on node a."""
    out = []
    for k, (prompt, outputs) in enumerate(sizes):
        sample = FakeSample(f"r{k}", "a", prompt, outputs)
        generation = Generation(c, [sample])
        c.inflight[sample.request_id] = (sample, generation.queue)
        out.append((generation, sample))
    return out


SIZES = [(200, 20), (150, 10), (100, 40), (50, 5)]  # (prompt, outputs so far) of each


def test_the_cluster_pick_alone_would_send_most_of_the_burst_to_one_replica(cluster):
    """Why moves are not left to Cluster.pick: it weighs load in grains, then the work ever
    given, so c (less to do, less given) takes three of these four moves."""
    replicas(cluster, LOADS)
    went = []
    for prompt, _ in SIZES:
        node_id = cluster.pick("tiny", {"a"}).node_id
        cluster.sent_load[node_id] = cluster.sent_load.get(node_id, 0) + prompt + 64  # as submit
        went.append(node_id)
    assert went == ["c", "c", "b", "c"]


async def test_the_moves_of_a_death_are_spread_by_the_moved_work_on_each_replica(cluster):
    replicas(cluster, LOADS)
    moves = moving(cluster, SIZES)
    cluster._node_dead("a")
    for generation, sample in moves:
        event = await generation.queue.get()
        assert isinstance(event[1], NodeLost)
        generation._handle(sample, event[1])
    went = [sample.journal.node_id for _, sample in moves]
    # the first to the least loaded; then each to the replica with the least moved work
    assert went == ["c", "b", "b", "c"]
    tally = cluster.moves
    assert (tally.tokens("b"), tally.tokens("c")) == (160 + 140, 220 + 55)
    generation, sample = moves[1]
    generation._handle(sample, m.TokenDelta(sample.request_id, [8], sample.num_output_tokens))
    assert tally.tokens("b") == 140  # streaming again: its prefill is done
    moves[2][0].close()
    assert tally.tokens("b") == 0


async def test_a_sample_with_no_token_yet_moves_like_a_fresh_request(cluster):
    replicas(cluster, LOADS)
    ((generation, sample),) = moving(cluster, [(200, 0)])
    generation._handle(sample, NodeLost("a", "test"))
    assert sample.journal.node_id == "c"
    assert cluster.moves.tokens("c") == 0


async def test_with_one_replica_left_every_move_goes_there(cluster):
    replicas(cluster, {"a": (0, 0), "b": (500, 0)})
    moves = moving(cluster, SIZES[:2])
    for generation, sample in moves:
        generation._handle(sample, NodeLost("a", "test"))
    assert [s.journal.node_id for _, s in moves] == ["b", "b"]
    assert cluster.moves.tokens("b") == 220 + 160


async def test_a_busy_refusal_with_no_other_replica_cancels_there_and_comes_back(cluster):
    """Found by the constrained chaos run (seed 6013): a stream left b when its link reset (the
    Cancel went down with the link, so it ran on there), then its new node died; b, the only
    replica left, refused it as busy, and it failed. Now the edge cancels it on b again and
    resubmits it there once that took effect."""
    from p3.nodes.cluster import generation as g

    replicas(cluster, {"b": (0, 0)})
    ((generation, sample),) = moving(cluster, [(100, 7)])
    sample.journal.node_id, sample.journal.tried_nodes = "b", {"a", "b"}  # where it ran before
    busy = m.Rejected(sample.request_id, "request_id is still running here", "busy")
    assert generation._handle(sample, busy) is None  # no failure: it waits
    socket = cluster.links["b"].socket
    cancels = [f for f in socket.sent if b"cancel" in f[-1]]
    assert cancels, "the earlier submission is cancelled on b"
    event = await asyncio.wait_for(generation.queue.get(), 2)
    assert isinstance(event[1], g.RetryBusy)
    generation._handle(sample, event[1])
    assert cluster.holds(sample) and sample.journal.node_id == "b"
    submits = [f for f in socket.sent if b"submit" in f[-1]]
    assert submits, "submitted to b again, with the tokens it has"
    generation._busy[sample.index] = g.BUSY_RETRIES  # a node that stays busy: in the end
    with pytest.raises(g.RequestFailed):
        generation._handle(sample, busy)


# -- and the tokens are those of the run without a fault -----------------------------------


def test_moved_and_fresh_streams_together_give_the_tokens_each_gives_alone(default_model_dir):
    """The default model as stored, chunked prefill: streams moved in mid-way (prompt + the
    tokens they had) among fresh ones and running decodes, scheduled first, end exactly as
    they do alone and uninterrupted, greedy and seeded."""
    from p3.config import EngineConfig
    from p3.engine.engine import Engine
    from p3.sampling_params import SamplingParams

    engine = Engine(default_model_dir, EngineConfig(
        dtype="float32", kv_cache_bytes=64 << 20, max_num_batched_tokens=24, num_threads=1,
        enable_prefix_caching=False,  # every moved token computed again, as on a new node
    ))  # fmt: skip
    assert engine.scheduler.move_schedule == "serial"
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True),
    ]
    prompts = [[1, *range(200 + 37 * k, 200 + 37 * k + 9 + 5 * k)] for k in range(6)]

    def run(requests: list[Request], later: list[Request] = ()) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {r.request_id: list(r.output_token_ids) for r in requests}
        out |= {r.request_id: list(r.output_token_ids) for r in later}
        for r in requests:
            engine.add(r)
        steps = 0
        while engine.has_unfinished():
            if steps == 2:
                for r in later:  # they arrive while the others run
                    engine.add(r)
            for step in engine.step():
                out[step.request_id] += step.new_token_ids
            steps += 1
        return out

    def request(k: int, had: list[int] = ()) -> Request:
        return Request(f"p{k}", prompts[k], params[k % 2], seed=k, output_token_ids=tuple(had))

    alone: dict[str, list[int]] = {}
    for k in range(len(prompts)):
        alone |= run([request(k)])
    fresh_ones = [request(k) for k in (0, 1, 2)]
    # each moved one with the tokens it had when its node died
    moved_ones = [request(k, alone[f"p{k}"][:cut]) for k, cut in ((3, 5), (4, 1), (5, 9))]
    assert run(fresh_ones, moved_ones) == alone
