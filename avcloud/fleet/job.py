"""The fleet job: a grid of fleet sizes x GPU pool sizes x cell traces x policies, each point one
fleet simulation, run as Ray tasks when Ray is installed and on this machine's cores otherwise
(`_run_here`; the same results either way).

A point is a pure function of its inputs (`run_point(inputs, settings, point)`): the inputs name
the scenes, traces and replay settings, and each process loads them once (`load_inputs`), so a
Ray worker reads the profile from the cache as the local run does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from avcloud.errors import Terminated, UserError
from avcloud.fleet.cell import SCHEDULERS, SHARED_SCHEDULERS
from avcloud.fleet.coordinator import (
    CELL_POLICY,
    CELL_POLICY_SPEC,
    CellCoordinator,
    CellPolicySettings,
    check_cell_policy,
)
from avcloud.fleet.metrics import break_even_vehicles, summarise_fleet
from avcloud.fleet.parallel import available_cores, can_run_on_processes, processes_for
from avcloud.fleet.scoring import SceneScorer
from avcloud.fleet.simulation import (
    PHASES,
    SceneInputs,
    simulate_fleet,
    start_phases_ms,
    vehicle_cases,
)
from avcloud.pools import serve_the_parent_only, stop_pool
from avcloud.replay.car_times import DEFAULT_CAR, check_car_choice
from avcloud.replay.cloud_runtimes import DEFAULT_CLOUD, check_cloud_choice
from avcloud.replay.inputs import UplinkTrace
from avcloud.replay.job import avcloud_version, check_input_paths

DEFAULT_VEHICLES: tuple[int, ...] = (1, 2, 4, 8, 16)
# The default GPU pool: 4 workers (say one 4-GPU server), each running one batch at a time.
DEFAULT_WORKERS = 4
DEFAULT_POLICIES: tuple[str, ...] = ("turbo", "turbo-q")
DEFAULT_SCHEDULER = "pf"
# Offloading "stops paying" once the fleet's mean gain over on-car only is below this (mAP points).
DEFAULT_BREAK_EVEN_POINTS = 1.0
EXECUTORS: tuple[str, ...] = ("auto", "local", "ray")
# What one simulated vehicle holds, measured (`/usr/bin/time` on `avcloud fleet --vehicles 200 /
# 1000 / 2000`, one process): about 35 kB for the car and its agent, and 0.35 kB per camera-frame
# of the scene for its per-frame records (1000 vehicles of 5 cameras x 200 frames: 0.38 GB).
VEHICLE_BYTES = 35_000
VEHICLE_BYTES_PER_CAMERA_FRAME = 350
# The interval the memory estimate assumes before a scene is loaded (the bundled scene's).
ESTIMATE_FRAME_INTERVAL_MS = 100.0
RAY_WAIT_S = 0.5


@dataclass
class FleetOptions:
    vehicles: Sequence[int] = DEFAULT_VEHICLES
    workers: Sequence[int | None] = (DEFAULT_WORKERS,)  # None: a pool that never queues
    policies: Sequence[str] = DEFAULT_POLICIES
    scheduler: str = DEFAULT_SCHEDULER
    phase: str = "spread"
    scene_paths: Sequence[str | Path] = ()  # empty: the bundled synthetic segment
    trace_paths: Sequence[str | Path] = ()  # empty: the bundled synthetic LTE-like uplink
    rtt_ms: float = 50.0
    slo_ms: float = 200.0
    preset: str = "demo"
    profile_dir: str | Path | None = None
    models: Sequence[str] = ()
    max_frames: int | None = None
    camera_input_ms: float = 0.0
    cloud: str = DEFAULT_CLOUD
    car: str = DEFAULT_CAR
    pf_window_ms: float = 1000.0
    executor: str = "auto"
    # Each point's cars over this many processes; None: this machine's cores when the points run
    # one after another here, one per point as Ray tasks (Ray spreads the points instead).
    processes: int | None = None
    break_even_points: float = DEFAULT_BREAK_EVEN_POINTS
    progress: bool = True
    cell: CellPolicySettings = field(default_factory=CellPolicySettings)  # the `cell` policy's settings


# ----------------------------------------------------------------------------- inputs


@dataclass
class LoadedInputs:
    scenes: list[SceneInputs]
    traces: list[UplinkTrace]
    scorers: list[SceneScorer]
    notes: dict[str, Any] = field(default_factory=dict)  # profile notes, cloud runtimes
    onboard_maps: dict[tuple[int, int], float] = field(default_factory=dict)


class InputsSource(Protocol):
    """What a sweep point reads: hashable, picklable, and loads the same inputs in any process."""

    def load(self, progress: bool = False) -> LoadedInputs: ...


@dataclass(frozen=True)
class FleetInputs:
    """Profiled scenes and traces by path, with the replay settings that shape the scenarios."""

    scene_paths: tuple[str, ...]  # empty: the bundled synthetic segment
    trace_paths: tuple[str, ...]  # empty: the bundled synthetic LTE-like uplink
    rtt_ms: float
    slo_ms: float
    preset: str = "demo"
    profile_dir: str | None = None
    models: tuple[str, ...] = ()
    max_frames: int | None = None
    camera_input_ms: float = 0.0
    cloud: str = DEFAULT_CLOUD
    car: str = DEFAULT_CAR

    def load(self, progress: bool = False) -> LoadedInputs:
        from avcloud.replay.inputs import make_case, open_profiled_scene, open_trace
        from avcloud.replay.job import default_scene_path, default_trace_path

        traces = [open_trace(path) for path in (self.trace_paths or [default_trace_path()])]
        scenes, scorers, notes = [], [], {"profiles": [], "cloud_runtimes": None, "car_times": None}
        for path in self.scene_paths or [default_scene_path()]:
            scene = open_profiled_scene(path, self.preset, progress, self.profile_dir, self.models or None)
            case = make_case(scene, traces[0], self.rtt_ms, self.slo_ms, self.max_frames, self.camera_input_ms,
                             self.cloud, self.car)
            scenes.append(SceneInputs(case.scene_name, case.scenario, case.detections, case.ground_truths))
            scorers.append(SceneScorer(case.detections, case.scenario.fallback_config))
            notes["profiles"].append(case.profile_note)
            notes["cloud_runtimes"] = case.cloud.describe() if case.cloud is not None else None
            notes["car_times"] = case.car.describe() if case.car is not None else None
        return LoadedInputs(scenes, traces, scorers, notes)


_LOADED: dict[Any, LoadedInputs] = {}


def load_inputs(inputs: InputsSource, progress: bool = False) -> LoadedInputs:
    """The inputs, loaded once per process."""
    loaded = _LOADED.get(inputs)
    if loaded is None:
        loaded = inputs.load(progress)
        _LOADED[inputs] = loaded
    return loaded


# ----------------------------------------------------------------------------- one point


@dataclass(frozen=True)
class FleetSettings:
    """What every point of a sweep shares besides its inputs."""

    scheduler: str = DEFAULT_SCHEDULER
    phase: str = "spread"
    pf_window_ms: float = 1000.0
    cell: CellPolicySettings = field(default_factory=CellPolicySettings)
    processes: int = 1  # each point's cars over this many processes (avcloud/fleet/parallel.py)


@dataclass(frozen=True)
class FleetPoint:
    vehicles: int
    workers: int | None
    policy: str
    trace: int = 0  # index of the cell's trace (shared cells); per-vehicle uplinks use every trace


def run_point(inputs: InputsSource, settings: FleetSettings, point: FleetPoint) -> dict:
    """One fleet simulation and its figures (deterministic; wall times under "timing")."""
    from optimizer.policies import get_policy

    loaded = load_inputs(inputs)
    cases = vehicle_cases(loaded.scenes, point.vehicles)
    if settings.scheduler in SHARED_SCHEDULERS:
        schedules = [loaded.traces[point.trace].schedule]
        trace_name = loaded.traces[point.trace].name
    else:
        schedules = [trace.schedule for trace in loaded.traces]
        trace_name = "+".join(trace.name for trace in loaded.traces)
    coordinator = None
    if point.policy == CELL_POLICY:
        check_cell_policy()
        spec = CELL_POLICY_SPEC
        scenario = cases[0].scenario

        def coordinator(clock):
            return CellCoordinator([case.scenario.services for case in cases], schedules[0], clock, settings.cell,
                                   scenario.rtt_ms, scenario.slo_ms, scenario.frame_interval_ms, point.workers)
    else:
        spec = get_policy(point.policy)
    run = simulate_fleet(spec, cases, schedules, settings.scheduler, point.workers, settings.phase,
                         pf_window_ms=settings.pf_window_ms, coordinator=coordinator,
                         processes=processes_for(point.vehicles, settings.processes))
    summary = summarise_fleet(run, loaded.scorers, loaded.onboard_maps)
    summary["trace"] = trace_name
    return summary


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def run_points(inputs: InputsSource, settings: FleetSettings, points: Sequence[FleetPoint], executor: str = "auto",
               on_done: Callable[[FleetPoint], None] | None = None) -> list[dict]:
    """Every point, as Ray tasks (`ray`, or `auto` with Ray installed) or here (`_run_here`);
    results in the order of `points` either way."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown --executor '{executor}' (choose from {', '.join(EXECUTORS)})")
    if executor == "ray" and not ray_available():
        raise UserError("--executor ray: Ray is not installed (pip install 'avcloud[ray]')")
    # auto: Ray only when there is a sweep to spread (starting Ray costs seconds of a 2-core machine).
    if executor == "local" or (executor == "auto" and (len(points) < 2 or not ray_available())):
        return _run_here(inputs, settings, points, on_done or (lambda _point: None))
    import ray

    settings = dataclasses.replace(settings, processes=1)  # Ray spreads the points over the cores
    terminate_handler = signal.getsignal(signal.SIGTERM)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Ray's core worker takes SIGTERM over with a failure handler that prints a native stack and
    # kills the process, and a signal that lands inside Ray's own calls comes out of them as a
    # plain KeyboardInterrupt: the command's handler (avcloud.cli) goes back in, and a SIGTERM is
    # remembered so that it still ends the command as one.
    sigterm_received = threading.Event()
    handles_sigterm = callable(terminate_handler) and threading.current_thread() is threading.main_thread()
    if handles_sigterm:
        def on_sigterm(signum: int, frame: object) -> None:
            sigterm_received.set()
            terminate_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
    results: list[dict | None] = [None] * len(points)
    try:
        remote = ray.remote(run_point)
        shared_inputs = ray.put(inputs)
        pending = {remote.remote(shared_inputs, settings, point): index for index, point in enumerate(points)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_WAIT_S)
            if not done:
                continue  # back in Python now and then, so that a signal's handler runs
            index = pending.pop(done[0])
            results[index] = ray.get(done[0])
            if on_done is not None:
                on_done(points[index])
    except BaseException as error:
        ray.shutdown()  # no task outlives the command (Ctrl-C, SIGTERM, an error)
        if sigterm_received.is_set() and not isinstance(error, Terminated):
            raise Terminated() from None
        raise
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, terminate_handler)
    return results  # type: ignore[return-value]


def _run_here(inputs: InputsSource, settings: FleetSettings, points: Sequence[FleetPoint],
              on_done: Callable[[FleetPoint], None]) -> list[dict]:
    """Points on this machine's `settings.processes` processes: a fleet large enough to split
    runs alone, its cars over them (`processes_for`); smaller fleets run side by side, one
    process each, in a pool of forked workers (which inherit the loaded inputs), as Ray would
    run them. The same results as one after another (a test compares them)."""
    results: list[dict | None] = [None] * len(points)
    split = [processes_for(point.vehicles, settings.processes) > 1 for point in points]
    alone = [index for index in range(len(points)) if split[index]]
    side_by_side = [index for index in range(len(points)) if not split[index]]
    workers = min(settings.processes, len(side_by_side))
    if workers > 1 and can_run_on_processes():
        one_each = dataclasses.replace(settings, processes=1)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=serve_the_parent_only)
        try:
            futures = {pool.submit(run_point, inputs, one_each, points[index]): index for index in side_by_side}
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                on_done(points[index])
        except BaseException:
            stop_pool(pool)  # no worker outlives the command (Ctrl-C, SIGTERM, an error)
            raise
        pool.shutdown(wait=True)
    else:
        alone = list(range(len(points)))
    for index in alone:
        results[index] = run_point(inputs, settings, points[index])
        on_done(points[index])
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the job


def _scene_shape(path: str | Path | None, max_frames: int | None) -> tuple[float, int]:
    """(duration in ms, cameras) of a scene, cheaply and before any profiling: the bundled segment's
    are known; a given scene's header is read."""
    if path is None:
        from avcloud.types import ALL_CAMERAS
        from datasets.synthetic import DEFAULT_FRAMES, FRAME_RATE_HZ

        frames, rate_hz, cameras = DEFAULT_FRAMES, FRAME_RATE_HZ, len(ALL_CAMERAS)
    else:
        from datasets.scene import open_scene

        try:
            scene = open_scene(path)
        except (OSError, ValueError) as error:
            raise UserError(f"scene {path}: cannot read it ({error})") from None
        frames, rate_hz, cameras = scene.num_frames, scene.frame_rate_hz, len(scene.cameras)
    if max_frames is not None:
        frames = min(frames, max_frames)
    return (frames * 1000.0 / rate_hz if rate_hz > 0 else math.inf), cameras


def check_options(options: FleetOptions) -> tuple[str, ...]:
    """Everything a user can get wrong, before any profiling; returns the policies in order."""
    from optimizer.policies import get_policy

    if not options.vehicles:
        raise UserError("--vehicles: give at least one fleet size")
    for vehicles in options.vehicles:
        if vehicles < 1:
            raise UserError(f"--vehicles must be at least 1 (got {vehicles}): a fleet needs a vehicle")
    for workers in options.workers:
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1 or 'unlimited' (got {workers})")
    if options.scheduler not in SCHEDULERS:
        raise UserError(f"unknown --scheduler '{options.scheduler}' (choose from {', '.join(SCHEDULERS)})")
    if options.phase not in PHASES:
        raise UserError(f"unknown --phase '{options.phase}' (choose from {', '.join(PHASES)})")
    if options.executor not in EXECUTORS:
        raise UserError(f"unknown --executor '{options.executor}' (choose from {', '.join(EXECUTORS)})")
    if options.processes is not None and options.processes < 1:
        raise UserError(f"--processes must be at least 1 (got {options.processes})")
    for label, value in (("--rtt-ms", options.rtt_ms), ("--slo-ms", options.slo_ms),
                         ("--camera-input-ms", options.camera_input_ms)):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{label} must be a finite number >= 0 (got {value:g})")
    if options.rtt_ms >= options.slo_ms:
        raise UserError(f"--rtt-ms {options.rtt_ms:g} must be below --slo-ms {options.slo_ms:g}: "
                        "no cloud result could ever meet the deadline")
    if not (math.isfinite(options.pf_window_ms) and options.pf_window_ms > 0):
        raise UserError(f"--pf-window-ms must be a finite number > 0 (got {options.pf_window_ms:g})")
    if options.max_frames is not None and options.max_frames < 2:
        raise UserError(f"--frames must be at least 2 (got {options.max_frames})")
    if not math.isfinite(options.break_even_points):
        raise UserError("--break-even-points must be a finite number")
    check_cloud_choice(options.cloud)
    check_car_choice(options.car)
    # The cell's settings are checked even when no point runs the cell policy: a value out of
    # range is a mistake either way, and ignoring it would hide a typo in the policy list.
    options.cell.check()
    policies = list(dict.fromkeys(options.policies))
    if not policies:
        raise UserError("no policy to simulate")
    for name in policies:
        if name == CELL_POLICY:
            check_cell_policy()
            if options.scheduler not in SHARED_SCHEDULERS:
                raise UserError(f"policy '{CELL_POLICY}' coordinates the vehicles of one shared cell: use it with "
                                f"--scheduler {' or '.join(SHARED_SCHEDULERS)}")
            if options.cell.gpu_fraction > 0 and any(workers is None for workers in options.workers):
                raise UserError("--cell-gpu-fraction plans with the GPU pool's size: give --workers a number")
            continue
        spec = get_policy(name)  # UserError naming an unknown policy
        if spec.planner == "oracle" and options.scheduler in SHARED_SCHEDULERS:
            raise UserError(f"policy '{name}' plans from its own trace's future, which a shared cell does not "
                            "have: use it with --scheduler per-vehicle")
    check_input_paths(options.scene_paths, options.profile_dir, options.trace_paths)
    # The scene's length and cameras (cheap), for the pool and the traces.
    shapes = [_scene_shape(path, options.max_frames) for path in (options.scene_paths or [None])]
    check_fleet_against_scenes(options, [duration for duration, _ in shapes], [cameras for _, cameras in shapes])
    _check_traces(options, max(duration for duration, _ in shapes))
    return tuple(policies)


def check_fleet_against_scenes(options: FleetOptions, durations_ms: Sequence[float], cameras: Sequence[int]) -> None:
    """More workers than the fleet could ever keep busy is a mistake: the agent keeps at most
    `max_in_flight_per_camera` requests in flight per camera (the most of the policies run), so K
    workers need at least that many requests in the fleet."""
    from optimizer.policies import get_policy

    check_fleet_memory(max(options.vehicles), max(durations_ms), max(cameras))
    per_camera = max(CELL_POLICY_SPEC.max_in_flight_per_camera if name == CELL_POLICY
                     else get_policy(name).max_in_flight_per_camera for name in options.policies)
    for vehicles in sorted(options.vehicles):
        requests = per_camera * sum(cameras[vehicle % len(cameras)] for vehicle in range(vehicles))
        for workers in options.workers:
            if workers is not None and workers > requests:
                raise UserError(f"--workers {workers} is more than the {requests} requests {vehicles} vehicle(s) can "
                                f"have in flight at once ({per_camera} per camera): use at most {requests} workers "
                                "for that fleet, or 'unlimited' for a pool that never queues")


def check_fleet_memory(vehicles: int, duration_ms: float, cameras: int, memory_bytes: int | None = None) -> None:
    """A fleet larger than this machine's memory could hold is refused before it is built (it
    would run for hours and end in the kernel's out-of-memory kill): one line with the estimate."""
    memory_bytes = physical_memory_bytes() if memory_bytes is None else memory_bytes
    if memory_bytes is None:
        return
    camera_frames = cameras * duration_ms / ESTIMATE_FRAME_INTERVAL_MS if math.isfinite(duration_ms) else 0.0
    needed_bytes = vehicles * (VEHICLE_BYTES + VEHICLE_BYTES_PER_CAMERA_FRAME * camera_frames)
    if needed_bytes > memory_bytes:
        raise UserError(f"--vehicles {vehicles}: a fleet this size needs about {needed_bytes / 1e9:,.1f} GB of memory "
                        f"for this scene, more than this machine's {memory_bytes / 1e9:,.1f} GB")


def physical_memory_bytes() -> int | None:
    """This machine's memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_traces(options: FleetOptions, scene_duration_ms: float) -> None:
    """A cell trace shorter than the fleet's scene would loop (Mahimahi does): refused."""
    from avcloud.replay.inputs import open_trace

    if not options.trace_paths:
        return  # the bundled trace is 150 s long
    interval_ms = 100.0  # checked again with the scene's own interval once it is loaded
    horizon_ms = scene_duration_ms + max(max(start_phases_ms(vehicles, interval_ms, options.phase))
                                         for vehicles in options.vehicles)
    for path in options.trace_paths:
        trace = open_trace(path)
        if trace.schedule.period_ms < horizon_ms:
            raise UserError(f"trace {path}: {trace.schedule.period_ms / 1000.0:g} s long, shorter than the fleet's "
                            f"{horizon_ms / 1000.0:g} s (scene and start phases): a cell trace must cover the scene")


def inputs_for(options: FleetOptions) -> FleetInputs:
    return FleetInputs(
        scene_paths=tuple(str(path) for path in options.scene_paths),
        trace_paths=tuple(str(Path(path).resolve()) for path in options.trace_paths),
        rtt_ms=options.rtt_ms, slo_ms=options.slo_ms, preset=options.preset,
        profile_dir=str(options.profile_dir) if options.profile_dir is not None else None,
        models=tuple(options.models), max_frames=options.max_frames, camera_input_ms=options.camera_input_ms,
        cloud=options.cloud, car=options.car,
    )


def grid(options: FleetOptions, policies: Sequence[str], traces: int) -> list[FleetPoint]:
    """Every point of the sweep: (trace, pool, policy, fleet size), fleet sizes innermost."""
    trace_indices = range(traces) if options.scheduler in SHARED_SCHEDULERS else range(1)
    return [FleetPoint(vehicles, workers, policy, trace)
            for trace in trace_indices for workers in dict.fromkeys(options.workers)
            for policy in policies for vehicles in sorted(set(options.vehicles))]


def run_fleet_job(options: FleetOptions, inputs: InputsSource | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Check, load, sweep, and return the results document."""
    policies = check_options(options)
    inputs = inputs or inputs_for(options)
    loaded = load_inputs(inputs, options.progress)
    durations_ms = [scene.scenario.duration_s * 1000.0 for scene in loaded.scenes]
    check_fleet_against_scenes(options, durations_ms, [len(scene.scenario.cameras) for scene in loaded.scenes])
    interval_ms = loaded.scenes[0].scenario.frame_interval_ms
    horizon_ms = max(durations_ms) + max(max(start_phases_ms(vehicles, interval_ms, options.phase))
                                         for vehicles in options.vehicles)
    for trace in loaded.traces:
        if trace.schedule.period_ms < horizon_ms:
            raise UserError(f"trace {trace.path}: {trace.schedule.period_ms / 1000.0:g} s long, shorter than the "
                            f"fleet's {horizon_ms / 1000.0:g} s (scene and start phases): a cell trace must cover the scene")
    settings = FleetSettings(options.scheduler, options.phase, options.pf_window_ms, options.cell,
                             options.processes if options.processes is not None else available_cores())
    points = grid(options, policies, len(loaded.traces))
    done = [0]

    def count(_point: FleetPoint) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], len(points))

    results = run_points(inputs, settings, points, options.executor, count)
    return results_document(options, policies, loaded, results)


def results_document(options: FleetOptions, policies: Sequence[str], loaded: LoadedInputs, results: list[dict]) -> dict:
    groups: dict[tuple[str, Any, str], list[dict]] = {}
    for result in results:
        groups.setdefault((result["trace"], result["workers"], result["policy"]), []).append(result)
    break_even = [
        {"trace": trace, "workers": workers, "policy": policy,
         "vehicles": break_even_vehicles(points, options.break_even_points),
         "largest_fleet_tried": max(point["vehicles"] for point in points)}
        for (trace, workers, policy), points in groups.items()
    ]
    return {
        "schema": 1,
        "kind": "fleet",
        "avcloud_version": avcloud_version(),
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {
            "vehicles": sorted(set(options.vehicles)), "workers": list(dict.fromkeys(options.workers)),
            "policies": list(policies), "scheduler": options.scheduler, "phase": options.phase,
            "pf_window_ms": options.pf_window_ms, "rtt_ms": options.rtt_ms, "slo_ms": options.slo_ms,
            "cloud": options.cloud, "car": options.car, "profile_preset": options.preset, "max_frames": options.max_frames,
            "break_even_points": options.break_even_points,
            "cell_policy": {"fairness": options.cell.fairness, "capacity_fraction": options.cell.capacity_fraction,
                            "capacity_window_ms": options.cell.capacity_window_ms,
                            "gpu_fraction": options.cell.gpu_fraction} if CELL_POLICY in policies else None,
            "executor": options.executor if options.executor != "auto" else (
                "ray" if ray_available() and len(results) > 1 else "local"),
            # each point's processes are under its "timing" (fleets of 32 vehicles or more split)
            "processes": options.processes if options.processes is not None else available_cores(),
            "agent": "onboard.daemon.OnboardAgent on a simulated clock, one per vehicle",
            "map": "per vehicle: mean over cameras of per-camera mAP over all frames",
        },
        "scenes": [{"name": scene.name, "frames": scene.scenario.num_frames, "cameras": list(scene.scenario.cameras),
                    "duration_s": scene.scenario.duration_s, "profile_note": note}
                   for scene, note in zip(loaded.scenes, loaded.notes.get("profiles", [""] * len(loaded.scenes)),
                                          strict=True)],
        "traces": [{"name": trace.name, "path": trace.path, "mean_mbps": trace.schedule.mean_mbps(),
                    "period_s": trace.schedule.period_ms / 1000.0} for trace in loaded.traces],
        "cloud_runtimes": loaded.notes.get("cloud_runtimes"),
        "car_times": loaded.notes.get("car_times"),
        "points": results,
        "break_even": break_even,
    }


def default_out_dir() -> Path:
    return Path("runs") / f"fleet-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
