"""The profiler: every (model, compression) configuration on every frame and camera of a scene.

For each frame, camera and configuration the camera image is really encoded, decoded and run
through the detector (encode -> decode -> detect), and the detections, mapped back to
full-image pixels, go into the detection cache that the simulated replay reuses. From them the
profile table is computed: per configuration, service (camera) and window of N frames the
mean transport size, the mAP (TURBO's utility) and, from a dedicated single-process timing
pass, the encode time and the server-side runtime (decode + inference).

Work is chunked per frame; each finished frame is persisted as one small parquet file in a
work directory beside the outputs, so an interrupted run resumes where it stopped. Frames run
in parallel processes, each loading its detectors once. A frame is a pure function of
(scene, frame index, models, codecs), which is what a fleet-scale runner (Ray tasks) needs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from avcloud.compression import (
    CompressionConfig,
    configuration_name,
    decode_image,
    encode_for_model,
    parse_configuration_name,
)
from avcloud.errors import DataError, UserError
from avcloud.paths import cache_dir
from avcloud.pools import serve_the_parent_only, stop_pool
from avcloud.profile_format import (
    ENCODE_COLUMN,
    GROUND_TRUTH_NAME,
    MODEL_COLUMN,
    RUNTIME_COLUMN,
    RUNTIME_SPREAD_COLUMN,
    SERVICE_COLUMN,
    SIZE_COLUMN,
    UTILITY_COLUMN,
    WINDOW_COLUMN,
    detections_from_bytes,
    write_table,
)
from avcloud.types import DETECTION_COLUMNS, GroundTruth

TABLE_NAME = "profile.parquet"
CACHE_NAME = "detections.parquet"
NO_COMPRESSION = CompressionConfig("None", "None")
TURBO_CODECS: tuple[str, ...] = (
    "imgcompNone-inpcompNone",
    "imgcompPNG",
    "imgcomp50",
    "imgcomp75",
    "imgcomp90",
    "imgcomp95",
    "inpcompPNG",
    "inpcomp50",
    "inpcomp75",
    "inpcomp90",
    "inpcomp95",
)
FAMILY_MODELS: tuple[str, ...] = ("avd-onboard", "avd-cloud-s", "avd-cloud-m", "avd-cloud-l")
_GROUND_TRUTH_CONFIG = "<ground-truth>"
_WORK_VERSION = 1
# Part of the cached profile's key: bump when compression or model-input resizing changes the
# pixels the models see (2: halving + bilinear resize instead of INTER_AREA).
PIXEL_PIPELINE_VERSION = 2


@dataclass(frozen=True)
class ProfilePreset:
    models: tuple[str, ...]
    codecs: tuple[str, ...]
    window_frames: int | None
    frame_stride: int = 1
    max_frames: int | None = None


PROFILE_PRESETS: dict[str, ProfilePreset] = {
    # What `make demo` uses: every frame (the replay needs them all), the four family models and
    # three compression levels that span the curve (10 configurations); sized to finish within
    # 5 minutes on 2 idle cores (13 configurations took ~4.5 CPU-minutes per core).
    "demo": ProfilePreset(FAMILY_MODELS, ("inpcomp50", "inpcomp95", "imgcomp90"), window_frames=50),
    # TURBO's whole configuration space; every second frame to bound the run time.
    "full": ProfilePreset(FAMILY_MODELS, TURBO_CODECS, window_frames=50, frame_stride=2),
}


@dataclass(frozen=True)
class ProfileResult:
    table_path: Path
    cache_path: Path

    @property
    def ground_truth_path(self) -> Path:
        return self.cache_path.parent / GROUND_TRUTH_NAME


# ----------------------------------------------------------------------------- detection cache


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    """What a worker runs: cloud configurations grouped so each encoding is done once."""

    onboard_models: tuple[str, ...]
    cloud_models: tuple[str, ...]
    codecs: tuple[CompressionConfig, ...]

    def configuration_names(self) -> list[str]:
        names = [configuration_name(model, NO_COMPRESSION) for model in self.onboard_models]
        names += [configuration_name(model, codec) for model in self.cloud_models for codec in self.codecs]
        return names


def _make_plan(models: Sequence[str], codecs: Sequence[str]) -> _Plan:
    from avcloud.models import get_card

    if not models:
        raise UserError("profile needs at least one model")
    cards = [get_card(model) for model in models]
    parsed = tuple(dict.fromkeys(CompressionConfig.parse(codec) for codec in codecs))
    onboard = tuple(card.name for card in cards if card.place == "onboard")
    cloud = tuple(card.name for card in cards if card.place == "cloud")
    if cloud and not parsed:
        raise UserError("profile needs at least one codec for the cloud models")
    return _Plan(onboard, cloud, parsed)


# ----------------------------------------------------------------------------- workers

_worker_state: dict[str, object] = {}


def _init_worker(scene_path: str, plan: _Plan, backend: str, work_dir: str) -> None:
    from avcloud.models import Detector
    from datasets.scene import open_scene

    if multiprocessing.parent_process() is not None:  # a pool worker, not the single-process path
        serve_the_parent_only()

    _worker_state["scene"] = open_scene(scene_path)
    _worker_state["detectors"] = {
        name: Detector.load(name, backend, num_threads=1) for name in plan.onboard_models + plan.cloud_models
    }
    _worker_state["plan"] = plan
    _worker_state["work_dir"] = Path(work_dir)


def _chunk_path(work_dir: Path, frame_index: int) -> Path:
    return work_dir / f"frame-{frame_index:06d}.parquet"


def profile_camera_image(
    image_bgr: np.ndarray, plan: _Plan, detectors: dict
) -> Iterator[tuple[str, int, np.ndarray]]:
    """(configuration name, payload bytes, full-image detections) for every configuration of one image."""
    source_wh = (image_bgr.shape[1], image_bgr.shape[0])
    for model in plan.onboard_models:
        yield configuration_name(model, NO_COMPRESSION), 0, detectors[model].detect(image_bgr)
    for codec in plan.codecs:
        # Image compression encodes the frame once for every model; input compression once per input size.
        groups: dict[tuple[int, int] | None, list[str]] = {}
        for model in plan.cloud_models:
            key = detectors[model].card.input_wh if codec.resizes_to_model_input else None
            groups.setdefault(key, []).append(model)
        for input_wh, models in groups.items():
            encoded = encode_for_model(image_bgr, codec, input_wh or source_wh)
            decoded = decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height)
            for model in models:
                detections = detectors[model].detect(decoded, output_size_wh=source_wh)
                yield configuration_name(model, codec), encoded.size_bytes, detections


def _profile_frame(frame_index: int) -> int:
    scene = _worker_state["scene"]
    plan: _Plan = _worker_state["plan"]
    detectors = _worker_state["detectors"]
    work_dir: Path = _worker_state["work_dir"]
    frame = scene.frame(frame_index)
    rows: dict[str, list] = {"frame_index": [], "camera": [], "config": [], "size_bytes": [], "detections": []}

    def add(camera: str, config: str, size_bytes: int, detections: np.ndarray) -> None:
        rows["frame_index"].append(frame_index)
        rows["camera"].append(camera)
        rows["config"].append(config)
        rows["size_bytes"].append(size_bytes)
        rows["detections"].append(np.ascontiguousarray(detections, dtype=np.float32).tobytes())

    for camera, camera_image in frame.cameras.items():
        truth = camera_image.ground_truth
        truth_rows = np.zeros((len(truth), DETECTION_COLUMNS), np.float32)
        truth_rows[:, :4] = truth.boxes_xyxy
        truth_rows[:, 4] = 1.0
        truth_rows[:, 5] = truth.classes
        add(camera, _GROUND_TRUTH_CONFIG, 0, truth_rows)
        for config, size_bytes, detections in profile_camera_image(camera_image.image_bgr(), plan, detectors):
            add(camera, config, size_bytes, detections)
    path = _chunk_path(work_dir, frame_index)
    temporary = path.with_suffix(".partial")
    pq.write_table(pa.table(rows), temporary)
    os.replace(temporary, path)  # a chunk is either complete or absent
    return frame_index


# ----------------------------------------------------------------------------- timing pass


@dataclass(frozen=True)
class _Timing:
    runtime_ms: float  # RUNTIME_PERCENTILE of the repeated timings: robust to a busy machine's spikes
    runtime_spread_ms: float  # P90 - P10 of the same timings
    encode_ms: float
    backend: str


# A low percentile of repeated timings: what the configuration costs when nothing interferes, so
# that one slow run (another process, a page fault) does not make an option look unusable.
RUNTIME_PERCENTILE = 20.0
TIMING_FRAMES = 5


def _robust_ms(times: Sequence[float]) -> tuple[float, float]:
    low, p10, p90 = np.percentile(np.asarray(times, dtype=float), [RUNTIME_PERCENTILE, 10.0, 90.0])
    return float(low), float(p90 - p10)


def _timing_pass(scene, plan: _Plan, backend: str, frame_indices: Sequence[int],
                 samples: int = TIMING_FRAMES) -> dict[str, _Timing]:
    """Encode and server-side (decode + inference) times, one process, one thread: each
    configuration timed on every camera of `samples` frames spread over the scene."""
    from avcloud.models import Detector

    detectors = {name: Detector.load(name, backend, num_threads=1) for name in plan.onboard_models + plan.cloud_models}
    for detector in detectors.values():
        detector.warmup()
    picks = [frame_indices[int(i)] for i in np.linspace(0, len(frame_indices) - 1, min(samples, len(frame_indices)))]
    encode_ms: dict[str, list[float]] = {}
    runtime_ms: dict[str, list[float]] = {}
    for frame_index in picks:
        frame = scene.frame(frame_index)
        for camera_image in frame.cameras.values():
            image = camera_image.image_bgr()
            source_wh = (image.shape[1], image.shape[0])
            for model in plan.onboard_models:
                started = time.perf_counter()
                detectors[model].detect(image)
                runtime_ms.setdefault(configuration_name(model, NO_COMPRESSION), []).append(
                    (time.perf_counter() - started) * 1000.0
                )
            for model in plan.cloud_models:
                for codec in plan.codecs:
                    name = configuration_name(model, codec)
                    encoded = encode_for_model(image, codec, detectors[model].card.input_wh)
                    started = time.perf_counter()
                    decoded = decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height)
                    detectors[model].detect(decoded, output_size_wh=source_wh)
                    runtime_ms.setdefault(name, []).append((time.perf_counter() - started) * 1000.0)
                    encode_ms.setdefault(name, []).append(encoded.encode_ms)
    timings = {}
    for name, times in runtime_ms.items():
        runtime, spread = _robust_ms(times)
        timings[name] = _Timing(runtime, spread, _robust_ms(encode_ms[name])[0] if name in encode_ms else 0.0,
                                detectors[parse_configuration_name(name)[0]].backend_name)
    return timings


def measure_cloud_runtimes(scene_path: str | Path, models: Sequence[str], codecs: Sequence[str],
                           out_path: str | Path, backend: str = "onnxruntime", frames: int = TIMING_FRAMES) -> Path:
    """The timing pass alone, written as a cloud runtime table (`Model`, `Runtime [ms]`, spread,
    backend) that `avcloud replay --cloud PATH.csv` reads: run it on the machine whose runtimes
    you want to declare (a GPU server), on an otherwise idle machine."""
    from datasets.scene import open_scene

    plan = _make_plan(models, codecs)
    scene = open_scene(Path(scene_path))
    timings = _timing_pass(scene, plan, backend, list(range(scene.num_frames)), samples=frames)
    names = sorted(name for name in timings if parse_configuration_name(name)[0] in plan.cloud_models)
    table = pa.table({
        MODEL_COLUMN: names,
        RUNTIME_COLUMN: [round(timings[name].runtime_ms, 3) for name in names],
        RUNTIME_SPREAD_COLUMN: [round(timings[name].runtime_spread_ms, 3) for name in names],
        "Backend": [timings[name].backend for name in names],
    })
    write_table(table, out_path)
    return Path(out_path)


# ----------------------------------------------------------------------------- table


def _read_chunks(work_dir: Path, frame_indices: Sequence[int]) -> pa.Table:
    return pa.concat_tables([pq.read_table(_chunk_path(work_dir, index)) for index in frame_indices])


def _profile_table(
    cache: pa.Table,
    truth: pa.Table,
    timings: dict[str, _Timing],
    frame_indices: Sequence[int],
    window_frames: int | None,
) -> pa.Table:
    from datasets.metric import evaluate, windowed_map

    truth_by_key = {
        (int(f), c): GroundTruth(rows[:, :4].copy(), rows[:, 5].astype(np.int32))
        for f, c, rows in zip(
            truth["frame_index"].to_pylist(), truth["camera"].to_pylist(),
            (detections_from_bytes(data) for data in truth["detections"].to_pylist()), strict=True,
        )
    }
    columns = cache.to_pydict()
    grouped: dict[tuple[str, str], dict[int, tuple[int, bytes]]] = {}
    for frame_index, camera, config, size_bytes, data in zip(
        columns["frame_index"], columns["camera"], columns["config"], columns["size_bytes"], columns["detections"],
        strict=True,
    ):
        grouped.setdefault((config, camera), {})[int(frame_index)] = (int(size_bytes), data)
    out: dict[str, list] = {key: [] for key in (
        MODEL_COLUMN, SIZE_COLUMN, RUNTIME_COLUMN, RUNTIME_SPREAD_COLUMN, UTILITY_COLUMN, SERVICE_COLUMN,
        WINDOW_COLUMN, ENCODE_COLUMN, "Backend", "Frames", "Ground Truth")}
    # mAP is undefined where a camera (or a window of it) has no labelled object at all. The
    # optimizer needs a number, so such rows take the next wider estimate: the camera's
    # whole-scene mAP for a window, the mAP over all cameras for a whole camera.
    pooled_map: dict[str, float] = {}
    for config in sorted({config for config, _ in grouped}):
        cameras = sorted(camera for other, camera in grouped if other == config)
        detections, truths = [], []
        for camera in cameras:
            per_frame = grouped[(config, camera)]
            for index in frame_indices:
                if index in per_frame:
                    detections.append(detections_from_bytes(per_frame[index][1]))
                    truths.append(truth_by_key[(index, camera)])
        pooled_map[config] = float(evaluate(detections, truths).map)
    for (config, camera), per_frame in sorted(grouped.items()):
        frames = [index for index in frame_indices if index in per_frame]
        detections = [detections_from_bytes(per_frame[index][1]) for index in frames]
        truths = [truth_by_key[(index, camera)] for index in frames]
        sizes_mbit = [per_frame[index][0] * 8 / 1e6 for index in frames]
        timing = timings[config]
        scene_map = float(evaluate(detections, truths).map)
        if np.isnan(scene_map):
            scene_map = pooled_map[config] if not np.isnan(pooled_map[config]) else 0.0
        windows = [(-1, scene_map, float(np.mean(sizes_mbit)), len(frames), sum(len(t) for t in truths))]
        if window_frames:
            for window_index, window_map in enumerate(windowed_map(detections, truths, window_frames)):
                window = slice(window_index * window_frames, (window_index + 1) * window_frames)
                utility = scene_map if np.isnan(window_map) else float(window_map)
                windows.append((window_index, utility, float(np.mean(sizes_mbit[window])), len(sizes_mbit[window]),
                                sum(len(t) for t in truths[window])))
        for window_index, utility, size_mbit, frame_count, truth_count in windows:
            out[MODEL_COLUMN].append(config)
            out[SIZE_COLUMN].append(size_mbit)
            out[RUNTIME_COLUMN].append(timing.runtime_ms)
            out[RUNTIME_SPREAD_COLUMN].append(timing.runtime_spread_ms)
            out[UTILITY_COLUMN].append(utility)
            out[SERVICE_COLUMN].append(camera)
            out[WINDOW_COLUMN].append(window_index)
            out[ENCODE_COLUMN].append(timing.encode_ms)
            out["Backend"].append(timing.backend)
            out["Frames"].append(frame_count)
            out["Ground Truth"].append(truth_count)
    return pa.table(out)


# ----------------------------------------------------------------------------- entry points


def _file_digest(path: Path) -> str:
    """Content digest of a scene file (or a listing digest of a scene directory).

    Hashing a 200-frame scene (~700 MB) takes a second, and the replay asks for its profile
    often, so file digests are remembered per (path, size, mtime) in cache_dir()/profiles.
    """
    digest = hashlib.blake2b(digest_size=12)
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                stat = child.stat()
                digest.update(f"{child.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    memo_path = cache_dir() / "profiles" / "scene-digests.json"
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    memo[memo_key] = digest.hexdigest()
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = memo_path.with_suffix(f".{os.getpid()}.partial")
    temporary.write_text(json.dumps(memo))
    os.replace(temporary, memo_path)
    return memo[memo_key]


def _models_digest(models: Sequence[str]) -> str:
    from avcloud.models import get_card

    digest = hashlib.blake2b(digest_size=8)
    for model in models:
        card = get_card(model)
        digest.update(card.name.encode())
        digest.update(card.onnx_path.read_bytes())
    return digest.hexdigest()


def _prepare_work_dir(work_dir: Path, manifest: dict) -> None:
    manifest_path = work_dir / "manifest.json"
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == manifest:
            return
        shutil.rmtree(work_dir)  # other settings or models: earlier chunks do not apply
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))


def run_profile(
    scene_path: str | Path,
    models: Sequence[str],
    codecs: Sequence[str],
    out_dir: str | Path,
    window_frames: int | None,
    frame_stride: int = 1,
    max_frames: int | None = None,
    workers: int = 2,
    progress: bool = True,
    backend: str = "onnxruntime",
    table_name: str = TABLE_NAME,
) -> ProfileResult:
    """Profile every configuration on every selected frame and camera; write table + detection cache."""
    from datasets.scene import open_scene

    scene_path, out_dir = Path(scene_path), Path(out_dir)
    if frame_stride < 1:
        raise UserError(f"frame stride must be >= 1 (got {frame_stride})")
    if window_frames is not None and window_frames < 1:
        raise UserError(f"window must be at least 1 frame (got {window_frames})")
    plan = _make_plan(models, codecs)
    scene = open_scene(scene_path)
    frame_indices = list(range(0, scene.num_frames, frame_stride))[:max_frames]
    if not frame_indices:
        raise DataError(f"{scene_path}: no frames to profile")
    # A window is N scene frames; with a stride it holds N / stride profiled frames.
    window_samples = max(1, window_frames // frame_stride) if window_frames else None
    configurations = plan.configuration_names()
    subsampled = len(frame_indices) < scene.num_frames
    say = print if progress else (lambda *args, **kwargs: None)
    say(
        f"profiling {scene_path.name}: {len(frame_indices)} of {scene.num_frames} frames"
        + (f" (subsampled: {_subsampling(frame_stride, max_frames)})" if subsampled else "")
        + f", cameras {', '.join(scene.cameras)}, {len(configurations)} configurations "
        f"(models {', '.join(models)}; codecs {', '.join(c.name for c in plan.codecs)}), "
        f"{workers} worker(s), backend {backend}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / f".{Path(table_name).stem}-work"
    manifest = {
        "version": _WORK_VERSION,
        "scene": _file_digest(scene_path),
        "models": _models_digest(list(plan.onboard_models + plan.cloud_models)),
        "configurations": configurations,
        "backend": backend,
    }
    _prepare_work_dir(work_dir, manifest)
    pending = [index for index in frame_indices if not _chunk_path(work_dir, index).exists()]
    if len(pending) < len(frame_indices):
        say(f"resuming: {len(frame_indices) - len(pending)} frame(s) already profiled in {work_dir}")
    started = time.monotonic()
    if pending:
        _run_frames(scene_path, plan, backend, work_dir, pending, len(frame_indices), workers, progress)
    say(f"profiled {len(pending)} frame(s) in {time.monotonic() - started:.1f} s; timing pass")
    timings = _timing_pass(scene, plan, backend, frame_indices)
    chunks = _read_chunks(work_dir, frame_indices)
    is_truth = pyarrow.compute.equal(chunks["config"], _GROUND_TRUTH_CONFIG)
    truth = chunks.filter(is_truth).select(["frame_index", "camera", "detections"])
    cache = chunks.filter(pyarrow.compute.invert(is_truth))
    table = _profile_table(cache, truth, timings, frame_indices, window_samples)
    table_path = out_dir / table_name
    cache_path = out_dir / CACHE_NAME
    write_table(cache, cache_path)
    write_table(truth, out_dir / GROUND_TRUTH_NAME)
    write_table(table, table_path)
    write_table(table, table_path.with_suffix(".csv"))
    shutil.rmtree(work_dir, ignore_errors=True)
    return ProfileResult(table_path, cache_path)


def _subsampling(frame_stride: int, max_frames: int | None) -> str:
    parts = [f"one frame in {frame_stride}"] if frame_stride > 1 else []
    parts += [f"the first {max_frames}"] if max_frames else []
    return ", ".join(parts)


def _run_frames(scene_path: Path, plan: _Plan, backend: str, work_dir: Path, pending: list[int], total: int,
                workers: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("profiling frames", total=total, completed=total - len(pending))
        if workers <= 1:
            _init_worker(str(scene_path), plan, backend, str(work_dir))
            for frame_index in pending:
                _profile_frame(frame_index)
                bar.advance(task)
            return
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                       initargs=(str(scene_path), plan, backend, str(work_dir)))
        try:
            # Bounded submission keeps memory flat and lets Ctrl-C stop promptly.
            queue = iter(pending)
            in_flight = set()
            for frame_index in queue:
                in_flight.add(executor.submit(_profile_frame, frame_index))
                if len(in_flight) >= workers * 2:
                    break
            while in_flight:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    bar.advance(task)
                    next_index = next(queue, None)
                    if next_index is not None:
                        in_flight.add(executor.submit(_profile_frame, next_index))
        except BaseException:  # SIGINT, SIGTERM (avcloud.errors.Terminated) or a failed frame
            stop_pool(executor)  # finished frames are on disk, each chunk atomic: a rerun resumes
            raise
        executor.shutdown(wait=True)



def profile_dir(scene_path: str | Path, preset: str, models: Sequence[str] | None = None) -> Path:
    """Where the cached profile of a scene, preset and model set lives (the models are the preset's
    unless given: a real scene is profiled with the real family)."""
    models = tuple(models) if models else PROFILE_PRESETS[preset].models
    key = f"{_file_digest(Path(scene_path))}-{_models_digest(models)}"
    return cache_dir() / "profiles" / f"{key}-{preset}-pixels{PIXEL_PIPELINE_VERSION}"


def ensure_profile(scene_path: str | Path, preset: str = "demo", progress: bool = True,
                   workers: int | None = None, models: Sequence[str] | None = None) -> ProfileResult:
    """The scene's profile for a preset (and a model set other than the preset's, if given):
    computed on first use into cache_dir()/profiles, reused after."""
    if preset not in PROFILE_PRESETS:
        raise UserError(f"unknown profile preset '{preset}' (known: {', '.join(PROFILE_PRESETS)})")
    settings = PROFILE_PRESETS[preset]
    models = tuple(models) if models else settings.models
    out_dir = profile_dir(scene_path, preset, models)
    result = ProfileResult(out_dir / TABLE_NAME, out_dir / CACHE_NAME)
    if result.table_path.exists() and result.cache_path.exists() and result.ground_truth_path.exists():
        return result
    return run_profile(
        scene_path, models, settings.codecs, out_dir, settings.window_frames, settings.frame_stride,
        settings.max_frames, workers=workers or min(2, os.cpu_count() or 1), progress=progress,
    )
