"""A real Prometheus scrapes `p3 serve` (its edge, and the coordinator's and the node's status
servers) under load from the openai client; then every expression of every dashboard panel
and every alert rule is evaluated through Prometheus' HTTP API.

A panel's expression must name only series p3 exports and return something under load. An
alert's expression is empty while all is well, so it is evaluated without its threshold (the
comparison at its end removed), and absent(X) as X: what it watches must be there. Prometheus
itself evaluates the rules too (loaded from deploy/prometheus/alerts.yml): each must be healthy.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from ..model.tiny import make_tiny_chat_model
from .openai_cluster import SERVING_LINE, Cluster, wait_routed

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not on PATH"),
]

DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "p3-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\b(p3:[A-Za-z0-9_:]+)")
THRESHOLD = re.compile(r"\s*(>|<|>=|<=|==|!=)\s*[0-9.eE+-]+\s*$")
ABSENT = re.compile(r"^absent\((.*)\)$")


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def watched(expr: str) -> str:
    """What an alert watches: its expression without the threshold, absent(X) as X."""
    expr = THRESHOLD.sub("", expr.strip())
    inner = ABSENT.match(expr)
    return inner.group(1) if inner else expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def serve(model_dir: Path) -> tuple[Cluster, dict[str, str]]:
    """`p3 serve` with status servers on free ports: (the cluster, name -> status url)."""
    cmd = [sys.executable, "-m", "p3", "serve", "--port", "0", "--model", str(model_dir),
           "--status-port-base", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    cluster, status = Cluster("", [proc]), {}
    try:
        for line in proc.stdout:
            if line.startswith("p3 status: "):
                status = dict(e.split(" ") for e in line.removeprefix("p3 status: ").split(", "))
            if (served := SERVING_LINE.search(line)) is not None:
                cluster.url = served.group(1)
                break
        assert cluster.url, f"p3 serve exited with {proc.wait()}"
        wait_routed(cluster.url)
    except BaseException:
        cluster.stop()
        raise
    return cluster, {name: url.strip() for name, url in status.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir):
    model_dir = make_tiny_chat_model(tmp_path_factory.mktemp("model"), default_model_dir)
    cluster, status = serve(model_dir)
    yield cluster, status
    cluster.stop()


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    cluster, status = served
    root = tmp_path_factory.mktemp("prometheus")
    hostport = lambda url: urllib.parse.urlsplit(url).netloc  # noqa: E731
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "p3-edge", "static_configs": [{"targets": [hostport(cluster.url)]}]},
            {
                "job_name": "p3-status",
                "static_configs": [{"targets": [hostport(u) for u in status.values()]}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(root / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={url[7:]}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        wait_until(lambda: _ok(url + "/-/ready"), 30, "prometheus ready")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while (found := check()) in (None, False, [], {}):
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(interval_s)
    return found


def query(prom: str, expr: str) -> list:
    body = get_json(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def loaded(served, prometheus):
    """A completion, scraped (so the counters it creates have a sample to rise from); then a
    few completions and a stream through the openai client, scraped twice after."""
    cluster, status = served
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    client.completions.create(model=model, prompt="Warm", max_tokens=2)
    wait_scraped(prometheus, 1 + len(status), after=time.time())
    for i in range(3):
        client.completions.create(model=model, prompt=f"Count {i}", max_tokens=4)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
    )
    assert [c for c in stream]
    wait_scraped(prometheus, 1 + len(status), after=time.time() + 1.0)
    return prometheus


def wait_scraped(prom: str, num_targets: int, after: float) -> None:
    """Until every target's latest scrape is later than after, and succeeded."""

    def scraped() -> bool:
        ups = query(prom, "up")
        late = [r for r in ups if float(r["value"][1]) == 1 and _scraped_at(prom, r) > after]
        return len(late) == num_targets

    wait_until(scraped, 20, f"scrape of {num_targets} targets")


def _scraped_at(prom: str, up: dict) -> float:
    instance = up["metric"]["instance"]
    return float(query(prom, f'timestamp(up{{instance="{instance}"}})')[0]["value"][1])


def exported(prom: str) -> set[str]:
    return set(get_json(prom + "/api/v1/label/__name__/values")["data"])


def test_the_status_servers_are_announced(served):
    _, status = served
    assert set(status) == {"coordinator", "node-0"}
    for url in status.values():
        assert _ok(url + "/health") and _ok(url + "/ready")


def test_every_dashboard_expression_names_exported_series_and_has_data(loaded):
    names = exported(loaded)
    for expr in dashboard_exprs():
        missing = set(METRIC_NAME.findall(expr)) - names
        assert not missing, f"{expr!r} names series p3 does not export: {missing}"
        assert query(loaded, expr), f"{expr!r} returned nothing under load"


def test_every_alert_watches_exported_series_with_data(loaded):
    names = exported(loaded)
    for rule in alert_rules():
        expr = rule["expr"]
        missing = set(METRIC_NAME.findall(expr)) - names
        assert not missing, f"{rule['alert']}: {expr!r} names series p3 does not export: {missing}"
        assert query(loaded, expr) is not None  # evaluates
        assert query(loaded, watched(expr)), f"{rule['alert']}: {watched(expr)!r} is empty"


def test_prometheus_evaluates_every_alert_rule_healthily(loaded):
    def evaluated():
        groups = get_json(loaded + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_until(evaluated, 10, "evaluation of every rule")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
