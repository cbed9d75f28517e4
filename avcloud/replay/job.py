"""The replay job: every policy on the same frames and the same trace, for each scene x trace."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from avcloud.errors import UserError
from avcloud.replay.car_times import DEFAULT_CAR, check_car_choice
from avcloud.replay.cloud_runtimes import DEFAULT_CLOUD, check_cloud_choice
from avcloud.replay.inputs import ReplayCase, make_case, open_profiled_scene, open_trace
from avcloud.replay.metrics import MapFunction, datasets_map, summarise_policies
from avcloud.replay.simulator import PolicyRun, simulate_policy, true_capacity_mbps
from optimizer.policies import POLICY_NAMES, check_policy_names, get_policy

# A 4G round trip from a car to a regional cloud is typically 40-60 ms.
DEFAULT_RTT_MS = 50.0
# With RTT 50 ms, a 200 ms deadline leaves the profiled cloud options (about 10-75 ms of runtime on
# the CPU backend) 75-140 ms for encoding and upload: about one frame interval at 10 Hz. Longer
# deadlines let TURBO's critical bandwidth, size / (SLO - RTT - runtime), fall below the rate a
# 10 Hz stream needs (size / 100 ms), and every allocating policy then over-commits the uplink.
DEFAULT_SLO_MS = 200.0
DEFAULT_PRESET = "demo"


@dataclass
class ReplayOptions:
    scene_paths: Sequence[str | Path] = ()  # empty: the bundled synthetic segment
    trace_paths: Sequence[str | Path] = ()  # empty: the bundled synthetic LTE-like uplink
    policies: Sequence[str] = POLICY_NAMES
    rtt_ms: float = DEFAULT_RTT_MS
    slo_ms: float = DEFAULT_SLO_MS
    preset: str = DEFAULT_PRESET
    max_frames: int | None = None  # only the first frames of each scene
    profile_dir: str | Path | None = None  # an existing profile folder instead of the cached preset
    progress: bool = True
    # None: the simulated cloud serves every request on arrival (a GPU pool); k: k workers in
    # arrival order. Live runs start the service with this many workers (default 1).
    cloud_workers: int | None = None
    # Simulated time the car needs per camera image before compressing it (cameras in turn):
    # 0 for raw camera frames; the live replay decodes each dataset JPEG first.
    camera_input_ms: float = 0.0
    # Cloud runtime model (avcloud/replay/cloud_runtimes.py): "reference", "measured", a CSV, "scale:F".
    cloud: str = DEFAULT_CLOUD
    # Car-side encode and fallback times (avcloud/replay/car_times.py): "reference", "measured", a CSV.
    car: str = DEFAULT_CAR
    # Models to profile and replay (default: the family for each scene, see open_profiled_scene).
    models: Sequence[str] = ()
    # Field overrides applied to every replayed policy (optimizer.policies.PolicySpec), e.g.
    # {"max_in_flight_per_camera": 2}.
    policy_overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class CaseResult:
    case: ReplayCase
    runs: dict[str, PolicyRun]
    summaries: dict[str, dict]


def check_options(options: ReplayOptions) -> tuple[str, ...]:
    """Validate what a user can get wrong before any work starts; returns the policies in order."""
    for label, value in (("--rtt-ms", options.rtt_ms), ("--slo-ms", options.slo_ms)):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{label} must be a finite number >= 0 (got {value:g})")
    if options.slo_ms <= 0:
        raise UserError(f"--slo-ms must be > 0 (got {options.slo_ms:g})")
    if options.rtt_ms >= options.slo_ms:
        raise UserError(f"--rtt-ms {options.rtt_ms:g} must be below --slo-ms {options.slo_ms:g}: "
                        "no cloud result could ever meet the deadline")
    if not math.isfinite(options.camera_input_ms) or options.camera_input_ms < 0:
        raise UserError(f"--camera-input-ms must be a finite number >= 0 (got {options.camera_input_ms:g})")
    if options.cloud_workers is not None and options.cloud_workers < 1:
        raise UserError(f"--cloud-workers must be at least 1 (got {options.cloud_workers})")
    if options.max_frames is not None and options.max_frames < 2:
        raise UserError(f"--frames must be at least 2 (got {options.max_frames})")
    check_cloud_choice(options.cloud)
    check_car_choice(options.car)
    if options.models:
        from avcloud.models import get_card

        for model in options.models:
            get_card(model)  # UserError naming an unknown model
    names = check_policy_names(list(options.policies))
    if not names:
        raise UserError("no policy to replay")
    check_input_paths(options.scene_paths, options.profile_dir, options.trace_paths)
    return names


def check_input_paths(scene_paths: Sequence[str | Path], profile_dir: str | Path | None,
                      trace_paths: Sequence[str | Path]) -> None:
    """One line naming the first scene, profile folder or trace that is not there."""
    for path in scene_paths:
        if not Path(path).exists():
            raise UserError(f"scene {path}: no such file or directory")
    if profile_dir is not None and not Path(profile_dir).is_dir():
        raise UserError(f"--profile {profile_dir}: no such directory")
    for path in trace_paths:
        if not Path(path).is_file():
            raise UserError(f"trace {path}: no such file")


def default_scene_path() -> Path:
    from datasets.synthetic import default_scene_path as synthetic_default

    return Path(synthetic_default())


def default_trace_path() -> Path:
    from datasets.traces import default_trace_path as bundled_default

    return Path(bundled_default())


def run_case(case: ReplayCase, policy_names: Sequence[str], progress: Progress | None = None,
             map_function: MapFunction = datasets_map, cloud_workers: int | None = None,
             overrides: Mapping[str, Any] | None = None) -> CaseResult:
    """Each policy (with `overrides` applied) on its own copy of the link, then the figures of all of them."""
    runs: dict[str, PolicyRun] = {}
    task = None
    if progress is not None:
        task = progress.add_task(f"replay {case.scene_name} x {case.trace_name}", total=len(policy_names))
    for name in policy_names:
        spec = get_policy(name, overrides)
        if spec.planner == "oracle":
            runs[name] = best_oracle_run(case, cloud_workers, name, overrides)
        else:
            runs[name] = simulate_policy(spec, case.scenario, case.schedule, case.detections_at,
                                         cloud_workers=cloud_workers)
        if progress is not None and task is not None:
            progress.advance(task)
    summaries = summarise_policies(runs, case.scenario, case.detections, case.ground_truths, map_function)
    return CaseResult(case=case, runs=runs, summaries=summaries)


def best_oracle_run(case: ReplayCase, cloud_workers: int | None = None, name: str = "oracle",
                    overrides: Mapping[str, Any] | None = None) -> PolicyRun:
    """The oracle at each of its capacity fractions; the run whose published results have the most
    profiled utility wins (chosen in hindsight, without looking at the ground truth)."""
    scenario = case.scenario
    spec = get_policy(name, overrides)
    utility = np.zeros((len(scenario.cameras), len(scenario.config_names)))
    fallback_utility = np.zeros(len(scenario.cameras))
    for c, service in enumerate(scenario.services):
        for option in service.options:
            if option.is_fallback:
                fallback_utility[c] = option.utility
            else:
                utility[c, scenario.config_position[option.name]] = option.utility
    best: tuple[float, PolicyRun] | None = None
    wall_s = 0.0
    for fraction in spec.oracle_capacity_fractions:
        run = simulate_policy(spec, scenario, case.schedule, case.detections_at, cloud_workers=cloud_workers,
                              oracle_capacity_fraction=fraction)
        wall_s += run.wall_s
        served = run.served_config()
        cameras = np.arange(len(scenario.cameras))[None, :]
        value = float(np.where(served >= 0, utility[cameras, np.maximum(served, 0)], fallback_utility[None, :]).sum())
        if best is None or value > best[0]:
            best = (value, run)
            run.policy_spec = {**run.policy_spec, "chosen_capacity_fraction": fraction}
    assert best is not None
    best[1].wall_s = wall_s
    return best[1]


def run_replay(options: ReplayOptions, console: Console | None = None) -> list[CaseResult]:
    policy_names = check_options(options)
    console = console or Console(stderr=True)
    # Traces first: they are quick to read, so a bad one fails before any profiling starts.
    traces = [open_trace(path) for path in (options.trace_paths or [default_trace_path()])]
    scene_paths = [Path(p) for p in options.scene_paths] or [default_scene_path()]
    results = []
    for scene_path in scene_paths:
        scene = open_profiled_scene(scene_path, options.preset, options.progress, options.profile_dir,
                                    options.models or None)
        for trace in traces:
            case = make_case(scene, trace, options.rtt_ms, options.slo_ms, options.max_frames,
                             options.camera_input_ms, options.cloud, options.car)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, disable=not options.progress,
                          transient=True) as progress:
                results.append(run_case(case, policy_names, progress, cloud_workers=options.cloud_workers,
                                        overrides=options.policy_overrides))
    return results


def results_document(results: Sequence[CaseResult], options: ReplayOptions, mode: str = "simulated") -> dict:
    """Everything measured, as one JSON-ready mapping (schema version 1)."""
    cases = []
    for result in results:
        case, scenario = result.case, result.case.scenario
        bins_start_ms, capacity_mbps = true_capacity_mbps(case.schedule, 0.0, max(scenario.duration_s * 1000.0, 1000.0))
        cases.append({
            "scene": case.scene_name,
            "scene_path": case.scene_path,
            "trace": case.trace_name,
            "trace_path": case.trace_path,
            "trace_mean_mbps_over_scene": float(capacity_mbps.mean()),
            "trace_capacity_mbps_per_second": [round(float(v), 4) for v in capacity_mbps],
            "frames": scenario.num_frames,
            "cameras": list(scenario.cameras),
            "duration_s": scenario.duration_s,
            "cloud_configurations": list(scenario.config_names),
            "fallback_configuration": scenario.fallback_config,
            "profile": case.profile_path,
            "profile_note": case.profile_note,
            "cloud_runtimes": case.cloud.describe() if case.cloud is not None else None,
            "car_times": case.car.describe() if case.car is not None else None,
            "policy_specs": {name: run.policy_spec for name, run in result.runs.items()},
            "policies": result.summaries,
        })
    document = {
        "schema": 1,
        "avcloud_version": avcloud_version(),
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "settings": {
            "rtt_ms": options.rtt_ms,
            "slo_ms": options.slo_ms,
            "policies": list(check_policy_names(list(options.policies))),
            "profile_preset": options.preset,
            "max_frames": options.max_frames,
            # Kept from schema 1's first release (readers of these fields still find them); the
            # full spec of every policy is in each case's `policy_specs`.
            "initial_estimate_mbps": get_policy("turbo").initial_estimate_mbps,
            "point_estimate": f"harmonic mean of the last {get_policy('turbo').estimator_window} throughput samples",
            "forecast_samples": get_policy("turbo-q").quantile_window,
            "probe_interval_ms": get_policy("turbo").stale_after_ms,
            "cloud": options.cloud,
            "cloud_workers": options.cloud_workers,
            "agent": "onboard.daemon.OnboardAgent on a simulated clock" if mode == "simulated"
            else "the onboard daemon process in real time",
            "overall_map": "mean over cameras of per-camera mAP over all frames",
        },
        "cases": cases,
    }
    if len(cases) > 1:
        document["aggregate"] = aggregate(cases)
    return document


def aggregate(cases: Sequence[dict]) -> dict[str, dict]:
    """Mean over cases of the headline figures, per policy."""
    names = list(cases[0]["policies"])
    keys = ("map", "gain_over_onboard_points", "fraction_of_oracle_gain", "cloud_share",
            "deadline_miss_rate", "mean_uplink_mbps")
    figures: dict[str, dict] = {}
    for name in names:
        entry = {}
        for key in keys:
            values = [case["policies"][name].get(key) for case in cases if name in case["policies"]]
            values = [value for value in values if value is not None]
            entry[key] = float(sum(values) / len(values)) if values else None
        figures[name] = entry
    return figures


def avcloud_version() -> str:
    """The installed avcloud version, for the reports ('unknown' from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avcloud")
    except PackageNotFoundError:
        return "unknown"


def default_out_dir() -> Path:
    return Path("runs") / f"replay-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
