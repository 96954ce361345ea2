"""CurveZMQ with a key per member, at the real processes: `p3 serve` keys its cluster by
itself; pieces started by hand refuse to run open unless told --insecure; a keyed cluster
serves the HTTP edge and the native client, and never admits a node with a stranger's key or
none, even under a member's name; a revoked client is cut off."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from p3.client import Client
from p3.sampling_params import SamplingParams

from ..model.tiny import make_tiny_chat_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(180)


def p3_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "p3", *args], capture_output=True, text=True, timeout=60
    )


def start(*args: str, stderr=None) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "p3", *args], stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    return proc, openai_cluster._wait_ready(proc)


def node_args(address: str, model, node_id: str, *keys: str) -> list[str]:
    return ["node", "--coordinator", address, "--model", str(model), "--node-id", node_id,
            "--threads", "1", "--kv-cache-memory", "64MiB", *keys]  # fmt: skip


async def cluster_ids(url: str) -> set[str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/cluster") as r:
        return {n["id"] for n in (await r.json())["nodes"]}


def test_pieces_refuse_to_start_open_unless_told():
    for args in (["coordinator", "--bind", "tcp://127.0.0.1:0"],
                 ["edge", "--coordinator", "tcp://127.0.0.1:9", "--port", "0"]):  # fmt: skip
        result = p3_run(*args)
        assert result.returncode == 2, result.stderr
        assert "refuses to start without --keys" in result.stderr and "--insecure" in result.stderr


def test_p3_serve_keys_its_members_privately_and_cleans_up(tmp_path, default_model_dir):
    model = make_tiny_chat_model(tmp_path, default_model_dir)
    cluster = openai_cluster.serve("--model", str(model))
    try:
        commands = [argv for _, argv in openai_cluster.children(cluster.procs[0].pid)]
        assert len(commands) == 3  # coordinator, node, edge
        dirs = {c[c.index("--keys") + 1] for c in commands}
        assert len(dirs) == 1 and not any("--insecure" in c for c in commands)
        keys = Path(dirs.pop())
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        secrets = list(keys.glob("*/*.key_secret"))
        assert {p.stem for p in secrets} == {"coordinator", "node-0", "edge-0", "client-0"}
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets)
    finally:
        cluster.stop()
    assert not keys.exists()


async def test_a_keyed_cluster_serves_and_refuses_strangers(tmp_path, default_model_dir):
    keys, other = str(tmp_path / "keys"), str(tmp_path / "other")
    assert p3_run("keys", "generate", keys, "--node", "good").returncode == 0
    assert p3_run("keys", "add", keys, "edge", "client-0").returncode == 0
    assert p3_run("keys", "generate", other, "--node", "good").returncode == 0
    public = "coordinator/coordinator.key"  # a stranger may know the coordinator's public key
    (Path(other) / public).write_bytes((Path(keys) / public).read_bytes())
    model = make_tiny_chat_model(tmp_path, default_model_dir)
    procs = []
    try:
        coord, info = start(
            "--log-level", "info", "coordinator", "--bind", "tcp://127.0.0.1:0", "--keys", keys,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(coord)
        log: list[str] = []  # the coordinator's log, read as it comes
        reader = threading.Thread(target=lambda: log.extend(coord.stderr), daemon=True)
        reader.start()
        node, _ = start(*node_args(info["address"], model, "good", "--keys", keys))
        procs.append(node)
        edge, edge_info = start(
            "edge", "--coordinator", info["address"], "--port", "0", "--keys", keys,
            "--model", str(model),
        )  # fmt: skip
        procs.append(edge)
        url = edge_info["url"]
        openai_cluster.wait_routed(url)  # the edge has its first routing table
        body = {"model": model.name, "prompt": [300, 400], "max_tokens": 4, "temperature": 0}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/completions", json=body) as r,
        ):
            assert r.status == 200
            text = (await r.json())["choices"][0]["text"]
        params = SamplingParams(max_tokens=4, temperature=0)
        async with Client(info["address"], keys=keys, name="client-0") as client:
            native = await client.generate({"prompt_token_ids": [300, 400]}, params)
            assert native.outputs[0].text == text
            assert "revoked" in p3_run("keys", "revoke", keys, "client-0").stdout
            revoked_at = time.monotonic()
            while True:  # members reread the keys within a second; then the client is cut off
                try:
                    await asyncio.wait_for(client.generate({"prompt_token_ids": [300]}, params), 3)
                except TimeoutError:
                    break
                assert time.monotonic() - revoked_at < 2.5, "a revoked key still served"

        strangers = [  # under the real node's name: a stranger's key for it, and no key
            subprocess.Popen(
                [sys.executable, "-m", "p3", *node_args(info["address"], model, "good", *k)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for k in (("--keys", other), ("--insecure",))
        ]
        procs += strangers
        deadline = time.monotonic() + 60  # a stranger's start: torch, then its Hello
        while not any("auth.refused" in line for line in log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert any("auth.refused" in line for line in log), "the wrong key was never refused"
        assert all(p.poll() is None for p in strangers)  # still knocking, never let in
        assert await cluster_ids(url) == {"good"}
        async with aiohttp.ClientSession() as session, session.get(url + "/cluster") as r:
            assert [n["pid"] for n in (await r.json())["nodes"]] == [node.pid]
    finally:
        openai_cluster.Cluster("", procs).stop()  # SIGTERM in reverse, SIGKILL what stays
