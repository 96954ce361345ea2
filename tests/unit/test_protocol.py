"""The wire: every message round-trips, older shorter messages decode, bad frames drop."""

from __future__ import annotations

import msgspec
import pytest

from p3.protocol import messages as m
from p3.protocol import wire
from p3.protocol.sampling import from_wire, to_wire
from p3.sampling_params import SamplingParams

EXAMPLES = [
    m.WireSamplingParams(max_tokens=5, temperature=0.5, stop_token_ids=[2], logit_bias={3: 1.5}),
    m.Capacity(device="cuda:0", memory_bytes=1 << 30, num_threads=8),
    m.Hello(m.PROTOCOL_VERSION, "n1", "host", 42, "tcp://1.2.3.4:5", m.Capacity(), "tiny"),
    m.Hello(m.PROTOCOL_VERSION, "n1", "host", 42, "tcp://1.2.3.4:5", m.Capacity(), "tiny", 7),
    m.Ready("n1", 3, "tiny", 100, 16, 2048, 0.25),
    m.Ready("n1", 3, "tiny", 100, 16, 2048, 0.25, 1, 2),
    m.Rendezvous("n1", 3, "10.0.0.1", 29500),
    m.Place(3, 0, 1, 2, 1, "10.0.0.1:29500"),
    m.Heartbeat("n1", 3, 10, 0.01, True),
    m.Heartbeat("n1", 3, 10, 0.01, True, True, m.Load(90, 1, 2, 300, 5000, 64)),
    m.Fatal("n1", 3, "boom"),
    m.Goodbye("n1", 3),
    m.EdgeHello(m.PROTOCOL_VERSION, "e1"),
    m.Welcome(3, "tiny", 0, 0.1),
    m.Welcome(3, "tiny", 0, 0.1, False),
    m.Refused("version mismatch"),
    m.Fence(3, "declared dead"),
    m.Shutdown("abort"),
    m.Reregister(3, "unknown node"),
    m.Route("n1", 3, "tcp://1.2.3.4:5", "tiny", 0, 2048, 100, "host", 42, 1, m.Load(90, 1, 2)),
    m.Routes(7, [m.Route("n1", 3, "tcp://x:1", "tiny")], ["n0"]),
    m.Submit("r1", [1, 2, 3], m.WireSamplingParams(), 99, 3),
    m.Cancel("r1"),
    m.Ping(5),
    m.TokenDelta("r1", [4, 5], 0, [-0.1, -0.2], [[(4, -0.1)], [(5, -0.2)]], "stop", 3, 0),
    m.Tokens("n1", 3, 12, [m.TokenDelta("r1", [4])]),
    m.Rejected("r1", "queue full", "overloaded"),
    m.Pong(5, "n1", 3),
]
UNIONS = [
    m.ToCoordinator,
    m.ToNodeFromCoordinator,
    m.ToEdgeFromCoordinator,
    m.ToNodeFromEdge,
    m.ToEdgeFromNode,
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_every_message_round_trips(msg):
    assert msgspec.msgpack.decode(wire.encode(msg), type=type(msg)) == msg


def test_every_union_member_has_a_distinct_tag():
    for union in UNIONS:
        tags = [t.__struct_config__.tag for t in union.__args__]
        assert len(tags) == len(set(tags))


def test_an_older_shorter_message_decodes_with_defaults():
    old_heartbeat = msgspec.msgpack.encode(["heartbeat", "n1", 4])  # only the first fields
    msg = wire.to_coordinator().decode(old_heartbeat)
    assert msg == m.Heartbeat("n1", 4)


def test_a_hello_carries_the_protocol_version():
    msg = wire.to_coordinator().decode(wire.encode(m.Hello(m.PROTOCOL_VERSION, "n1")))
    assert msg.protocol_version == m.PROTOCOL_VERSION


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode(["nope", 1]),
        msgspec.msgpack.encode(["submit"]),
        msgspec.msgpack.encode(["submit", 5, "x"]),
        msgspec.msgpack.encode({"a": 1}),
        wire.encode(m.Tokens("n", 1, 1)),
    ],
)
def test_a_malformed_frame_is_dropped_not_raised(frame):
    decoder = wire.node_from_edge()
    assert decoder.decode(frame) is None
    assert decoder.num_dropped == 1


def test_a_hello_from_before_epochs_decodes_with_no_epoch():
    old = msgspec.msgpack.encode(["hello", m.PROTOCOL_VERSION, "n1", "h", 1, "tcp://h:1"])
    assert wire.to_coordinator().decode(old).epoch == 0


def test_a_shorter_heartbeat_decodes_as_not_draining_and_idle():
    old = msgspec.msgpack.encode(["heartbeat", "n1", 4, 10, 0.5, True])
    msg = wire.to_coordinator().decode(old)
    assert msg.draining is False and msg.load == m.Load()


def test_a_load_with_fewer_figures_decodes_with_the_rest_zero():
    hb = msgspec.msgpack.encode(["heartbeat", "n1", 4, 10, 0.5, True, False, [7, 1]])
    assert wire.to_coordinator().decode(hb).load == m.Load(7, 1)


def test_sampling_params_survive_the_wire():
    params = SamplingParams(
        max_tokens=9, min_tokens=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=3,
        stop_token_ids=(2, 7), ignore_eos=True, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, logit_bias={5: -2.0}, logprobs=3,
    )  # fmt: skip
    wire_params = to_wire(params)
    decoded = msgspec.msgpack.decode(wire.encode(wire_params), type=m.WireSamplingParams)
    assert from_wire(decoded) == params


def test_out_of_range_wire_sampling_params_raise_value_error():
    with pytest.raises(ValueError, match="temperature"):
        from_wire(m.WireSamplingParams(temperature=-1.0))


DELTA = ["delta", "r", [5], 0, None, None]


@pytest.mark.parametrize(
    ("decoder", "bad", "good"),
    [
        (wire.edge_from_node, ["rejected", "r1", "why", "teapot"], ["rejected", "r1", "w", "busy"]),
        (wire.node_from_coordinator, ["shutdown", "later"], ["shutdown", "abort"]),
        (
            wire.edge_from_node,
            ["tokens", "n", 1, 1, [[*DELTA, "done"]]],
            ["tokens", "n", 1, 1, [[*DELTA, "length"]]],
        ),
    ],
    ids=["reject-code", "stop-mode", "finish-reason"],
)
def test_a_code_mode_or_reason_outside_its_literal_is_dropped(decoder, bad, good):
    d = decoder()
    assert d.decode(msgspec.msgpack.encode(good)) is not None
    assert d.decode(msgspec.msgpack.encode(bad)) is None
    assert d.num_dropped == 1
