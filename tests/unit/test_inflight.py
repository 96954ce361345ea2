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
    adopted = {e.request_id: e for e in table.adopt("cmpl-1", b"edge-1/b")}
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
    assert [e.request_id for e in table.adopt("cmpl-1", b"edge-1/b")] == ["r-0"]
    again = table.adopt("cmpl-1", b"edge-2/c")  # edge-1 died as well
    assert [(e.request_id, e.finished) for e in again] == [("r-0", True)]
