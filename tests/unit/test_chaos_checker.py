"""The chaos checker catches each broken promise: fed histories with one fault planted, it
names it (and passes the clean one)."""

from __future__ import annotations

import json

from chaos.checker import check

TOKENS = ["Once", " upon", " a", " time", ",", " a", " fox"]


def stream(req="c0.0", tokens=TOKENS, t0=100.0, attempt=0, sid="cmpl-x", drop=None,
           repeat=None, billed=None, end="done", error_after=None, extra=False):
    """A history for one request, as chaos.workload writes it, with one fault planted."""
    h = [{"t": t0, "req": req, "attempt": attempt, "type": "invoke", "body": {}}]
    text, n = "", 0
    for i, tok in enumerate(tokens):
        if i == drop:  # the edge sent it, the client never saw it
            n += 1
            text += tok
            continue
        for _ in range(2 if i == repeat else 1):
            n += 1
            finish = "length" if i == len(tokens) - 1 else None
            choice = {"index": 0, "text": tok, "tokens": [tok], "offset": len(text),
                      "finish": finish}
            h.append({"t": t0 + 0.1 * n, "req": req, "attempt": attempt, "type": "event",
                      "sid": f"{sid}.{n}", "choices": [choice]})
            text += tok
        if error_after == i:
            h.append({"t": t0 + 0.1 * n, "req": req, "attempt": attempt, "type": "error",
                      "sid": f"{sid}.{n + 1}", "error": {"code": "node_dead"}})
            return h + [{"t": t0 + 9, "req": req, "type": "gave_up"}]
    delivered = len(tokens) - (drop is not None) + (repeat is not None)
    usage = {"completion_tokens": delivered if billed is None else billed}
    h.append({"t": t0 + 5, "req": req, "attempt": attempt, "type": "usage",
              "sid": f"{sid}.{n + 1}", "usage": usage})
    if end == "done":
        h.append({"t": t0 + 5, "req": req, "attempt": attempt, "type": "done",
                  "sid": f"{sid}.{n + 2}"})
    if extra:
        h.append({"t": t0 + 6, "req": req, "attempt": attempt, "type": "extra", "data": "{}"})
    return h + [{"t": t0 + 6, "req": req, "type": "ok"}]


def verdict(history, reference=None):
    return check(json.loads(json.dumps(history)), reference or stream(t0=0.0))


def test_a_clean_run_passes():
    report = verdict(stream())
    assert report.passed, report.violations
    assert (report.ok, report.tokens, report.tokens_lost, report.tokens_repeated) == (1, 7, 0, 0)


def test_a_lost_token_is_counted_and_named():
    report = verdict(stream(drop=3))
    assert not report.passed
    assert report.tokens_lost == 1
    assert any("SSE ids not contiguous" in v for v in report.violations)


def test_a_repeated_token_is_counted_and_named():
    report = verdict(stream(repeat=2))
    assert report.tokens_repeated == 1
    assert any("differs from the reference at token 3" in v for v in report.violations)


def test_an_event_replayed_with_its_offset_is_caught():
    history = stream()
    history.insert(4, {**history[2], "t": history[3]["t"]})  # event 2 again, after event 3
    report = verdict(history)
    assert any("goes back" in v for v in report.violations)


def test_offsets_that_disagree_with_the_reference_are_caught():
    history = stream()
    history[5]["choices"][0]["offset"] += 1
    report = verdict(history)
    assert any("text offsets differ" in v for v in report.violations)


def test_usage_billing_a_token_twice_is_caught():
    report = verdict(stream(billed=8))
    assert any("usage bills 8" in v for v in report.violations)


def test_a_failure_after_the_first_token_is_a_violation():
    report = verdict(stream(error_after=2))
    assert report.failed == 1
    assert any("failed after 3 tokens" in v for v in report.violations)


def test_anything_after_done_is_caught():
    report = verdict(stream(extra=True))
    assert any("after [DONE]" in v for v in report.violations)


def test_a_stream_without_its_end_is_caught():
    report = verdict(stream(end=None))
    assert any("ended 0 times" in v for v in report.violations)


def test_a_gap_in_sse_ids_is_caught():
    history = stream()
    history[3]["sid"] = "cmpl-x.9"
    report = verdict(history)
    assert any("SSE ids not contiguous" in v for v in report.violations)


def test_the_pause_a_fault_causes_is_measured():
    history = stream(t0=100.0)
    history.append({"t": 100.25, "type": "fault", "kind": "kill", "node": "node-0"})
    report = verdict(history)
    assert report.fault_gaps_s == [0.1] or abs(report.fault_gaps_s[0] - 0.1) < 1e-9


def broken_at(history: list[dict], k: int, resume_from: str | None = None) -> list[dict]:
    """The stream breaks after its k-th event (its edge died) and the client resumes it from
    the last id it got (or resume_from)."""
    events = [i for i, r in enumerate(history) if r["type"] == "event"]
    cut = events[k - 1] + 1
    last = history[cut - 1]
    fail = {"t": last["t"], "req": last["req"], "attempt": 0, "type": "fail", "tokens": k,
            "error": "ServerDisconnectedError()"}
    resume = {"t": last["t"] + 1, "req": last["req"], "attempt": 0, "type": "invoke",
              "body": {}, "resume": resume_from or last["sid"]}
    return history[:cut] + [fail, resume] + history[cut:]


def test_a_stream_resumed_after_its_edge_died_is_one_whole_attempt():
    report = verdict(broken_at(stream(), 3))
    assert report.passed, report.violations
    assert (report.ok, report.tokens, report.failed) == (1, 7, 0)


def test_a_resume_from_another_event_than_the_last_one_seen_is_caught():
    report = verdict(broken_at(stream(), 3, resume_from="cmpl-x.2"))
    assert any("resumed from cmpl-x.2" in v for v in report.violations)


def test_ids_of_a_stream_of_several_choices_count_by_their_event_number():
    history = stream()
    for k, rec in enumerate(r for r in history if "sid" in r):
        rec["sid"] = f"cmpl-x.{k + 1}.{k}-1"
    assert verdict(history).passed


def constrained(tokens, body):
    """A stream whose request carried body's constraint, ending as the grammar ends it."""
    history = stream(tokens=tokens)
    history[0]["body"] = body
    for rec in history:
        if rec["type"] == "event" and rec["choices"][0]["finish"]:
            rec["choices"][0]["finish"] = "stop"
    return history


def test_output_outside_its_schema_is_caught():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    good, bad = ['{"a"', ": 1}"], ['{"a"', ': "x"}']
    for body in ({"structured_outputs": {"json": schema}},
                 {"tools": [{"function": {"parameters": schema}}], "tool_choice": "required"}):
        assert verdict(constrained(good, body), constrained(good, body)).passed
        report = verdict(constrained(bad, body), constrained(bad, body))
        assert any("outside its constraint" in v for v in report.violations), report.violations
    cut = stream(tokens=good)  # ended by max_tokens ("length"): not a whole answer
    cut[0]["body"] = {"structured_outputs": {"json": schema}}
    assert any("finish length" in v for v in verdict(cut, cut).violations)
