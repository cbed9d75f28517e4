"""Turning a scene, a trace and the profiler's output into what the simulator runs on.

The profile table gives each camera's options (size, runtime, utility: what the allocator
plans with); the detection cache gives, per frame, camera and configuration, the real encoded
size and the real detections (what actually happens); the scene gives the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from avcloud.errors import DataError
from avcloud.link import DeliverySchedule
from avcloud.replay.car_times import DEFAULT_CAR, CarTimes, read_car_table, resolve_car, with_fallback_runtime
from avcloud.replay.cloud_runtimes import DEFAULT_CLOUD, CloudRuntimes, resolve_cloud, with_runtimes
from avcloud.replay.simulator import ReplayScenario
from avcloud.types import ALL_CAMERAS, GroundTruth, Service


class DetectionSource(Protocol):
    """What the replay reads from the profiler's detection cache."""

    configs: Sequence[str]
    frame_indices: Sequence[int]
    cameras: Sequence[str]

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray: ...

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int: ...


@dataclass(frozen=True)
class UplinkTrace:
    name: str
    path: str
    schedule: DeliverySchedule


@dataclass
class ProfiledScene:
    """A scene with its profile, indexed for the simulator."""

    name: str
    path: str
    scenario_frames: np.ndarray
    frame_rate_hz: float
    services: tuple[Service, ...]
    detections: DetectionSource
    ground_truths: dict[str, list[GroundTruth]]  # per camera, per frame position
    encode_ms_by_config: dict[str, float]
    profile_path: str
    profile_note: str  # what the profile covers (preset, frames, configurations)


@dataclass
class ReplayCase:
    """One scene x one trace, ready to simulate."""

    scene_name: str
    scene_path: str
    trace_name: str
    trace_path: str
    schedule: DeliverySchedule
    scenario: ReplayScenario
    ground_truths: dict[str, list[GroundTruth]]  # per camera, per frame position
    detections: DetectionSource
    profile_path: str
    profile_note: str
    cloud: CloudRuntimes | None = None  # the declared cloud runtimes the case runs with
    car: CarTimes | None = None  # the car-side encode and fallback times it runs with

    def detections_at(self, frame: int, camera: int, config: str) -> np.ndarray:
        """Cached detections by scenario position (what the replayed car's models return)."""
        scenario = self.scenario
        return self.detections.detections(int(scenario.frame_indices[frame]), scenario.cameras[camera], config)


def build_scenario(
    services: Sequence[Service],
    cache: DetectionSource,
    frame_indices: Sequence[int],
    frame_rate_hz: float,
    rtt_ms: float,
    slo_ms: float,
    encode_ms_by_config: dict[str, float] | None = None,
    camera_input_ms: float = 0.0,
) -> ReplayScenario:
    """Index the cache once (sizes as one array) so the simulator does no look-ups per frame."""
    encode_ms_by_config = encode_ms_by_config or {}
    cameras = tuple(service.name for service in services)
    fallbacks = {option.name for service in services for option in service.options if option.is_fallback}
    if len(fallbacks) != 1:
        raise DataError(f"profile: expected one on-car fallback configuration for every camera, found {sorted(fallbacks)}")
    fallback = next(iter(fallbacks))
    config_names = tuple(dict.fromkeys(
        option.name for service in services for option in service.options if not option.is_fallback))
    runtime_ms = np.zeros(len(config_names))
    for service in services:
        for option in service.options:
            if not option.is_fallback:
                runtime_ms[config_names.index(option.name)] = option.runtime_ms
    cached = set(cache.configs)
    missing = [name for name in (*config_names, fallback) if name not in cached]
    if missing:
        raise DataError(f"detection cache has no entries for configuration(s) {', '.join(missing)} named in the profile")
    frame_indices = np.asarray(sorted(frame_indices), dtype=np.int64)
    sizes = np.zeros((len(frame_indices), len(cameras), len(config_names)), dtype=np.int64)
    for f, frame_index in enumerate(frame_indices):
        for c, camera in enumerate(cameras):
            for k, config in enumerate(config_names):
                sizes[f, c, k] = int(cache.size_bytes(int(frame_index), camera, config))
    interval_ms = 1000.0 / frame_rate_hz
    fallback_runtime_ms = max(option.runtime_ms for service in services for option in service.options
                              if option.is_fallback)
    return ReplayScenario(
        cameras=cameras,
        frame_indices=frame_indices,
        capture_ms=(frame_indices - frame_indices[0]) * interval_ms if len(frame_indices) else np.zeros(0),
        services=tuple(services),
        config_names=config_names,
        size_bytes=sizes,
        runtime_ms=runtime_ms,
        encode_ms=np.array([encode_ms_by_config.get(name, 0.0) for name in config_names]),
        fallback_config=fallback,
        rtt_ms=rtt_ms,
        slo_ms=slo_ms,
        camera_input_ms=camera_input_ms,
        fallback_runtime_ms=fallback_runtime_ms,
    )


def order_cameras(names: Sequence[str]) -> tuple[str, ...]:
    """Waymo camera order first, then any other names in the order given."""
    known = [camera for camera in ALL_CAMERAS if camera in names]
    return tuple(known + [name for name in names if name not in ALL_CAMERAS])


def open_trace(path: str | Path) -> UplinkTrace:
    """Read an uplink trace (Mahimahi or two-column); DataError with one line if it cannot be."""
    from datasets.traces import load_trace

    path = Path(path)
    if not path.is_file():
        raise DataError(f"trace {path}: no such file")
    trace = load_trace(path)
    return UplinkTrace(name=trace.name, path=str(path), schedule=trace.schedule)


def open_profiled_scene(scene_path: str | Path, preset: str = "demo", progress: bool = True,
                        profile_dir: str | Path | None = None, models: Sequence[str] | None = None) -> ProfiledScene:
    """Open the scene and make sure its profile exists (profiling on first use), then read it.

    `profile_dir`: use the profile already in that folder (profile.parquet + detections.parquet,
    as the profiler writes them) instead of the cached one for `preset`. `models`: the models to
    profile (default: the family for the scene, `avcloud.models.family_for_scene`: our
    synthetic-trained family on our synthetic scenes, the COCO-pretrained one on real images).
    """
    from avcloud.models import family_for_scene, family_of, is_synthetic_scene_name
    from avcloud.profile_format import DetectionCache
    from avcloud.profiler import CACHE_NAME, TABLE_NAME, ProfileResult, ensure_profile
    from datasets.scene import open_scene
    from optimizer.curves import load_profile_table

    scene_path = Path(scene_path)
    if not scene_path.exists():
        raise DataError(f"scene {scene_path}: no such file or directory")
    scene = open_scene(scene_path)
    scene_name = getattr(scene, "name", scene_path.stem)
    if models:
        families = sorted({family_of(model) or "custom" for model in models})
        family_note = f"models {', '.join(models)} (--models; family {', '.join(families)})"
    else:
        family = family_for_scene(is_synthetic_scene_name(scene_name))
        models = family.models
        family_note = f"family {family.name} ({family.trained_on}): {', '.join(models)}"
    if profile_dir is not None:
        profile = ProfileResult(Path(profile_dir) / TABLE_NAME, Path(profile_dir) / CACHE_NAME)
        for path in (profile.table_path, profile.cache_path):
            if not path.is_file():
                raise DataError(f"--profile {profile_dir}: no {path.name} in it")
        preset = f"from {profile_dir}"
    else:
        profile = ensure_profile(scene_path, preset=preset, progress=progress, models=models)
    cache = DetectionCache(profile.cache_path)
    table = load_profile_table(profile.table_path)
    cameras = order_cameras([camera for camera in cache.cameras if camera in scene.cameras])
    if not cameras:
        raise DataError(f"{profile.cache_path}: no camera of scene {scene_path} in the detection cache")
    services = table.services(cameras)
    frame_indices = np.asarray(sorted(int(index) for index in cache.frame_indices), dtype=np.int64)
    configs = {option.name for service in services for option in service.options}
    note = (f"profile {preset if profile_dir else repr(preset)}: {len(frame_indices)} frames x {len(cameras)} cameras, "
            f"{len(configs) - 1} cloud configurations + on-car fallback; "
            + (f"models of the profile in {profile_dir}" if profile_dir is not None else family_note))
    return ProfiledScene(
        name=scene_name,
        path=str(scene_path),
        scenario_frames=frame_indices,
        frame_rate_hz=float(scene.frame_rate_hz),
        services=services,
        detections=cache,
        ground_truths=read_ground_truths(scene, cache, cameras, frame_indices, scene_path),
        encode_ms_by_config=read_car_table(profile.table_path)[0],
        profile_path=str(profile.table_path),
        profile_note=note,
    )


def make_case(scene: ProfiledScene, trace: UplinkTrace, rtt_ms: float, slo_ms: float,
              max_frames: int | None = None, camera_input_ms: float = 0.0, cloud: str = DEFAULT_CLOUD,
              car: str = DEFAULT_CAR) -> ReplayCase:
    """One scene x trace; `max_frames` keeps only the first frames the profile covers; `cloud`
    chooses the cloud runtime model (avcloud/replay/cloud_runtimes.py), `car` the car-side times
    (avcloud/replay/car_times.py)."""
    frames = scene.scenario_frames if max_frames is None else scene.scenario_frames[:max_frames]
    measured_ms = {option.name: option.runtime_ms for service in scene.services for option in service.options
                   if not option.is_fallback}
    runtimes = resolve_cloud(cloud, measured_ms)
    fallbacks = [option for service in scene.services for option in service.options if option.is_fallback]
    if not fallbacks:
        raise DataError("profile: expected one on-car fallback configuration for every camera, found none")
    car_times = resolve_car(car, {name: scene.encode_ms_by_config.get(name, 0.0) for name in measured_ms},
                            fallbacks[0].name, max(option.runtime_ms for option in fallbacks))
    services = with_fallback_runtime(with_runtimes(scene.services, runtimes), car_times)
    scenario = build_scenario(services, scene.detections, frames, scene.frame_rate_hz,
                              rtt_ms, slo_ms, car_times.encode_ms, camera_input_ms)
    ground_truths = {camera: truths[: len(frames)] for camera, truths in scene.ground_truths.items()}
    return ReplayCase(
        scene_name=scene.name, scene_path=scene.path, trace_name=trace.name, trace_path=trace.path,
        schedule=trace.schedule, scenario=scenario, ground_truths=ground_truths,
        detections=scene.detections, profile_path=scene.profile_path, profile_note=scene.profile_note,
        cloud=runtimes, car=car_times,
    )


def read_ground_truths(scene, cache, cameras: Sequence[str], frame_indices: Sequence[int],
                       scene_path: Path) -> dict[str, list[GroundTruth]]:
    """Labels per camera and frame position: from the profiler's copy when it has one, else the scene."""
    if hasattr(cache, "ground_truth"):
        try:
            return {camera: [cache.ground_truth(int(index), camera) for index in frame_indices] for camera in cameras}
        except (KeyError, OSError, DataError):
            pass
    wanted = {int(index): position for position, index in enumerate(frame_indices)}
    found: dict[str, list[GroundTruth | None]] = {camera: [None] * len(wanted) for camera in cameras}
    for frame in scene.frames(cameras):
        position = wanted.get(frame.index)
        if position is not None:
            for camera in cameras:
                found[camera][position] = frame.cameras[camera].ground_truth
    for camera, truths in found.items():
        if any(truth is None for truth in truths):
            raise DataError(f"scene {scene_path}: camera {camera} lacks frames the profile covers")
    return found  # type: ignore[return-value]
