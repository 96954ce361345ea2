"""LoRA adapters against transformers + peft with the adapter merged: each alone, and mixed in
one batch with other adapters and the base; the prefix cache kept apart per adapter; what
p3 cannot run refused with the file named."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from p3 import LLM, LoRARequest, SamplingParams

from .families import make_family_model
from .tiny import VOCAB, load_reference, make_tiny_model, reference_greedy

NUM_NEW = 10
GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, out, seed: int, rank: int, targets, rslora: bool = False):
    """A PEFT adapter with random A and B (peft starts B at 0), saved as peft saves it."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
        use_rslora=rslora, init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)  # outputs visibly move
    model.save_pretrained(out)
    return out


def merged_reference(model_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = make_tiny_model(root, "llama-gqa-untied")
    a = make_adapter(model_dir, root / "a", seed=1, rank=8, targets=ALL, rslora=True)
    b = make_adapter(model_dir, root / "b", seed=2, rank=4, targets=["q_proj", "v_proj"])
    refs = {
        None: load_reference(model_dir),
        "a": merged_reference(model_dir, a),
        "b": merged_reference(model_dir, b),
    }
    requests = {"a": LoRARequest("a", 1, str(a)), "b": LoRARequest("b", 2, str(b)), None: None}
    return model_dir, requests, refs


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _ = setup
    return LLM(model_dir, dtype="float32", kv_cache_bytes=8 * 2**20, enable_lora=True,
               max_loras=2, max_lora_rank=8)  # fmt: skip


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB - 1) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def run(llm, batch, loras):
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, lora_request=loras)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_each_adapter_alone_equals_peft_merged(llm, setup):
    _, requests, refs = setup
    batch = prompts(2)
    for name in ("a", "b"):
        got = run(llm, batch, requests[name])
        assert got == [reference_greedy(refs[name], p, NUM_NEW) for p in batch], name
        assert got != [reference_greedy(refs[None], p, NUM_NEW) for p in batch], name


def test_adapters_and_the_base_mixed_in_one_batch(llm, setup):
    _, requests, refs = setup
    batch = prompts(6, seed=1)
    names = ["a", "b", None, "b", "a", None]
    got = run(llm, batch, [requests[n] for n in names])
    want = [reference_greedy(refs[n], p, NUM_NEW) for n, p in zip(names, batch, strict=True)]
    assert got == want


def test_prefix_cache_is_kept_apart_per_adapter(llm, setup):
    _, requests, refs = setup
    prompt = prompts(1, seed=2)[0] * 3  # several full blocks
    for name in (None, "a", None, "b"):  # each finds the previous one's blocks cached
        assert run(llm, [prompt], requests[name]) == [reference_greedy(refs[name], prompt, NUM_NEW)]


def test_prefill_logits_with_an_adapter_within_1e4(llm, setup):
    _, requests, refs = setup
    prompt = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt}], params, lora_request=requests["a"])[0]
    got = torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])
    with torch.inference_mode():
        logprobs = refs["a"](torch.tensor([prompt])).logits[0].log_softmax(-1)
    want = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_what_cannot_run_is_refused(llm, setup, tmp_path):
    model_dir, requests, _ = setup
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(model_dir, dtype="float32", kv_cache_bytes=2**20).generate(
            [{"prompt_token_ids": [5, 6]}], GREEDY, lora_request=requests["a"]
        )
    too_big = make_adapter(model_dir, tmp_path / "big", seed=3, rank=16, targets=["q_proj"])
    with pytest.raises(ValueError, match="max_lora_rank"):
        run(llm, [[5, 6]], LoRARequest("big", 9, str(too_big)))
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((too_big / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (too_big / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="adapter_config.json.*DoRA"):
        run(llm, [[5, 6]], LoRARequest("dora", 10, str(dora)))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        run(llm, [[5, 6]], LoRARequest("none", 11, str(tmp_path)))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, str(tmp_path))


def test_more_adapters_than_max_loras_take_turns(setup, tmp_path):
    model_dir, requests, refs = setup
    llm = LLM(model_dir, dtype="float32", kv_cache_bytes=4 * 2**20, enable_lora=True,
              max_loras=1, max_lora_rank=8)  # fmt: skip
    prompt = prompts(1, seed=4)[0]
    for name in ("a", "b", "a"):  # each evicts the other
        assert run(llm, [prompt], requests[name]) == [reference_greedy(refs[name], prompt, NUM_NEW)]
    with pytest.raises(ValueError, match="max_loras=1"):
        run(llm, [prompt, prompt], [requests["a"], requests["b"]])
    assert not llm.engine.has_unfinished()


def test_fused_checkpoint_projections_take_their_adapter(tmp_path):
    """Phi-3 keeps qkv_proj and gate_up_proj fused: an adapter on them splits its B rows."""
    model_dir = make_family_model(tmp_path, "phi3-longrope")
    adapter = make_adapter(model_dir, tmp_path / "a", seed=5, rank=4,
                           targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])  # fmt: skip
    ref = merged_reference(model_dir, adapter)
    llm = LLM(model_dir, dtype="float32", kv_cache_bytes=4 * 2**20, enable_lora=True)
    batch = prompts(2, seed=5)
    got = run(llm, batch, LoRARequest("a", 1, str(adapter)))
    assert got == [reference_greedy(ref, p, NUM_NEW) for p in batch]
