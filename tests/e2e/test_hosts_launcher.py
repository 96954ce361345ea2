"""`p3 cluster up|status|down HOSTS_FILE` over `local` hosts: a coordinator, two nodes on a tiny
model and an edge, each detached in its own session with its own run directory and keys, as on
separate machines (only ssh is left out); the official openai client gets a completion."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from p3 import hosts
from p3.cli import main

from ..model.tiny import make_tiny_chat_model

pytestmark = pytest.mark.timeout(150)
API_KEY = "sk-hosts"


def hosts_file(tmp_path: Path, model: Path) -> Path:
    engine = '["--dtype", "float32", "--kv-cache-memory", "32MiB"]'
    nodes = "".join(
        f'[[node]]\nid = "node-{i}"\nhost = "local"\nrun_dir = "{tmp_path}/node-{i}"\n'
        f'model = "{model}"\nthreads = 1\nargs = {engine}\n'
        for i in range(2)
    )
    path = tmp_path / "hosts.toml"
    path.write_text(
        f'[cluster]\nname = "e2e-{tmp_path.name}"\nkeys = "keys"\napi_key = "{API_KEY}"\n'
        "ready_timeout = 120\nstop_timeout = 20\n"
        f'[coordinator]\nhost = "local"\nport = 0\nrun_dir = "{tmp_path}/coordinator"\n'
        f'{nodes}[[edge]]\nhost = "local"\nport = 0\nrun_dir = "{tmp_path}/edge"\n'
        f'args = ["--model", "{model}"]\n'
    )
    return path


def is_p3(pid: int) -> bool:
    try:
        return b"-m\0p3\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_cluster_up_serves_status_lists_all_and_down_leaves_no_process(
    tmp_path, default_model_dir, capsys
):
    model = make_tiny_chat_model(tmp_path, default_model_dir)
    path = hosts_file(tmp_path, model)
    cluster = hosts.load(path)
    up = subprocess.run([sys.executable, "-m", "p3", "cluster", "up", str(path)],
                        capture_output=True, text=True, timeout=140)  # fmt: skip
    pids = hosts.State.read(cluster.state_file).pids
    try:
        assert up.returncode == 0, up.stderr
        url = re.search(r"serving at (http://\S+)/v1$", up.stdout, re.M).group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        out = client.completions.create(model=str(model), prompt="Hi", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1

        assert main(["cluster", "status", str(path)]) == 0
        shown = capsys.readouterr().out
        for role, name in [("coordinator", "coordinator"), ("node", "node-0"),
                           ("node", "node-1"), ("edge", "edge-0")]:  # fmt: skip
            assert re.search(rf"^{role} +{name} +local +{pids[name]}  up$", shown, re.M), shown
        assert re.search(r"^  node-0 +ready ", shown, re.M) and re.search(
            r"^  node-1 +ready ", shown, re.M
        )

        assert all(is_p3(pid) for pid in pids.values())  # what the check after down tells apart

        keys = tmp_path / "node-0" / "keys"  # its own secret, and the public keys it must know
        held = sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file())
        assert held == ["coordinator/coordinator.key", "edge/edge-0.key", "node/node-0.key",
                        "node/node-0.key_secret"]  # fmt: skip
        assert {stat.S_IMODE((keys / f).stat().st_mode) for f in held} == {0o600}
    finally:
        down = main(["cluster", "down", str(path)])
    assert down == 0
    assert [name for name, pid in pids.items() if is_p3(pid)] == []
    assert not cluster.state_file.exists()
