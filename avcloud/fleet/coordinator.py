"""The cell-level coordinator policy (`cell`): one joint allocation per frame interval over every
camera of every vehicle in the cell, under the cell's capacity (and optionally the GPU pool's);
each vehicle then sends what it was given.

The joint problem is `optimizer.cell.solve_cell` (exact; weights per vehicle and camera; max-min
or floor fairness; the GPU pool as a second constraint). The coordinator sits where the base
station's scheduler sits, so it knows the cell's capacity as the cell measured it: the mean over
the last `capacity_window_ms` (over the first window before one has passed, the cell's prior),
times `capacity_fraction`. It knows every vehicle's utility curves (their profiles) and plans at
the cell's RTT and SLO. At the first plan of each frame interval (vehicles capture at spread
phases within it) it solves once; every vehicle's agent (the shipped agent, its planner replaced
by `CoordinatedPlanner`) gets its cameras' choices and critical bandwidths. A vehicle's agent
still measures its own uplink and drops a request it cannot deliver in time, but sends no
discovery requests (`stale_after_ms` infinite): the coordinator decides who sends.

`cell_allocator_available()` says whether optimizer/cell.py is installed; without it the policy
is refused with one line.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass

from avcloud.clock import SimulatedClock
from avcloud.errors import UserError
from avcloud.link import DeliverySchedule
from avcloud.types import Allocation
from optimizer.policies import PolicySpec

CELL_POLICY = "cell"
# The agent side of the policy: planning is the coordinator's; no discovery requests. The agent
# pipelines uploads and the coordinator plans at the stream rate, as turbo-q does.
CELL_POLICY_SPEC = PolicySpec(CELL_POLICY, planner="point", allocator="exact", stale_after_ms=math.inf,
                              max_in_flight_per_camera=2, stream_rate_cap=True)


def cell_allocator_available() -> bool:
    try:
        return importlib.util.find_spec("optimizer.cell") is not None
    except (ImportError, ValueError):
        return False


def check_cell_policy() -> None:
    if not cell_allocator_available():
        raise UserError(f"policy '{CELL_POLICY}' needs the cell-level allocator (optimizer/cell.py), "
                        "which this installation lacks; choose turbo, turbo-q, equal, naive or onboard")


def parse_fairness(text: str | None) -> str | float | None:
    """`none`, `max-min`, or a number (a floor on every vehicle's summed camera utility)."""
    if text is None or text == "none":
        return None
    if text == "max-min":
        return "max-min"
    try:
        floor = float(text)
    except ValueError:
        raise UserError(f"--cell-fairness: '{text}' is not 'none', 'max-min' or a number (a utility floor)") from None
    if not math.isfinite(floor) or floor < 0:
        raise UserError(f"--cell-fairness: a utility floor must be a finite number >= 0 (got {text})")
    return floor


@dataclass(frozen=True)
class CellPolicySettings:
    fairness: str | float | None = None  # None (weighted total), "max-min", or a floor per vehicle
    capacity_fraction: float = 0.9  # plan for this fraction of the measured cell capacity
    capacity_window_ms: float = 1000.0
    gpu_fraction: float = 0.0  # > 0: the GPU pool (K workers) at this fraction is a second constraint

    def check(self) -> None:
        if not (math.isfinite(self.capacity_fraction) and 0 < self.capacity_fraction <= 1):
            raise UserError(f"--cell-capacity-fraction must be in (0, 1] (got {self.capacity_fraction:g})")
        if not (math.isfinite(self.gpu_fraction) and 0 <= self.gpu_fraction <= 1):
            raise UserError(f"--cell-gpu-fraction must be in [0, 1] (got {self.gpu_fraction:g})")
        if self.gpu_fraction > 0 and self.fairness is not None:
            raise UserError("--cell-gpu-fraction cannot be combined with --cell-fairness (the cell allocator "
                            "does not support a GPU constraint together with fairness)")


class CellCoordinator:
    """Solves the cell's joint allocation once per frame interval, for every vehicle of the fleet."""

    def __init__(self, services_by_vehicle: Sequence[tuple], schedule: DeliverySchedule, clock: SimulatedClock,
                 settings: CellPolicySettings, rtt_ms: float, slo_ms: float, frame_interval_ms: float,
                 gpu_workers: int | None = None) -> None:
        from onboard.planning import planning_rtt_ms, services_for_deadline
        from optimizer.cell import CellVehicle

        def planned(services):  # the RTT and SLO are the scenario's: one view per vehicle
            return services_for_deadline(services, CELL_POLICY_SPEC, frame_interval_ms)(planning_rtt_ms(rtt_ms), slo_ms)

        self.vehicles = tuple(CellVehicle(f"car-{vehicle}", planned(services))
                              for vehicle, services in enumerate(services_by_vehicle))
        self.schedule = schedule
        self.clock = clock
        self.settings = settings
        self.rtt_ms = rtt_ms
        self.slo_ms = slo_ms
        self.frame_interval_ms = frame_interval_ms
        self.gpu_workers = (gpu_workers * settings.gpu_fraction
                            if gpu_workers is not None and settings.gpu_fraction > 0 else None)
        self._tick = -1
        self._allocation = None
        self._capacity_mbps = math.nan
        self.solves = 0
        self.solve_us: list[float] = []

    def planner(self, vehicle: int) -> CoordinatedPlanner:
        return CoordinatedPlanner(self, vehicle)

    def capacity_mbps(self, now_ms: float) -> float:
        """The cell's capacity as measured over the last window (the first window before one passed)."""
        window_ms = self.settings.capacity_window_ms
        start_ms = max(0.0, now_ms - window_ms)
        return self.schedule.capacity_mbps(start_ms, start_ms + window_ms)

    def allocation(self, vehicle: int) -> Allocation:
        from onboard.planning import planning_rtt_ms
        from optimizer.cell import CellProblem, solve_cell

        now_ms = self.clock.now_ms()
        tick = math.floor(now_ms / self.frame_interval_ms)
        solve_us = 0.0
        if tick != self._tick or self._allocation is None:
            self._tick = tick
            self._capacity_mbps = self.capacity_mbps(now_ms) * self.settings.capacity_fraction
            problem = CellProblem(self.vehicles, self._capacity_mbps, planning_rtt_ms(self.rtt_ms), self.slo_ms,
                                  gpu_workers=self.gpu_workers, frame_rate_hz=1000.0 / self.frame_interval_ms,
                                  fairness=self.settings.fairness)
            self._allocation = solve_cell(problem)
            solve_us = float(self._allocation.solve_us)
            self.solves += 1
            self.solve_us.append(solve_us)
        mine = self._allocation.vehicles[self.vehicles[vehicle].name]
        return Allocation(dict(mine.choices), mine.utility, dict(mine.bandwidth_mbps), solve_us=solve_us,
                          extra={"planning_budget_mbps": float(sum(mine.bandwidth_mbps.values())),
                                 "cell_capacity_mbps": self._capacity_mbps})


class CoordinatedPlanner:
    """A vehicle's planner under the coordinator: its share of the cell's joint allocation (the
    agent's own estimates are not used)."""

    def __init__(self, coordinator: CellCoordinator, vehicle: int) -> None:
        self.coordinator = coordinator
        self.vehicle = vehicle

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float, bandwidth_samples_mbps) -> Allocation:
        return self.coordinator.allocation(self.vehicle)
