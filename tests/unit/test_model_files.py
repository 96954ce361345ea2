"""A model directory's files as read: every missing or malformed one is named in its error, and
a directory without tokenizer.json gets a NoTokenizer (token ids only, text refused with why)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import struct
from pathlib import Path

import pytest

from p3.nodes.edge.models import Models
from p3.protocol import messages as m
from p3.sampling_params import SamplingParams
from p3.tokenizer import NoTokenizer, NoTokenizerError, Tokenizer, load_tokenizer
from p3.weights.files import check_model_files, load_config, resolve_model, weight_files

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "eos_token_id": 2}


def safetensors_bytes(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


ONE_TENSOR = safetensors_bytes(
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
)


def model_dir(root: Path, files: dict[str, bytes | str] | None = None) -> Path:
    """config.json and one good safetensors file, then files (name: bytes or text)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(CONFIG))
    (root / "model.safetensors").write_bytes(ONE_TENSOR)
    for name, data in (files or {}).items():
        (root / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def test_a_good_directory_passes_every_check(tmp_path):
    check_model_files(model_dir(tmp_path / "m"))


def test_a_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match=f"the directory {tmp_path / 'm'} has no config.json"):
        resolve_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_malformed_json_in_a_config_file_is_named(tmp_path, name):
    root = model_dir(tmp_path / "m")
    (root / name).write_text('{"vocab_size": 256,')
    with pytest.raises(ValueError, match=f"{root / name} is not valid JSON"):
        load_config(root)
    (root / name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{root / name} is not a JSON object"):
        check_model_files(root)


def test_a_shard_the_index_lists_but_that_is_missing_is_named(tmp_path):
    index = {
        "weight_map": {
            "w": "model-00001-of-00002.safetensors",
            "v": "model-00002-of-00002.safetensors",
        }
    }
    root = model_dir(tmp_path / "m", {"model.safetensors.index.json": json.dumps(index)})
    (root / "model.safetensors").unlink()
    (root / "model-00001-of-00002.safetensors").write_bytes(ONE_TENSOR)
    missing = root / "model-00002-of-00002.safetensors"
    with pytest.raises(
        FileNotFoundError,
        match=f"{missing} does not exist, and {root}/model.safetensors.index.json lists it",
    ):
        weight_files(root)
    (root / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="index.json has no weight_map"):
        weight_files(root)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "no header"),
        (ONE_TENSOR[:20], "truncated"),
        (struct.pack("<Q", 4) + b"{not" + b"\0" * 8, "corrupt safetensors header"),
        (
            safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
            ),
            "outside",
        ),
        (
            safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "not those of",
        ),
        (
            safetensors_bytes(
                {"w": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "does not read",
        ),
    ],
)
def test_a_corrupt_safetensors_file_is_named_by_the_check_and_the_reader(tmp_path, data, what):
    from p3.weights.read import iter_state_dict  # torch

    root = model_dir(tmp_path / "m", {"model.safetensors": data})
    file = root / "model.safetensors"
    with pytest.raises(ValueError, match=what) as checked:
        check_model_files(root)
    with pytest.raises(ValueError, match=what) as read:
        dict(iter_state_dict(root))
    assert str(file) in str(checked.value) and str(file) in str(read.value)


def test_a_directory_without_tokenizer_json_gets_a_no_tokenizer_that_says_why(tmp_path):
    root = model_dir(tmp_path / "m")
    tokenizer = load_tokenizer(root)
    assert isinstance(tokenizer, NoTokenizer) and tokenizer.vocab_size == 256
    assert tokenizer.decode([5, 6]) == "" and tokenizer.token_text(5) is None
    tokenizer.check_params(SamplingParams(stop_token_ids=[7], max_tokens=3))  # no text needed
    for refused in (
        lambda: tokenizer.encode("hello"),
        lambda: tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(NoTokenizerError, match="has no tokenizer") as error:
            refused()
        assert f"{root / 'tokenizer.json'} does not exist" in str(error.value)
    with pytest.raises(ValueError, match="stop strings need one") as error:
        tokenizer.check_params(SamplingParams(stop=["."]))
    assert error.value.name == "stop"
    with pytest.raises(ValueError, match="structured outputs need one"):
        tokenizer.check_params(SamplingParams(structured_outputs={"regex": "a+"}))


def test_skip_tokenizer_init_leaves_a_tokenizer_unread(tmp_path, default_model_dir):
    root = model_dir(tmp_path / "m")
    shutil.copy(default_model_dir / "tokenizer.json", root / "tokenizer.json")
    assert isinstance(load_tokenizer(root), Tokenizer)
    skipped = load_tokenizer(root, skip_tokenizer_init=True)
    assert isinstance(skipped, NoTokenizer) and "skip_tokenizer_init" in skipped.why


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("tokenizer.json", "is unreadable as a tokenizer"),
        ("tokenizer_config.json", "is not valid JSON"),
        ("generation_config.json", "is not valid JSON"),
    ],
)
def test_a_malformed_tokenizer_file_is_named(tmp_path, default_model_dir, name, what):
    root = model_dir(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, root / f)
    good = (root / name).read_bytes() if (root / name).exists() else b'{"eos_token_id": 2}'
    (root / name).write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=what) as error:
        load_tokenizer(root)
    assert str(root / name) in str(error.value)


@pytest.mark.parametrize("skip", [False, True])
def test_an_edge_serves_a_model_without_a_tokenizer_as_token_ids_only(skip):
    """Its node announced none (no tokenizer.json, or --skip-tokenizer-init there), or the
    edge itself runs with --skip-tokenizer-init: nothing is fetched."""

    async def learn() -> tuple[Models, str | None]:
        async def never(route):
            raise AssertionError("no tokenizer to fetch")

        models = Models(fetch=never, skip_tokenizer_init=skip)
        route = m.Route(
            "node-0", 1, "tcp://127.0.0.1:1", "/m/tiny", tokenizer_hash="ab" if skip else ""
        )
        models.learn({"/m/tiny": route})
        return models, models.resolve("tiny")

    models, model = asyncio.run(learn())
    tokenizer = asyncio.run(models.tokenizer(model))
    assert isinstance(tokenizer, NoTokenizer) and model in models.names()
    why = "this edge runs with --skip-tokenizer-init" if skip else "its node 'node-0'"
    with pytest.raises(NoTokenizerError, match=f"'/m/tiny' has no tokenizer \\({why}"):
        tokenizer.encode("hi")


def test_skip_tokenizer_init_reaches_the_nodes_and_the_edge_p3_serve_starts():
    from p3.cli import build_parser
    from p3.flags import engine_argv
    from p3.nodes.edge import edge

    args = build_parser().parse_args(["serve", "--skip-tokenizer-init"])
    assert "--skip-tokenizer-init" in engine_argv(args)  # what p3 serve passes each node
    node = build_parser().parse_args(["node", "--coordinator", "tcp://x:1", *engine_argv(args)])
    assert node.skip_tokenizer_init
    parser = argparse.ArgumentParser()
    edge.add_arguments(parser)
    edge_args = parser.parse_args(
        ["--coordinator", "tcp://x:1", "--insecure", "--skip-tokenizer-init"]
    )
    assert edge.config_from_args(edge_args).skip_tokenizer_init
