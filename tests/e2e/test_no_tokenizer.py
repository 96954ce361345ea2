"""`p3 serve --model DIR` where DIR has no tokenizer.json: token-id completions are served (empty
text; the ids with vLLM's return_token_ids), text and chat are OpenAI-shaped 400s saying the
model has no tokenizer. And through the CLI, a missing or malformed model file is one line
naming it, before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from ..model.tiny import make_tiny_model
from . import openai_cluster

pytestmark = pytest.mark.timeout(120)
PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("notok"), "llama-gqa-untied")


@pytest.fixture(scope="module")
def client(model):
    args = ("--model", str(model), "--dtype", "float32", "--kv-cache-memory", "64MiB")
    cluster = openai_cluster.serve(*args)
    yield openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", timeout=60, max_retries=0)
    cluster.stop()


def complete(client, model, **body):
    return client.completions.create(
        model=str(model), prompt=PROMPT, max_tokens=6, temperature=0, **body
    )


def test_a_token_id_completion_has_empty_text_and_its_token_ids(client, model):
    assert str(model) in [m.id for m in client.models.list().data]
    extra = {"return_token_ids": True, "ignore_eos": True}
    whole = complete(client, model, logprobs=1, extra_body=extra).choices[0]
    assert whole.text == "" and whole.finish_reason == "length"
    assert whole.model_extra["prompt_token_ids"] == PROMPT
    ids = whole.model_extra["token_ids"]
    assert len(ids) == 6 and all(isinstance(t, int) for t in ids)
    assert whole.logprobs.tokens == [f"token_id:{t}" for t in ids]  # vLLM's form, no text
    assert complete(client, model).choices[0].model_extra.get("token_ids") is None  # asked only
    chunks = [c.choices[0] for c in complete(client, model, stream=True, extra_body=extra)]
    assert [t for c in chunks for t in c.model_extra["token_ids"]] == ids
    assert chunks[0].model_extra["prompt_token_ids"] == PROMPT and all(c.text == "" for c in chunks)


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (
            lambda c, m: c.completions.create(model=str(m), prompt="Once upon", max_tokens=4),
            "prompt",
        ),
        (
            lambda c, m: c.chat.completions.create(
                model=str(m), messages=[{"role": "user", "content": "hi"}], max_tokens=4
            ),
            "messages",
        ),
        (lambda c, m: complete(c, m, stop=["."]), "stop"),
        (lambda c, m: complete(c, m, echo=True), "echo"),
    ],
)
def test_what_needs_text_is_a_400_saying_the_model_has_no_tokenizer(client, model, call, param):
    with pytest.raises(openai.BadRequestError) as error:
        call(client, model)
    body = error.value.body
    assert body["param"] == param and body["code"] == "no_tokenizer"
    assert f"the model at {model} has no tokenizer" in body["message"]
    assert f"{model / 'tokenizer.json'} does not exist" in body["message"]


def p3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "p3", *args], capture_output=True, text=True, timeout=60
    )


def test_the_cli_names_a_malformed_file_in_one_line_and_exits_non_zero(model, tmp_path):
    import shutil

    broken = shutil.copytree(model, tmp_path / "broken")
    (broken / "config.json").write_text('{"vocab_size": ')
    served = p3("serve", "--model", str(broken), "--port", "0")
    assert served.returncode == 2
    assert served.stderr.splitlines() == [
        f"p3: error: {broken / 'config.json'} is not valid JSON: "
        "Expecting value: line 1 column 16 (char 15)"
    ]
    shutil.copy(model / "config.json", broken / "config.json")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (broken / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header[:-3])
    generated = p3("generate", "hi", "--model", str(broken), "--raw")
    assert generated.returncode == 2 and len(generated.stderr.splitlines()) == 1
    assert f"{broken / 'model.safetensors'} is truncated" in generated.stderr
