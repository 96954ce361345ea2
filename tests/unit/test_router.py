"""The edge's choice of replica (least work left, then least work given in all), and which
epochs it hears a node under."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from p3.nodes.cluster.links import LOAD_GRAIN, Cluster, NodeLost
from p3.nodes.cluster.samples import Journal
from p3.protocol import messages as m


@pytest.fixture
def cluster():
    c = Cluster("tcp://127.0.0.1:1", "edge-test")
    yield c
    c.close()


def route(node_id: str, to_do: int = 0, processed: int = 0) -> m.Route:
    return m.Route(
        node_id, 1, f"tcp://h:{len(node_id)}", "tiny",
        load=m.Load(num_tokens_to_do=to_do, num_tokens_processed=processed),
    )  # fmt: skip


def test_the_replica_with_less_work_left_wins(cluster):
    cluster.routes = {"a": route("a", to_do=3 * LOAD_GRAIN), "b": route("b", to_do=10)}
    assert cluster.pick("tiny").node_id == "b"


def test_among_equally_loaded_replicas_the_one_given_less_in_all_wins(cluster):
    cluster.routes = {"a": route("a", processed=5000), "b": route("b", processed=4000)}
    assert cluster.pick("tiny").node_id == "b"
    cluster.sent_load["b"] = 2000  # sent since the table (a local increment): b is busier now
    assert cluster.pick("tiny").node_id == "a"


def test_excluded_and_other_models_replicas_are_not_picked(cluster):
    cluster.routes = {"a": route("a"), "b": route("b", processed=10**6)}
    assert cluster.pick("tiny", exclude={"a"}).node_id == "b"
    assert cluster.pick("other") is None


# -- epochs: a coordinator restart, a death, a restarted node process ----------------------


def routed(node_id: str, epoch: int, pid: int = 7) -> m.Route:
    return m.Route(node_id, epoch, "tcp://127.0.0.1:9", "tiny", pid=pid)


def on_node(cluster: Cluster, node_id: str, request_id: str) -> asyncio.Queue:
    """A sample in flight on node_id under the epoch the edge routes it by."""
    epoch = max(cluster.epochs[node_id])
    journal = Journal(request_id, "tiny", [1, 2], m.WireSamplingParams(), 0, node_id, epoch)
    queue: asyncio.Queue = asyncio.Queue()
    cluster.inflight[request_id] = (SimpleNamespace(request_id=request_id, journal=journal), queue)
    return queue


def tokens(node_id: str, epoch: int, request_id: str, index: int) -> m.Tokens:
    return m.Tokens(node_id, epoch, index, [m.TokenDelta(request_id, [100 + index], index)])


def received(queue: asyncio.Queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait()[1])
    return out


async def test_a_node_registered_again_streams_on_under_the_epoch_of_its_samples(cluster):
    cluster.on_routes(m.Routes(40, [routed("a", 1)]))
    old = on_node(cluster, "a", "old")
    cluster.on_routes(m.Routes(1, [routed("a", 3)]))  # a new coordinator: a new epoch, no death
    new = on_node(cluster, "a", "new")
    cluster.on_node_tokens("a", tokens("a", 1, "old", 0))
    cluster.on_node_tokens("a", tokens("a", 3, "new", 0))
    cluster.on_node_tokens("a", tokens("a", 3, "old", 1))  # not the epoch "old" went under
    assert [d.token_ids for d in received(old)] == [[100]]
    assert [d.token_ids for d in received(new)] == [[100]]
    assert cluster.epochs["a"] == {1, 3}
    del cluster.inflight["old"]
    cluster.on_routes(m.Routes(2, [routed("a", 5)]))  # epochs no sample uses are forgotten
    assert cluster.epochs["a"] == {3, 5}


async def test_a_node_listed_dead_is_heard_under_none_of_its_epochs(cluster):
    cluster.on_routes(m.Routes(1, [routed("a", 1)]))
    queue = on_node(cluster, "a", "r")
    cluster.on_routes(m.Routes(2, [routed("a", 3)]))
    cluster.on_routes(m.Routes(3, [], dead=["a"]))
    cluster.on_node_tokens("a", tokens("a", 1, "r", 0))
    assert [type(x) for x in received(queue)] == [NodeLost]


async def test_a_node_routed_from_another_process_lost_the_samples_of_the_old_one(cluster):
    cluster.on_routes(m.Routes(1, [routed("a", 1, pid=7)]))
    queue = on_node(cluster, "a", "r")
    cluster.on_routes(m.Routes(2, [routed("a", 2, pid=8)]))  # died, started again, registered
    cluster.on_node_tokens("a", tokens("a", 1, "r", 0))
    assert received(queue) == [NodeLost("a", "node restarted")]


async def test_a_link_whose_reader_raises_is_logged_dropped_and_linked_anew(cluster, monkeypatch):
    """A bug in handling a node's frames must not silence the link: the edge logs it, moves
    the link's samples, and the next routes table links the node again."""
    import structlog.testing
    import zmq

    from p3.protocol import wire

    node = wire.make_socket(cluster.ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0")
    try:
        table = m.Route("n1", 1, wire.bound_address(node), "tiny", pid=7)
        cluster.on_routes(m.Routes(1, [table]))
        first = cluster.links["n1"]
        broken = asyncio.Event()

        def bug(node_id, tokens):
            broken.set()
            raise KeyError("a bug in on_node_tokens")

        monkeypatch.setattr(cluster, "on_node_tokens", bug)
        lost = []
        monkeypatch.setattr(cluster, "link_lost", lost.append)
        with structlog.testing.capture_logs() as logs:
            first.socket.send(wire.encode(m.Ping(1)))  # so the node learns the edge's identity
            identity, _ = await asyncio.wait_for(node.recv_multipart(), 5)
            await node.send_multipart([identity, wire.encode(m.Tokens("n1", 1, 1))])
            await asyncio.wait_for(broken.wait(), 5)
            async with asyncio.timeout(5):
                while "n1" in cluster.links:  # the done-callback runs on a later loop turn
                    await asyncio.sleep(0)
        [entry] = [e for e in logs if e["event"] == "edge.link_task_failed"]
        assert entry["log_level"] == "error" and entry["error_type"] == "KeyError"
        assert lost == ["n1"]
        cluster.on_routes(m.Routes(2, [table]))
        assert cluster.links["n1"] is not first
    finally:
        node.close(linger=0)
