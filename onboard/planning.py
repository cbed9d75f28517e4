"""Per-frame allocation for the daemon: which option each camera uses, from the current estimates.

Two modes (params.method): `exact` solves the multiple-choice knapsack at the point estimate of
the uplink bandwidth; `quantile` hands the recent bandwidth samples to the optimizer's
`QuantilePlanner`, which plans at the quantile that maximises expected utility.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from avcloud.types import Allocation, AllocationProblem, Option, Service

# Measured RTT moves by a few ms every frame; planning at it rounded up to this step keeps the exact
# solver's per-(options, RTT, SLO) preparation cached (a new budget is then one binary search) and
# errs on the safe side (a slightly higher RTT asks for slightly more bandwidth).
PLANNING_RTT_STEP_MS = 5.0


def planning_rtt_ms(measured_rtt_ms: float) -> float:
    return math.ceil(measured_rtt_ms / PLANNING_RTT_STEP_MS) * PLANNING_RTT_STEP_MS


class AllocationPlanner(Protocol):
    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation: ...


class PointEstimatePlanner:
    """Solves the allocation at the estimated bandwidth with an `optimizer.allocators` allocator."""

    def __init__(self, services: Sequence[Service], allocator: Any) -> None:
        self.services = tuple(services)
        self.allocator = allocator

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation:
        return self.allocator.solve(AllocationProblem(self.services, bandwidth_mbps, planning_rtt_ms(rtt_ms), slo_ms))


class QuantileModePlanner:
    """Plans at a quantile of the bandwidth forecast (`optimizer.quantile.QuantilePlanner`)."""

    def __init__(self, services: Sequence[Service], quantile_planner: Any, fallback: AllocationPlanner) -> None:
        self.services = tuple(services)
        self.quantile_planner = quantile_planner
        self.fallback = fallback  # used until there are samples to forecast from

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation:
        if len(bandwidth_samples_mbps) < 2:
            return self.fallback.plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        return self.quantile_planner.plan(self.services, planning_rtt_ms(rtt_ms), slo_ms, list(bandwidth_samples_mbps))


def onboard_only_services(cameras: Sequence[str], fallback_name: str) -> tuple[Service, ...]:
    """Services with only the on-car fallback (no profile table: nothing is ever sent)."""
    fallback = Option(name=fallback_name, size_mbit=0.0, runtime_ms=0.0, utility=0.0)
    return tuple(Service(name=camera, options=(fallback,)) for camera in cameras)


def build_planner(services: Sequence[Service], method: str = "exact", allocator_name: str = "exact",
                  quantile_planner: Any = None) -> AllocationPlanner:
    """The planner for params.method, wired to the optimizer package."""
    from optimizer.allocators import get_allocator

    point = PointEstimatePlanner(services, get_allocator(allocator_name))
    if method == "exact":
        return point
    if quantile_planner is None:
        from optimizer.quantile import QuantilePlanner

        quantile_planner = QuantilePlanner()
    return QuantileModePlanner(services, quantile_planner, point)
