"""Where compressdit keeps reusable work: prompt embeddings, teacher trajectories, resumable training state."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$COMPRESSDIT_CACHE``, else ``~/.cache/compressdit``."""
    return Path(os.environ.get("COMPRESSDIT_CACHE", Path.home() / ".cache" / "compressdit"))
