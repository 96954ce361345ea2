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


def test_tensor_parallel_nodes_form_replicas_in_join_order():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    joined = [
        members.register(n.encode(), m.Hello(m.PROTOCOL_VERSION, n, model="a")) for n in "xyz"
    ]
    assert not any(mb.placed for mb in joined)
    groups = members.form_groups()
    assert [[mb.node_id for mb in g] for g in groups] == [["x", "y"]]
    assert [(mb.replica, mb.rank) for mb in groups[0]] == [(0, 0), (0, 1)]
    assert not joined[2].placed and members.form_groups() == []  # z waits for a partner
    w = members.register(b"w", m.Hello(m.PROTOCOL_VERSION, "w", model="a"))
    (group,) = members.form_groups()
    assert [(mb.node_id, mb.replica, mb.rank) for mb in group] == [("z", 1, 0), ("w", 1, 1)]
    assert w.group_size == 2


def test_a_replica_is_routed_through_rank_0_only_while_every_rank_is_ready():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    for n in "xy":
        members.register(n.encode(), m.Hello(m.PROTOCOL_VERSION, n, model="a"))
    leader, follower = members.form_groups()[0]
    members.mark_ready(leader, m.Ready("x", leader.epoch, "a"))
    assert members.routes() == []  # the follower is still loading
    members.mark_ready(follower, m.Ready("y", follower.epoch, "a", replica_rank=1, replica_size=2))
    assert [(r.node_id, r.replica_rank) for r in members.routes()] == [("x", 0), ("y", 1)]
    assert members.group_of(follower) == [leader, follower]
    members.declare_dead(follower, "heartbeat-timeout")
    assert members.routes() == []  # half a model serves no one
