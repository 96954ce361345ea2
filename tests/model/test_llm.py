"""The offline API on the real default model: p3.LLM(...).generate / .chat."""

from __future__ import annotations

import pytest

from p3 import LLM, SamplingParams

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", kv_cache_bytes=256 * 2**20)


def test_greedy_chat_answers_paris_from_the_dequantized_weights(default_model_dir):
    """With the GGUF's weights dequantized (fp32 arithmetic) the model knows its capitals.
    (As stored, with int8 activations, it answers "L'Étoile, la Marseillaise, ...": so
    does llama.cpp on the same file, measured with its llama-server.)"""
    llm = LLM(default_model_dir, dtype="float32", quantization="none", kv_cache_bytes=64 * 2**20)
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, not by max_tokens


def test_greedy_chat_as_stored_ends_its_turn(llm):
    question = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(question, SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text.strip()


def test_bfloat16_chat_answers_paris(default_model_dir):
    llm = LLM(default_model_dir, dtype="bfloat16", quantization="none", kv_cache_bytes=64 * 2**20)
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0]
    assert "Paris" in out.text


def test_same_seed_same_tokens_alone_or_in_a_batch_of_8(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate(STORY, params)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in range(7)]
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(7)]
    batch = llm.generate([*prompts[:3], STORY, *prompts[3:]], [*others[:3], params, *others[3:]])
    assert batch[3].outputs[0].token_ids == alone


def test_different_seeds_differ(llm):
    outs = llm.generate(
        [STORY] * 4, [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in range(4)]
    )
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 4


def test_prompt_token_ids_and_string_prompts_agree(llm):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ids = llm.tokenizer.encode(STORY)
    by_text, by_ids = llm.generate([STORY, {"prompt_token_ids": ids}], params)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_ids.prompt_token_ids == ids


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(STORY, SamplingParams(max_tokens=5, temperature=0.0))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_cuts_the_text_and_frees_the_request(llm):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = llm.generate(STORY, greedy)[0].outputs[0].text
    stop = full[10:14]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    out = llm.generate(STORY, params)[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_ids_end_the_request(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    tokens = llm.generate(STORY, greedy)[0].outputs[0].token_ids
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[tokens[3]])
    out = llm.generate(STORY, params)[0].outputs[0]
    first = tokens.index(tokens[3])
    assert out.token_ids == tokens[: first + 1] and out.stop_reason == tokens[3]


def test_n_samples_share_the_prompt_and_differ(llm):
    out = llm.generate(STORY, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    again = llm.generate(STORY, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_logprobs_report_the_chosen_token_and_top_k(llm):
    out = llm.generate(STORY, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    sample = out.outputs[0]
    assert len(sample.logprobs) == 4
    for token, entry in zip(sample.token_ids, sample.logprobs, strict=True):
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None)
        assert len(ranked) == 3 and ranked[0] == (1, token)  # greedy picks the top token
        assert entry[token].logprob <= 0.0
    assert sample.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(sample.token_ids, sample.logprobs, strict=True))
    )


def test_prefix_cache_hits_on_a_repeated_chat(llm):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = llm.chat(CAPITAL, params)[0]
    second = llm.chat(CAPITAL, params)[0]
    assert second.num_cached_tokens >= 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_cancel_mid_flight_frees_its_blocks(llm):
    from p3.engine.sequence import Request

    engine = llm.engine
    engine.add(Request("cancel-me", llm.tokenizer.encode(STORY), SamplingParams(max_tokens=100)))
    engine.step()
    engine.step()
    assert engine.num_free_blocks < engine.num_kv_blocks
    engine.cancel("cancel-me")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("cancel-me", "abort")]


def test_invalid_requests_are_refused_with_value_error(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [10**9]})
    with pytest.raises(ValueError, match="context"):
        llm.generate({"prompt_token_ids": [5] * (llm.engine.max_model_len + 1)})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_embed_gives_unit_vectors_nearer_for_nearer_meanings(llm):
    cat, kitten, stocks = (
        out.outputs.embedding
        for out in llm.embed(
            ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock prices fell sharply."]
        )
    )

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert abs(dot(cat, cat) - 1.0) < 1e-4 and len(cat) == 576
    assert dot(cat, kitten) > dot(cat, stocks)
