"""Text <-> token ids with the `tokenizers` package alone, plus the streaming helpers.

`Tokenizer` reads tokenizer.json, tokenizer_config.json and the chat template the way
transformers' AutoTokenizer does, without importing transformers. A model without
tokenizer.json, or loaded with skip_tokenizer_init, gets a `NoTokenizer` (`load_tokenizer`):
token ids in, token ids out, and whatever needs text refused with why. `IncrementalDetokenizer`
turns a stream of token ids into text deltas; `StopStringMatcher` cuts that text at stop strings.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from p3.sampling_params import InvalidParam, SamplingParams
from p3.weights.files import read_json

REPLACEMENT_CHAR = "\ufffd"
DETOKENIZE_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A tokenizers.Tokenizer plus what tokenizer_config.json adds: special tokens, BOS, template.

    all_special_ids are the ids decode(skip_special_tokens=True) drops (every added token
    marked special); eos_token_ids adds generation_config.json's end ids to eos_token_id.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any],
        chat_template: str | None,
        generation_eos: Iterable[int] = (),
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.tokens = {key: _token_content(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids = frozenset([*eos, *generation_eos])
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = frozenset(i for i, token in added.items() if token.special)
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            self._set_post_processor(config.get("add_bos_token"), config.get("add_eos_token"))

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        return cls.from_files(read_tokenizer_files(model_dir), model_dir)

    @classmethod
    def from_files(cls, files: dict[str, bytes], origin: str | Path = "") -> Tokenizer:
        """From the bytes of TOKENIZER_FILES (as a node sends them; tokenizer.json needed).
        origin: their directory (or the model they are of), which the errors name each
        missing or malformed file in."""
        path = {name: Path(origin) / name for name in TOKENIZER_FILES}
        if "tokenizer.json" not in files:
            raise ValueError(f"{path['tokenizer.json']} is not among the tokenizer files")
        try:
            backend = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(
                f"{path['tokenizer.json']} is unreadable as a tokenizer: {exc}"
            ) from None
        config, generation = (
            read_json(path[name], files[name]) if name in files else {}
            for name in ("tokenizer_config.json", "generation_config.json")
        )
        jinja = files.get("chat_template.jinja")
        template = jinja.decode(errors="replace") if jinja is not None else None
        eos = _as_list(generation.get("eos_token_id"))
        return cls(backend, config, template or _config_template(config), eos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_text(self, token_id: int) -> str | None:
        """One token's own text, special or not (a logprob's decoded_token)."""
        return self.decode([token_id], skip_special_tokens=False)

    def check_params(self, params: SamplingParams) -> None:
        """Every parameter is served with a tokenizer (NoTokenizer refuses some)."""

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a chat, rendered like transformers' apply_chat_template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        special_tokens = {key: token for key, token in self.tokens.items() if token is not None}
        return self._compiled_template.render(
            {**special_tokens, **kwargs},
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )

    @cached_property
    def _compiled_template(self) -> Any:
        return _compile_template(self.chat_template)

    def _id_of(self, key: str) -> int | None:
        token = self.tokens[key]
        return None if token is None else self.backend.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """What transformers does when tokenizer_config.json says add_bos_token/add_eos_token."""
        bos = self._special_token("bos_token") if add_bos else []
        eos = self._special_token("eos_token") if add_eos else []
        single = " ".join([*(f"{t}:0" for t, _ in bos), "$A:0", *(f"{t}:0" for t, _ in eos)])
        pair = " ".join([single, *(f"{t}:1" for t, _ in bos), "$B:1", *(f"{t}:1" for t, _ in eos)])
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=bos + eos
        )

    def _special_token(self, key: str) -> list[tuple[str, int]]:
        token, token_id = self.tokens[key], self._id_of(key)
        return [] if token is None or token_id is None else [(token, token_id)]


def _token_content(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers 5 saves the template there; it wins over the config's
)


def read_tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'} does not exist")
    return {n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).is_file()}


class NoTokenizerError(ValueError):
    """Text asked of a model that has no tokenizer."""


class NoTokenizer:
    """The tokenizer of a model served without one, as vLLM's skip_tokenizer_init serves:
    prompts are token ids, outputs are token ids and their text is empty. Whatever needs text
    (a text prompt, a chat, stop strings, structured outputs) is refused, saying why: the
    model's directory and the file it lacks, or that its tokenizer was skipped. End of
    sequence and stop_token_ids need no tokenizer (config.json and generation_config.json
    give the end ids to the engine)."""

    chat_template = None
    all_special_ids: frozenset[int] = frozenset()

    def __init__(self, why: str, vocab_size: int | None = None):
        self.why = why  # "the model at DIR has no tokenizer (DIR/tokenizer.json does not exist)"
        self.vocab_size = vocab_size  # None where not known (an edge told by a node's route)

    def refuse(self, what: str) -> NoTokenizerError:
        return NoTokenizerError(f"{self.why}: {what}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise self.refuse(
            "a text prompt needs one; give the prompt as token ids (prompt_token_ids)"
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""

    def id_to_token(self, token_id: int) -> None:
        return None

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[None]:
        return [None for _ in ids]

    def token_text(self, token_id: int) -> None:
        return None

    def apply_chat_template(self, messages: list[dict], *args: Any, **kwargs: Any) -> str:
        raise self.refuse("chat messages need one to be rendered; give the prompt as token ids")

    def check_params(self, params: SamplingParams) -> None:
        """InvalidParam naming the first parameter that needs text."""
        if params.stop:
            what = "stop strings need one to match the text; stop_token_ids need none"
            raise InvalidParam("stop", str(self.refuse(what)))
        if params.structured_outputs is not None:
            what = "structured outputs need one to constrain the text"
            raise InvalidParam("structured_outputs", str(self.refuse(what)))


def load_tokenizer(model_dir: Path, skip_tokenizer_init: bool = False) -> Tokenizer | NoTokenizer:
    """The tokenizer of the model in model_dir; a NoTokenizer when skip_tokenizer_init, or when
    the directory has no tokenizer.json (vLLM would need the flag; p3 sees there is none). A
    malformed tokenizer file is a ValueError naming it."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not skip_tokenizer_init and path.is_file():
        return Tokenizer.from_dir(model_dir)
    why = (
        "skip_tokenizer_init: it is not loaded" if skip_tokenizer_init else f"{path} does not exist"
    )
    vocab_size = read_json(model_dir / "config.json").get("vocab_size")
    return NoTokenizer(
        f"the model at {model_dir} has no tokenizer ({why})",
        vocab_size if isinstance(vocab_size, int) else None,
    )


def tokenizer_files_hash(files: dict[str, bytes]) -> str:
    """sha256 over the files' names and bytes: what a node announces and an edge checks."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(b"%d:%s:%d:" % (len(name), name.encode(), len(files[name])))
        digest.update(files[name])
    return digest.hexdigest()


def _config_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _compile_template(source: str) -> Any:
    """The Jinja environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class IncrementalDetokenizer:
    """Token ids in, new text out; never ends a delta inside a multi-byte character.

    vLLM's prefix/read offsets: decode a small window of ids twice, with and without the ids
    not yet emitted, and emit the difference. Deltas join to `tokenizer.decode(output_ids)`,
    or, when prompt ids are given, to the text the output adds after the prompt (these differ
    only for tokenizers that drop the leading space of a text, like sentencepiece's).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = self._kept(prompt_token_ids or [])[-DETOKENIZE_CONTEXT_TOKENS:]  # the window
        self.read_offset = len(self.ids)  # ids before it only give context: their text is out

    def push(self, token_ids: Iterable[int]) -> str:
        self.ids.extend(self._kept(token_ids))
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text, text = self._decode_window()
        self._advance()
        return text[len(prefix_text) :]

    def _decode_window(self) -> tuple[str, str]:
        """(text of the context ids, text of the whole window)."""
        skip = self.skip_special_tokens
        context_text = self.tokenizer.decode(self.ids[: self.read_offset], skip)
        return context_text, self.tokenizer.decode(self.ids, skip)

    def _advance(self) -> None:
        """The ids just emitted become the next window's context; older ids are dropped."""
        del self.ids[: self.read_offset]
        self.read_offset = len(self.ids)

    def _kept(self, token_ids: Iterable[int]) -> list[int]:
        """Skipped special tokens add no text: leave them out so the window stays small."""
        if not self.skip_special_tokens:
            return list(token_ids)
        return [t for t in token_ids if t not in self.tokenizer.all_special_ids]


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back what may be the start of one.

    The stop strings' Aho-Corasick automaton (`_stop_automaton`, shared by every matcher with
    the same stops) does both at once: its state is the longest suffix of the text so far that
    begins a stop string, which is what to hold back, and it reaches a stop string's end on
    the character that completes it. A delta costs a step or two per character whatever the
    stop strings' lengths, and the automaton's size is their total length.
    """

    def __init__(self, stop: Iterable[str] = (), include_stop_str_in_output: bool = False):
        self.stops = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.automaton = _stop_automaton(tuple(self.stops)) if self.stops else None
        self.state = 0
        self.pending = ""
        self.stopped: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string hit or None). After a hit, nothing more."""
        if self.stopped is not None:
            return "", self.stopped
        if self.automaton is None:
            return delta, None
        text = self.pending + delta
        self.state, hit = self.automaton.scan(self.state, delta)
        if hit is not None:
            end, stop = len(self.pending) + hit[0], hit[1]
            self.pending, self.stopped = "", stop
            return text[: end if self.include_stop_str_in_output else end - len(stop)], stop
        held = self.automaton.depth[self.state]
        self.pending = text[len(text) - held :]
        return text[: len(text) - held], None

    def flush(self) -> str:
        """The held-back tail, once the stream has ended without a stop string."""
        text, self.pending, self.state = self.pending, "", 0
        return text


_CODE_POINTS = 0x110000  # a transition's key: state * _CODE_POINTS + ord(character)


class _StopAutomaton:
    """Aho-Corasick over stop strings: a trie whose states are the stop strings' prefixes,
    each with its failure link (the state of its longest proper suffix that is a prefix too)
    and the longest stop string that ends it, if any."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: dict[int, int] = {}
        self.depth = [0]  # a state's prefix length
        self.found: list[str | None] = [None]
        children: list[list[tuple[int, int]]] = [[]]
        for stop in stops:
            state = 0
            for char in stop:
                key = state * _CODE_POINTS + ord(char)
                if (child := self.goto.get(key)) is None:
                    child = self.goto[key] = len(self.depth)
                    children[state].append((ord(char), child))
                    children.append([])
                    self.depth.append(self.depth[state] + 1)
                    self.found.append(None)
                state = child
            self.found[state] = stop
        self.fail = [0] * len(self.depth)
        self._link(children)

    def _link(self, children: list[list[tuple[int, int]]]) -> None:
        """Failure links breadth first, so a state's (shallower) is final before it is read."""
        queue = deque(child for _, child in children[0])
        while queue:
            state = queue.popleft()
            for code, child in children[state]:
                self.fail[child] = self._step(self.fail[state], code)
                if self.found[child] is None:
                    self.found[child] = self.found[self.fail[child]]
                queue.append(child)

    def _step(self, state: int, code: int) -> int:
        while (child := self.goto.get(state * _CODE_POINTS + code)) is None and state:
            state = self.fail[state]
        return child or 0

    def scan(self, state: int, text: str) -> tuple[int, tuple[int, str] | None]:
        """From state through text: the state after, and (where in text it ends, the stop
        string) for the first stop string completed, the longest if several end together."""
        for i, char in enumerate(text):
            state = self._step(state, ord(char))
            if (stop := self.found[state]) is not None:
                return state, (i + 1, stop)
        return state, None


@lru_cache(maxsize=32)
def _stop_automaton(stops: tuple[str, ...]) -> _StopAutomaton:
    """One automaton for every sample of a request (and requests that repeat their stops)."""
    return _StopAutomaton(stops)


class OutputText:
    """One sample's token ids in, its final text out: incremental detokenizing and stop strings,
    as vLLM's output processor does them (a stop string counts only once min_tokens are out).
    The offline API and the edge both use this, so their text and stops agree."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | None, params: SamplingParams
    ):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.min_tokens = params.min_tokens

    def push(
        self, token_ids: Sequence[int], num_output_tokens: int, last: bool
    ) -> tuple[str, str | None]:
        """The text that became final after these tokens (num_output_tokens counts them), and
        the stop string that ended the sample, if one did."""
        text = self.detok.push(token_ids)
        if last:
            text += self.detok.flush()
        if num_output_tokens <= self.min_tokens and not last:
            return text, None
        text, hit = self.stops.feed(text)
        if hit is None and last:
            text += self.stops.flush()
        return text, hit
