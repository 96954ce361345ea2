"""Check a chaos run's history against the promises, and measure it.

Checked, per request (a violation is a line in `Report.violations`):
- it ends exactly once (one `ok` or `gave_up`), and each attempt once (`done` or `fail`); an
  attempt whose stream broke and was resumed with Last-Event-ID (its edge died) is one
  attempt: the resumed events continue it, from the very event id it was resumed from;
- nothing after its end: no token in a choice after its finish, nothing after [DONE];
- contiguity: every event's text offset is where the choice's text so far ends, and the SSE
  ids count up by one (no event lost or repeated across moves);
- a failure after the first token (indefinite) is a violation; before it (definite, so the
  client retried) it is counted;
- usage bills each delivered token once (completion_tokens = tokens delivered);
- its output equals the fault-free reference run's (same tokens, same text, same finish):
  tokens missing from the reference alignment count as lost, extra ones as repeated;
- a constrained request's output (a JSON schema's text, a tool call's arguments) parses and
  validates against its schema, and ended with the grammar, not at max_tokens.
Measured: detection time (fault to the coordinator's `node_dead`), the edge's reaction time,
and for every stream under way at a fault the longest pause between two of its tokens while
the fault acted (until shortly after the cluster was whole again).
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chaos.nemesis import DEATHS


@dataclass
class Attempt:
    num: int
    choices: dict[int, dict] = field(default_factory=dict)  # index -> tokens, text, finish
    sids: list[str] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    usage: dict | None = None
    ends: list[str] = field(default_factory=list)  # "done" / "fail"
    num_tokens_at_failure: int | None = None
    errors: list = field(default_factory=list)
    extra: int = 0
    problems: list[str] = field(default_factory=list)
    resumes: int = 0  # times its stream broke and was resumed from its last event id
    schema: dict | None = None  # what its output must validate against (constrained)

    @property
    def num_tokens(self) -> int:
        return sum(len(c["tokens"]) for c in self.choices.values())


@dataclass
class Report:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0  # definite failures (no token yet), retried by the client
    tokens: int = 0
    tokens_lost: int = 0
    tokens_repeated: int = 0
    differing: int = 0  # requests whose output differs from the reference
    faults: list[dict] = field(default_factory=list)
    detection_s: dict[str, list[float]] = field(default_factory=dict)  # by fault kind
    edge_reaction_s: dict[str, list[float]] = field(default_factory=dict)  # by fault kind
    fault_gaps_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)  # every pause between two tokens
    reference_gaps_s: list[float] = field(default_factory=list)  # the same, with no fault
    gaps_by_kind: dict[str, list[float]] = field(default_factory=dict)
    kv_free: bool | None = None
    leftovers: list[int] = field(default_factory=list)
    stuck: int = 0  # faults after which the cluster was not whole again
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def summary(self) -> dict:
        return {
            "passed": self.passed,
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "retried_definite": self.retried,
            "tokens": self.tokens,
            "tokens_lost": self.tokens_lost,
            "tokens_repeated": self.tokens_repeated,
            "differing_from_reference": self.differing,
            "faults": [f"{f['kind']}@{f['node']}" for f in self.faults],
            "detection_ms": {
                k: [round(v * 1000) for v in vs] for k, vs in self.detection_s.items()
            },
            "edge_reaction_ms": {
                k: [round(v * 1000) for v in vs] for k, vs in self.edge_reaction_s.items()
            },
            "fault_gap_s": gap_stats(self.fault_gaps_s),
            "token_gap_s": gap_stats(self.gaps_s),
            "reference_token_gap_s": gap_stats(self.reference_gaps_s),
            "max_gap_by_kind_s": {k: round(max(v), 3) for k, v in self.gaps_by_kind.items() if v},
            "kv_free": self.kv_free,
            "leftover_pids": self.leftovers,
            "stuck": self.stuck,
            "violations": self.violations[:50],
        }


def read_history(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def attempts_of(history: list[dict]) -> dict[str, list[Attempt]]:
    """Each request's attempts, rebuilt from its events."""
    out: dict[str, dict[int, Attempt]] = defaultdict(dict)
    for rec in history:
        if "attempt" not in rec:
            continue
        attempt = out[rec["req"]].setdefault(rec["attempt"], Attempt(rec["attempt"]))
        _apply(attempt, rec)
    return {req: [a[k] for k in sorted(a)] for req, a in out.items()}


def _apply(a: Attempt, rec: dict) -> None:
    kind = rec["type"]
    if kind == "invoke":
        a.schema = constraint_schema(rec.get("body") or {})
    if kind == "invoke" and rec.get("resume") is not None:  # the same attempt goes on
        if a.ends != ["fail"] or not a.sids or a.sids[-1] != rec["resume"]:
            a.problems.append(f"resumed from {rec['resume']} after {a.ends}, ids {a.sids[-1:]}")
        a.resumes += 1
        a.ends, a.errors, a.num_tokens_at_failure = [], [], None
        return
    if rec.get("sid") is not None and (not a.sids or a.sids[-1] != rec["sid"]):
        a.sids.append(rec["sid"])
    if a.ends and kind != "extra":
        a.problems.append(f"{kind} after the attempt ended")
    if kind == "event":
        for c in rec["choices"]:
            choice = a.choices.setdefault(
                c["index"], {"tokens": [], "text": "", "finish": None, "offsets": []}
            )
            if choice["finish"] is not None and (c["tokens"] or c["text"]):
                a.problems.append(f"choice {c['index']}: tokens after its finish")
            if c["offset"] is not None and c["tokens"]:
                if choice["offsets"] and c["offset"] < choice["offsets"][-1][1]:
                    a.problems.append(
                        f"choice {c['index']}: text offset {c['offset']} goes back from "
                        f"{choice['offsets'][-1][1]} (a repeat)"
                    )
                choice["offsets"].append((len(choice["tokens"]), c["offset"]))
            choice["tokens"] += c["tokens"]
            choice["text"] += c["text"]
            choice["finish"] = choice["finish"] or c["finish"]
            if c["tokens"]:
                a.token_times.append(rec["t"])
    elif kind == "usage":
        a.usage = rec["usage"]
    elif kind == "error":
        a.errors.append(rec["error"])
    elif kind == "done":
        a.ends.append("done")
    elif kind == "fail":
        a.ends.append("fail")
        a.num_tokens_at_failure = rec["tokens"]
        a.errors.append(rec.get("error") or rec.get("status"))
    elif kind == "extra":
        a.extra += 1


def check(
    history: list[dict],
    reference: list[dict],
    logs: Path | None = None,
) -> Report:
    """logs: the run's log directory (detection times come from the coordinator's and the
    edge's logs)."""
    report = Report()
    report.faults = [r for r in history if r.get("type") == "fault"]
    report.stuck = sum(1 for r in history if r.get("type") == "stuck")
    if report.stuck:
        report.violations.append(f"the cluster was not whole again after {report.stuck} faults")
    ends = defaultdict(list)
    for rec in history:
        if rec.get("type") in ("ok", "gave_up"):
            ends[rec["req"]].append(rec["type"])
    runs = attempts_of(history)
    expected = {req: attempts[-1] for req, attempts in attempts_of(reference).items()}
    report.requests = len(runs)
    for req, attempts in sorted(runs.items()):
        _check_request(report, req, attempts, ends.get(req, []), expected.get(req))
    _measure_gaps(report, runs, history)
    report.gaps_s = _all_gaps(runs)
    report.reference_gaps_s = _all_gaps(attempts_of(reference))
    if logs is not None:
        cut = {r["fault_t"] for r in history if r.get("type") == "cut"}
        _measure_detection(report, logs, cut)
    return report


def _check_request(
    report: Report, req: str, attempts: list[Attempt], ends: list[str], reference: Attempt | None
) -> None:
    def violation(what: str) -> None:
        report.violations.append(f"{req}: {what}")

    if len(ends) != 1:
        violation(f"ended {len(ends)} times ({ends})")
    for a in attempts:
        for problem in a.problems:
            violation(f"attempt {a.num}: {problem}")
        if len(a.ends) != 1:
            violation(f"attempt {a.num} ended {len(a.ends)} times")
        if a.extra:
            violation(f"attempt {a.num}: {a.extra} events after [DONE]")
        if not _contiguous(a.sids):
            violation(f"attempt {a.num}: SSE ids not contiguous: {a.sids[:3]}..{a.sids[-3:]}")
        if a.ends == ["fail"] or a.errors:
            if a.num_tokens > 0:
                violation(f"attempt {a.num} failed after {a.num_tokens} tokens: {a.errors[:2]}")
            else:
                report.retried += 1
    last = attempts[-1]
    report.tokens += last.num_tokens
    if ends != ["ok"]:
        report.failed += 1
        return
    report.ok += 1
    if last.usage is None or last.usage.get("completion_tokens") != last.num_tokens:
        billed = last.usage and last.usage.get("completion_tokens")
        violation(f"usage bills {billed} completion tokens for {last.num_tokens} delivered")
    if last.schema is not None:
        for index, choice in sorted(last.choices.items()):
            if (problem := _invalid(choice, last.schema)) is not None:
                violation(f"choice {index} is outside its constraint: {problem}")
    if reference is None:
        violation("no fault-free reference run")
        return
    _compare(report, req, last, reference)


def constraint_schema(body: dict) -> dict | None:
    """The JSON schema a request's output must validate against, if it is constrained."""
    if (so := body.get("structured_outputs")) is not None:
        return so.get("json")
    tools = body.get("tools")
    if tools and body.get("tool_choice") == "required" and len(tools) == 1:
        return tools[0]["function"]["parameters"]
    return None


def _invalid(choice: dict, schema: dict) -> str | None:
    import jsonschema

    if choice["finish"] not in ("stop", "tool_calls"):
        return f"finish {choice['finish']}"
    try:
        jsonschema.validate(json.loads(choice["text"]), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:120]} in {choice['text'][:80]!r}"
    return None


def _compare(report: Report, req: str, got: Attempt, want: Attempt) -> None:
    differs = False
    for index in sorted(set(got.choices) | set(want.choices)):
        empty = {"tokens": [], "text": "", "finish": None, "offsets": []}
        g, w = got.choices.get(index, empty), want.choices.get(index, empty)
        same = ("tokens", "text", "finish")
        if all(g[k] == w[k] for k in same):
            at, want_at = dict(g["offsets"]), dict(w["offsets"])
            moved = [i for i in at.keys() & want_at.keys() if at[i] != want_at[i]]
            if moved:  # offsets are a function of the tokens: they must agree too
                report.violations.append(
                    f"{req} choice {index}: text offsets differ from the reference's at "
                    f"token {min(moved)}"
                )
            continue
        differs = True
        matcher = difflib.SequenceMatcher(None, w["tokens"], g["tokens"], autojunk=False)
        lost = repeated = 0
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op in ("delete", "replace"):
                lost += max(0, (i2 - i1) - (j2 - j1)) if op == "replace" else i2 - i1
            if op in ("insert", "replace"):
                repeated += max(0, (j2 - j1) - (i2 - i1)) if op == "replace" else j2 - j1
        pairs = zip(w["tokens"], g["tokens"], strict=False)
        same = min(len(w["tokens"]), len(g["tokens"]))
        first = next((k for k, (a, b) in enumerate(pairs) if a != b), same)
        report.tokens_lost += lost
        report.tokens_repeated += repeated
        report.violations.append(
            f"{req} choice {index}: differs from the reference at token {first} "
            f"({len(g['tokens'])} tokens vs {len(w['tokens'])}; lost {lost}, extra {repeated}; "
            f"finish {g['finish']} vs {w['finish']}): {g['text'][-60:]!r} vs {w['text'][-60:]!r}"
        )
    report.differing += differs


def _contiguous(sids: list[str]) -> bool:
    numbers = []
    for sid in sids:
        try:
            numbers.append(int(sid.split(".")[1]))  # <id>.<n>[.<per-choice counts>]
        except (IndexError, ValueError):
            return False
    return all(b == a + 1 for a, b in zip(numbers, numbers[1:], strict=False))


AFTER_WHOLE_S = 2.0  # a fault's effect is counted until this long after the cluster is whole


def _measure_gaps(report: Report, runs: dict[str, list[Attempt]], history: list[dict]) -> None:
    """For every fault and every stream under way at it: the longest pause its client saw
    while the fault acted, from the fault until AFTER_WHOLE_S after the cluster was whole
    again (or the next fault). A stream moved when its node is declared dead, 300 ms after
    the fault, pauses then, not across the fault's instant: so the window."""
    marks = sorted(r["t"] for r in history if r.get("type") in ("whole", "stuck"))
    starts = [f["t"] for f in report.faults]
    for k, fault in enumerate(report.faults):
        tf = fault["t"]
        whole = next((t for t in marks if t > tf), float("inf"))
        end = min(whole + AFTER_WHOLE_S, starts[k + 1] if k + 1 < len(starts) else float("inf"))
        gaps = report.gaps_by_kind.setdefault(fault["kind"], [])
        for attempts in runs.values():
            times = sorted(attempts[-1].token_times)
            if not times or not times[0] < tf < times[-1]:
                continue
            pauses = [b - a for a, b in zip(times, times[1:], strict=False) if b > tf and a < end]
            gaps.append(max(pauses))
            report.fault_gaps_s.append(max(pauses))


def _all_gaps(runs: dict[str, list[Attempt]]) -> list[float]:
    gaps = []
    for attempts in runs.values():
        times = sorted(attempts[-1].token_times)
        gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    return gaps


def gap_stats(gaps: list[float]) -> dict:
    """n, p50, p99 and max of a list of pauses (seconds)."""
    stats = {q: percentile(gaps, p) for q, p in (("p50", 50), ("p99", 99), ("max", 100))}
    return {"n": len(gaps), **stats}


def _log_events(path: Path, events: tuple[str, ...]) -> list[tuple[str, str | None, float]]:
    """(event, node_id, wall time) of the JSON log lines naming one of events."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if not any(f'"{event}"' in line for event in events):
            continue
        try:
            rec = json.loads(line[line.index("{") :])
            when = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        found.append((rec["event"], rec.get("node_id"), when))
    return found


def _measure_detection(report: Report, logs: Path, cut: set[float]) -> None:
    """Detection: the coordinator's node_dead after each fault that kills, pauses or cuts a
    node off. The edge's reaction: its first link_lost or node_dead for that node, for any
    fault (a crash closes the node's sockets, which the edge sees before any heartbeat is
    missed). cut: the times of faults the end of the workload cut short."""
    coordinator, edge = logs / "coordinator.log", logs / "edge.log"
    deaths = _log_events(coordinator, ("coordinator.node_dead",)) if coordinator.exists() else []
    reactions = _log_events(edge, ("edge.link_lost", "edge.node_dead")) if edge.exists() else []
    ends = [f["t"] for f in report.faults[1:]] + [float("inf")]
    for fault, next_at in zip(report.faults, ends, strict=True):
        after = [
            t - fault["t"]
            for _, node, t in reactions
            if node == fault["node"] and fault["t"] <= t < min(next_at, fault["t"] + 30)
        ]
        if after:
            report.edge_reaction_s.setdefault(fault["kind"], []).append(min(after))
        if fault["kind"] not in DEATHS:
            continue
        seen = [
            t - fault["t"]
            for _, node, t in deaths
            if node == fault["node"] and 0 <= t - fault["t"] < 30
        ]
        if seen:  # measured even when the workload's end cut the fault short
            report.detection_s.setdefault(fault["kind"], []).append(min(seen))
        elif fault["t"] not in cut:
            report.violations.append(f"{fault['kind']} of {fault['node']}: never declared dead")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of values (nearest rank), rounded to ms; None if empty."""
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))
    return round(values[k], 3)


def main(argv: list[str] | None = None) -> int:
    """`python -m chaos.checker RUN_DIR...`: check stored runs again (history.jsonl,
    reference.jsonl, logs/; the KV and leftover figures from their report.json)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m chaos.checker", description=main.__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    failed = 0
    for run in args.runs:
        report = check(
            read_history(run / "history.jsonl"), read_history(run / "reference.jsonl"), run / "logs"
        )
        stored = json.loads((run / "report.json").read_text())
        report.kv_free, report.leftovers = stored["kv_free"], stored["leftover_pids"]
        report.violations += [
            v for v in stored["violations"] if v.startswith(("KV blocks", "p3 processes"))
        ]
        failed += not report.passed
        print(json.dumps({"run": str(run), **report.summary()}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
