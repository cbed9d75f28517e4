"""Benchmark of the model runtime, the codecs and the profiler on this machine (JSON out).

    .venv/bin/python benchmarks/bench_models.py --out runs/bench/models.json [--quick]

Figures: per model, backend and input size the median inference time (ms, batch 1, one
thread) and the end-to-end `detect` time from a 1920x1280 frame; per codec the encode and
decode time (ms) and payload size (Mb) of a 1920x1280 synthetic camera frame, for image
compression and for input compression at each cloud model's input size; and the wall time of
`avcloud profile` with the demo preset on the default 200-frame scene (--quick: 20 frames).
"""

from __future__ import annotations

import argparse
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
from avcloud.models import Detector, list_cards  # noqa: E402
from avcloud.models.detector import model_input_from_image, normalise_to_chw  # noqa: E402


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def bench_models(frame: np.ndarray, repeats: int, backends: list[str]) -> list[dict]:
    rows = []
    for card in list_cards():
        for backend in backends:
            detector = Detector.load(card, backend, num_threads=1)
            if backend != "onnxruntime" and detector.backend_name.startswith("onnxruntime[CPU"):
                continue  # fell back: already measured as onnxruntime
            batch = normalise_to_chw(model_input_from_image(frame, card), card)[None]
            rows.append({
                "model": card.name,
                "place": card.place,
                "backend": detector.backend_name,
                "input": f"{card.input_width}x{card.input_height}",
                "inference_ms": round(median_ms(lambda d=detector, b=batch: d.backend.run(b), repeats), 2),
                "detect_from_1920x1280_ms": round(median_ms(lambda d=detector: d.detect(frame), repeats), 2),
            })
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
    args = parser.parse_args()
    from datasets.synthetic import render_camera

    frame, _ = render_camera(0, 30, "FRONT")
    repeats = 5 if args.quick else 20
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "models": bench_models(frame, repeats, ["onnxruntime", "torch"]),
        "codecs_1920x1280": bench_codecs(frame, repeats),
    }
    if not args.no_profile:
        result["profile"] = bench_profile(args.quick)
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
