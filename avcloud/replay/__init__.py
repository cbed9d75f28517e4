"""Replay: every allocation policy on the same scene frames and uplink trace, simulated or live.

`run_default_demo()` is what `make demo` runs: all policies on the bundled synthetic segment over
the bundled synthetic LTE-like uplink, printing the table and writing a report folder.
"""

from __future__ import annotations


def run_default_demo(argv: list[str] | None = None) -> int:
    """`avcloud replay` with its defaults (extra CLI arguments may be passed); returns the exit code."""
    from avcloud.cli import main

    return main(["replay", *(argv or [])])


__all__ = ["run_default_demo"]
