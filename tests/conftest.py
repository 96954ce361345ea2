"""Session-wide fixtures. P3_HOME stays the user's cache, so the default model converts once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("P3_HOME", str(Path.home() / ".cache" / "p3"))  # also for subprocesses


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF (about 15 s the first time, then cached)."""
    from p3.weights.files import ensure_default_model

    return ensure_default_model()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the C++ kernels and convert the default model once, before any test and outside
    every test's time limit: on a fresh machine that takes ~30 s, which would otherwise land
    inside whichever test first starts an engine."""
    from p3.kernels import build
    from p3.weights.files import ensure_default_model

    build.warm()
    ensure_default_model()
