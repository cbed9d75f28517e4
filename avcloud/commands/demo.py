"""`avcloud demo`: the main job on the embedded default (what `make demo` runs).

Every allocation policy replayed on the bundled synthetic driving segment over the bundled
synthetic LTE-like uplink trace; the profile is computed on first use and cached.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job on the embedded default: `avcloud replay` with its defaults",
        description="Replay every allocation policy on the bundled synthetic segment over the bundled "
        "LTE-like uplink trace, print the comparison table and write a report folder. "
        "Same as `avcloud replay` with no arguments.",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="report folder (default: runs/replay-<time>)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from avcloud.replay import run_default_demo

    return run_default_demo(["--out", args.out] if args.out else None)
