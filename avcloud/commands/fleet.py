"""`avcloud fleet`: many vehicles sharing one cell's uplink and one cloud GPU pool, simulated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avcloud.errors import UserError

DESCRIPTION = """\
Simulate a fleet: N vehicles, each the shipped onboard agent with its own cameras, on one
simulated clock, sharing one cell's uplink (a trace split by a scheduler) and one cloud GPU pool
(EDF across vehicles with batching, runtimes from the declared cloud). Vehicles drive the scene
from evenly spread frame offsets. Every combination of --vehicles, --workers, --trace (shared
cells) and --policy is one point of the sweep; points run as Ray tasks when Ray is installed
(pip install 'avcloud[ray]'), one after another otherwise, with the same results. Prints one row
per point (mAP per vehicle: mean, worst, percentiles; gain over on-car only; Jain's fairness
index; GPU and uplink utilisation; cloud goodput and deadline misses) and the fleet size where
offloading stops paying, and writes a report folder (results.json, plots, summary).
"""


def _int_list(groups: list[list[str]] | None, label: str) -> list[int] | None:
    """Whole numbers from `--vehicles 1 2 4` or `--vehicles 1,2,4` (UserError naming a bad one)."""
    if groups is None:
        return None
    values = []
    for part in (part for group in groups for text in group for part in text.replace(",", " ").split()):
        try:
            values.append(int(part))
        except ValueError:
            raise UserError(f"{label}: '{part}' is not a whole number") from None
    return values


def _one_int(text: str | None, label: str) -> int | None:
    """One whole number, or None when the option was not given (UserError naming a bad one)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{label}: '{text}' is not a whole number") from None


def _workers_list(groups: list[list[str]] | None) -> list[int | None] | None:
    """Pool sizes: whole numbers or 'unlimited' (a pool that never queues)."""
    if groups is None:
        return None
    values: list[int | None] = []
    for part in (part for group in groups for text in group for part in text.replace(",", " ").split()):
        if part == "unlimited":
            values.append(None)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise UserError(f"--workers: '{part}' is neither a whole number nor 'unlimited'") from None
    return values


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register(subparsers) -> None:
    from avcloud.fleet.cell import SCHEDULERS
    from avcloud.fleet.job import (
        DEFAULT_BREAK_EVEN_POINTS,
        DEFAULT_POLICIES,
        DEFAULT_SCHEDULER,
        DEFAULT_VEHICLES,
        DEFAULT_WORKERS,
        EXECUTORS,
    )
    from avcloud.fleet.simulation import PHASES
    from avcloud.replay.car_times import DEFAULT_CAR
    from avcloud.replay.cloud_runtimes import DEFAULT_CLOUD

    parser = subparsers.add_parser("fleet", help="simulate many vehicles sharing one cell and one GPU pool",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vehicles", action="append", nargs="+", metavar="N",
                        help=f"fleet sizes to simulate (default {' '.join(map(str, DEFAULT_VEHICLES))})")
    parser.add_argument("--workers", action="append", nargs="+", metavar="K",
                        help=f"GPU pool sizes: workers, each running one batch at a time, or 'unlimited' "
                             f"(default {DEFAULT_WORKERS}); at most the requests the fleet can have in flight "
                             "(max_in_flight_per_camera of its policies, per camera)")
    parser.add_argument("--policy", dest="policies", action="extend", nargs="+", type=_name_list, metavar="NAME",
                        help=f"policy every vehicle runs, one point each (default {', '.join(DEFAULT_POLICIES)}; "
                             "onboard, naive, equal, turbo, turbo-q; oracle with --scheduler per-vehicle; cell: "
                             "the cell-level coordinator, one joint allocation per frame over every vehicle)")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, metavar="NAME",
                        help=f"how the cell splits its capacity: {', '.join(SCHEDULERS)} (default {DEFAULT_SCHEDULER}: "
                             "proportional fair; equal: round robin among backlogged vehicles; per-vehicle: a "
                             "private uplink each, vehicle i on trace i mod the traces given)")
    parser.add_argument("--phase", default="spread", metavar="HOW",
                        help=f"when the vehicles' cameras capture: {' or '.join(PHASES)} (default spread over one "
                             "frame interval; aligned: all at once, the worst burst for the cell)")
    parser.add_argument("--scene", dest="scenes", action="extend", nargs="+", type=Path, metavar="PATH",
                        help="scenes the vehicles drive, vehicle i scene i mod the scenes given (default: the "
                             "bundled synthetic segment)")
    parser.add_argument("--trace", dest="traces", action="extend", nargs="+", type=Path, metavar="PATH",
                        help="the cell's capacity trace, one sweep point per trace (per-vehicle: the vehicles' "
                             "traces); it must be at least as long as the scene (default: the bundled LTE-like uplink)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time car <-> cloud (default 50)")
    parser.add_argument("--slo-ms", type=float, default=200.0, help="deadline after capture (default 200)")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD, metavar="MODEL",
                        help="cloud runtimes, as for `avcloud replay` (default 'reference')")
    parser.add_argument("--car", default=DEFAULT_CAR, metavar="MODEL",
                        help="car-side encode and fallback times, as for `avcloud replay` (default 'reference')")
    parser.add_argument("--preset", default="demo", help="profile preset used when profiling on first use")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="an existing profile folder")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL", help="models to profile and replay")
    parser.add_argument("--frames", type=int, default=None, metavar="N", help="only the first N frames of each scene")
    parser.add_argument("--pf-window-ms", type=float, default=1000.0, metavar="MS",
                        help="proportional fair: time constant of each vehicle's average throughput (default 1000)")
    parser.add_argument("--executor", default="auto", metavar="HOW",
                        help=f"how the sweep runs: {', '.join(EXECUTORS)} (default auto: Ray tasks when Ray is "
                             "installed, else here)")
    parser.add_argument("--processes", default=None, metavar="N",
                        help="run here on N processes, with the same results: fleets under 32 vehicles side by "
                             "side, larger ones split, at most one process per 16 vehicles (default: this "
                             "machine's cores; ignored for Ray tasks)")
    parser.add_argument("--break-even-points", type=float, default=DEFAULT_BREAK_EVEN_POINTS, metavar="P",
                        help=f"offloading stops paying when the mean gain over on-car only falls below P mAP "
                             f"points (default {DEFAULT_BREAK_EVEN_POINTS:g})")
    parser.add_argument("--cell-fairness", default="none", metavar="HOW",
                        help="policy cell: 'none' (the most total utility), 'max-min' (the worst vehicle first), or "
                             "a number, a floor on every vehicle's summed camera utility (default none)")
    parser.add_argument("--cell-capacity-fraction", type=float, default=0.9, metavar="F",
                        help="policy cell: plan for this fraction of the cell capacity measured over the last "
                             "second (default 0.9)")
    parser.add_argument("--cell-gpu-fraction", type=float, default=0.0, metavar="F",
                        help="policy cell: also keep the GPU load within this fraction of the pool's workers "
                             "(default 0: no GPU constraint)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default runs/fleet-<timestamp>)")
    parser.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from avcloud.fleet.coordinator import CellPolicySettings, parse_fairness
    from avcloud.fleet.job import (
        DEFAULT_POLICIES,
        DEFAULT_VEHICLES,
        DEFAULT_WORKERS,
        FleetOptions,
        check_options,
        default_out_dir,
        run_fleet_job,
    )
    from avcloud.fleet.report import print_tables, write_report
    from avcloud.paths import writable_output_dir
    from avcloud.replay.report import show_report

    vehicles = _int_list(args.vehicles, "--vehicles")
    workers = _workers_list(args.workers)
    options = FleetOptions(
        vehicles=list(DEFAULT_VEHICLES) if vehicles is None else vehicles,
        workers=[DEFAULT_WORKERS] if workers is None else workers,
        policies=[name for group in (args.policies or [list(DEFAULT_POLICIES)]) for name in group],
        scheduler=args.scheduler, phase=args.phase, scene_paths=args.scenes or (), trace_paths=args.traces or (),
        rtt_ms=args.rtt_ms, slo_ms=args.slo_ms, preset=args.preset, profile_dir=args.profile,
        models=tuple(args.models or ()), max_frames=args.frames, cloud=args.cloud, car=args.car, pf_window_ms=args.pf_window_ms,
        executor=args.executor, processes=_one_int(args.processes, "--processes"),
        break_even_points=args.break_even_points, progress=not args.no_progress,
        cell=CellPolicySettings(parse_fairness(args.cell_fairness), args.cell_capacity_fraction,
                                gpu_fraction=args.cell_gpu_fraction),
    )
    check_options(options)
    out_dir = writable_output_dir(args.out or default_out_dir())
    console = Console() if sys.stdout.isatty() else Console(width=170)
    with Progress(TextColumn("fleet sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=args.no_progress, transient=True) as progress:
        task = progress.add_task("fleet", total=None)
        document = run_fleet_job(options, on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                            total=total))
    try:
        write_report(document, out_dir)
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot write the report ({error.strerror or error})") from None
    show_report(document, out_dir, console, args.json, print_tables)
    return 0
