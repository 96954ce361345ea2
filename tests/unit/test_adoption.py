"""What an adopting edge replays of a stream that moved before its edge died: the prefix
(tokens from the node it left) in the sizes and with the logprobs the first edge applied."""

from __future__ import annotations

import msgspec

from p3.nodes.cluster.samples import Journal, Sample
from p3.nodes.edge.adoption import ResumeContext, _deltas, resume_context
from p3.protocol import messages as m
from p3.sampling_params import SamplingParams
from p3.tokenizer import Tokenizer


class FakeResponder:  # only its id and creation time go into the context
    id, created = "cmpl-7", 1


def test_a_moved_streams_prefix_comes_back_with_its_logprobs(default_model_dir):
    params = m.WireSamplingParams(logprobs=1)
    journal = Journal("req-1-0", "model", [1, 2, 3], params, seed=5, stream_id="cmpl-7")
    journal.resume = resume_context({"prompt": "x"}, False, FakeResponder())
    sample = Sample(0, journal, Tokenizer.from_dir(default_model_dir), SamplingParams(logprobs=1))
    for at, tokens in ((0, [10, 11]), (2, [12])):
        lps = [-0.5 * (at + i + 1) for i in range(len(tokens))]
        sample.apply(m.TokenDelta("req-1-0", tokens, at, lps, [[(t, lp)] for t, lp in
                                                               zip(tokens, lps, strict=True)]))
    moved = journal.submit_message()  # as it is resubmitted to another node
    context = msgspec.msgpack.decode(moved.resume, type=ResumeContext)
    assert context.delta_sizes == [2, 1] and context.logprobs == [-0.5, -1.0, -1.5]
    later = m.TokenDelta("req-1-0", [13], 3, [-2.0], [[(13, -2.0)]])
    deltas = _deltas(m.AdoptedSample(moved, [later]), context)
    assert [(d.index, d.token_ids, d.logprobs) for d in deltas] == [
        (0, [10, 11], [-0.5, -1.0]), (2, [12], [-1.5]), (3, [13], [-2.0])
    ]
    assert deltas[1].top_logprobs == [[(12, -1.5)]]


async def test_an_adopted_streams_deltas_under_an_epoch_never_routed_here_are_heard(
    default_model_dir,
):
    """Found by the constrained chaos run (seed 5022): the coordinator restarted (the nodes
    registered again under new epochs, keeping their streams under the old ones), then the
    edge died. The new edge, routed only the new epochs, dropped the adopted samples' first
    deltas as a stranger's and then saw a gap; now an Adopted answer's epochs are heard."""
    import asyncio

    from p3.nodes.cluster.adopting import Adopting
    from p3.nodes.cluster.links import Cluster

    cluster = Cluster("tcp://127.0.0.1:1", "edge-0")
    cluster.epochs["node-1"] = {4}  # what the routes say now
    cluster._adopting["cmpl-7"] = Adopting(bool)
    submit = m.Submit("req-1-0", [1, 2], m.WireSamplingParams(), 5, epoch=1, stream_id="cmpl-7")
    cluster.on_adopted("node-1", m.Adopted("cmpl-7", [m.AdoptedSample(submit, [])]))
    cluster.on_node_tokens("node-1", m.Tokens("node-1", 1, 9, [m.TokenDelta("req-1-0", [7], 0)]))
    journal = Journal("req-1-0", "model", [1, 2], m.WireSamplingParams(), 5, stream_id="cmpl-7")
    queue: asyncio.Queue = asyncio.Queue()
    sample = Sample(0, journal, Tokenizer.from_dir(default_model_dir), SamplingParams())
    cluster.attach(sample, queue, "node-1", 1)
    _, delta, _ = queue.get_nowait()
    assert (delta.index, delta.token_ids) == (0, [7])  # held, then delivered at attach
