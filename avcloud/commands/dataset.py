"""`avcloud dataset`: inspect Waymo scenes (v1 tfrecord or v2 directory), render synthetic ones.

`inspect PATH --json` prints {"format", "frames", "cameras", "frames_detail": [{"timestamp_micros",
"cameras": {NAME: {"width", "height", "jpeg_bytes", "labels": {CLASS: count}}}}]}; `--summary`
leaves out frames_detail. A damaged v1 file fails with one line naming the file, the record
and the reason, unless --skip-corrupt, which reads past bad records and reports how many.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from avcloud.errors import DataError, UserError
from avcloud.types import ALL_CAMERAS, ObjectType


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dataset", help="inspect Waymo scenes, render synthetic ones",
                                   description="Waymo Open Dataset scenes (v1 tfrecord, v2 parquet) and synthetic ones.")
    actions = parser.add_subparsers(dest="dataset_command", metavar="ACTION")
    actions.required = True

    inspect = actions.add_parser("inspect", help="frames, cameras, image sizes and labels of a scene")
    inspect.add_argument("path", type=Path, metavar="PATH", help="a v1 .tfrecord file or a v2 directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--summary", action="store_true", help="leave out the per-frame detail")
    inspect.add_argument("--skip-corrupt", action="store_true", help="read past damaged records, report how many")
    inspect.add_argument("--no-crc", action="store_true", help="do not verify record CRCs (faster)")
    inspect.set_defaults(handler=run_inspect)

    synth = actions.add_parser("synth", help="render a synthetic driving segment as a Waymo v1 tfrecord")
    synth.add_argument("--out", type=Path, required=True, metavar="FILE.tfrecord")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--frames", type=int, default=200, help="frames at 10 Hz (default 200 = 20 s)")
    synth.add_argument("--cameras", default=",".join(ALL_CAMERAS),
                       help=f"comma-separated camera names (default {','.join(ALL_CAMERAS)})")
    synth.add_argument("--jpeg-quality", type=int, default=95)
    synth.add_argument("--workers", type=int, default=None, help="rendering processes (default 2)")
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(handler=run_synth)

    default = actions.add_parser("default", help="path of the default synthetic scene (rendered on first use)")
    default.add_argument("--no-progress", action="store_true")
    default.set_defaults(handler=run_default)

    convert = actions.add_parser("to-v2", help="write a scene as a Waymo v2 (parquet) directory")
    convert.add_argument("path", type=Path, metavar="PATH")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR")
    convert.set_defaults(handler=run_to_v2)


def _label_counts(classes) -> dict[str, int]:
    counts = Counter(int(c) for c in classes)
    names = {}
    for value, count in sorted(counts.items()):
        try:
            names[ObjectType(value).name] = count
        except ValueError:
            names[f"TYPE_{value}"] = count
    return names


def _v1_frames(path: Path, verify_crc: bool, skip_corrupt: bool, skipped: list[int]) -> Iterator[dict]:
    from datasets import waymo_v1
    from datasets.scene import jpeg_size
    from datasets.tfrecord import TFRecordReader

    reader = TFRecordReader(path, verify_crc=verify_crc, skip_corrupt=skip_corrupt)
    try:
        for record_index, data in reader.records():
            try:
                frame = waymo_v1.decode_frame(data, str(path), record_index)
            except DataError:
                if not skip_corrupt:
                    raise
                skipped[0] += 1
                continue
            cameras = {}
            for name, record in waymo_v1.frame_cameras(frame).items():
                width, height = record.width, record.height
                if not width or not height:
                    width, height = jpeg_size(record.jpeg_bytes)
                cameras[name] = {"width": width, "height": height, "jpeg_bytes": len(record.jpeg_bytes),
                                 "labels": _label_counts(record.ground_truth.classes)}
            yield {"timestamp_micros": int(frame.timestamp_micros), "cameras": cameras}
    finally:
        skipped[0] += reader.skipped


def _v2_frames(path: Path) -> Iterator[dict]:
    from datasets.waymo_v2 import WaymoV2Scene

    scene = WaymoV2Scene(path)
    for frame in scene.frames():
        yield {
            "timestamp_micros": frame.timestamp_micros,
            "cameras": {
                name: {"width": image.width, "height": image.height, "jpeg_bytes": len(image.jpeg_bytes),
                       "labels": _label_counts(image.ground_truth.classes)}
                for name, image in frame.cameras.items()
            },
        }


def inspect_scene(path: Path, verify_crc: bool = True, skip_corrupt: bool = False) -> dict:
    """The `dataset inspect --json` document of a scene (streams it once)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    skipped = [0]
    if path.is_dir():
        fmt, frames_iter = "waymo-v2", _v2_frames(path)
    else:
        fmt, frames_iter = "waymo-v1", _v1_frames(path, verify_crc, skip_corrupt, skipped)
    frames_detail = list(frames_iter)
    if not frames_detail:
        # What the player and the replay refuse, inspect does not report as a valid 0-frame scene.
        if path.is_file() and path.stat().st_size == 0:  # worded as the player and the replay refuse it
            raise DataError(f"{path}: not a Waymo scene (too short for a TFRecord: 0 bytes)")
        detail = f" ({skipped[0]} corrupt record(s) skipped)" if skipped[0] else ""
        raise DataError(f"{path}: no frames{detail}")
    cameras: list[str] = []
    for frame in frames_detail:
        for name in frame["cameras"]:
            if name not in cameras:
                cameras.append(name)
    document = {"format": fmt, "frames": len(frames_detail), "cameras": cameras, "frames_detail": frames_detail}
    if skip_corrupt:
        document["skipped_records"] = skipped[0]
    return document


def run_inspect(args: argparse.Namespace) -> int:
    document = inspect_scene(args.path, verify_crc=not args.no_crc, skip_corrupt=args.skip_corrupt)
    skipped = document.get("skipped_records", 0)
    if skipped:
        print(f"avcloud dataset inspect: {args.path}: skipped {skipped} corrupt record(s)", file=sys.stderr)
    if args.json:
        if args.summary:
            document = {key: value for key, value in document.items() if key != "frames_detail"}
        json.dump(document, sys.stdout, indent=None if not args.summary else 2)
        sys.stdout.write("\n")
        return 0
    _print_table(args.path, document)
    return 0


def _print_table(path: Path, document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    frames = document["frames_detail"]
    duration = ""
    if len(frames) > 1:
        span_s = (frames[-1]["timestamp_micros"] - frames[0]["timestamp_micros"]) / 1e6
        duration = f", {span_s * len(frames) / (len(frames) - 1):.1f} s"
    console = Console()
    console.print(f"[bold]{path}[/bold]: {document['format']}, {document['frames']} frames{duration}, "
                  f"cameras {', '.join(document['cameras'])}")
    table = Table("camera", "size", "mean JPEG KB", *[t.name for t in ObjectType if t.name != "UNKNOWN"])
    for camera in document["cameras"]:
        entries = [frame["cameras"][camera] for frame in frames if camera in frame["cameras"]]
        totals: Counter = Counter()
        for entry in entries:
            totals.update(entry["labels"])
        mean_kb = sum(entry["jpeg_bytes"] for entry in entries) / max(1, len(entries)) / 1024
        size = f"{entries[0]['width']}x{entries[0]['height']}" if entries else "-"
        table.add_row(camera, size, f"{mean_kb:.0f}",
                      *[str(totals.get(t.name, 0)) for t in ObjectType if t.name != "UNKNOWN"])
    console.print(table)
    if "skipped_records" in document:
        console.print(f"skipped records: {document['skipped_records']}")


def _parse_cameras(text: str) -> tuple[str, ...]:
    cameras = tuple(name.strip().upper() for name in text.split(",") if name.strip())
    unknown = [name for name in cameras if name not in ALL_CAMERAS]
    if unknown or not cameras:
        raise UserError(f"--cameras: unknown camera(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(ALL_CAMERAS)}")
    return cameras


def run_synth(args: argparse.Namespace) -> int:
    from avcloud.paths import writable_output_dir
    from datasets.synthetic import write_synthetic_scene

    cameras = _parse_cameras(args.cameras)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    writable_output_dir(args.out.parent, named=args.out)  # before the rendering, not after it
    path = write_synthetic_scene(args.out, seed=args.seed, frames=args.frames, cameras=cameras,
                                 jpeg_quality=args.jpeg_quality, progress=not args.no_progress, workers=args.workers)
    print(f"wrote {path} ({args.frames} frames, {len(cameras)} cameras, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def run_default(args: argparse.Namespace) -> int:
    from datasets.synthetic import default_scene_path

    print(default_scene_path(progress=not args.no_progress))
    return 0


def run_to_v2(args: argparse.Namespace) -> int:
    from datasets.scene import open_scene
    from datasets.waymo_v2 import write_v2_scene

    scene = open_scene(args.path)
    out = write_v2_scene(scene, args.out)
    print(f"wrote {out} (segment {scene.name}, {scene.num_frames} frames)")
    return 0
