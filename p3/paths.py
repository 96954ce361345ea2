"""Where p3 keeps what it builds once: converted models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def p3_home() -> Path:
    """$P3_HOME, default ~/.cache/p3; created on first use."""
    home = Path(os.environ.get("P3_HOME") or Path.home() / ".cache" / "p3")
    home.mkdir(parents=True, exist_ok=True)
    return home
