"""`p3 convert MODEL_DIR OUT.gguf`: tiny random models written as GGUF and read back.

The tiny models carry a cut-down SmolLM2 tokenizer (its first 500 tokens and the merges among
them; the model's vocabulary is 512, so 12 ids are pads): GGUF files of the full 49152-token
vocabulary take seconds to read back, these milliseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from p3 import LLM, SamplingParams
from p3.config import ModelConfig
from p3.kernels.quant import QuantWeight, quantize_weight
from p3.tokenizer import Tokenizer
from p3.weights.convert import convert_gguf, rope_permutation, undo_rope_permutation
from p3.weights.files import load_config
from p3.weights.gguf_write import FAMILIES, export_gguf, pre_tokenizer
from p3.weights.quantize import quantize_checkpoint
from p3.weights.read import iter_state_dict

from .tiny import make_tiny_chat_model

TOKENS, VOCAB = 500, 512
PROMPTS = [[5, 17, 99, 3, 200, 301], list(range(20, 60))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, default_model_dir) -> Path:
    """SmolLM2's tokenizer cut to its first TOKENS ids, for a vocabulary of VOCAB."""
    return cut_tokenizer(default_model_dir, tmp_path_factory.mktemp("tokenizer"), TOKENS, VOCAB)


def cut_tokenizer(model_dir: Path, out: Path, tokens: int, vocab_size: int) -> Path:
    """model_dir's tokenizer (SmolLM2's) cut to its first `tokens` ids and the merges among
    them; <reponame> made a non-special added token (a user-defined one in GGUF); config.json
    says vocab_size (for make_tiny_chat_model)."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {text: i for text, i in data["model"]["vocab"].items() if i < tokens}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [
        m for m in data["model"]["merges"] if "".join(m.split(" ")) in vocab and all(
            part in vocab for part in m.split(" ")
        )
    ]  # fmt: skip
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < tokens]
    data["added_tokens"][4]["special"] = False
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / name, out / name)
    (out / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return out


def tiny_model(root: Path, tokenizer_dir: Path, name: str, tied: bool | None = None) -> Path:
    """make_tiny_chat_model's model, with random q/k/v biases where it has biases (qwen2:
    transformers makes them zero) and, when `tied` says otherwise, its head untied (a random
    lm_head) or tied (lm_head dropped)."""
    model_dir = make_tiny_chat_model(root, tokenizer_dir, name)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for key in [k for k in tensors if k.endswith("_proj.bias")]:
        tensors[key] = torch.randn(tensors[key].shape, generator=gen) * 0.2
    config = json.loads((model_dir / "config.json").read_text())
    if tied is not None and tied != config["tie_word_embeddings"]:
        config["tie_word_embeddings"] = tied
        if tied:
            tensors.pop("lm_head.weight", None)
        else:
            tensors["lm_head.weight"] = torch.randn(VOCAB, config["hidden_size"], generator=gen)
        (model_dir / "config.json").write_text(json.dumps(config))
    save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


def gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def top20(llm: LLM, prompt: list[int]) -> tuple[list[int], dict[int, float]]:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=20, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    return out.token_ids, {token: lp.logprob for token, lp in out.logprobs[0].items()}


def load(model_dir: Path, quantization: str = "auto") -> LLM:
    """One thread: these tiny models run 10x faster so on a shared 2-core machine."""
    return LLM(
        model_dir, dtype="float32", quantization=quantization, kv_cache_bytes=4 * 2**20,
        num_threads=1,
    )  # fmt: skip


# --- f32: the exact round trip -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tied"),
    [("llama-gqa-untied", None), ("llama-uneven", None), ("qwen2-bias-tied", None),
     ("qwen2-bias-tied", False), ("mistral", True)],
)  # fmt: skip
def test_f32_round_trip_is_exact(tmp_path, tokenizer_dir, name, tied):
    """HF -> GGUF -> `p3 convert` back: every tensor bit for bit, the same model config (the
    q/k rows permuted for llama and back again; qwen2's as they are, its biases kept)."""
    model_dir = tiny_model(tmp_path, tokenizer_dir, name, tied)
    gguf_file = export_gguf(model_dir, tmp_path / "model.gguf", "f32", progress=False)
    convert_gguf(gguf_file, tmp_path / "back", progress=False)
    original = load_file(model_dir / "model.safetensors")
    back = dict(iter_state_dict(tmp_path / "back"))
    config, back_config = load_config(model_dir), load_config(tmp_path / "back")
    if config["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key].view(torch.int32), tensor.view(torch.int32)), key
    ours, theirs = ModelConfig.from_hf(back_config), ModelConfig.from_hf(config)
    if name == "mistral":  # llama.cpp runs it as llama: read back as Llama
        assert back_config["architectures"] == ["LlamaForCausalLM"]
        theirs = ModelConfig.from_hf({**config, "architectures": ["LlamaForCausalLM"]})
    assert ours == theirs
    tensors = gguf_tensors(gguf_file)
    assert ("output.weight" in tensors) != config["tie_word_embeddings"]
    q = original["model.layers.0.self_attn.q_proj.weight"].numpy()
    stored_q = tensors["blk.0.attn_q.weight"].data
    permuted = name.startswith(("llama", "mistral"))
    expected = rope_permutation(q, config["num_attention_heads"]) if permuted else q
    assert np.array_equal(stored_q, expected)


def test_rope_permutation_inverts_undo():
    weights = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    permuted = rope_permutation(weights, 3)
    assert not np.array_equal(permuted, weights)
    assert np.array_equal(undo_rope_permutation(permuted, 3), weights)
    head = np.arange(8)  # one head of 8 rows: halves [0..3] [4..7] -> pairs (0,4), (1,5)...
    assert rope_permutation(head, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# --- q8_0 / q4_0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_blocks_are_the_gguf_quantizers(tmp_path, tokenizer_dir, outtype):
    """2-D weights as gguf.quants.quantize makes them (q/k rows permuted first), a width not
    whole blocks (llama-uneven's FFN, 135) in f16, norms f32."""
    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama-uneven")
    tensors = gguf_tensors(export_gguf(model_dir, tmp_path / "m.gguf", outtype, progress=False))
    config = load_config(model_dir)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    kind = GGMLQuantizationType[outtype.upper()]
    for hf_name, tensor in load_file(model_dir / "model.safetensors").items():
        name, _ = FAMILIES["LlamaForCausalLM"].gguf_tensor(hf_name, config)
        weights = tensor.numpy()
        if (projection := hf_name.split(".")[-2]) in heads:
            weights = rope_permutation(weights, heads[projection])
        qtype = (
            GGMLQuantizationType.F32 if weights.ndim == 1
            else GGMLQuantizationType.F16 if weights.shape[1] % 32 else kind
        )  # fmt: skip
        assert tensors[name].tensor_type == qtype, name
        assert np.array_equal(np.asarray(tensors[name].data), quantize(weights, qtype)), name
    assert tensors["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].tensor_type == kind


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_read_back_p3_serves_it_as_quantized_at_load(tmp_path, tokenizer_dir, outtype):
    """The file read back (`p3 convert X.gguf DIR`) serves its blocks with exactly the logits
    of the original quantized at load. q4_0: p3 keeps the embedding and head in q8_0, the
    file has them in q4_0, so the reference is `p3 quantize`'s checkpoint with those two
    requantized to q4_0 (the same bytes everywhere, then)."""
    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama-gqa-untied")
    gguf_file = export_gguf(model_dir, tmp_path / "m.gguf", outtype, progress=False)
    convert_gguf(gguf_file, tmp_path / "back", progress=False)
    if outtype == "q8_0":
        reference = load(model_dir, quantization="q8_0")
    else:
        reference = load(_vocab_tensors_in_q4_0(model_dir, tmp_path / "reference"))
    served = load(tmp_path / "back")
    for prompt in PROMPTS:
        assert top20(served, prompt) == top20(reference, prompt)


def _vocab_tensors_in_q4_0(model_dir: Path, dst: Path) -> Path:
    saved = quantize_checkpoint(model_dir, dst, "q4_0")
    original = load_file(model_dir / "model.safetensors")
    tensors = load_file(saved / "model.safetensors")
    kinds = json.loads((saved / "quantization.json").read_text())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = quantize_weight(original[name], "q4_0").blocks
        kinds["tensors"][name] = "q4_0"
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    (saved / "quantization.json").write_text(json.dumps(kinds))
    return saved


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_stored_blocks_are_copied_and_are_ggml_blocks(tmp_path, tokenizer_dir, kind):
    """A directory of p3 blocks of the kind asked for keeps them byte for byte, even blocks
    that requantizing would change (here every quant of one weight halved), and GGML reads
    them as p3 does: gguf.quants.dequantize of the file's bytes is QuantWeight.dequantize."""
    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama-gqa-untied")
    saved = quantize_checkpoint(model_dir, tmp_path / "blocks", kind)
    path = saved / "model.safetensors"
    tensors = load_file(path)
    down = "model.layers.1.mlp.down_proj.weight"
    tensors[down] = _halved_quants(tensors[down], kind)
    save_file(tensors, path, metadata={"format": "pt"})
    stored = dict(iter_state_dict(saved))
    file = gguf_tensors(export_gguf(saved, tmp_path / "model.gguf", kind, progress=False))
    heads = {"attn_q": 4, "attn_k": 2}
    for layer in (0, 1):
        for gg, hf in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                       ("ffn_down", "mlp.down_proj")]:  # fmt: skip
            weight = stored[f"model.layers.{layer}.{hf}.weight"]
            assert isinstance(weight, QuantWeight) and weight.kind == kind
            blocks = weight.blocks.numpy()
            if gg in heads:
                blocks = rope_permutation(blocks, heads[gg])
            ours = file[f"blk.{layer}.{gg}.weight"]
            assert ours.tensor_type == GGMLQuantizationType[kind.upper()]
            assert np.array_equal(np.asarray(ours.data), blocks)
            ggml = dequantize(np.asarray(ours.data), ours.tensor_type)
            p3 = QuantWeight(kind, torch.from_numpy(np.ascontiguousarray(blocks))).dequantize()
            assert np.array_equal(ggml, p3.numpy())
    assert not np.array_equal(
        quantize(stored[down].dequantize().numpy(), GGMLQuantizationType[kind.upper()]),
        stored[down].blocks.numpy(),
    )  # requantized, the halved blocks would have changed


def _halved_quants(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """Blocks whose quants span half their range: valid, but not what a quantizer writes."""
    b = blocks.clone().view(blocks.shape[0], -1, 34 if kind == "q8_0" else 18)
    if kind == "q8_0":
        b[..., 2:] = (b[..., 2:].view(torch.int8) // 2).view(torch.uint8)
    else:  # nibbles q in 0..15 around 8: (q - 8) // 2 + 8, both halves of each byte
        low, high = b[..., 2:] & 15, b[..., 2:] >> 4
        b[..., 2:] = ((low.int() - 8) // 2 + 8 | ((high.int() - 8) // 2 + 8) << 4).to(torch.uint8)
    return b.view(blocks.shape)


# --- metadata, tokenizer, refusals ---------------------------------------------------------------


def test_metadata_and_tokenizer_read_back(tmp_path, tokenizer_dir):
    model_dir = tiny_model(tmp_path, tokenizer_dir, "qwen2-bias-tied")
    reader = GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf", "f16", progress=False))
    config = load_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    source = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    expected = {
        "general.architecture": "qwen2",
        "general.name": model_dir.name,
        "general.file_type": 1,
        "qwen2.context_length": config["max_position_embeddings"],
        "qwen2.embedding_length": 64,
        "qwen2.block_count": 2,
        "qwen2.feed_forward_length": 128,
        "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2,
        "qwen2.rope.freq_base": config["rope_parameters"]["rope_theta"],
        "qwen2.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # the cut vocabulary's hash is nobody's: ByteLevel
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {key: field(reader, key) for key in expected} == expected
    eps = field(reader, "qwen2.attention.layer_norm_rms_epsilon")
    assert np.float32(eps) == np.float32(config["rms_norm_eps"])
    assert reader.get_field("qwen2.attention.key_length") is None  # head_dim = 64 / 4
    by_id = {i: text for text, i in source["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in source["added_tokens"]})
    pads = [f"[PAD{i}]" for i in range(TOKENS, VOCAB)]
    assert field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(TOKENS)] + pads
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:6] == [TokenType.CONTROL] * 4 + [TokenType.USER_DEFINED, TokenType.CONTROL]
    assert set(types[17:TOKENS]) == {TokenType.NORMAL}
    assert set(types[TOKENS:]) == {TokenType.UNUSED}
    assert field(reader, "tokenizer.ggml.merges") == source["model"]["merges"]
    tensor_types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert tensor_types["blk.0.attn_q.weight"] == tensor_types["token_embd.weight"] == "F16"
    assert tensor_types["blk.0.attn_q.bias"] == tensor_types["blk.0.attn_norm.weight"] == "F32"


def test_smollm2s_pre_tokenizer_is_llama_cpps_smollm(default_model_dir):
    data = json.loads((default_model_dir / "tokenizer.json").read_text())
    assert pre_tokenizer(Tokenizer.from_dir(default_model_dir), data) == "smollm"


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tokenizer_dir):
    """llama.cpp divides each rotary frequency by rope_freqs: the base frequencies so divided
    are the scaled ones transformers (and p3) rotate by."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama3-rope-scaling")
    tensors = gguf_tensors(export_gguf(model_dir, tmp_path / "m.gguf", "f32", progress=False))
    cfg = ModelConfig.from_hf(load_config(model_dir))
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model_dir))
    torch.testing.assert_close(base / factors, scaled, rtol=1e-6, atol=0)
    assert factors.min() == 1 and factors.max() == 8  # both ends of the band, and a blend
    assert ((factors > 1) & (factors < 8)).any()


def test_what_cannot_be_written_is_refused_clearly(tmp_path, tokenizer_dir):
    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama-gqa-untied")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma"]}))
    with pytest.raises(ValueError, match=r"'Gemma'.*LlamaForCausalLM, MistralForCausalLM, Mixtral"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    unsplit = {**tokenizer, "pre_tokenizer": None, "decoder": None}  # BPE, not byte-level
    (model_dir / "tokenizer.json").write_text(json.dumps(unsplit))
    with pytest.raises(ValueError, match="tokenizer.json is not a byte-level BPE"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(model_dir, tmp_path / "m.gguf", "q4_1")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half written


# --- the command line ----------------------------------------------------------------------------


def test_p3_convert_writes_a_gguf_file(tmp_path, tokenizer_dir):
    """Through the real entry point; a failure is one line (both runs at once: each spends
    most of its time importing)."""
    model_dir = tiny_model(tmp_path, tokenizer_dir, "llama-gqa-untied")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "tokenizer.json").unlink()
    out = tmp_path / "out.gguf"
    p3 = [sys.executable, "-m", "p3", "convert"]
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in (
            [*p3, str(model_dir), str(out), "--outtype", "q8_0", "--quiet"],
            [*p3, str(broken), str(tmp_path / "no.gguf")],
        )
    ]
    (_, written), (_, failed) = (run.communicate(timeout=120) for run in runs)
    assert runs[0].returncode == 0, written
    reader = GGUFReader(out)
    assert field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.1.ffn_up.weight"] == "Q8_0"
    assert runs[1].returncode == 2
    [line] = failed.strip().splitlines()
    assert line.startswith("p3: error: ") and "tokenizer.json" in line and str(broken) in line
