"""The hosts file of `p3 cluster` (p3/hosts.py): what it becomes, and each mistake named by
its field; the key files each member is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from p3 import hosts
from p3.cli import main

pytestmark = pytest.mark.timeout(30)

GOOD = """
[cluster]
keys = "keys"
user = "p3"
tp = 2
ssh = ["-o", "BatchMode=yes"]
[coordinator]
host = "10.0.0.1"
[[node]]
id = "n0"
host = "10.0.0.2"
model = "/models/m"
threads = 4
args = ["--dtype", "float32"]
[[node]]
id = "n1"
host = "root@10.0.0.3"
[[edge]]
host = "local"
port = 0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prod.toml"
    path.write_text(text)
    return path


def test_a_hosts_file_names_each_members_host_address_and_flags(tmp_path):
    cluster = hosts.load(write(tmp_path, GOOD))
    assert cluster.name == "prod" and cluster.tp == 2 and cluster.keys == tmp_path / "keys"
    coordinator, n0, n1, edge = cluster.members
    assert (coordinator.host, coordinator.address, coordinator.port) == (
        "p3@10.0.0.1",
        "10.0.0.1",
        5555,
    )
    assert (n0.host, n0.bind, n0.port) == ("p3@10.0.0.2", "0.0.0.0", 0)
    assert n0.flags == ("--model", "/models/m", "--threads", "4", "--dtype", "float32")
    assert n1.host == "root@10.0.0.3" and n1.address == "10.0.0.3"
    assert (edge.name, edge.address, edge.bind) == ("edge-0", "127.0.0.1", "127.0.0.1")
    argv = hosts.p3_argv(cluster, n0, "tcp://10.0.0.1:5555")
    assert argv[1:] == ["-m", "p3", "--log-level", "warning", "node", "--coordinator",
                        "tcp://10.0.0.1:5555", "--node-id", "n0", "--bind", "tcp://0.0.0.0:0",
                        "--advertise-host", "10.0.0.2", "--keys", "~/.p3/cluster/keys",
                        "--model", "/models/m", "--threads", "4", "--dtype", "float32"]  # fmt: skip
    assert hosts.on_host(cluster, n0, "true") == [
        "ssh",
        "-o",
        "BatchMode=yes",
        "p3@10.0.0.2",
        "true",
    ]
    assert hosts.on_host(cluster, edge, "true") == ["sh", "-c", "true"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("threads = 4", 'threads = "four"'), "node[0].threads: expected an integer"),
        (("threads = 4", "threds = 4"), "node[0].threds: unknown field"),
        (('id = "n1"\n', ""), "node[1].id: missing"),
        (('host = "root@10.0.0.3"', ""), "node[1].host: missing"),
        (('id = "n1"', 'id = "n0"'), "node.id: 'n0' is given twice"),
        (('id = "n1"', 'id = "n 1"'), "node[1].id: a member's name is"),
        (('"--dtype", "float32"', '"--dtype", "fp7"'), "node[0].args: p3 node refuses"),
        (('"--dtype", "float32"', '"--no-such-flag"'), "node[0].args: p3 node does not take"),
        (("port = 0", "port = true"), "edge[0].port: expected an integer"),
        (('keys = "keys"', "insecure = true\nkeys = 'k'"), "cluster.keys: and cluster.insecure"),
        (('keys = "keys"', ""), "cluster.keys: missing"),
        (("[coordinator]", "[coordinater]"), "coordinater: unknown table"),
        (('mode = "x"\n[coordinator]', None), "cluster.mode: 'x' is not one of"),
    ],
)
def test_a_malformed_hosts_file_is_one_error_naming_the_field(tmp_path, change, named):
    old, new = change
    text = GOOD.replace("[coordinator]", old, 1) if new is None else GOOD.replace(old, new, 1)
    with pytest.raises(hosts.HostsFileError, match="^" + str(tmp_path)) as caught:
        hosts.load(write(tmp_path, text))
    assert named in str(caught.value)


def test_a_hosts_file_without_nodes_or_coordinator_is_refused(tmp_path):
    with pytest.raises(hosts.HostsFileError, match="coordinator: missing"):
        hosts.load(write(tmp_path, "[cluster]\ninsecure = true\n[[node]]\nid='a'\nhost='local'"))
    with pytest.raises(hosts.HostsFileError, match=r"node: missing: at least one \[\[node\]\]"):
        hosts.load(write(tmp_path, "[cluster]\ninsecure = true\n[coordinator]\nhost='local'"))
    with pytest.raises(hosts.HostsFileError, match="not TOML"):
        hosts.load(write(tmp_path, "[cluster"))


def test_each_member_is_given_its_own_secret_and_the_public_keys_it_must_know(tmp_path):
    cluster = hosts.load(write(tmp_path, GOOD))
    coordinator, n0, _, edge = cluster.members
    want = ["node/n0.key", "node/n0.key_secret", "coordinator/coordinator.key", "edge/edge-0.key"]
    assert hosts.needed_keys(n0, cluster) == want
    assert hosts.needed_keys(edge, cluster) == ["edge/edge-0.key", "edge/edge-0.key_secret",
                                                "coordinator/coordinator.key", "node/n0.key",
                                                "node/n1.key"]  # fmt: skip
    assert "coordinator/coordinator.key_secret" in hosts.needed_keys(coordinator, cluster)


def test_the_cli_prints_a_malformed_hosts_file_as_one_line(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("threads = 4", "threads = 4.5"))
    assert main(["cluster", "up", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"p3: error: {path}: node[0].threads: expected an integer, got 4.5\n"
    )
