"""How every benchmark hands over its figures: JSON to --out FILE, or to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_report(report: dict, out_path: Path | None) -> None:
    """A file that cannot be written still leaves the figures, which may have taken an hour, on
    standard output, and the benchmark exits non-zero naming the file."""
    text = json.dumps(report, indent=2)
    if out_path is None:
        print(text)
        return
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text + "\n")
    except OSError as error:
        print(text)
        raise SystemExit(f"{Path(sys.argv[0]).name}: --out {out_path}: cannot write ({error.strerror or error}); "
                         "the figures are on standard output above") from None
