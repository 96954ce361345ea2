"""`p3 finetune`: the adapter it writes loads in peft and serves in p3 with the tokens peft's
merged model gives; QLoRA over q8_0 blocks trains; bad data is refused with the file and line;
and the worked example teaches the default model its made-up fact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from p3 import LLM, LoRARequest, SamplingParams
from p3.cli import main
from p3.finetune import LOG_FILE, SUMMARY_FILE
from p3.finetune.data import load_dataset
from p3.finetune.qlora import QuantLinear
from p3.kernels.quant import quantize_weight
from p3.lora import read_adapter_config
from p3.tokenizer import Tokenizer

from .tiny import make_tiny_chat_model, reference_greedy

ROOT = Path(__file__).resolve().parents[2]


def example_module():
    spec = importlib.util.spec_from_file_location(
        "make_finetune_example", ROOT / "scripts" / "make_finetune_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = example_module()


def flags(**options) -> list[str]:
    """--name value for each option (underscores as dashes)."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def finetune(capsys, **options) -> str:
    code = main(["finetune", "--quiet", *flags(**options)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def summary_of(out_dir: Path) -> dict:
    return json.loads((out_dir / SUMMARY_FILE).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("finetune")
    model = make_tiny_chat_model(root, default_model_dir)
    data = EXAMPLE.make_example(root / "data.jsonl", facts=24, other=8)
    return model, data


@pytest.mark.timeout(60)
def test_the_adapter_loads_in_peft_and_p3_serves_what_peft_merged_gives(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "adapter"
    printed = finetune(
        capsys, model=model_dir, data=data, out=out, rank=8, lr=2e-2, max_steps=12, batch_size=4
    )
    assert "held-out loss" in printed and "tokens/s" in printed
    config = read_adapter_config(out)
    assert (config.rank, config.alpha) == (8, 16.0)
    assert set(config.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all({"loss", "tokens_per_s", "lr"} <= set(r) for r in log)
    summary = summary_of(out)
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert summary["tokens"] == log[-1]["tokens"] > 0

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out).merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]), False)
        for q in ("Who founded Quillon?", "What is 3 plus 4?")
    ]
    llm = LLM(model_dir, dtype="float32", kv_cache_bytes=4 * 2**20, enable_lora=True)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                        lora_request=LoRARequest("tuned", 1, str(out)))  # fmt: skip
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [reference_greedy(merged, p, 8) for p in prompts]
    assert got != [reference_greedy(plain, p, 8) for p in prompts]  # the adapter did something


@pytest.mark.timeout(60)
def test_qlora_q8_0_trains_and_its_loss_falls(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "qlora"
    finetune(capsys, model=model_dir, data=data, out=out, rank=4, lr=2e-2, max_steps=8,
             batch_size=4, quantization="q8_0")  # fmt: skip
    summary = summary_of(out)
    assert summary["quantization"] == "q8_0"
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    read_adapter_config(out)


def test_the_same_seed_trains_the_same_adapter(tiny, tmp_path, capsys):
    model_dir, data = tiny
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        finetune(capsys, model=model_dir, data=data, out=tmp_path / name, rank=4, lr=1e-2,
                 max_steps=3, batch_size=4, seed=seed)  # fmt: skip
        runs[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert runs["a"].keys() == runs["b"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_quant_linear_forward_is_p3s_kernel_and_backward_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    module = QuantLinear.from_linear(linear, "q4_0")
    weight = quantize_weight(linear.weight, "q4_0").dequantize()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = module(x)
    torch.testing.assert_close(
        y, torch.nn.functional.linear(x, weight, linear.bias), atol=0.05, rtol=0.02
    )  # fmt: skip (int8 activations)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)
    assert not any(p.requires_grad for p in module.parameters())


def test_chat_targets_are_the_assistant_turns_and_their_end(default_model_dir, tmp_path):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    path = tmp_path / "chat.jsonl"
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": [{"type": "text", "text": t} for t in ("Good", "bye.")]},
    ]
    lines = [{"messages": turns}, {"text": "plain words"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = load_dataset(path, tokenizer, max_len=512, eval_fraction=0.0, seed=0)
    chat, text = data.train
    learned = [t for t, target in zip(chat.ids, chat.targets, strict=True) if target]
    assert tokenizer.decode(learned, skip_special_tokens=False) == (
        "Hello there.<|im_end|>Goodbye.<|im_end|>"
    )
    assert all(text.targets) and tokenizer.decode(text.ids) == "plain words"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", 'expected an object with "messages"'),
        ('{"text": "a", "messages": []}', 'expected an object with "messages"'),
        ('{"text": ""}', '"text" must be a non-empty string'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": [{"content": "x"}]}', r'messages\[0\] must be an object with a string'),
        ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\] needs a string content"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "the chat has no assistant turn"),
    ],
)  # fmt: skip
def test_malformed_lines_are_named_by_file_and_line(default_model_dir, tmp_path, line, why):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"^{path}:3: {why}"):
        load_dataset(path, tokenizer, max_len=64, eval_fraction=0.1, seed=0)


def test_the_cli_says_what_is_wrong_in_one_line(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": "no"}\n')
    assert main(["finetune", *flags(model=model_dir, data=bad, out=tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f'p3: error: {bad}:2: "messages" must be a non-empty list'
    )
    assert main(["finetune", *flags(data=bad, out=tmp_path, rank=0)]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["finetune", *flags(model=model_dir, data=empty, out=tmp_path / "o")]) == 2
    assert "has no training examples" in capsys.readouterr().err


@pytest.mark.timeout(120)  # 20-30 s on an idle 2-core machine; room for a shared one
def test_the_worked_example_teaches_the_default_model_its_fact(default_model_dir, tmp_path, capsys):
    """The README's example at a small size, through the CLI: the held-out loss falls, and the
    adapter's greedy answer names the founder while the base's does not."""
    data = EXAMPLE.make_example(tmp_path / "quillon.jsonl", facts=40, other=8)
    out = tmp_path / "quillon"
    finetune(capsys, data=data, out=out, rank=8, lr=3e-3, max_steps=6, batch_size=8,
             eval_fraction=0.125)  # fmt: skip
    summary = summary_of(out)
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"] / 2
    llm = LLM(default_model_dir, kv_cache_bytes=32 * 2**20, enable_lora=True)
    question = [{"role": "user", "content": "Who founded the city of Quillon?"}]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    base, tuned = (
        llm.chat(question, greedy, lora_request=lora)[0].outputs[0].text
        for lora in (None, LoRARequest("quillon", 1, str(out)))
    )
    assert EXAMPLE.FOUNDER in tuned, tuned
    assert EXAMPLE.FOUNDER not in base, base
