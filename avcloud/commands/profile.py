"""`avcloud profile`: run every (model, compression) configuration on a scene; write the profile
table the optimizer reads and the detection cache the replay reuses (beside it)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from avcloud.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from avcloud.profiler import PROFILE_PRESETS

    parser = subparsers.add_parser("profile", help="profile models x codecs on a scene (table + detection cache)")
    parser.add_argument("--scene", default=None, help="Waymo scene (default: the synthetic default segment)")
    parser.add_argument("--preset", default="demo", choices=sorted(PROFILE_PRESETS),
                        help="default models/codecs/window/stride (explicit options override it)")
    parser.add_argument("--models", nargs="+", default=None, help="model names from `avcloud models list`")
    parser.add_argument("--codecs", nargs="+", default=None,
                        help="e.g. inpcomp50 inpcomp95 imgcomp90 imgcompPNG imgcompNone-inpcompNone (-downF suffix)")
    parser.add_argument("--window", type=int, default=None, help="also mAP per window of N frames")
    parser.add_argument("--stride", type=int, default=None, help="profile every Nth frame")
    parser.add_argument("--max-frames", type=int, default=None, help="profile at most N frames")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    parser.add_argument("--backend", default="onnxruntime", help="inference backend (auto, onnxruntime, torch, ...)")
    parser.add_argument("--out", default="profile.parquet", help="profile table; detections.parquet goes beside it")
    parser.add_argument("--cloud-table", type=Path, default=None, metavar="CSV",
                        help="only time the cloud configurations (decode + inference, a low percentile of "
                             "repeated runs) and write them as a runtime table for `replay --cloud CSV`")
    parser.add_argument("--timing-frames", type=int, default=None, metavar="N",
                        help="frames of the scene each configuration is timed on (all cameras of each)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from avcloud.paths import writable_output_dir
    from avcloud.profiler import PROFILE_PRESETS, run_profile

    logging.basicConfig(level=logging.WARNING)
    preset = PROFILE_PRESETS[args.preset]
    out = Path(args.out)
    if out.suffix != ".parquet":
        raise UserError(f"--out {out}: the profile table is a .parquet file")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    if args.scene is None:
        from datasets.synthetic import default_scene_path

        scene = default_scene_path()
    else:
        scene = Path(args.scene)
    if args.timing_frames is not None and args.timing_frames < 1:
        raise UserError(f"--timing-frames must be >= 1 (got {args.timing_frames})")
    if args.cloud_table is not None:
        from avcloud.profiler import TIMING_FRAMES, measure_cloud_runtimes

        if args.cloud_table.suffix.lower() != ".csv":
            raise UserError(f"--cloud-table {args.cloud_table}: the runtime table is a .csv file")
        writable_output_dir(args.cloud_table.parent, "--cloud-table", named=args.cloud_table)
        try:
            path = measure_cloud_runtimes(scene, args.models or preset.models, args.codecs or preset.codecs,
                                          args.cloud_table, args.backend, args.timing_frames or TIMING_FRAMES)
        except OSError as error:
            raise UserError(f"--cloud-table {args.cloud_table}: cannot write ({error.strerror or error})") from None
        print(f"wrote {path}")
        return 0
    writable_output_dir(out.parent, named=out)
    result = run_profile(
        scene,
        models=args.models or preset.models,
        codecs=args.codecs or preset.codecs,
        out_dir=out.parent if str(out.parent) else Path("."),
        window_frames=args.window if args.window is not None else preset.window_frames,
        frame_stride=args.stride if args.stride is not None else preset.frame_stride,
        max_frames=args.max_frames if args.max_frames is not None else preset.max_frames,
        workers=args.workers,
        progress=True,
        backend=args.backend,
        table_name=out.name,
    )
    print_summary(result.table_path)
    print(f"wrote {result.table_path} (+ .csv) and {result.cache_path}")
    return 0


def print_summary(table_path: Path) -> None:
    """Whole-scene figures per configuration, averaged over the cameras (the utility curve's points)."""
    import pyarrow.parquet as pq
    from rich.console import Console
    from rich.table import Table

    rows = [row for row in pq.read_table(table_path).to_pylist() if row["Window"] == -1]
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["Model"], []).append(row)
    table = Table(title="profile (whole scene, mean over cameras)")
    for column in ("configuration", "size [Mb]", "encode [ms]", "runtime [ms]", "mAP"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    summary = sorted(
        (
            name,
            sum(r["Network Transport Size [Mb]"] for r in group) / len(group),
            group[0]["Encode [ms]"],
            group[0]["Runtime [ms]"],
            sum(r["Utility"] for r in group) / len(group),
        )
        for name, group in by_config.items()
    )
    for name, size_mbit, encode_ms, runtime_ms, utility in summary:
        table.add_row(name, f"{size_mbit:.3f}", f"{encode_ms:.1f}", f"{runtime_ms:.1f}", f"{utility:.3f}")
    Console().print(table)
