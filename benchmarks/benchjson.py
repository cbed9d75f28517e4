"""How every benchmark hands over its figures: JSON to --out FILE, or to stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out_path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if out_path is None:
        print(text)
        return
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")
