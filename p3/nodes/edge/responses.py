"""OpenAI response bodies and stream chunks, field for field, from a request's Deltas.

`Responder` knows one request (chat or completion, its id, model name and tokenizer) and
builds: the first chunk, a chunk per Delta, the usage chunk, and the whole non-streamed
body from the accumulated `Choice`s.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from p3.nodes.cluster.samples import Delta, Sample, TokenLogprob
from p3.nodes.edge.tools import Call, ToolCallParser, Tools
from p3.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = "p3-0.1.0"
MIN_LOGPROB = -9999.0  # JSON has no -inf


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: Delta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Responder:
    def __init__(
        self,
        chat: bool,
        model_name: str,
        tokenizer: Tokenizer,
        logprobs: int | None,
        echo_texts: list[str] | None = None,
        echo_ids: list[list[int]] | None = None,
        tools: Tools | None = None,
        returned_ids: list[list[int]] | None = None,
    ):
        self.chat = chat
        self.tools = tools if tools is not None and tools.active and chat else None
        self._parsers: dict[int, ToolCallParser] = {}  # streamed choices' tool calls
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.logprobs = logprobs  # None: off
        self.echo_texts = echo_texts  # completions with echo: the prompt text of each choice
        self.echo_ids = echo_ids  # and its token ids (echo with logprobs)
        # completions with vLLM's return_token_ids: each choice's prompt ids, returned with
        # the choice's output ids (streamed: on its first chunk, and each chunk's own ids)
        self.returned_ids = returned_ids
        self._ids_returned: set[int] = set()
        self.text_offsets: dict[int, int] = {}
        self.skip_special_tokens = True  # as the request's text: skipped ones take no room
        self._echoed: set[int] = set()  # streamed choices whose echo chunk is out

    # -- streamed ---------------------------------------------------------------------------

    def first_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        """Chat: the assistant role on every choice; completions: the echoed prompts."""
        if self.chat:
            return [
                self._chunk(i, {"role": "assistant", "content": ""}) for i in range(num_choices)
            ]
        if self.echo_texts is None or self._echo_logprobs_wanted:
            return []  # with logprobs, each echo waits for its prompt's logprobs (chunks())
        return [self._chunk(i, self.echo_texts[i]) for i in range(num_choices)]

    @property
    def returns_ids(self) -> bool:
        """Every delta makes a chunk, its ids in it (text or not: a model without a tokenizer)."""
        return self.returned_ids is not None

    @property
    def _echo_logprobs_wanted(self) -> bool:
        return self.echo_texts is not None and self.logprobs is not None and not self.chat

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """A delta's SSE chunks. Chat, as OpenAI streams it: the finish_reason comes in a
        chunk of its own with an empty delta, after the last content."""
        if not self.chat:
            echo = []
            if self._echo_logprobs_wanted and delta.index not in self._echoed:
                self._echoed.add(delta.index)
                chunk = self._chunk(delta.index, self.echo_texts[delta.index])
                echoed = self._echo_logprobs(delta.index, delta.prompt_logprobs)
                chunk["choices"][0]["logprobs"] = echoed
                echo = [chunk]
            chunk = self._chunk(
                delta.index, delta.text, delta.logprobs, delta.finish_reason, delta.stop_reason
            )
            self._return_ids(chunk["choices"][0], delta.token_ids)
            return [*echo, chunk]
        if self.tools is not None:
            return self._tool_chunks(delta)
        out = []
        if delta.text or delta.logprobs:
            out.append(self._chunk(delta.index, {"content": delta.text}, delta.logprobs))
        if delta.finish_reason is not None:
            out.append(self._chunk(delta.index, {}, None, delta.finish_reason))
        return out

    def _tool_chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """Content outside calls as content; a call's header (index, id, name) first, then
        its argument fragments; the delta's logprobs ride on its first chunk."""
        parser = self._parsers.get(delta.index)
        if parser is None:
            parser = self._parsers[delta.index] = self._parser(delta.index)
        events = parser.feed(delta.text) if delta.text else []
        if delta.finish_reason is not None:
            events += parser.finish()
        bodies = [_tool_delta(event) for event in events]
        if not bodies and delta.logprobs:
            bodies = [{"content": ""}]
        out = [
            self._chunk(delta.index, body, delta.logprobs if i == 0 else None)
            for i, body in enumerate(bodies)
        ]
        if delta.finish_reason is not None:
            finish = _tool_finish(delta.finish_reason, parser.calls)
            out.append(self._chunk(delta.index, {}, None, finish))
        return out

    def _parser(self, index: int) -> ToolCallParser:
        return self.tools.parser(self.tokenizer.chat_template, self.id, index)

    def usage_chunk(self, samples: list[Sample]) -> dict[str, Any]:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage(samples)}

    def _chunk(self, index, body, logprobs=None, finish=None, stop_reason=None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        choice["delta" if self.chat else "text"] = body
        choice["logprobs"] = self._logprobs(index, logprobs) if logprobs else None
        choice["finish_reason"] = finish
        if not self.chat:
            choice["stop_reason"] = stop_reason
        return {**self._envelope(chunk=True), "choices": [choice]}

    # -- whole ------------------------------------------------------------------------------

    def response(self, choices: list[Choice], samples: list[Sample]) -> dict[str, Any]:
        return {
            **self._envelope(chunk=False),
            "choices": [self._choice(c) for c in choices],
            "usage": usage(samples),
        }

    def _choice(self, choice: Choice) -> dict[str, Any]:
        logprobs = None
        if self.logprobs is not None:
            logprobs = self._logprobs(choice.index, choice.logprobs)
            if self._echo_logprobs_wanted:
                echoed = self._echo_logprobs(choice.index, choice.prompt_logprobs)
                logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            finish = choice.finish_reason
            if self.tools is not None:
                parser = self._parser(choice.index)
                events = parser.feed(choice.text) + parser.finish()
                content = "".join(e[1] for e in events if e[0] == "content")
                if parser.calls:
                    message["content"] = content.strip() or None
                    message["tool_calls"] = [_tool_call(c) for c in parser.calls]
                    finish = _tool_finish(finish, parser.calls)
            return {
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        echo = self.echo_texts[choice.index] if self.echo_texts else ""
        out = {
            "index": choice.index,
            "text": echo + choice.text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        self._return_ids(out, choice.token_ids)
        return out

    def _return_ids(self, choice: dict[str, Any], token_ids: list[int]) -> None:
        """vLLM's return_token_ids: the choice's output ids, and its prompt's the first time."""
        if self.returned_ids is None:
            return
        index = choice["index"]
        first = index not in self._ids_returned
        self._ids_returned.add(index)
        choice["prompt_token_ids"] = self.returned_ids[index] if first else None
        choice["token_ids"] = list(token_ids)

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    # -- logprobs ---------------------------------------------------------------------------

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        return self._completion_logprobs(index, entries)

    def _chat_entry(self, entry: TokenLogprob) -> dict[str, Any]:
        top = [self._chat_top(t, lp) for t, lp in entry.top[: self.logprobs or 0]]
        return {**self._chat_top(entry.token_id, entry.logprob), "top_logprobs": top}

    def _chat_top(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(self.tokenizer, token_id)
        return {
            "token": token_text(self.tokenizer, token_id),
            "logprob": _finite(logprob),
            "bytes": raw,
        }

    def _echo_logprobs(
        self, index: int, entries: list[TokenLogprob] | None
    ) -> dict[str, list[Any]]:
        """The echoed prompt's part of a completion's logprobs: its first token has none."""
        ids = self.echo_ids[index] if self.echo_ids else []
        texts = [token_text(self.tokenizer, t) for t in ids]
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        entries = entries or []
        return {
            "tokens": texts,
            "token_logprobs": [None] + [_finite(e.logprob) for e in entries],
            "top_logprobs": [None] + [self._top_dict(e) for e in entries],
            "text_offset": offsets,
        }

    def _completion_logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        offset = self.text_offsets.get(index, len(self.echo_texts[index]) if self.echo_texts else 0)
        tokens, offsets = [], []
        skipped = self.tokenizer.all_special_ids if self.skip_special_tokens else ()
        for entry in entries:
            text = self.tokenizer.token_text(entry.token_id)  # None: no tokenizer, no text
            tokens.append(_shown(text, entry.token_id))
            offsets.append(offset)  # where the token's text starts in the choice's text
            offset += 0 if text is None or entry.token_id in skipped else len(text)
        self.text_offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [self._top_dict(e) for e in entries],
            "text_offset": offsets,
        }

    def _top_dict(self, entry: TokenLogprob) -> dict[str, float]:
        top = {token_text(self.tokenizer, t): _finite(lp) for t, lp in entry.top[: self.logprobs]}
        top.setdefault(token_text(self.tokenizer, entry.token_id), _finite(entry.logprob))
        return top


def _tool_delta(event: tuple) -> dict[str, Any]:
    kind = event[0]
    if kind == "content":
        return {"content": event[1]}
    if kind == "call":
        _, index, call_id, name = event
        function = {"name": name, "arguments": ""}
        return {
            "tool_calls": [
                {"index": index, "id": call_id, "type": "function", "function": function}
            ]
        }
    _, index, fragment = event
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


def _tool_call(call: Call) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def _tool_finish(finish: str | None, calls: list[Call]) -> str | None:
    """A turn that ended after calling tools ends with "tool_calls", as OpenAI's do."""
    return "tool_calls" if calls and finish == "stop" else finish


def usage(samples: list[Sample]) -> dict[str, Any]:
    """Exact counts: each prompt once (n samples share it), every sample's output tokens."""
    prompts: dict[int, tuple[int, int]] = {}
    for sample in samples:
        key = id(sample.journal.prompt_token_ids)
        num_cached = max(prompts.get(key, (0, 0))[1], sample.num_cached_tokens)
        prompts[key] = (sample.num_prompt_tokens, num_cached)
    prompt_tokens = sum(n for n, _ in prompts.values())
    completion_tokens = sum(s.num_output_tokens for s in samples)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())},
    }


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return _shown(tokenizer.token_text(token_id), token_id)


def _shown(text: str | None, token_id: int) -> str:
    """A token as logprobs show it: its text, or without a tokenizer "token_id:N" (vLLM's
    return_tokens_as_token_ids form)."""
    return f"token_id:{token_id}" if text is None else text


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The token's own bytes: byte-level BPE pieces map back through GPT-2's byte table."""
    piece = tokenizer.id_to_token(token_id) or ""
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece):
        return [table[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode())


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
