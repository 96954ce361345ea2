"""Tokenizer, streaming detokenizer and stop strings, on tiny offline tokenizers and SmolLM2."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from p3.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

TEXT = "Hello world 😀 你好, the cat! 🎉🎉 naïve café 日本語 👨‍👩‍👧 done."
CORPUS = [TEXT, "the world says hello", "你好 世界 😀😀 🎉", "日本語のテキスト café"] * 20
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_bpe() -> Tokenizer:
    """GPT-2 style: tokens are bytes, so emoji and CJK characters span several tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"}, chat_template=None)


def sentencepiece_like(style: str) -> Tokenizer:
    """Unigram with byte fallback; '▁' marks a space and the text's first space is dropped."""
    pieces = [(t, 0.0) for t in SPECIALS] + [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [(p, -1.0) for p in ("▁", "▁Hello", "▁world", "▁the", "▁cat", "▁你好", "▁done")]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzHW,.!"]
    backend = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.add_special_tokens(SPECIALS)
    if style == "llama2":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        )
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    return Tokenizer(backend, config, chat_template=None)


TINY_TOKENIZERS = {
    "byte-level-bpe": byte_level_bpe,
    "llama2-sentencepiece": lambda: sentencepiece_like("llama2"),
    "metaspace": lambda: sentencepiece_like("metaspace"),
}


@pytest.fixture(scope="module", params=sorted(TINY_TOKENIZERS))
def tiny_tokenizer(request) -> Tokenizer:
    return TINY_TOKENIZERS[request.param]()


def stream(
    tokenizer: Tokenizer,
    ids: list[int],
    prompt: list[int] | None = None,
    skip_special_tokens: bool = True,
    step: int = 1,
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    deltas = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*deltas, detok.flush()]


def test_characters_span_several_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)  # so the tests below bite


@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_join_to_full_decode(tiny_tokenizer, step):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    deltas = stream(tiny_tokenizer, ids, step=step)
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in delta for delta in deltas)


def test_deltas_after_prompt_join_to_the_continuation(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("the cat 你好", add_special_tokens=False)
    ids = tiny_tokenizer.encode("Hello world 😀 done", add_special_tokens=False)
    continuation = tiny_tokenizer.decode(prompt + ids)[len(tiny_tokenizer.decode(prompt)) :]
    assert "".join(stream(tiny_tokenizer, ids, prompt)) == continuation
    assert continuation.lstrip() == "Hello world 😀 done"  # sentencepiece keeps its "▁"


def test_split_character_is_held_until_complete():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids]
    assert deltas[0] == "a" and deltas[-1].endswith("😀")
    assert all(delta == "" for delta in deltas[1:-1])


def test_flush_emits_an_unfinished_character():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode("ok 🦜", add_special_tokens=False)[:-1]  # unseen: several byte tokens
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)
    assert tokenizer.decode(ids).endswith("\ufffd")


def test_special_tokens_are_skipped_or_kept(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = [*tiny_tokenizer.encode("the cat", add_special_tokens=False), eos, eos]
    assert "".join(stream(tiny_tokenizer, ids)) == tiny_tokenizer.decode(ids) == "the cat"
    kept = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(stream(tiny_tokenizer, ids, skip_special_tokens=False)) == kept


def test_each_step_decodes_a_bounded_window():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode(TEXT * 30, add_special_tokens=False)
    window_lengths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda w, skip=True: window_lengths.append(len(w)) or decode(w, skip)
    stream(tokenizer, ids, prompt=ids)
    assert len(ids) > 500 and max(window_lengths) <= 16


def test_bos_follows_the_tokenizer_config():
    sentencepiece = sentencepiece_like("llama2")
    assert sentencepiece.encode("the cat")[0] == sentencepiece.bos_token_id == 1
    assert sentencepiece.encode("the cat", add_special_tokens=False)[0] != 1


def test_no_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template"):
        byte_level_bpe().apply_chat_template([{"role": "user", "content": "hi"}])


# --- stop strings ---------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    out, hit = "", None
    for delta in deltas:
        text, hit = matcher.feed(delta)
        out += text
        if hit is not None:
            return out, hit
    return out + matcher.flush(), None


def test_stop_matcher_holds_back_a_possible_stop_start():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("abc</e") == ("abc", None)
    assert matcher.feed("x") == ("</ex", None)
    assert matcher.feed("<") == ("", None)
    assert matcher.flush() == "<"


def test_stop_matcher_cuts_at_the_stop_string():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("abc</e") == ("abc", None)
    assert matcher.feed("nd>tail") == ("", "</end>")
    assert matcher.feed("more") == ("", "</end>")


def test_stop_matcher_can_include_the_stop_string():
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert feed_all(matcher, ["one ST", "OP two"]) == ("one STOP", "STOP")


def test_first_completed_stop_string_wins():
    text = "say hello, then goodbye"
    for deltas in ([text], list(text)):
        assert feed_all(StopStringMatcher(["goodbye", "lo,"]), deltas) == ("say hel", "lo,")


def test_stream_without_stop_strings_passes_through():
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == ("ab", None)
    assert feed_all(StopStringMatcher(["zz"]), ["a z", "b z"]) == ("a zb z", None)


def cut_at_stops(stops: list[str], text: str, include: bool) -> tuple[str, str | None]:
    """What a matcher has emitted once it has seen text, from the definition: up to the stop
    string that ends first (the longest if several end together), else all but the longest
    suffix that begins a stop string."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if ends:
        end, _, stop = min(ends)
        return text[: end if include else end - len(stop)], stop
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], None


@pytest.mark.timeout(30)
def test_stop_matcher_emits_what_the_definition_says():
    rng = random.Random(7)
    for trial in range(3000):
        alphabet = "ab" if trial % 2 else "abc"
        stops = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        include = rng.random() < 0.5
        matcher, out, seen = StopStringMatcher(stops, include), "", ""
        for delta in random_split(rng, text):
            seen += delta
            emitted, hit = matcher.feed(delta)
            out += emitted
            assert (out, hit) == cut_at_stops(stops, seen, include), (stops, seen)
            if hit is not None:
                break
        else:
            assert out + matcher.flush() == text


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.timeout(30)
def test_stop_matcher_work_is_linear_in_the_text_and_the_stops():
    """16 stop strings of 4,000 characters that the text nearly matches all along: the old
    matcher held every prefix (16 x 4,000^2 / 2 characters) and rescanned them on every
    delta; now memory follows the stops' length and each character costs a step or two."""
    stops = [("ab" * 2000)[:3999] + "cdefghij"[i] for i in range(8)]
    stops += ["a" * 3999 + "klmnopqr"[i] for i in range(8)]
    tracemalloc.start()
    matcher = StopStringMatcher(stops)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20
    started = time.perf_counter()
    text, out, held = "ab" * 50_000 + "a" * 3999 + "k", "", 0
    for i in range(0, len(text), 3):
        emitted, hit = matcher.feed(text[i : i + 3])
        out += emitted
        held = max(held, len(matcher.pending))
    assert hit == stops[8] and out == text[: -len(stops[8])]
    assert held == 3999
    assert time.perf_counter() - started < 2.0


def test_stop_matchers_with_the_same_stops_share_one_automaton():
    assert StopStringMatcher(["x", "yz"]).automaton is StopStringMatcher(["x", "yz"]).automaton


# --- the real SmolLM2 tokenizer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf_smollm2(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


CHATS = [
    [{"role": "user", "content": "Hi there 😀"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文."},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["user", "system", "multi-turn"])
def test_chat_template_matches_transformers(smollm2, hf_smollm2, chat, add_generation_prompt):
    ours = smollm2.apply_chat_template(chat, add_generation_prompt)
    theirs = hf_smollm2.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs


def test_chat_template_adds_smollm2_default_system_prompt(smollm2):
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_encodes_like_transformers(smollm2, hf_smollm2):
    text = smollm2.apply_chat_template(CHATS[2]) + TEXT
    assert smollm2.encode(text) == hf_smollm2(text).input_ids
    assert smollm2.encode(text)[0] == 1  # <|im_start|> from the template, no BOS added
    assert smollm2.encode("Hello")[0] != smollm2.bos_token_id


@pytest.mark.parametrize("tokenizer_name", ["smollm2", *sorted(TINY_TOKENIZERS)])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_the_edges_off_loop_encoding_gives_the_same_ids(
    request, tokenizer_name, add_special_tokens
):
    """The edge encodes big prompts in a thread through encode_batch (it releases the GIL)."""
    from p3.nodes.edge.prompts import _encode

    if tokenizer_name == "smollm2":
        tokenizer = request.getfixturevalue("smollm2")
    else:
        tokenizer = TINY_TOKENIZERS[tokenizer_name]()
    chat = tokenizer.apply_chat_template(CHATS[2]) if tokenizer.chat_template else ""
    text = chat + TEXT * 50
    expected = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert _encode(tokenizer, text, add_special_tokens, off_loop=True) == expected
    assert _encode(tokenizer, text, add_special_tokens, off_loop=False) == expected


def test_smollm2_streams_chat_output(smollm2):
    prompt = smollm2.encode(smollm2.apply_chat_template(CHATS[0]))
    ids = smollm2.encode(TEXT + "<|im_end|>")
    deltas = stream(smollm2, ids, prompt)
    assert "".join(deltas) == smollm2.decode(ids) == TEXT
    assert not any("\ufffd" in delta for delta in deltas)


def test_tokenizer_loads_without_transformers(default_model_dir):
    """The edge's tokenizer needs only `tokenizers` (transformers takes seconds to import and
    hundreds of MB); how fast it loads is measured, not asserted here."""
    script = (
        "import sys; from p3.tokenizer import Tokenizer; "
        f"Tokenizer.from_dir({str(default_model_dir)!r}); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]


def test_from_dir_reads_eos_ids_from_generation_config(tmp_path, default_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((Path(default_model_dir) / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token_ids == {0, 2}


def test_tokenizer_files_travel_as_bytes_with_a_hash_that_names_them(default_model_dir):
    from p3.tokenizer import read_tokenizer_files, tokenizer_files_hash

    files = read_tokenizer_files(default_model_dir)
    assert "tokenizer.json" in files
    shipped, local = Tokenizer.from_files(files), Tokenizer.from_dir(default_model_dir)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert shipped.apply_chat_template(chat) == local.apply_chat_template(chat)
    assert shipped.encode("héllo wörld") == local.encode("héllo wörld")
    assert shipped.eos_token_ids == local.eos_token_ids
    digest = tokenizer_files_hash(files)
    tampered = {**files, "tokenizer.json": files["tokenizer.json"].replace(b"{", b"{ ", 1)}
    assert tokenizer_files_hash(tampered) != digest
    renamed = {("x" + name): data for name, data in files.items()}
    assert tokenizer_files_hash(renamed) != digest
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_files({k: v for k, v in files.items() if k != "tokenizer.json"})
    with pytest.raises(ValueError, match="unreadable"):
        Tokenizer.from_files({**files, "tokenizer.json": b"not json"})
