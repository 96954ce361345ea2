"""The coordinator's membership table alone, on a hand-moved clock."""

from __future__ import annotations

from p3.nodes.coordinator.membership import (
    FORGET_DEAD_AFTER_S,
    JITTER_CAP,
    JOINING_TIMEOUT_S,
    Membership,
    Verdict,
)
from p3.nodes.coordinator.threads import thread_grants
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


def ready_member(members, clock, gaps_s):
    member = members.register(b"n1", m.Hello(m.PROTOCOL_VERSION, "n1"))
    members.mark_ready(member, m.Ready("n1", member.epoch))
    for gap_s in gaps_s:
        clock.now += gap_s
        members.record_heartbeat(member, m.Heartbeat("n1", member.epoch))
    return member


def test_a_node_seen_late_gets_more_silence_but_never_past_the_cap():
    members, clock = table()
    ready_member(members, clock, [0.1] * 5)  # punctual: the configured 0.3 s
    clock.now += 0.31
    assert len(members.find_dead()) == 1
    members, clock = table()
    ready_member(members, clock, [0.1, 0.4, 0.1])  # one heartbeat 0.3 s late: 1.5 x 0.4 s
    clock.now += 0.55
    assert members.find_dead() == []
    clock.now += 0.1
    assert len(members.find_dead()) == 1
    members, clock = table()
    ready_member(members, clock, [2.0, 0.1])  # a long stall: still the cap
    clock.now += JITTER_CAP * 0.3 + 0.01
    assert len(members.find_dead()) == 1


def test_a_late_gap_is_forgotten_once_out_of_the_window():
    members, clock = table()
    ready_member(members, clock, [0.5] + [0.1] * 32)
    clock.now += 0.31
    assert len(members.find_dead()) == 1


def test_the_coordinators_own_stall_is_excused():
    members, clock = table()
    ready_member(members, clock, [0.1])
    clock.now += 0.25
    members.excuse(0.2)  # the coordinator's loop ran 0.2 s late
    clock.now += 0.2
    assert members.find_dead() == []  # 0.45 s since its heartbeat, 0.25 s of it observed
    clock.now += 0.1
    assert len(members.find_dead()) == 1


def test_a_dead_member_is_fenced_for_a_while_then_forgotten():
    members, clock = table()
    member = members.register(b"n1", m.Hello(m.PROTOCOL_VERSION, "n1"))
    members.declare_dead(member, "test")
    clock.now += FORGET_DEAD_AFTER_S / 2
    assert members.forget_dead() == [] and members.classify("n1", member.epoch)[0] is Verdict.FENCED
    clock.now += FORGET_DEAD_AFTER_S
    assert members.forget_dead() == ["n1"] and "n1" not in members.members
    assert members.classify("n1", member.epoch)[0] is Verdict.UNKNOWN


def test_tensor_parallel_nodes_form_replicas_in_join_order():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    joined = [
        members.register(n.encode(), m.Hello(m.PROTOCOL_VERSION, n, model="a")) for n in "xyz"
    ]
    assert not any(mb.placed for mb in joined)
    groups = members.form_groups()
    assert [[mb.node_id for mb in g] for g in groups] == [["x", "y"]]
    assert [(mb.replica, mb.replica_rank) for mb in groups[0]] == [(0, 0), (0, 1)]
    assert not joined[2].placed and members.form_groups() == []  # z waits for a partner
    w = members.register(b"w", m.Hello(m.PROTOCOL_VERSION, "w", model="a"))
    (group,) = members.form_groups()
    assert [(mb.node_id, mb.replica, mb.replica_rank) for mb in group] == [("z", 1, 0), ("w", 1, 1)]
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


def placed_hello(node_id: str, replica: int, rank: int, size: int = 2) -> m.Hello:
    """The Hello of a node registering again (the coordinator restarted), placed already."""
    return m.Hello(
        m.PROTOCOL_VERSION, node_id, model="a", epoch=5, replica=replica, replica_rank=rank,
        replica_size=size,
    )  # fmt: skip


def test_nodes_registering_again_keep_their_replica_and_ranks_in_any_order():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    follower = members.register(b"y", placed_hello("y", 3, 1))
    leader = members.register(b"x", placed_hello("x", 3, 0))
    assert members.form_groups() == []  # nothing to form: they are a replica still
    assert [(mb.replica, mb.replica_rank, mb.group_size) for mb in (leader, follower)] == [
        (3, 0, 2),
        (3, 1, 2),
    ]
    members.mark_ready(follower, m.Ready("y", follower.epoch, "a", replica_rank=1, replica_size=2))
    assert members.routes() == []
    members.mark_ready(leader, m.Ready("x", leader.epoch, "a"))
    assert [(r.node_id, r.replica_rank) for r in members.routes()] == [("x", 0), ("y", 1)]


def test_a_kept_replica_number_taken_since_moves_the_whole_replica_to_another():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    for n in "ab":
        members.register(n.encode(), m.Hello(m.PROTOCOL_VERSION, n, model="a"))
    (formed,) = members.form_groups()
    assert formed[0].replica == 0
    x = members.register(b"x", placed_hello("x", 0, 0))
    y = members.register(b"y", placed_hello("y", 0, 1))
    assert (x.replica, x.replica_rank, y.replica, y.replica_rank) == (1, 0, 1, 1)
    assert members.group_of(x) == [x, y]


def test_a_node_declared_dead_keeps_no_place_and_size_one_keeps_its_number():
    members = Membership(0.1, 3, hung_after_s=30.0, replica_size=2)
    x = members.register(b"x", placed_hello("x", 0, 0))
    members.declare_dead(x, "heartbeat-timeout")
    assert not members.register(b"x", placed_hello("x", 0, 0)).placed  # its replica is down
    single, _ = table()
    assert single.register(b"n", placed_hello("n", 4, 0, size=1)).replica == 4
    assert single.register(b"o", placed_hello("o", 4, 0, size=1)).replica == 0  # 4 is taken


def test_a_dead_nodes_threads_are_lent_to_its_host_peers_until_it_is_back():
    members, _ = table()

    def hello(node_id: str, host: str, threads: int = 1, most: int = 2) -> m.Hello:
        capacity = m.Capacity(num_threads=threads, max_threads=most)
        return m.Hello(m.PROTOCOL_VERSION, node_id, host=host, capacity=capacity)

    a = members.register(b"a", hello("a", "h1"))
    members.register(b"b", hello("b", "h1"))
    members.register(b"c", hello("c", "h2"))  # another host: nothing of h1's for it
    members.register(b"d", hello("d", "h1", most=0))  # may not grow
    assert thread_grants(members.members.values(), 200.0) == {"a": 1, "b": 1, "c": 1, "d": 1}
    members.declare_dead(members.members["b"], "killed")  # at 100.0
    assert thread_grants(members.members.values(), 105.0, 10.0)["a"] == 1  # may be restarting
    assert thread_grants(members.members.values(), 200.0) == {"a": 2, "c": 1, "d": 1}
    members.register(b"b", hello("b", "h1"))  # back: each to its own
    assert thread_grants(members.members.values(), 200.0) == {"a": 1, "b": 1, "c": 1, "d": 1}
    members.declare_dead(a, "killed")
    members.declare_dead(members.members["b"], "killed")
    assert thread_grants(members.members.values(), 200.0)["d"] == 1  # capped at its own


def test_gaps_while_loading_are_no_evidence_of_a_late_host():
    members, clock = table()
    member = members.register(b"n1", m.Hello(m.PROTOCOL_VERSION, "n1"))
    clock.now += 2.0  # loading starved its heartbeats
    members.record_heartbeat(member, m.Heartbeat("n1", member.epoch))
    members.mark_ready(member, m.Ready("n1", member.epoch))
    clock.now += 0.31
    assert len(members.find_dead()) == 1
