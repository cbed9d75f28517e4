"""`avcloud trace`: bandwidth traces (Mahimahi or `seconds Mbps`): statistics, synthesis, conversion,
and Mahimahi's measured traces from Debian's package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avcloud.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="bandwidth traces: statistics, synthetic traces, conversion",
                                   description="Cellular bandwidth traces in Mahimahi or two-column format.")
    actions = parser.add_subparsers(dest="trace_command", metavar="ACTION")
    actions.required = True

    info = actions.add_parser("info", help="duration, mean, per-second percentiles, seconds at zero")
    info.add_argument("path", type=Path, metavar="FILE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=run_info)

    synth = actions.add_parser("synth", help="write a synthetic trace (Mahimahi unless --two-column)")
    synth.add_argument("--out", type=Path, required=True, metavar="FILE")
    synth.add_argument("--kind", choices=("lte", "constant", "step"), default="lte")
    synth.add_argument("--seed", type=int, default=0, help="for --kind lte")
    synth.add_argument("--duration-s", type=float, default=150.0)
    synth.add_argument("--mbps", type=float, default=10.0, help="mean (lte) or rate (constant)")
    synth.add_argument("--levels-mbps", default="12,3,20,1", help="for --kind step: comma-separated levels")
    synth.add_argument("--step-s", type=float, default=10.0, help="for --kind step: seconds per level")
    synth.add_argument("--two-column", action="store_true", help="write `seconds Mbps` lines instead")
    synth.set_defaults(handler=run_synth)

    convert = actions.add_parser("convert", help="convert between Mahimahi and two-column formats")
    convert.add_argument("path", type=Path, metavar="FILE")
    convert.add_argument("--out", type=Path, required=True, metavar="FILE")
    convert.add_argument("--two-column", action="store_true", help="write `seconds Mbps` (default: Mahimahi)")
    convert.set_defaults(handler=run_convert)

    fetch = actions.add_parser("fetch", help="download Mahimahi's measured cellular traces (Debian package)",
                               description="Download Debian's mahimahi-traces package (checked against its "
                                           "SHA-256) and write its 16 measured traces and README to a folder.")
    fetch.add_argument("--out", type=Path, required=True, metavar="DIR")
    fetch.add_argument("--force", action="store_true", help="replace files of the same names with other content")
    fetch.add_argument("--no-progress", action="store_true")
    fetch.set_defaults(handler=run_fetch)


def run_info(args: argparse.Namespace) -> int:
    from datasets.traces import load_trace

    trace = load_trace(args.path)
    stats = trace.stats()
    if args.json:
        json.dump({"name": trace.name, **stats}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("statistic", "value", title=str(args.path))
    table.add_row("duration", f"{stats['duration_s']:.1f} s")
    table.add_row("packets", f"{stats['packets']}")
    table.add_row("mean", f"{stats['mean_mbps']:.2f} Mbps")
    for key in ("p10_mbps", "p50_mbps", "p90_mbps", "min_mbps", "max_mbps"):
        table.add_row(f"{key[:-5]} per second", f"{stats[key]:.2f} Mbps")
    table.add_row("seconds at zero", f"{stats['seconds_at_zero']}")
    Console().print(table)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from datasets import traces

    if args.duration_s <= 0:
        raise UserError(f"--duration-s must be positive (got {args.duration_s})")
    if args.kind == "lte":
        if args.mbps <= 0:
            raise UserError(f"--mbps must be positive (got {args.mbps})")
        opportunities = traces.markov_lte_trace(args.seed, args.duration_s, args.mbps)
    elif args.kind == "constant":
        if args.mbps <= 0:
            raise UserError(f"--mbps must be positive (got {args.mbps})")
        opportunities = traces.constant_trace(args.mbps, args.duration_s)
    else:
        try:
            levels = [float(level) for level in args.levels_mbps.split(",")]
        except ValueError:
            raise UserError(f"--levels-mbps: expected comma-separated numbers, got '{args.levels_mbps}'") from None
        if any(level < 0 for level in levels) or args.step_s <= 0 or round(args.step_s) != args.step_s:
            raise UserError("--levels-mbps must be non-negative and --step-s a positive whole number")
        opportunities = traces.step_trace(levels, args.step_s)
    _write(args.out, traces.Trace(args.out.name, opportunities), args.two_column)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from datasets.traces import load_trace

    _write(args.out, load_trace(args.path), args.two_column)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from datasets.mahimahi_package import PACKAGE_URL, fetch_traces

    written = fetch_traces(args.out, progress=not args.no_progress, force=args.force)
    traces = sum(1 for path in written if path.suffix in (".up", ".down"))
    print(f"wrote {traces} traces and the README from {PACKAGE_URL} to {args.out}")
    return 0


def _write(path: Path, trace, two_column: bool) -> None:
    from datasets.traces import write_mahimahi, write_two_column

    if two_column:
        write_two_column(path, trace.per_second_mbps())
    else:
        write_mahimahi(path, trace.opportunities_ms)
    print(f"wrote {path} ({trace.duration_s:.1f} s, mean {trace.mean_mbps:.2f} Mbps)")
