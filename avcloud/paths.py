"""Where avcloud keeps generated data (default scene, profiles, zoo registrations)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from avcloud.errors import UserError


def cache_dir() -> Path:
    """Root of generated data: $AVCLOUD_CACHE, else ~/.cache/avcloud. Created on demand."""
    root = Path(os.environ.get("AVCLOUD_CACHE", Path.home() / ".cache" / "avcloud"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def writable_output_dir(path: Path, flag: str = "--out", named: Path | None = None) -> Path:
    """Creates an output folder and checks that it takes a file, before the run whose output goes
    there: a folder that cannot be written is found in a second, not after minutes of work.
    `named`: what the error names after the flag (the file the user gave; default the folder)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {named or path}: cannot write there ({error.strerror or error})") from None
    return path
