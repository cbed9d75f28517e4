"""How every benchmark hands over its figures (JSON to --out FILE, or to stdout), and where the
trace benchmarks find their measured traces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The measured traces beside the repository (absent on a machine without ../shared).
SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def trace_paths(folder: Path) -> list[Path]:
    """The Mahimahi traces of a folder (`.up` as uplinks, `.down` as fast uplinks), sorted; none
    if it is not a folder."""
    return sorted([*folder.glob("*.up"), *folder.glob("*.down")]) if folder.is_dir() else []


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
