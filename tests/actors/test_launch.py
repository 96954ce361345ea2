"""Launching: readiness, failures named with their stderr, children that die with the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p3.nodes.actor.launch import Child, LaunchError, python_m_p3, stop_all, wait_ready

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_child_that_exits_before_ready_is_named_with_its_stderr():
    child = Child("broken", python("import sys; sys.stderr.write('no model here\\n'); exit(3)"))
    with pytest.raises(LaunchError, match=r"(?s)broken .*code 3.*no model here"):
        wait_ready([child], timeout_s=20)
    stop_all([child])


def test_a_silent_child_fails_the_launch_after_the_timeout():
    child = Child("silent", python("import time; time.sleep(60)"))
    try:
        with pytest.raises(LaunchError, match="silent .*not ready after 0.5s"):
            wait_ready([child], timeout_s=0.5)
    finally:
        stop_all([child], timeout_s=2)
    assert child.proc.returncode is not None


def test_a_ready_line_carries_what_the_child_announced():
    argv = python_m_p3("coordinator", "--bind", "tcp://127.0.0.1:0", "--insecure")
    child = Child("coordinator", argv)
    try:
        wait_ready([child], timeout_s=20)
        assert child.info["kind"] == "coordinator"
        assert child.info["address"].startswith("tcp://127.0.0.1:")
    finally:
        stop_all([child], timeout_s=5)
    assert child.proc.returncode == 0, "SIGTERM drains and exits cleanly"


ANNOUNCING_SERVER = """
    import http.server, json
    asked = []
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            ok = self.path == "/ready" and len(asked) >= 2  # not ready at the first probe
            self.send_response(200 if ok else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("0.0.0.0", 0), Ready)
    url = f"http://0.0.0.0:{server.server_address[1]}"
    print("P3_READY " + json.dumps({"kind": "edge", "url": url}), flush=True)
    server.serve_forever()
"""


def test_a_child_that_binds_port_0_is_probed_at_the_url_it_announced():
    child = Child("edge", python(ANNOUNCING_SERVER), ready_path="/ready")
    try:
        assert not child.is_ready
        wait_ready([child], timeout_s=20)
        assert child.is_ready and child.info["url"].startswith("http://0.0.0.0:")
    finally:
        stop_all([child], timeout_s=5)


def test_a_child_whose_announced_url_never_answers_200_is_not_ready():
    child = Child("edge", python(ANNOUNCING_SERVER), ready_path="/elsewhere")
    try:
        with pytest.raises(LaunchError, match="edge .*not ready after 1s"):
            wait_ready([child], timeout_s=1)
    finally:
        stop_all([child], timeout_s=5)


def is_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_children_die_when_their_parent_is_killed():
    parent = subprocess.Popen(
        python(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from p3.nodes.actor.launch import Child, python_m_p3, wait_ready
            argv = python_m_p3("coordinator", "--bind", "tcp://127.0.0.1:0", "--insecure")
            child = Child("coordinator", argv)
            wait_ready([child], 20)
            print(child.pid, flush=True)
            time.sleep(60)
        """),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        grandchild = int(parent.stdout.readline())
        assert is_alive(grandchild)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while is_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(grandchild)
    finally:
        parent.kill()
        if "grandchild" in locals() and is_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_launch_cluster_dry_run_prints_every_command_in_start_order():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/launch_cluster.py"),
         str(ROOT / "scripts/cluster.hosts.example"), "--dry-run", "--keys", "/etc/p3/keys"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    roles = [next(r for r in ("coordinator", "node", "edge") if f" {r} " in c) for c in commands]
    assert roles == ["coordinator", "node", "node", "edge"]
    assert all("--coordinator tcp://10.0.0.1:5555" in c for c in commands[1:])
    assert "--advertise-host 10.0.0.2" in commands[1] and "-tt 10.0.0.2" in commands[1]
    assert all("--keys /etc/p3/keys" in c for c in commands)
