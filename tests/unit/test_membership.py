"""The coordinator's membership table alone, on a hand-moved clock."""

from __future__ import annotations

from p3.nodes.membership import JOINING_TIMEOUT_S, Membership
from p3.protocol import messages as m


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table() -> tuple[Membership, Clock]:
    clock = Clock()
    return Membership(0.1, 3, hung_after_s=30.0, clock=clock), clock


def test_a_ready_node_silent_past_its_misses_is_dead():
    members, clock = table()
    member = members.register(b"n1", m.Hello(m.PROTOCOL_VERSION, "n1"))
    members.mark_ready(member, m.Ready("n1", member.epoch))
    clock.now += 0.31
    assert [mb.node_id for mb, _ in members.find_dead()] == ["n1"]


def test_a_loading_node_gets_longer_before_it_is_dead():
    members, clock = table()
    members.register(b"n1", m.Hello(m.PROTOCOL_VERSION, "n1"))
    clock.now += 0.31  # a heartbeat stall while the engine loads
    assert members.find_dead() == []
    clock.now += JOINING_TIMEOUT_S
    assert [mb.node_id for mb, _ in members.find_dead()] == ["n1"]
