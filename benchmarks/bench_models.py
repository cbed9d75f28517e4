"""Benchmark of the model runtime, the codecs and the profiler on this machine (JSON out).

    .venv/bin/python benchmarks/bench_models.py --out runs/bench/models.json [--quick]

Figures: per model (both families, the shipped and any imported or registered ones), backend
and input size the median inference time of the graph (ms, batch 1) on one thread and on all
threads, and the end-to-end `detect` time on one thread from a 1920x1280 frame (resize,
every pass of a multi-scale card, decoding, NMS; a synthetic camera frame for the `avd` family,
a real photo, OpenCV's vtest frame upscaled, for the others); per codec the encode and
decode time (ms) and payload size (Mb) of a 1920x1280 synthetic camera frame, for image
compression and for input compression at each cloud model's input size; and the wall time of
`avcloud profile` with the demo preset on the default 200-frame scene (--quick: 20 frames).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchjson import write_report  # noqa: E402

from avcloud.compression import CompressionConfig, decode_image, encode_for_model  # noqa: E402
from avcloud.models import Detector, family_of, list_cards  # noqa: E402
from avcloud.models.detector import model_input_from_image, normalise_to_chw  # noqa: E402

REAL_FRAME = REPO_ROOT / "tests" / "data" / "vtest-0142.jpg"


def real_frame() -> np.ndarray:
    import cv2

    return cv2.resize(cv2.imread(str(REAL_FRAME)), (1920, 1280), interpolation=cv2.INTER_LINEAR)


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def bench_models(synthetic_frame: np.ndarray, repeats: int, backends: list[str]) -> list[dict]:
    photo = real_frame()
    rows = []
    for card in list_cards():
        if not card.onnx_path.is_file():
            continue
        family = family_of(card.name)
        frame = synthetic_frame if family == "avd" else photo
        for backend in backends:
            if backend == "torch" and card.torch is None:
                continue  # no native weights: the torch backend would fall back to onnxruntime
            detector = Detector.load(card, backend, num_threads=1)
            if backend != "onnxruntime" and detector.backend_name.startswith("onnxruntime[CPU"):
                continue  # fell back: already measured as onnxruntime
            batch = normalise_to_chw(model_input_from_image(frame, card), card)[None]
            row = {
                "model": card.name,
                "family": family,
                "place": card.place,
                "backend": detector.backend_name,
                "input": f"{card.input_width}x{card.input_height}",
                "extra_passes": [f"{p.input_width}x{p.input_height}" for p in card.multi_scale.passes]
                if card.multi_scale else [],
                "inference_ms": round(median_ms(lambda d=detector, b=batch: d.backend.run_outputs(b), repeats), 2),
                "detect_from_1920x1280_ms": round(median_ms(lambda d=detector, f=frame: d.detect(f), repeats), 2),
                "frame": "synthetic" if frame is synthetic_frame else "real (vtest, upscaled)",
            }
            if backend == "onnxruntime":
                all_threads = Detector.load(card, backend, num_threads=None)
                row["inference_ms_all_threads"] = round(
                    median_ms(lambda d=all_threads, b=batch: d.backend.run_outputs(b), repeats), 2)
                row["detect_from_1920x1280_ms_all_threads"] = round(
                    median_ms(lambda d=all_threads, f=frame: d.detect(f), repeats), 2)
            rows.append(row)
    return rows


PROXY_LABELS = REPO_ROOT / "tests" / "data" / "vtest-proxy-labels.json"


def proxy_sets(video_path: str) -> dict[str, list]:
    """Name -> [(BGR image, GroundTruth)]: the labelled vtest frames, as they are and as mosaics."""
    import json

    import cv2

    from avcloud.types import GroundTruth, ObjectType

    labels = {int(index): objects for index, objects in json.loads(PROXY_LABELS.read_text()).items()}
    video = cv2.VideoCapture(video_path)
    frames, index = {}, 0
    while len(frames) < len(labels):
        ok, frame = video.read()
        if not ok:
            raise SystemExit(f"{video_path}: ended at frame {index}, before every labelled frame was read")
        if index in labels:
            frames[index] = frame
        index += 1
    items = [(frames[i], np.array([box for _, box in labels[i]], np.float32),
              np.array([int(ObjectType[kind]) for kind, _ in labels[i]], np.int32)) for i in sorted(labels)]

    def mosaic(chosen: list, order: int) -> tuple:
        height, width = chosen[0][0].shape[:2]
        canvas = np.zeros((height * order, width * order, 3), np.uint8)
        boxes, classes = [], []
        for tile, (image, tile_boxes, tile_classes) in enumerate(chosen):
            row, col = divmod(tile, order)
            canvas[row * height:(row + 1) * height, col * width:(col + 1) * width] = image
            boxes.append(tile_boxes + np.array([col * width, row * height] * 2, np.float32))
            classes.append(tile_classes)
        scale = np.array([1920 / canvas.shape[1], 1280 / canvas.shape[0]] * 2, np.float32)
        image = cv2.resize(canvas, (1920, 1280), interpolation=cv2.INTER_AREA)
        return image, GroundTruth(boxes_xyxy=np.concatenate(boxes) * scale, classes=np.concatenate(classes))

    return {
        "frames_768x576": [(image, GroundTruth(boxes_xyxy=boxes, classes=classes)) for image, boxes, classes in items],
        "mosaic_2x2": [mosaic(items[4 * m:4 * m + 4], 2) for m in range(4)],
        "mosaic_3x3": [mosaic(items[9 * m:9 * m + 9], 3) for m in range(2)],
        "mosaic_4x4": [mosaic(items[0:16], 4), mosaic(items[2:18], 4)],
    }


def bench_real_accuracy(video_path: str) -> list[dict]:
    from datasets.metric import evaluate

    sets = proxy_sets(video_path)
    rows = []
    for card in list_cards():
        if not card.onnx_path.is_file():
            continue
        detector = Detector.load(card, "onnxruntime")
        row = {"model": card.name, "family": family_of(card.name), "place": card.place,
               "input": f"{card.input_width}x{card.input_height}"}
        for name, items in sets.items():
            result = evaluate([detector.detect(image) for image, _ in items], [truth for _, truth in items])
            row[name] = {"map_x100": round(100 * result.map, 1),
                         **{f"ap_{cls.lower()}_x100": round(100 * ap, 1) for cls, ap in result.ap_per_class.items()}}
        rows.append(row)
    return rows


def bench_codecs(frame: np.ndarray, repeats: int) -> list[dict]:
    rows = []
    codecs = ["None", "PNG", "50", "75", "90", "95"]
    targets = [("imgcomp", None)] + [("inpcomp", card) for card in list_cards() if card.place == "cloud"]
    for kind, card in targets:
        for codec in codecs:
            if kind == "inpcomp" and codec == "None":
                continue
            config = CompressionConfig(codec, "None") if kind == "imgcomp" else CompressionConfig("None", codec)
            input_wh = card.input_wh if card else (frame.shape[1], frame.shape[0])
            encoded = encode_for_model(frame, config, input_wh)
            encode_ms = median_ms(lambda c=config, wh=input_wh: encode_for_model(frame, c, wh), repeats)
            decode_ms = median_ms(lambda e=encoded: decode_image(e.payload, e.codec, e.width, e.height), repeats)
            rows.append({
                "config": config.name,
                "encoded_size": f"{encoded.width}x{encoded.height}",
                "model_input": card.name if card else None,
                "size_mbit": round(encoded.size_mbit, 3),
                "encode_ms": round(encode_ms, 2),
                "decode_ms": round(decode_ms, 2),
            })
    return rows


def bench_profile(quick: bool) -> dict:
    from avcloud.profiler import PROFILE_PRESETS, run_profile
    from datasets.synthetic import default_scene_path

    preset = PROFILE_PRESETS["demo"]
    scene = default_scene_path(progress=False)
    max_frames = 20 if quick else preset.max_frames
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        run_profile(scene, preset.models, preset.codecs, out_dir, preset.window_frames, preset.frame_stride,
                    max_frames, workers=2, progress=False)
        wall_s = time.perf_counter() - started
    return {"preset": "demo", "frames": max_frames or "all", "workers": 2, "wall_s": round(wall_s, 1),
            "models": list(preset.models), "codecs": list(preset.codecs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 20-frame profile")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile wall-time measurement")
    parser.add_argument("--real-video", default=None, metavar="vtest.avi",
                        help="also score every model on labelled frames of OpenCV's vtest.avi (see above)")
    parser.add_argument("--only-real-accuracy", action="store_true", help="with --real-video: nothing else")
    args = parser.parse_args()
    if args.only_real_accuracy:
        if not args.real_video:
            parser.error("--only-real-accuracy needs --real-video")
        write_report({"real_accuracy": bench_real_accuracy(args.real_video)}, args.out)
        return 0
    from datasets.synthetic import render_camera

    frame, _ = render_camera(0, 30, "FRONT")
    repeats = 5 if args.quick else 20
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "models": bench_models(frame, repeats, ["onnxruntime", "torch"]),
        "codecs_1920x1280": bench_codecs(frame, repeats),
    }
    if args.real_video:
        result["real_accuracy"] = bench_real_accuracy(args.real_video)
    if not args.no_profile:
        result["profile"] = bench_profile(args.quick)
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
