"""A fleet on one simulated clock: N shipped agents, one cell uplink, one cloud GPU pool.

Every vehicle is a `ReplayedCar` (the shipped `onboard.daemon.OnboardAgent`, built from its
policy spec, with the cache-backed cameras, fallback and encoder) on one `EventLoop`:

- scenes: vehicle i drives scene i modulo the scenes given; the vehicles on one scene start at
  evenly spread frame offsets into it (wrapping around), so they see different moments of it
  at any time. Their cameras start at evenly spread phases of one frame interval (`spread`), or
  all at once (`aligned`, the worst burst for a shared cell);
- uplink: one `CellUplink` shared under a scheduler (`pf`, `equal`), or a private `TraceLink`
  per vehicle (`per-vehicle`), see avcloud/fleet/cell.py;
- cloud: one `SimulatedCloud`, i.e. `cloudside.scheduler.RequestQueue` (EDF across vehicles,
  expiry, batching, per-vehicle fair share) in front of K workers, runtimes from the declared
  cloud runtime model of the scenario.

`run_fleet` is `run_cars` with the cell: after every instant it hands out the cell's
opportunities up to the next event. With `processes` > 1 the cars are split over several
processes in windows of RTT/2, with the same decisions (avcloud/fleet/parallel.py).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avcloud.clock import SimulatedClock
from avcloud.fleet.cell import SHARED_SCHEDULERS, CellUplink, private_links
from avcloud.fleet.parallel import can_run_on_processes, run_on_processes
from avcloud.link import DeliverySchedule, packets_for
from avcloud.replay.inputs import DetectionSource
from avcloud.replay.simulator import (
    CarSettings,
    EventLoop,
    PolicyRun,
    ReplayedCar,
    ReplayScenario,
    SimulatedCloud,
    run_instant,
)
from avcloud.types import GroundTruth
from optimizer.policies import PolicySpec

PHASES: tuple[str, ...] = ("spread", "aligned")


@dataclass
class SceneInputs:
    """One profiled scene, ready for vehicles (the scenario's frames in scene order)."""

    name: str
    scenario: ReplayScenario
    source: DetectionSource
    ground_truths: dict[str, list[GroundTruth]]  # per camera, per frame position


@dataclass
class VehicleCase:
    """What one vehicle drives: its scene from a frame offset on, wrapping around."""

    scene: int  # index into the scenes
    offset_frames: int
    scenario: ReplayScenario
    source: DetectionSource
    ground_truths: dict[str, list[GroundTruth]]

    def __post_init__(self) -> None:
        self._frame_indices = [int(index) for index in self.scenario.frame_indices]

    def detections_at(self, frame: int, camera: int, config: str) -> np.ndarray:
        return self.source.detections(self._frame_indices[frame], self.scenario.cameras[camera], config)


def rotated_scenario(scenario: ReplayScenario, offset_frames: int) -> ReplayScenario:
    """The scenario from frame position `offset_frames` on, wrapping around; capture times stay
    those of the positions (frame position f is still captured at capture_ms[f])."""
    offset_frames %= max(scenario.num_frames, 1)
    if offset_frames == 0:
        return scenario
    return ReplayScenario(
        cameras=scenario.cameras, frame_indices=np.roll(scenario.frame_indices, -offset_frames),
        capture_ms=scenario.capture_ms, services=scenario.services, config_names=scenario.config_names,
        size_bytes=np.roll(scenario.size_bytes, -offset_frames, axis=0), runtime_ms=scenario.runtime_ms,
        encode_ms=scenario.encode_ms, fallback_config=scenario.fallback_config, rtt_ms=scenario.rtt_ms,
        slo_ms=scenario.slo_ms, camera_input_ms=scenario.camera_input_ms,
        fallback_runtime_ms=scenario.fallback_runtime_ms, camera_size_wh=dict(scenario.camera_size_wh),
    )


def vehicle_cases(scenes: Sequence[SceneInputs], vehicles: int) -> list[VehicleCase]:
    """Vehicle i drives scene i mod len(scenes); the m vehicles of one scene start at frame offsets
    j * F // m (j = 0..m-1), so vehicle 0 drives the scene exactly as the single-car replay does.
    Vehicles with the same scene and offset share one scenario."""
    counts = [len(range(s, vehicles, len(scenes))) for s in range(len(scenes))]
    rotated: dict[tuple[int, int], tuple[ReplayScenario, dict[str, list[GroundTruth]]]] = {}
    cases = []
    for vehicle in range(vehicles):
        s, j = vehicle % len(scenes), vehicle // len(scenes)
        scene = scenes[s]
        offset = (j * scene.scenario.num_frames) // counts[s]
        if (s, offset) not in rotated:
            truths = {camera: truth[offset:] + truth[:offset] for camera, truth in scene.ground_truths.items()}
            rotated[(s, offset)] = (rotated_scenario(scene.scenario, offset), truths)
        scenario, truths = rotated[(s, offset)]
        cases.append(VehicleCase(s, offset, scenario, scene.source, truths))
    return cases


def start_phases_ms(vehicles: int, frame_interval_ms: float, phase: str = "spread") -> list[float]:
    """When each vehicle's first frame is captured: evenly spread over one frame interval, or all at 0."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (choose from {', '.join(PHASES)})")
    if phase == "aligned":
        return [0.0] * vehicles
    return [vehicle * frame_interval_ms / vehicles for vehicle in range(vehicles)]


class _CloudModels:
    """The configurations and runtimes the simulated cloud knows, over every scene of the fleet."""

    def __init__(self, scenarios: Sequence[ReplayScenario]) -> None:
        runtimes: dict[str, float] = {}
        models: dict[str, str] = {}
        for scenario in scenarios:
            for name, runtime_ms in zip(scenario.config_names, scenario.runtime_ms, strict=True):
                runtimes[name] = max(runtimes.get(name, 0.0), float(runtime_ms))
                models[name] = scenario.models[name]
        self.config_names = tuple(runtimes)
        self.runtime_ms = np.array([runtimes[name] for name in self.config_names])
        self.models = models


@dataclass
class FleetRun:
    """What a fleet did: one PolicyRun per vehicle, and what the shared resources did."""

    policy: str
    scheduler: str
    workers: int | None
    cases: list[VehicleCase]
    runs: list[PolicyRun]
    start_ms: list[float]
    horizon_ms: float  # from the first capture to the end of the last vehicle's scene
    cloud_busy_ms: float  # worker time spent on batches
    capacity_packets: int  # uplink opportunities over the horizon (the cell's, or every private link's)
    delivered_packets: int  # packets that left the uplink(s) within the horizon
    delivered_bytes_per_vehicle: list[int]  # within the horizon
    wall_s: float
    counters: dict[str, int] = field(default_factory=dict)
    solve_us: list[float] = field(default_factory=list)  # the coordinator's joint solves, if any
    processes: int = 1  # the processes the cars ran on (avcloud/fleet/parallel.py)


def run_fleet(loop: EventLoop, cars: Sequence[ReplayedCar], cell: CellUplink | None = None) -> None:
    """`run_cars` for a fleet: every event of one instant, then one agent step per car touched
    (`run_instant`), then (with a shared cell) the cell's opportunities up to the next event."""
    events = loop._events  # noqa: SLF001
    next_time_ms = loop.next_time_ms
    advance = cell.advance if cell is not None else None
    if advance is not None:
        advance(next_time_ms)
    while True:
        if not events:
            if cell is not None and cell.backlog_packets():
                advance(next_time_ms)
                continue
            return
        run_instant(loop)
        if advance is not None:
            advance(next_time_ms)


@contextlib.contextmanager
def fewer_collections(young_threshold: int = 50_000):
    """A fleet's loop makes millions of short-lived objects (tasks, futures, events), and
    Python's cyclic collector would run every 700 of them, its fuller passes walking every car's
    long-lived state too (1000 cars, best of two runs in one process: 0.16 ms per vehicle-frame
    with the collector as it is, 0.14 with this, 0.15 with it off; building the 1000 cars took
    0.44 s, 0.15-0.18 s in this block). Within the block, what exists now (scenes, profiles) is
    frozen out of the collector's view and the young generation is collected every
    `young_threshold` allocations; both are restored after."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(young_threshold, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def simulate_fleet(policy: PolicySpec, cases: Sequence[VehicleCase], schedules: Sequence[DeliverySchedule],
                   scheduler: str = "pf", workers: int | None = None, phase: str = "spread",
                   car: CarSettings | None = None, pf_window_ms: float = 1000.0,
                   coordinator: Callable[[SimulatedClock], Any] | None = None, processes: int = 1) -> FleetRun:
    """Run every vehicle of `cases` with `policy` on one clock, one uplink model and one cloud.

    `schedules`: the cell's trace (shared schedulers use the first) or the vehicles' traces
    (`per-vehicle`: vehicle i gets trace i mod len). `workers`: the GPU pool (None: a pool that
    never queues). `coordinator(clock)`: an object whose `planner(vehicle)` replaces the policy's
    planner (the cell-level coordinator hands every vehicle its share of one joint allocation).
    `processes` > 1 splits the cars over that many processes with the same decisions
    (avcloud/fleet/parallel.py); a coordinator, which plans every car at once, keeps them on one.
    """
    started = time.perf_counter()
    vehicles = len(cases)
    if vehicles < 1:
        raise ValueError("a fleet needs at least one vehicle")
    loop = EventLoop(SimulatedClock(0.0))
    cloud = SimulatedCloud(loop, _CloudModels([case.scenario for case in cases]), workers)  # type: ignore[arg-type]
    cell: CellUplink | None = None
    if scheduler in SHARED_SCHEDULERS:
        cell = CellUplink(schedules[0], vehicles, scheduler, pf_window_ms=pf_window_ms)
        links: list = [cell.link(vehicle) for vehicle in range(vehicles)]
        vehicle_schedules = [schedules[0]] * vehicles
    elif scheduler == "per-vehicle":
        links = private_links(schedules, vehicles)
        vehicle_schedules = [schedules[vehicle % len(schedules)] for vehicle in range(vehicles)]
    else:
        raise ValueError(f"unknown cell scheduler {scheduler!r}")
    interval_ms = cases[0].scenario.frame_interval_ms
    starts_ms = start_phases_ms(vehicles, interval_ms, phase)
    coordinating = coordinator(loop.clock) if coordinator is not None else None
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    # The processes' windows are RTT/2 long: with no RTT there is nothing to divide.
    on_processes = min(case.scenario.rtt_ms for case in cases) > 0 and can_run_on_processes()

    def make_car(vehicle: int, car_loop: EventLoop, path=None) -> ReplayedCar:
        """Vehicle `vehicle` of this fleet, on `car_loop`; `path`: its connection's network side
        when that runs on another process (else its link to this loop's cloud)."""
        case = cases[vehicle]
        return ReplayedCar(policy, case.scenario, case.detections_at, car_loop, links[vehicle], cloud, car,
                           planner=coordinating.planner(vehicle) if coordinating is not None else None,
                           vehicle=f"car-{vehicle}", start_ms=starts_ms[vehicle], schedule=vehicle_schedules[vehicle],
                           index=vehicle, path=path)

    if processes > 1 and vehicles > 1 and coordinating is None and on_processes:
        with fewer_collections():
            runs = run_on_processes(make_car, [case.scenario.rtt_ms for case in cases], loop, cloud, cell, links,
                                    processes)
        wall_s = time.perf_counter() - started
        for run in runs:
            run.wall_s = wall_s / vehicles
        return _fleet_run(policy, scheduler, workers, cases, runs, starts_ms, cloud, cell, vehicle_schedules,
                          wall_s, coordinating, min(processes, vehicles))
    with fewer_collections():
        cars = [make_car(vehicle, loop) for vehicle in range(vehicles)]
        run_fleet(loop, cars, cell)
        wall_s = time.perf_counter() - started
        runs = [replayed.run(wall_s / vehicles) for replayed in cars]
    return _fleet_run(policy, scheduler, workers, cases, runs, starts_ms, cloud, cell, vehicle_schedules, wall_s,
                      coordinating, 1)


def _fleet_run(policy: PolicySpec, scheduler: str, workers: int | None, cases: Sequence[VehicleCase],
               runs: list[PolicyRun], starts_ms: list[float], cloud: SimulatedCloud, cell: CellUplink | None,
               vehicle_schedules: Sequence[DeliverySchedule], wall_s: float, coordinating: Any,
               processes: int) -> FleetRun:
    """The fleet's figures from its vehicles' runs and the shared resources."""
    horizon_ms = max(start + case.scenario.duration_s * 1000.0 for start, case in zip(starts_ms, cases, strict=True))
    if cell is not None:
        capacity_packets = cell.schedule.packets_between(0.0, horizon_ms)
    else:
        capacity_packets = sum(schedule.packets_between(0.0, horizon_ms) for schedule in vehicle_schedules)
    delivered_packets = 0
    delivered_bytes = []
    for run in runs:
        within = [(size) for _, delivered_ms, size in run.transfers if delivered_ms < horizon_ms]
        delivered_packets += sum(packets_for(size) for size in within)
        delivered_bytes.append(int(sum(within)))
    return FleetRun(
        policy=policy.name, scheduler=scheduler, workers=workers, cases=list(cases), runs=runs, start_ms=starts_ms,
        horizon_ms=horizon_ms, cloud_busy_ms=cloud.busy_ms, capacity_packets=int(capacity_packets),
        delivered_packets=int(delivered_packets), delivered_bytes_per_vehicle=delivered_bytes, wall_s=wall_s,
        counters={"cell_opportunities_used": cell.opportunities_used if cell is not None else -1,
                  "coordinator_solves": getattr(coordinating, "solves", 0)},
        solve_us=list(getattr(coordinating, "solve_us", [])), processes=processes,
    )


def trace_too_short(schedule: DeliverySchedule, horizon_ms: float) -> bool:
    return schedule.period_ms < horizon_ms or not math.isfinite(horizon_ms)
