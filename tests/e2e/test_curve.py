"""CurveZMQ: a cluster started with --keys serves over encrypted, authenticated sockets (HTTP
edge and native client alike); a node with other keys, or none, is never admitted, and the
coordinator logs the refusal of the wrong key."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from p3.client import Client
from p3.protocol.security import generate
from p3.sampling_params import SamplingParams

from ..model.tiny import make_tiny_chat_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(180)


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


async def test_a_keyed_cluster_serves_and_refuses_strangers(tmp_path, default_model_dir):
    keys, other = str(generate(tmp_path / "keys")), generate(tmp_path / "other")
    for name in ("server.key", "server.key_secret"):  # it knows the cluster's server keys, but
        shutil.copy(Path(keys) / name, other / name)  # not its client key: the gate's check
    other = str(other)
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
        async with Client(info["address"], keys=keys) as client:
            native = await client.generate(
                {"prompt_token_ids": [300, 400]}, SamplingParams(max_tokens=4, temperature=0)
            )
        assert native.outputs[0].text == text

        strangers = [
            subprocess.Popen(
                [sys.executable, "-m", "p3", *node_args(info["address"], model, name, *k)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, k in (("wrong-key", ("--keys", other)), ("no-key", ()))
        ]
        procs += strangers
        deadline = time.monotonic() + 60  # a stranger's start: torch, then its Hello
        while not any("auth.refused" in line for line in log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert any("auth.refused" in line for line in log), "the wrong key was never refused"
        assert all(p.poll() is None for p in strangers)  # still knocking, never let in
        assert await cluster_ids(url) == {"good"}
    finally:
        openai_cluster.Cluster("", procs).stop()  # SIGTERM in reverse, SIGKILL what stays
