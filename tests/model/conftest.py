"""Fixtures the model tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_leaked_blocks(request):
    """A module's `llm` (an LLM) holds nothing after each of its tests: no request left, every
    KV block free."""
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished()
        assert engine.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
