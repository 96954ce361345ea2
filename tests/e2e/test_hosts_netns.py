"""Three "hosts" in Linux network namespaces joined by veth pairs to a bridge: the coordinator
and the edge on one, a node on each of the other two forming one tp=2 replica. Everything
talks over 10.231.x.0/24 only: the commands work when the pieces are on different hosts
(addresses advertised, the torch.distributed rendezvous handed out by the coordinator).

Needs root and `ip netns` (the CI machine has both); skipped, saying why, elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p3.protocol.security import generate

from ..model.tiny import load_reference, make_tiny_chat_model, reference_greedy
from . import openai_cluster

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
NUM_NEW = 12
CLIENT = """
import json, sys, time
from openai import OpenAI
url, model, prompt, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
deadline = time.monotonic() + 60  # until the edge has the tokenizer the node sent it
while not any(m.id.endswith(model) for m in client.models.list()) and time.monotonic() < deadline:
    time.sleep(0.05)
out = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
print(json.dumps({"text": out.choices[0].text, "models": [m.id for m in client.models.list()]}))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """A bridge in its own namespace and one namespace per host, 10.231.<net>.<i + 1>."""

    def __init__(self, num_hosts: int):
        tag = os.getpid() % 10000
        self.net = 1 + tag % 250
        self.switch = f"p3sw{tag}"
        self.names = [f"p3h{tag}x{i}" for i in range(num_hosts)]
        self.made: list[str] = []

    def ip(self, i: int) -> str:
        return f"10.231.{self.net}.{i + 1}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.switch)
        self.made.append(self.switch)
        sw = ("ip", "netns", "exec", self.switch)
        sh(*sw, "ip", "link", "add", "br0", "type", "bridge")
        sh(*sw, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            sh("ip", "netns", "add", name)
            self.made.append(name)
            ns = ("ip", "netns", "exec", name)
            sh(*ns, "ip", "link", "set", "lo", "up")
            sh(*ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}")
            sh(*ns, "ip", "link", "set", f"port{i}", "netns", self.switch)
            sh(*ns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh(*ns, "ip", "link", "set", "eth0", "up")
            sh(*sw, "ip", "link", "set", f"port{i}", "master", "br0")
            sh(*sw, "ip", "link", "set", f"port{i}", "up")

    def down(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    def run(self, i: int, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.names[i], *args], cwd=ROOT, text=True, **kwargs
        )


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"p3probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def p3(hosts: Hosts, i: int, *args: str) -> subprocess.Popen:
    return hosts.run(i, sys.executable, "-m", "p3", *args, stdout=subprocess.PIPE)


@pytest.fixture
def hosts():
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts(3)
    try:
        made.up()
        yield made
    finally:
        made.down()


def test_a_tp2_replica_across_two_hosts_serves_an_edge_on_a_third(
    hosts, tmp_path, default_model_dir
):
    model = make_tiny_chat_model(tmp_path, default_model_dir)
    keys = str(generate(tmp_path / "keys", ["host1", "host2"], ["edge-0"]))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(p3(hosts, 0, "coordinator", "--bind", f"tcp://{hosts.ip(0)}:0", "--tp", "2",
                        "--keys", keys))  # fmt: skip
        address = openai_cluster._wait_ready(procs[0])["address"]
        assert address.startswith(f"tcp://{hosts.ip(0)}:")
        nodes = [
            p3(
                hosts,
                i,
                "node",
                "--coordinator",
                address,
                "--bind",
                f"tcp://{hosts.ip(i)}:0",
                "--node-id",
                f"host{i}",
                "--model",
                str(model),
                "--dtype",
                "float32",
                "--threads",
                "1",
                "--kv-cache-memory",
                "64MiB",
                "--keys",
                keys,
            )  # fmt: skip
            for i in (1, 2)
        ]
        procs += nodes  # both at once: a tp rank loads only when its peer has joined
        for i, node in zip((1, 2), nodes, strict=True):
            assert openai_cluster._wait_ready(node)["address"].startswith(f"tcp://{hosts.ip(i)}:")
        edge = p3(
            hosts, 0, "edge", "--coordinator", address, "--host", hosts.ip(0), "--port", "0",
            "--keys", keys,
        )  # fmt: skip  (no --model: the edge gets the tokenizer from the node, over the wire)
        procs.append(edge)
        edge_info = openai_cluster._wait_ready(edge)
        prompt = [400, 500, 600, 700, 800]
        client = hosts.run(
            0, sys.executable, "-c", CLIENT, edge_info["url"], model.name, json.dumps(prompt),
            str(NUM_NEW),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = client.communicate(timeout=120)
        assert client.returncode == 0, out
        answer = json.loads(out)
    finally:
        openai_cluster.Cluster("", procs).stop()  # SIGTERM in reverse, SIGKILL what stays
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    want = tokenizer.decode(reference_greedy(load_reference(model), prompt, NUM_NEW), True)
    assert answer["text"] == want
    assert answer["models"] == [str(model)]
