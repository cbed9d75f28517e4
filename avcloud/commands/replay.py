"""`avcloud replay`: every allocation policy on the same scene frames and the same uplink trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avcloud.errors import UserError
from avcloud.replay.car_times import DEFAULT_CAR
from avcloud.replay.cloud_runtimes import DEFAULT_CLOUD
from avcloud.replay.job import DEFAULT_PRESET, DEFAULT_RTT_MS, DEFAULT_SLO_MS
from optimizer.policies import POLICY_NAMES, parse_overrides

DESCRIPTION = """\
Replay scenes over uplink traces and compare allocation policies by mAP: onboard (never offload),
naive (every camera to its most accurate cloud configuration), equal (equal bandwidth split),
turbo (exact allocation on a point estimate, TURBO's method), turbo-q (allocation at the forecast
quantile that maximises expected utility) and oracle (knows the coming interval's true bandwidth).
Without arguments: the bundled synthetic segment over the bundled synthetic LTE-like uplink, all
policies. The profile (real model outputs on really compressed images) is computed on first use
and cached under $AVCLOUD_CACHE.
"""


def _policy_list(text: str) -> list[str]:
    # Checked later with the other options, so a bad name is one line, not a usage dump.
    return [name.strip() for name in text.split(",") if name.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser("replay", help="compare allocation policies on scenes and uplink traces",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", dest="scenes", action="extend", nargs="+", type=Path, metavar="PATH",
                        help="Waymo v1 .tfrecord, Waymo v2 directory or synthetic scene (default: the bundled synthetic segment)")
    parser.add_argument("--trace", dest="traces", action="extend", nargs="+", type=Path, metavar="PATH",
                        help="Mahimahi or two-column uplink trace, e.g. ../shared/traces/*.up "
                             "(default: the bundled synthetic LTE-like uplink)")
    parser.add_argument("--policy", dest="policies", action="extend", nargs="+", type=_policy_list, metavar="NAME",
                        help=f"policies to compare, space or comma separated (default: all of {', '.join(POLICY_NAMES)})")
    parser.add_argument("--rtt-ms", type=float, default=DEFAULT_RTT_MS,
                        help=f"round-trip time car <-> cloud (default {DEFAULT_RTT_MS:g}: a typical 4G round trip is 40-60 ms)")
    parser.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS,
                        help=f"deadline after capture (default {DEFAULT_SLO_MS:g}: with RTT 50 ms it leaves the profiled "
                             "cloud options about one 10 Hz frame interval for encoding and upload; much longer "
                             "deadlines make TURBO's critical bandwidth under-count a 10 Hz stream)")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"profile preset used when profiling on first use (default '{DEFAULT_PRESET}')")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="models to profile and replay, on-car model included (default: the family for the "
                             "scene: avd-* on our synthetic scenes, the COCO-pretrained family on real images; "
                             "`avcloud models list`)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="use the profile in DIR (profile.parquet + detections.parquet from the profiler) "
                             "instead of the cached one for --preset")
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help="replay only the first N frames of each scene (default: all the profile covers)")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD, metavar="MODEL",
                        help="cloud runtimes: 'reference' (default: the shipped table, the same on a quiet or a busy "
                             "machine), 'measured' (the profile's, timed on this machine), a CSV of 'Model,Runtime [ms]' "
                             "rows for your device, or 'scale:F' / 'scale:MODEL=F,...' (measured x F)")
    parser.add_argument("--car", default=DEFAULT_CAR, metavar="MODEL",
                        help="car-side encode and on-car fallback times: 'reference' (default: the shipped table, "
                             "so the table does not move with the load of the machine that made the profile), "
                             "'measured' (the profile's), or a CSV with 'Model,Encode [ms],Runtime [ms]' rows "
                             "(a profile.csv is one)")
    parser.add_argument("--cloud-workers", type=int, default=None, metavar="N",
                        help="simulate a cloud of N workers (EDF with batching, as the service) instead of a GPU "
                             "pool that serves every request on arrival; with --live, the service's workers (default 1)")
    parser.add_argument("--camera-input-ms", type=float, default=0.0, metavar="MS",
                        help="simulated time the car needs per camera image before compressing it, cameras in "
                             "turn (default 0: raw frames from camera drivers; set it to the JPEG decode time to "
                             "compare with --live, which decodes the dataset's JPEGs)")
    parser.add_argument("--live", action="store_true",
                        help="run the real cloud service, link emulator, onboard daemon, player and recorder on loopback")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default runs/replay-<timestamp>)")
    parser.add_argument("--mcap", nargs="+", default=None, metavar="POLICY",
                        help="also write these policies' runs as MCAP recordings in the report folder (camera "
                             "images, each result with its source, the allocation and bandwidth estimate per frame; "
                             "opens in Foxglove)")
    parser.add_argument("--set", nargs="+", default=None, metavar="FIELD=VALUE", dest="policy_settings",
                        help="override a policy field for every replayed policy, e.g. max_in_flight_per_camera=2 "
                             "stream_rate_cap=true (fields: optimizer/policies.py PolicySpec); results.json records "
                             "each run's full spec")
    parser.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from avcloud.paths import writable_output_dir
    from avcloud.replay.job import ReplayOptions, check_options, default_out_dir, results_document, run_replay
    from avcloud.replay.report import print_tables, show_report, write_report

    policies = [name for group in (args.policies or [list(POLICY_NAMES)]) for name in group]
    options = ReplayOptions(
        scene_paths=args.scenes or (), trace_paths=args.traces or (), policies=policies,
        rtt_ms=args.rtt_ms, slo_ms=args.slo_ms, preset=args.preset, max_frames=args.frames, profile_dir=args.profile,
        progress=not args.no_progress, cloud_workers=args.cloud_workers, camera_input_ms=args.camera_input_ms,
        cloud=args.cloud, car=args.car, models=tuple(args.models or ()),
        policy_overrides=parse_overrides(args.policy_settings or ()),
    )
    if args.policy_settings and args.live:
        raise UserError("--set: a live replay's agent takes its policy fields from the onboard params")
    replayed = check_options(options)
    for name in args.mcap or ():
        if name not in replayed:
            raise UserError(f"--mcap {name}: not among the replayed policies ({', '.join(replayed)})")
        if args.live:
            raise UserError("--mcap: a live replay is recorded by `avcloud record --format mcap`")
    out_dir = writable_output_dir(args.out or default_out_dir())
    # Wide enough for the table when the output is not a terminal (a file, a pipe, `make demo` logs).
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if args.live:
        from avcloud.replay.live import run_live_replay

        results = run_live_replay(options)
        mode = "live"
    else:
        results = run_replay(options, console=Console(stderr=True))
        mode = "simulated"
    document = results_document(results, options, mode=mode)
    try:
        write_report(document, results, out_dir)
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot write the report ({error.strerror or error})") from None
    if args.mcap:
        from avcloud.replay.recording import write_policy_mcap

        for number, result in enumerate(results):
            for name in args.mcap:
                write_policy_mcap(result.case, result.runs[name], out_dir / f"case{number}-{name}.mcap")
    show_report(document, out_dir, console, args.json, print_tables)
    return 0
