"""Training examples from JSONL: each line a chat (`{"messages": [{"role", "content"}, ...]}`,
OpenAI's shape: the loss on the assistant turns only) or a text (`{"text": "..."}`: the loss on
every token). Chats are rendered with the model's chat template and tokenized as p3 serves
them (p3.tokenizer, no special tokens added), so the adapter learns on the very tokens it will
be asked with. A line that is not one of these is a ValueError naming the file and the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p3.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    ids: list[int]
    targets: list[bool]  # targets[t]: token t is predicted (from the tokens before it)
    line: int

    @property
    def num_targets(self) -> int:
        return sum(self.targets[1:])


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    held_out: list[Example]
    num_lines: int
    num_dropped: int  # examples left without a target within --max-len


def load_dataset(
    path: str | Path, tokenizer: Tokenizer, max_len: int, eval_fraction: float, seed: int
) -> Dataset:
    """Every line of path as an Example (cut to max_len tokens), split at random (seeded)
    into training and held-out examples."""
    path = Path(path)
    examples, dropped, num_lines = [], 0, 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            num_lines += 1
            example = read_line(path, number, line, tokenizer, max_len)
            if example.num_targets:
                examples.append(example)
            else:
                dropped += 1
    if not examples:
        why = f" ({dropped} had nothing to learn within --max-len {max_len})" if dropped else ""
        raise ValueError(f"{path} has no training examples{why}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) >= 2:
        num_eval = min(max(num_eval, 1), len(examples) - 1)
    held_out = sorted(order[:num_eval])
    train = sorted(order[num_eval:])
    return Dataset(
        [examples[i] for i in train], [examples[i] for i in held_out], num_lines, dropped
    )


def read_line(path: Path, number: int, line: str, tokenizer: Tokenizer, max_len: int) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict) or ("messages" in record) == ("text" in record):
        raise ValueError(f'{where}: expected an object with "messages" (a chat) or "text"')
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError(f'{where}: "text" must be a non-empty string')
        ids = tokenizer.encode(text)[:max_len]
        return Example(ids, [True] * len(ids), number)
    messages = _messages(where, record["messages"])
    ids, targets = _render_chat(where, messages, tokenizer)
    return Example(ids[:max_len], targets[:max_len], number)


def _messages(where: str, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: "messages" must be a non-empty list')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f'{where}: messages[{i}] must be an object with a string "role"')
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{where}: messages[{i}].content parts must be text parts")
            content = "".join(texts)
        if not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}] needs a string content")
        out.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise ValueError(f"{where}: the chat has no assistant turn to learn")
    return out


def _render_chat(
    where: str, messages: list[dict[str, str]], tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    """The chat's tokens, and which belong to an assistant turn (its end-of-turn token too).

    A turn's characters are those between the render of the chat before it (with the
    generation prompt) and the render through it, so the template must render a chat's
    turns as prefixes of the whole (every template p3 serves does)."""

    def render(turns: list[dict[str, str]], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, add_generation_prompt=prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raises what the template raises
            raise ValueError(f"{where}: the chat template failed: {exc}") from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"{where}: the chat template does not render the turns before an assistant "
                "turn as a prefix of the chat, so its tokens cannot be told apart"
            )
        spans.append((len(before), len(through.rstrip())))
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    targets = [
        any(end > start and begin < stop for start, stop in spans)
        for begin, end in encoding.offsets
    ]
    return list(encoding.ids), targets
