"""Every family llama.cpp has an architecture for, written as GGUF and read back.

Each family's tiny random model (tests/model/families.py) with SmolLM2's tokenizer cut to
the families' 256 ids goes HF -> GGUF f32 -> `p3 convert X.gguf DIR` -> p3: the same tensors
bit for bit (Gemma's norms, stored + 1, to the rounding of that), the same ModelConfig and
the same greedy tokens and top logprobs as p3 on the original. The names are llama.cpp's
(gguf.TensorNameMap and the architecture's tensor list agree), and what llama.cpp would run
differently is refused, naming why: six tiny families differ from llama.cpp in one switch
each, so their exported variants set it as llama.cpp runs it (VARIANTS).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest.mock import patch

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from p3 import SamplingParams
from p3.config import ModelConfig
from p3.weights.convert import convert_gguf
from p3.weights.files import load_config
from p3.weights.gguf_write import FAMILIES as GGUF_FAMILIES
from p3.weights.gguf_write import export_gguf, family_for, swa_pattern
from p3.weights.read import iter_state_dict

from .families import FAMILIES, VOCAB, make_family_model
from .test_gguf_export import cut_tokenizer, load

# the one switch each of these tiny families sets otherwise than llama.cpp can run it
VARIANTS = {
    "qwen2-moe": {"mlp_only_layers": []},  # llama.cpp's qwen2moe: experts in every layer
    "qwen3-moe": {"norm_topk_prob": True},  # llama.cpp's qwen3moe always renormalizes
    "gemma2": {"query_pre_attn_scalar": 16},  # llama.cpp scales queries by head_dim ** -0.5
    "gemma3": {"query_pre_attn_scalar": 16},
    "falcon-new": {"bias": False},  # llama.cpp's falcon has no biases
    "smollm3": {"no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4},  # every 4th
}
REFUSED = {
    "qwen2-moe": "layers \\[1\\] are dense",
    "qwen3-moe": "norm_topk_prob False: llama.cpp's qwen3_moe always renormalizes",
    "gemma2": "query_pre_attn_scalar 24: llama.cpp scales queries by 0.25",
    "gemma3": "query_pre_attn_scalar 256",
    "falcon-new": "biases",
    "smollm3": "layers \\[1, 3\\] without RoPE",
    "helium": "cannot write architecture 'HeliumForCausalLM' as GGUF",
}
EXPORTED = [name for name in FAMILIES if name != "helium"]
PROMPTS = [[5, 17, 99, 3, 200, 31], list(range(20, 60))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, default_model_dir) -> Path:
    return cut_tokenizer(default_model_dir, tmp_path_factory.mktemp("tokenizer"), VOCAB, VOCAB)


def family_model(
    root: Path, name: str, tokenizer_dir: Path | None, variant: bool = True, **switches
) -> Path:
    """make_family_model's model of `name` (its VARIANTS switch set when variant, and any
    other config switches given), with the tokenizer files of tokenizer_dir."""
    switches = {**(VARIANTS.get(name, {}) if variant else {}), **switches}
    make = FAMILIES[name]

    def config():
        config = make()
        for key, value in switches.items():
            setattr(config, key, value)
        return config

    with patch.dict(FAMILIES, {name: config}):
        model_dir = make_family_model(root, name)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if tokenizer_dir is not None:
            shutil.copy(tokenizer_dir / file, model_dir / file)
    return model_dir


def as_float32(value):
    """A ModelConfig's floats as GGUF keeps them (float32), for comparing."""
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, tuple):
        return tuple(as_float32(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        fields = {k: as_float32(getattr(value, k)) for k in value.__dataclass_fields__}
        return type(value)(**fields)
    return value


def greedy(model_dir: Path) -> list[tuple[list[int], dict[int, float]]]:
    llm = load(model_dir)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [
        (out.outputs[0].token_ids, {t: lp.logprob for t, lp in out.outputs[0].logprobs[-1].items()})
        for out in outs
    ]


@pytest.mark.parametrize("name", EXPORTED)
def test_family_round_trip(tmp_path, tokenizer_dir, name):
    """HF -> GGUF f32 -> HF: the same tensors, config and greedy output, in p3 and in
    transformers."""
    model_dir = family_model(tmp_path, name, tokenizer_dir)
    gguf_file = export_gguf(model_dir, tmp_path / "model.gguf", "f32", progress=False)
    back = tmp_path / "back"
    convert_gguf(gguf_file, back, progress=False)
    config, back_config = load_config(model_dir), load_config(back)
    ours, theirs = ModelConfig.from_hf(back_config), ModelConfig.from_hf(config)
    assert as_float32(ours) == as_float32(theirs)
    assert back_config["architectures"] == config["architectures"]
    original = load_file(model_dir / "model.safetensors")
    if ours.tie_word_embeddings:
        original = {k: v for k, v in original.items() if k not in ("lm_head.weight",)}
    tensors = dict(iter_state_dict(tmp_path / "back"))
    assert sorted(tensors) == sorted(original)
    offset = family_for(config).norm_offset
    for key, tensor in original.items():
        assert tensors[key].dtype == torch.float32
        if offset and key.endswith("norm.weight"):  # (w + 1) - 1 in float32
            torch.testing.assert_close(tensors[key], tensor, rtol=0, atol=2**-22)
        else:
            assert torch.equal(tensors[key].view(torch.int32), tensor.view(torch.int32)), key
    expected, served = greedy(model_dir), greedy(back)
    for (tokens, top), (back_tokens, back_top) in zip(expected, served, strict=True):
        assert back_tokens == tokens
        assert back_top.keys() == top.keys()
        for token, logprob in top.items():
            assert back_top[token] == pytest.approx(logprob, abs=1e-5 if offset else 0)
    # and a Hugging Face directory transformers loads as the family it was
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        logits = [AutoModelForCausalLM.from_pretrained(d)(ids).logits for d in (model_dir, back)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5 if offset else 0)


@pytest.mark.parametrize("name", EXPORTED)
def test_names_are_llama_cpps(tmp_path, name):
    """Every tensor written is one llama.cpp's architecture lists, and gguf.TensorNameMap
    (llama.cpp's converter's own table) names each Hugging Face tensor alike (experts, which
    the converter stacks under names of its own, aside)."""
    model_dir = family_model(tmp_path, name, None)
    config = load_config(model_dir)
    family = family_for(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.name)
    num_layers = ModelConfig.from_hf(config).num_layers
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=b)
        for t in gguf.MODEL_TENSORS[arch]
        for b in range(num_layers)
    }
    names = gguf.TensorNameMap(arch, num_layers)
    for hf_name, _ in iter_state_dict(model_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        written, expert = family.gguf_tensor(hf_name, config)
        assert written.rsplit(".", 1)[0] in allowed, written
        if expert is None:
            assert names.get_name(hf_name, try_suffixes=(".weight", ".bias")) == written


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_llama_cpp_runs_otherwise_is_refused(tmp_path, name):
    model_dir = family_model(tmp_path, name, None, variant=False)
    with pytest.raises(ValueError, match=REFUSED[name]):
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def metadata(reader: GGUFReader, arch: str) -> dict:
    prefix = f"{arch}."
    return {
        k[len(prefix) :]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)
    }


def test_llama_cpps_conventions_per_family(tmp_path, tokenizer_dir):
    """The transforms and keys llama.cpp's converter writes, spot-checked on the files."""
    files, sources = {}, {}
    for name in ("gemma3", "gpt-neox", "falcon-new", "gpt2", "phi3-longrope", "granite", "olmo"):
        model_dir = family_model(tmp_path / name, name, tokenizer_dir)
        files[name] = GGUFReader(export_gguf(model_dir, tmp_path / f"{name}.gguf", "f32", False))
        sources[name] = load_file(model_dir / "model.safetensors")
    tensors = {n: {t.name: np.asarray(t.data) for t in r.tensors} for n, r in files.items()}

    norm = sources["gemma3"]["model.layers.0.self_attn.q_norm.weight"].numpy()
    assert np.array_equal(tensors["gemma3"]["blk.0.attn_q_norm.weight"], norm + np.float32(1))
    g3 = metadata(files["gemma3"], "gemma3")
    assert (g3["rope.freq_base"], g3["rope.freq_base_swa"]) == (1e6, 1e4)
    assert (g3["rope.scaling.type"], g3["rope.scaling.factor"]) == ("linear", 4.0)
    assert g3["attention.sliding_window"] == 8
    assert g3["attention.sliding_window_pattern"] == 2  # [sliding, full, sliding]

    qkv = sources["gpt-neox"]["gpt_neox.layers.0.attention.query_key_value.weight"].numpy()
    per_head = qkv.reshape(4, 3, 16, 64)  # [heads, q/k/v, head_dim, hidden]
    q_k_v = np.concatenate([per_head[:, j].reshape(64, 64) for j in range(3)])
    assert np.array_equal(tensors["gpt-neox"]["blk.0.attn_qkv.weight"], q_k_v)
    assert metadata(files["gpt-neox"], "gptneox")["use_parallel_residual"] is True

    qkv = sources["falcon-new"]["transformer.h.0.self_attention.query_key_value.weight"].numpy()
    groups = qkv.reshape(2, 4, 16, 64)  # [kv heads, 2 queries + k + v, head_dim, hidden]
    grouped = [groups[:, :2].reshape(64, 64), groups[:, 2].reshape(32, 64), groups[:, 3]]
    expected = np.concatenate([grouped[0], grouped[1], grouped[2].reshape(32, 64)])
    assert np.array_equal(tensors["falcon-new"]["blk.0.attn_qkv.weight"], expected)
    assert "blk.0.attn_norm_2.weight" in tensors["falcon-new"]  # ln_attn; ln_mlp: attn_norm
    assert field(files["falcon-new"], "falcon.tensor_data_layout") == "jploski"

    c_attn = sources["gpt2"]["transformer.h.0.attn.c_attn.weight"].numpy()  # Conv1D [in, out]
    assert np.array_equal(tensors["gpt2"]["blk.0.attn_qkv.weight"], c_attn.T)
    assert "output.weight" not in tensors["gpt2"] and "position_embd.weight" in tensors["gpt2"]

    phi3 = metadata(files["phi3-longrope"], "phi3")
    assert phi3["rope.scaling.type"] == "longrope"
    assert phi3["rope.scaling.original_context_length"] == 128
    assert phi3["rope.scaling.attn_factor"] == pytest.approx((1 + np.log(2) / np.log(128)) ** 0.5)
    long = tensors["phi3-longrope"]["rope_factors_long.weight"]
    assert long.tolist() == [2.0 + 0.5 * i for i in range(8)]
    assert tensors["phi3-longrope"]["blk.0.attn_qkv.weight"].shape == (128, 64)  # fused, as is
    assert tensors["phi3-longrope"]["blk.0.ffn_up.weight"].shape == (192, 64)  # gate and up

    granite = metadata(files["granite"], "granite")
    scales = ("embedding_scale", "residual_scale", "attention.scale", "logit_scale")
    assert [granite[k] for k in scales] == pytest.approx([3.0, 0.5, 0.2, 2.0])
    assert metadata(files["olmo"], "olmo")["attention.clamp_kqv"] == 3.0


def field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def test_swa_pattern_is_llama_cpps():
    """llama.cpp: layer i slides when i % n < n - 1, 0 for all; else a bool per layer."""
    assert swa_pattern([True, False] * 3) == 2
    assert swa_pattern([True] * 5 + [False]) == 6
    assert swa_pattern([True] * 4) == 0
    assert swa_pattern([False, True, True]) == [False, True, True]


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_experts_stacked_and_their_blocks_kept(tmp_path, tokenizer_dir, name):
    """Experts as one [experts, rows, cols] tensor per projection (the gguf quantizer's bytes
    in q8_0, the router f32), read back as q8_0 blocks per expert that serve exactly the
    logits of the original quantized at load."""
    model_dir = family_model(tmp_path, name, tokenizer_dir)
    gguf_file = export_gguf(model_dir, tmp_path / "m.gguf", "q8_0", progress=False)
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    original = load_file(model_dir / "model.safetensors")
    prefix, up = (
        ("model.layers.0.block_sparse_moe.experts", "w3")
        if name == "mixtral"
        else ("model.layers.0.mlp.experts", "up_proj")
    )
    stacked = np.stack([original[f"{prefix}.{x}.{up}.weight"].numpy() for x in range(4)])
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert np.array_equal(
        np.asarray(tensors["blk.0.ffn_up_exps.weight"].data),
        quantize(stacked, GGMLQuantizationType.Q8_0),
    )
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32
    convert_gguf(gguf_file, tmp_path / "back", progress=False)
    kinds = json.loads((tmp_path / "back" / "quantization.json").read_text())["tensors"]
    assert kinds[f"{prefix}.3.{up}.weight"] == "q8_0"
    reference, served = load(model_dir, quantization="q8_0"), load(tmp_path / "back")
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, ignore_eos=True)
    for prompt in PROMPTS:
        ours = served.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        theirs = reference.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        assert ours.token_ids == theirs.token_ids
        assert ours.logprobs[-1].keys() == theirs.logprobs[-1].keys()


def test_every_family_p3_runs_is_written_but_helium():
    from p3.architectures import SUPPORTED_ARCHITECTURES

    assert set(SUPPORTED_ARCHITECTURES) - set(GGUF_FAMILIES) == {"HeliumForCausalLM"}
