"""The edge, the coordinator and the native client load no torch and no engine: an edge is
an HTTP process of ~100 MB that starts in a second, not a copy of the engine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from p3.nodes.actor.launch import READY_MARKER

TORCH_FREE = [
    "p3",
    "p3.client",
    "p3.cli",
    "p3.serve",
    "p3.nodes.edge.edge",
    "p3.nodes.edge.api",
    "p3.nodes.coordinator.coordinator",
    "p3.nodes.cluster.generation",
    "p3.weights.files",
    "p3.outputs",
    "p3.seeds",
]
FORBIDDEN = ("torch", "numpy", "safetensors", "transformers", "p3.engine", "p3.kernels", "p3.llm")


def test_the_torch_free_side_imports_no_torch_and_no_engine():
    code = (
        "import importlib, json, sys\n"
        f"for name in {TORCH_FREE!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"imported on the torch-free side: {bad[:10]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(90)
def test_a_running_edge_maps_no_torch_library():
    """A real edge process, with the default model's tokenizer loaded, serving HTTP."""
    nowhere = f"tcp://127.0.0.1:{_free_port()}"  # no coordinator: the edge keeps dialling
    edge = subprocess.Popen(
        [sys.executable, "-m", "p3", "edge", "--coordinator", nowhere, "--port", "0", "--insecure"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in edge.stdout:
            if line.startswith(READY_MARKER):
                url = json.loads(line[len(READY_MARKER) :])["url"]
                break
        else:
            pytest.fail(f"the edge exited ({edge.wait()}) before it was ready")
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as response:
            assert response.status in (200, 503)  # up, whether or not a node is there
        with open(f"/proc/{edge.pid}/maps") as maps:
            libraries = {line.split()[-1] for line in maps if ".so" in line}
        assert not [lib for lib in libraries if "torch" in lib], "the edge mapped libtorch"
    finally:
        edge.terminate()
        edge.wait(timeout=30)
