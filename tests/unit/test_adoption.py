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
