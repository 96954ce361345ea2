"""Resumable streams' Last-Event-ID parsing: whatever a client sends is found or not, never an
exception."""

from __future__ import annotations

from p3.nodes.edge.replay import EventId, Replay, ReplayStore, parse_event_id


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


def test_a_stream_of_several_choices_counts_each_in_its_ids():
    store = ReplayStore()
    replay = store.open("cmpl-2", num_choices=2)
    for choice in (0, 1, 1, None):
        replay.append(b"x", choice)
    ids = [e.split(b"\n")[0].decode() for e in replay.events]
    assert ids == ["id: cmpl-2.1.1-0", "id: cmpl-2.2.1-1", "id: cmpl-2.3.1-2", "id: cmpl-2.4.1-2"]
    assert store.find("cmpl-2.3.1-2") == (replay, 3)
    assert parse_event_id("cmpl-2.3.1-2") == EventId("cmpl-2", 3, (1, 2))
    for bad in ("cmpl-2.3.1-3", "cmpl-2.3.1-x", "cmpl-2.3.-1", "cmpl-2.3.1.2", "cmpl-2.3." +
                "-".join(["0"] * 5000)):  # fmt: skip
        assert parse_event_id(bad) is None, bad


def test_a_rebuilt_stream_holds_only_the_events_after_its_base():
    store = ReplayStore()
    replay = store.add(Replay("cmpl-3", 2, base=5, seen=(2, 3)))
    replay.append(b"y", 0)
    assert replay.events[0].startswith(b"id: cmpl-3.6.3-3\n")
    assert store.find("cmpl-3.6.3-3") == (replay, 6)
    assert store.find("cmpl-3.5.2-3") == (replay, 5)
    assert store.find("cmpl-3.4.2-2") is None  # before it: that edge never had it
    assert "cmpl-3" in store
