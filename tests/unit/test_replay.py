"""Resumable streams' Last-Event-ID parsing: whatever a client sends is found or not, never an
exception."""

from __future__ import annotations

from p3.nodes.edge.replay import ReplayStore


def test_last_event_ids_are_found_or_not_never_raise():
    store = ReplayStore()
    replay = store.open("chatcmpl-1")
    for i in range(3):
        replay.append(b"event %d" % i)
    assert store.find("chatcmpl-1.2") == (replay, 2)
    assert store.find(" chatcmpl-1.0 ") == (replay, 0)
    for bad in ("chatcmpl-1.²", "chatcmpl-1." + "9" * 5000, "chatcmpl-1.4", "chatcmpl-1.-1",
                "chatcmpl-1", "", ".", "other.1", "chatcmpl-1.1e3"):  # fmt: skip
        assert store.find(bad) is None, bad
