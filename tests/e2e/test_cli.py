"""The real entry point, as a subprocess: p3 generate / convert / serve."""

from __future__ import annotations

import subprocess
import sys

import torch

from p3.weights.read import iter_state_dict

from ..model.tiny import tiny_llama_bin


def p3(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "p3", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_streams_the_answer(default_model_dir):
    """From the GGUF's weights dequantized (as stored, with int8 activations, this model
    says "L'Étoile, ..." here, as llama.cpp does on the same file)."""
    question = "What is the capital of France?"
    result = p3("generate", question, "--max-tokens", "16", "--quantization", "none")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_refuses_a_bad_flag_value_clearly():
    result = p3("generate", "hi", "--kv-cache-memory", "lots")
    assert result.returncode == 2
    assert "not a size" in result.stderr


def test_convert_bin_checkpoint_to_safetensors(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=False)
    result = p3("convert", str(src), str(tmp_path / "st"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "st" / "model.safetensors").exists()
    converted = dict(iter_state_dict(tmp_path / "st"))
    for name, tensor in state.items():
        assert torch.equal(converted[name], tensor), name


def test_convert_refuses_what_it_cannot_read(tmp_path):
    result = p3("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "p3: error" in result.stderr


def test_serve_takes_several_api_keys_and_refuses_others(tmp_path, default_model_dir):
    import urllib.error
    import urllib.request

    from ..model.tiny import make_tiny_chat_model
    from . import openai_cluster

    model = make_tiny_chat_model(tmp_path, default_model_dir)
    cluster = openai_cluster.serve("--model", str(model), "--api-key", "k1", "--api-key", "k2")
    try:

        def status(key: str) -> int:
            request = urllib.request.Request(
                cluster.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert [status(k) for k in ("k1", "k2", "k3")] == [200, 200, 401]
    finally:
        cluster.stop()
