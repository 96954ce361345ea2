"""The offline API on a model without a tokenizer (vLLM's skip_tokenizer_init, or a directory
without tokenizer.json): token-id prompts generate what they generate with the tokenizer,
with empty text; whatever needs text is refused, saying the model has no tokenizer."""

from __future__ import annotations

import pytest

from p3 import LLM, SamplingParams

from .tiny import make_tiny_model

PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 3]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
OPTIONS = {"dtype": "float32", "kv_cache_bytes": 8 << 20}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("notok")
    bare = make_tiny_model(root / "bare", "llama-gqa-untied")
    with_tokenizer = make_tiny_model(root / "tok", "llama-gqa-untied", default_model_dir)
    return bare, with_tokenizer


@pytest.fixture(scope="module")
def llm(dirs):
    return LLM(dirs[0], **OPTIONS)


def test_token_ids_generate_as_with_a_tokenizer_and_the_text_is_empty(llm, dirs):
    assert not (dirs[0] / "tokenizer.json").exists()
    ours = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    reference = LLM(dirs[1], **OPTIONS).generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for out, ref in zip(ours, reference, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].text == ""
        assert out.prompt is None and out.prompt_token_ids == ref.prompt_token_ids
        [(token, logprob)] = out.outputs[0].logprobs[0].items()  # vLLM's: no decoded token
        assert token == out.outputs[0].token_ids[0] and logprob.decoded_token is None


def test_skip_tokenizer_init_serves_a_directory_with_a_tokenizer_the_same_way(llm, dirs):
    skipped = LLM(dirs[1], skip_tokenizer_init=True, **OPTIONS)
    with pytest.raises(ValueError, match="has no tokenizer .*skip_tokenizer_init"):
        skipped.generate("Once upon a time")
    tokens = {"prompt_token_ids": PROMPTS[0]}
    assert skipped.generate(tokens, GREEDY)[0].outputs[0].token_ids == (
        llm.generate(tokens, GREEDY)[0].outputs[0].token_ids
    )


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda llm: llm.generate("Once upon a time"), "a text prompt needs one"),
        (lambda llm: llm.generate({"prompt": "Once"}), "a text prompt needs one"),
        (lambda llm: llm.chat([{"role": "user", "content": "hi"}]), "chat messages need one"),
        (lambda llm: llm.embed("hi"), "a text prompt needs one"),
        (
            lambda llm: llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(stop=["."])),
            "stop strings need one",
        ),
    ],
)
def test_text_is_refused_naming_the_directory_and_the_missing_file(llm, dirs, call, what):
    with pytest.raises(ValueError, match=what) as error:
        call(llm)
    assert f"the model at {dirs[0]} has no tokenizer" in str(error.value)
    assert f"{dirs[0] / 'tokenizer.json'} does not exist" in str(error.value)


def test_stop_token_ids_and_the_configs_eos_end_a_sequence_without_a_tokenizer(llm):
    tokens = {"prompt_token_ids": PROMPTS[0]}
    first = llm.generate(tokens, GREEDY)[0].outputs[0].token_ids
    params = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[first[2]]
    )
    stopped = llm.generate(tokens, params)
    out = stopped[0].outputs[0]
    assert out.token_ids == first[:3] and (out.finish_reason, out.stop_reason) == ("stop", first[2])
    eos = llm.generate(tokens, SamplingParams(max_tokens=8, logit_bias={2: 100.0}))[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.stop_reason is None  # eos_token_id 2, config.json


def test_a_truncated_tokenizer_json_is_named_before_the_weights_load(tmp_path, dirs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dirs[1], broken)
    data = (broken / "tokenizer.json").read_bytes()
    (broken / "tokenizer.json").write_bytes(data[: len(data) // 3])
    (broken / "model.safetensors").write_bytes(b"")  # never read: the tokenizer fails first
    with pytest.raises(ValueError, match=f"{broken / 'tokenizer.json'} is unreadable"):
        LLM(broken, **OPTIONS)
