"""Per-frame allocation for the daemon: which option each camera uses, from the current estimates.

The policy spec (optimizer/policies.py) names the mode: `point` solves the allocation at the
point estimate of the uplink bandwidth with the spec's allocator; `quantile` hands the
bandwidth forecast (equally likely values) to the optimizer's `QuantilePlanner`, which plans at
the quantile that maximises expected utility, and uses the point planner until the forecast
has `quantile_min_samples` values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from avcloud.errors import UserError
from avcloud.types import Allocation, AllocationProblem, Option, Service
from optimizer.policies import PolicySpec

# Measured RTT moves by a few ms every frame; planning at it rounded up to this step keeps the exact
# solver's per-(options, RTT, SLO) preparation cached (a new budget is then one binary search) and
# errs on the safe side (a slightly higher RTT asks for slightly more bandwidth).
PLANNING_RTT_STEP_MS = 5.0


def planning_rtt_ms(measured_rtt_ms: float) -> float:
    return math.ceil(measured_rtt_ms / PLANNING_RTT_STEP_MS) * PLANNING_RTT_STEP_MS


def planning_slo(slo_ms: float, backlog_ms: float) -> float:
    """The deadline a frame plans with when the uplink still holds `backlog_ms` of the car's
    bytes: the SLO less that, rounded down to the RTT step (for the same reason: a handful of
    distinct values keeps the solver's preparation cached; rounding down is the safe side)."""
    if backlog_ms <= 0:
        return slo_ms
    return math.floor((slo_ms - backlog_ms) / PLANNING_RTT_STEP_MS) * PLANNING_RTT_STEP_MS


class AllocationPlanner(Protocol):
    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation: ...


def services_for_deadline(services: Sequence[Service], policy: PolicySpec | None,
                          frame_interval_ms: float | None) -> Callable[[float, float], tuple[Service, ...]]:
    """What the planners plan with at (RTT, SLO): the services themselves, or, for a policy with
    `stream_rate_cap` and a known frame interval, the stream's view of them
    (`optimizer.problem.StreamRateServices`)."""
    services = tuple(services)
    if policy is not None and policy.stream_rate_cap and frame_interval_ms is not None:
        from optimizer.problem import shared_stream_rate_services

        return shared_stream_rate_services(services, frame_interval_ms).at
    return lambda rtt_ms, slo_ms: services


class PointEstimatePlanner:
    """Solves the allocation at the estimated bandwidth with an `optimizer.allocators` allocator."""

    def __init__(self, services: Sequence[Service], allocator: Any,
                 services_at: Callable[[float, float], tuple[Service, ...]] | None = None) -> None:
        self.services = tuple(services)
        self.allocator = allocator
        self.services_at = services_at or services_for_deadline(self.services, None, None)

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation:
        rtt_ms = planning_rtt_ms(rtt_ms)
        return self.allocator.solve(AllocationProblem(self.services_at(rtt_ms, slo_ms), bandwidth_mbps, rtt_ms, slo_ms))


class QuantileModePlanner:
    """Plans at a quantile of the bandwidth forecast (`optimizer.quantile.QuantilePlanner`)."""

    def __init__(self, services: Sequence[Service], quantile_planner: Any, fallback: AllocationPlanner,
                 min_samples: int = 2, services_at: Callable[[float, float], tuple[Service, ...]] | None = None,
                 success_horizon_interval_ms: float | None = None) -> None:
        self.services = tuple(services)
        self.quantile_planner = quantile_planner
        self.fallback = fallback  # used until there are samples to forecast from
        self.min_samples = min_samples
        self.services_at = services_at or services_for_deadline(self.services, None, None)
        # The cameras' frame interval, for a policy that judges success over the deadline's frames.
        self.success_horizon_interval_ms = success_horizon_interval_ms

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation:
        if len(bandwidth_samples_mbps) < self.min_samples:
            return self.fallback.plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        rtt_ms = planning_rtt_ms(rtt_ms)
        return self.quantile_planner.plan(self.services_at(rtt_ms, slo_ms), rtt_ms, slo_ms, list(bandwidth_samples_mbps),
                                          self.horizon_intervals(rtt_ms, slo_ms))

    def horizon_intervals(self, rtt_ms: float, slo_ms: float) -> int:
        """Frame intervals a request's deadline spans, (SLO - RTT) // interval: its upload may use
        any of them. 1 without a success horizon."""
        if self.success_horizon_interval_ms is None:
            return 1
        return max(1, int((slo_ms - rtt_ms) // self.success_horizon_interval_ms))


class RepeatedPlanReuse:
    """A planner that returns a copy of its last allocation when a frame's inputs are the ones
    the last frame planned with (the same estimate, planning RTT and SLO, and forecast). A car
    that has not measured anything new since the last frame (most frames, when it sends little)
    then pays a comparison instead of a solve; the allocation is the one the solver gave, so the
    decisions are unchanged. The copy's `solve_us` is the time this frame's planning took."""

    def __init__(self, inner: AllocationPlanner) -> None:
        self.inner = inner
        self._last_key: tuple | None = None
        self._last_allocation: Allocation | None = None
        self.reused = 0

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float,
             bandwidth_samples_mbps: Sequence[float]) -> Allocation:
        started_ns = time.perf_counter_ns()
        key = (bandwidth_mbps, planning_rtt_ms(rtt_ms), slo_ms, tuple(bandwidth_samples_mbps))
        last = self._last_allocation
        if last is not None and key == self._last_key:
            self.reused += 1
            return _copy(last, solve_us=(time.perf_counter_ns() - started_ns) / 1000.0)
        allocation = self.inner.plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        # Kept as solved: the agent adds to the allocation it is handed (discovery, backlog).
        self._last_key = key
        self._last_allocation = _copy(allocation, allocation.solve_us)
        return allocation


def _copy(allocation: Allocation, solve_us: float) -> Allocation:
    return Allocation(dict(allocation.choices), allocation.utility, dict(allocation.bandwidth_mbps), solve_us,
                      dict(allocation.extra))


def onboard_only_services(cameras: Sequence[str], fallback_name: str) -> tuple[Service, ...]:
    """Services with only the on-car fallback (no profile table: nothing is ever sent)."""
    fallback = Option(name=fallback_name, size_mbit=0.0, runtime_ms=0.0, utility=0.0)
    return tuple(Service(name=camera, options=(fallback,)) for camera in cameras)


def build_planner(services: Sequence[Service], policy: PolicySpec,
                  frame_interval_ms: float | None = None) -> AllocationPlanner:
    """The planner a policy spec asks for, wired to the optimizer package. `frame_interval_ms`:
    the cameras' frame interval, for a policy with `stream_rate_cap`.

    The `oracle` planner needs the future of the uplink, which only a replay has: the replay
    builds it (avcloud/replay/simulator.py) and passes it in place of this one."""
    from optimizer.allocators import shared_allocator

    if policy.planner == "oracle":
        raise UserError(f"policy '{policy.name}' plans from the trace's future: it runs only in a replay")
    services = tuple(services)
    services_at = services_for_deadline(services, policy, frame_interval_ms)
    point = PointEstimatePlanner(services, shared_allocator(policy.allocator, services), services_at)
    if policy.planner == "point":
        return RepeatedPlanReuse(point)
    from optimizer.quantile import DEFAULT_QUANTILES, QuantilePlanner

    quantile_planner = QuantilePlanner(policy.quantiles or DEFAULT_QUANTILES, shared_allocator("exact", services),
                                       miss_cost=policy.miss_cost,
                                       horizon_partial_miss_cost=policy.horizon_partial_miss_cost)
    return RepeatedPlanReuse(QuantileModePlanner(services, quantile_planner, point, policy.quantile_min_samples,
                                                 services_at, frame_interval_ms if policy.success_horizon else None))
