"""Benchmark of the datasets package: scene read throughput, peak memory, synthetic generation, metric.

Figures are measured on the machine it runs on:
- read+parse throughput of a Waymo v1 segment (frames/s, MB/s), with and without CRC checks,
  without JPEG decoding, and the same with every JPEG decoded; the v2 reader on a converted copy;
- peak RSS of a process that streams the whole segment (target < 300 MB whatever its size);
- synthetic generation time per frame (5 cameras rendered + JPEG-encoded, one process) and per camera;
- the AP metric's speed (images/s) and, with --trace, trace loading time and statistics.

    .venv/bin/python benchmarks/bench_datasets.py [--scene X.tfrecord] [--trace ../shared/traces/X.up]
        [--quick] [--out FILE.json]

Without --scene, the default 200-frame segment is used (rendered into the cache on first use);
--quick renders a 20-frame segment into a temporary directory instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchjson import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def read_pass(path: Path, verify_crc: bool, decode_jpeg: bool, max_frames: int | None = None) -> dict:
    from datasets.scene import open_scene

    start = time.perf_counter()
    start_cpu = time.process_time()
    scene = open_scene(path, verify_crc=verify_crc) if path.is_file() else open_scene(path)
    frames = 0
    payload_bytes = 0
    boxes = 0
    for frame in scene.frames():
        for image in frame.cameras.values():
            payload_bytes += len(image.jpeg_bytes)
            boxes += len(image.ground_truth)
            if decode_jpeg:
                image.image_bgr()
        frames += 1
        if max_frames is not None and frames >= max_frames:
            break
    elapsed = time.perf_counter() - start
    elapsed_cpu = time.process_time() - start_cpu
    size_bytes = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*.parquet"))
    return {
        "frames": frames,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(frames / elapsed, 1),
        # The machine may be shared: CPU time shows what the reader itself costs.
        "frames_per_cpu_s": round(frames / max(elapsed_cpu, 1e-9), 1),
        "mb_per_s": round(size_bytes / 1e6 / elapsed, 1) if max_frames is None else None,
        "jpeg_mb_per_s": round(payload_bytes / 1e6 / elapsed, 1),
        "boxes": boxes,
    }


def _child_read(path: Path) -> dict:
    """Stream the whole segment in a fresh process and report its peak RSS."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[2], sys.argv[2] + '/benchmarks'];"  # the repo and benchjson
        "from benchmarks.bench_datasets import read_pass, _peak_rss_mb; from pathlib import Path;"
        "result = read_pass(Path(sys.argv[1]), True, False); result['peak_rss_mb'] = round(_peak_rss_mb(), 1);"
        "print(json.dumps(result))"
    )
    output = subprocess.run([sys.executable, "-c", code, str(path), str(REPO_ROOT)], capture_output=True, text=True,
                            check=True, cwd=REPO_ROOT)
    return json.loads(output.stdout.strip().splitlines()[-1])


def bench_generation(frames: int) -> dict:
    from datasets.synthetic import ALL_CAMERAS, encode_synthetic_frame, render_camera

    for camera in ALL_CAMERAS:  # build the world and the per-resolution noise once, as a generation does
        render_camera(0, 0, camera)
    per_camera_ms = {}
    per_camera_cpu_ms = {}
    for camera in ALL_CAMERAS:
        start, start_cpu = time.perf_counter(), time.process_time()
        for frame_index in range(frames):
            render_camera(0, frame_index * 7, camera)
        per_camera_ms[camera] = round((time.perf_counter() - start) / frames * 1000, 1)
        per_camera_cpu_ms[camera] = round((time.process_time() - start_cpu) / frames * 1000, 1)
    start, start_cpu = time.perf_counter(), time.process_time()
    for frame_index in range(frames):
        encode_synthetic_frame(0, frame_index, ALL_CAMERAS)
    per_frame_s = (time.perf_counter() - start) / frames
    per_frame_cpu_s = (time.process_time() - start_cpu) / frames
    return {
        "render_ms_per_camera": per_camera_ms,
        "render_cpu_ms_per_camera": per_camera_cpu_ms,
        "frame_seconds_one_process": round(per_frame_s, 3),
        "frame_cpu_seconds": round(per_frame_cpu_s, 3),
        "estimated_200_frames_s_two_workers": round(per_frame_cpu_s * 200 / 2, 1),
    }


def bench_metric(images: int) -> dict:
    from avcloud.types import GroundTruth
    from datasets.metric import evaluate

    rng = np.random.default_rng(0)
    detections, truths = [], []
    for _ in range(images):
        count = 30
        corner = rng.uniform(0, 1800, (count, 2))
        size = rng.uniform(5, 200, (count, 2))
        boxes = np.hstack([corner, corner + size]).astype(np.float32)
        classes = rng.integers(1, 5, count).astype(np.int32)
        truths.append(GroundTruth(boxes, classes))
        moved = boxes + rng.normal(0, 3, boxes.shape).astype(np.float32)
        detections.append(np.column_stack([moved, rng.random(count), classes]).astype(np.float32))
    start = time.perf_counter()
    result = evaluate(detections, truths)
    elapsed = time.perf_counter() - start
    return {"images": images, "boxes_per_image": 30, "seconds": round(elapsed, 3),
            "images_per_s": round(images / elapsed, 1), "map": round(result.map, 4)}


def bench_trace(path: Path) -> dict:
    from datasets.traces import load_trace

    start = time.perf_counter()
    trace = load_trace(path)
    elapsed = time.perf_counter() - start
    return {"path": str(path), "load_seconds": round(elapsed, 3), **trace.stats()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", type=Path, help="a Waymo v1 .tfrecord (default: the default synthetic segment)")
    parser.add_argument("--trace", type=Path, help="a trace to load and summarise (e.g. ../shared/traces/X.up)")
    parser.add_argument("--quick", action="store_true", help="a 20-frame segment and fewer repetitions")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)

    from datasets.synthetic import default_scene_path, write_synthetic_scene
    from datasets.traces import default_trace_path
    from datasets.waymo_v2 import write_v2_scene

    report: dict = {"quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench_datasets_") as temp:
        temp_dir = Path(temp)
        if args.scene is not None:
            scene_path = args.scene
        elif args.quick:
            start = time.perf_counter()
            scene_path = write_synthetic_scene(temp_dir / "quick.tfrecord", seed=0, frames=20, progress=False)
            report["quick_scene_generation_s"] = round(time.perf_counter() - start, 2)
        else:
            start = time.perf_counter()
            scene_path = default_scene_path(progress=False)
            report["default_scene_ready_s"] = round(time.perf_counter() - start, 2)
        report["scene"] = {"path": str(scene_path), "size_mb": round(scene_path.stat().st_size / 1e6, 1)}

        read_pass(scene_path, True, False)  # warm the page cache so the passes compare parsing, not the disk
        report["v1_read_with_crc"] = read_pass(scene_path, verify_crc=True, decode_jpeg=False)
        report["v1_read_without_crc"] = read_pass(scene_path, verify_crc=False, decode_jpeg=False)
        report["v1_read_with_jpeg_decode"] = read_pass(scene_path, verify_crc=True, decode_jpeg=True,
                                                       max_frames=10 if args.quick else 40)
        report["v1_stream_child_process"] = _child_read(scene_path)

        from datasets.scene import open_scene

        v2_frames = 20 if args.quick else 50
        v2_dir = temp_dir / "v2"

        class _FirstFrames:
            """The first frames of a scene, for a bounded v2 copy."""

            def __init__(self, scene, count):
                self.scene, self.count, self.name = scene, count, scene.name

            def frames(self):
                for frame in self.scene.frames():
                    if frame.index >= self.count:
                        return
                    yield frame

        write_v2_scene(_FirstFrames(open_scene(scene_path), v2_frames), v2_dir)
        report["v2_read"] = read_pass(v2_dir, verify_crc=True, decode_jpeg=False)

        report["synthetic_generation"] = bench_generation(3 if args.quick else 10)
        report["metric"] = bench_metric(200 if args.quick else 1000)
        report["trace"] = bench_trace(args.trace or default_trace_path())
        report["peak_rss_mb_this_process"] = round(_peak_rss_mb(), 1)

    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
