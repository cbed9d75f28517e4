"""Where avcloud keeps generated data (default scene, profiles, zoo registrations)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of generated data: $AVCLOUD_CACHE, else ~/.cache/avcloud. Created on demand."""
    root = Path(os.environ.get("AVCLOUD_CACHE", Path.home() / ".cache" / "avcloud"))
    root.mkdir(parents=True, exist_ok=True)
    return root
