"""The edge's choice of replica: least work left, then least work given in all."""

from __future__ import annotations

import pytest

from p3.nodes.router import LOAD_GRAIN, Cluster
from p3.protocol import messages as m


@pytest.fixture
def cluster():
    c = Cluster("tcp://127.0.0.1:1", "edge-test")
    yield c
    c.close()


def route(node_id: str, to_do: int = 0, processed: int = 0) -> m.Route:
    return m.Route(
        node_id, 1, f"tcp://h:{len(node_id)}", "tiny",
        num_tokens_to_do=to_do, num_tokens_processed=processed,
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
