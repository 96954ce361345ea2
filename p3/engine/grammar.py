"""Constrained decoding in the engine: a matcher per constrained sequence, masks per step.

A sequence whose params carry a grammar (p3/structured.py) gets an llguidance LLMatcher at
admission, fed the output tokens it already has (a sequence moved here from another node
replays them and goes on inside the grammar). Each step, the masks of the step's constrained
rows are computed on a worker thread while the model runs (`start`), and the sampler sets the
logits they forbid to -inf (`allowed`); after sampling, the matcher consumes the token, and a
matcher that reached the end of its grammar finishes the sequence ("stop").

The llguidance tokenizer is built from tokenizer.json once per engine (0.2-0.35 s for a
49k vocabulary on this machine, holding the GIL all along): a node builds it as it loads
(`warm`), since a serving node's event loop must not stall that long (its heartbeats would be
late); the offline API builds it at the first constrained request.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from p3.log import get_logger

log = get_logger(__name__)


class Grammars:
    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None
        self._pool: ThreadPoolExecutor | None = None

    def matcher(self, grammar: str, output_token_ids: Sequence[int]):
        """A matcher at the start of grammar, past output_token_ids; ValueError if the grammar
        does not compile for this vocabulary or the tokens leave it."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error().strip()}")
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            raise ValueError(f"the output so far leaves its grammar: {matcher.get_error()}")
        return matcher

    def warm(self) -> None:
        """Build the tokenizer now; a model without tokenizer.json serves no grammar (its
        constrained requests are refused), which is logged, not raised."""
        try:
            self.tokenizer()
        except (OSError, ValueError) as exc:
            log.warning("engine.grammar_unavailable", error=str(exc))

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLExecutor, LLTokenizer

                backend = (self.model_dir / "tokenizer.json").read_text()
                self._tokenizer = LLTokenizer(
                    backend, n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids)
                )
                self._executor = LLExecutor()
                log.info("engine.grammar_tokenizer", vocab_size=self.vocab_size)
            return self._tokenizer

    def start(self, matchers: list) -> Future:
        """The masks of these matchers ([len, words] int32, a bit a token), on a worker thread:
        the caller runs the model meanwhile and takes the result before it samples."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="p3-grammar")
        return self._pool.submit(self._fill, matchers)

    def _fill(self, matchers: list) -> np.ndarray:
        words = (self.vocab_size + 31) // 32
        masks = np.zeros((len(matchers), words), dtype=np.int32)
        rows = [(matcher, i) for i, matcher in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(rows, masks.ctypes.data, words * 4, len(matchers))
        return masks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def allowed(masks: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Bit masks [rows, words] as booleans [rows, vocab_size]: True where a token may come."""
    bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(bool)).to(device)
