"""The node's in-flight table keeps what an adopting edge needs: a resumable stream's orphans,
and its samples that finished while their edge was still there."""

from __future__ import annotations

import time

from p3.engine.sequence import StepOutput
from p3.nodes.node.inflight import InFlight, InFlightTable
from p3.protocol import messages as m


def entry(request_id: str, stream_id: str = "cmpl-1") -> InFlight:
    submit = m.Submit(request_id, [1, 2, 3], stream_id=stream_id, resume=b"x")
    return InFlight(request_id, b"edge-0/a", 1, 3, submit=submit if stream_id else None)


def test_a_stream_adopted_after_its_edge_died_brings_its_finished_samples():
    table = InFlightTable()
    for request_id in ("r-0", "r-1"):
        table.add(entry(request_id))
    table.add(entry("other", stream_id=""))
    table.batch([StepOutput("r-0", [7], finish_reason="stop"), StepOutput("r-1", [8])])
    assert "r-0" not in table and "r-1" in table  # r-0 is done streaming to its edge
    kept, stopped = table.orphan(b"edge-0/a", time.monotonic())
    assert [e.request_id for e in kept] == ["r-1"] and [e.request_id for e in stopped] == ["other"]
    table.batch([StepOutput("r-1", [9])])  # an orphan goes on, into its history
    found, taken = table.adopt("cmpl-1", b"edge-1/b")
    adopted = {e.request_id: e for e in found}
    assert taken == {}  # nothing of it streamed to a live edge
    assert sorted(adopted) == ["r-0", "r-1"]
    assert adopted["r-0"].finished and [d.token_ids for d in adopted["r-0"].history] == [[7]]
    assert not adopted["r-1"].finished and [d.token_ids for d in adopted["r-1"].history] == [
        [8], [9]
    ]
    assert table.get("r-1").edge == b"edge-1/b"  # it streams to its adopter from now on
    assert table.expire_orphans(time.monotonic() + 1) == [] and not table.ended


def test_a_sample_that_finished_as_an_orphan_is_there_for_a_second_adopter():
    table = InFlightTable()
    table.add(entry("r-0"))
    table.orphan(b"edge-0/a", time.monotonic())
    table.batch([StepOutput("r-0", [5], finish_reason="length")])
    assert [e.request_id for e in table.adopt("cmpl-1", b"edge-1/b")[0]] == ["r-0"]
    again, _ = table.adopt("cmpl-1", b"edge-2/c")  # edge-1 died as well
    assert [(e.request_id, e.finished) for e in again] == [("r-0", True)]


def test_a_stream_adopted_from_a_live_edge_is_taken_from_it():
    table = InFlightTable()
    table.add(entry("r-0"))
    table.add(entry("r-1", stream_id="cmpl-2"))
    found, taken = table.adopt("cmpl-1", b"edge-1/b")
    assert [e.request_id for e in found] == ["r-0"] and taken == {b"edge-0/a": ["r-0"]}
    assert table.get("r-0").edge == b"edge-1/b" and table.get("r-1").edge == b"edge-0/a"
    assert table.adopt("cmpl-1", b"edge-1/b") == ([], {})  # asked again: it has it already


def test_a_sample_its_edge_cancelled_at_a_stop_string_is_there_for_an_adopter():
    """The edge ends a sample whose text hit a stop string by cancelling it on its node; the
    stream's other sample goes on, and an adopter of the stream needs both."""
    table = InFlightTable()
    table.add(entry("r-0"))
    table.add(entry("r-1"))
    table.batch([StepOutput("r-0", [4]), StepOutput("r-1", [6])])
    table.cancel("r-0")
    table.orphan(b"edge-0/a", time.monotonic())
    found, _ = table.adopt("cmpl-1", b"edge-1/b")
    assert sorted((e.request_id, e.finished) for e in found) == [("r-0", True), ("r-1", False)]
