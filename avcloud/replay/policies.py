"""The allocation policies a replay compares, all driven by the same simulator.

| name | what it plans with | allocation |
|---|---|---|
| `onboard` | nothing | every camera on the on-car fallback; sends nothing, measures nothing |
| `naive` | nothing | every camera sends its most accurate cloud configuration every frame |
| `equal` | point estimate (as turbo) | equal bandwidth share per camera, best option within it |
| `turbo` | point estimate: harmonic mean of the last samples | exact multiple-choice knapsack (TURBO) |
| `turbo-q` | forecast distribution of recent samples | knapsack at the quantile that maximises expected utility |
| `oracle` | the trace's true capacity over the coming frame interval (x the best fraction in hindsight) | exact knapsack |

Only `oracle` is given the trace. Every other policy sees `ThroughputSample`s of its own
transfers, nothing else. Before its first sample a measuring policy plans with
`INITIAL_ESTIMATE_MBPS`. A measuring policy whose allocation sends nothing would never measure
again after a bad spell, so when it has learnt nothing for `PROBE_INTERVAL_MS` it sends its
cheapest cloud option on one camera (round robin) as a probe; the probe is a real request and its
result is used when on time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from avcloud.errors import UserError
from avcloud.link import DeliverySchedule
from avcloud.replay.simulator import PlanningContext, PolicyDecision, ThroughputSample
from avcloud.types import Allocation, AllocationProblem, Service, critical_bandwidth_mbps

POLICY_NAMES: tuple[str, ...] = ("onboard", "naive", "equal", "turbo", "turbo-q", "oracle")
# A conservative start: below the mean of every LTE uplink trace we ship or test against.
INITIAL_ESTIMATE_MBPS = 1.0
# TURBO-style point estimate: harmonic mean of this many most recent samples (robust to spikes).
POINT_ESTIMATE_SAMPLES = 5
# turbo-q forecasts from this many most recent samples.
FORECAST_SAMPLES = 20
PROBE_INTERVAL_MS = 1000.0
# The oracle is run at each of these fractions of the true capacity; the best in hindsight counts.
ORACLE_CAPACITY_FRACTIONS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _allocator(name: str):
    from optimizer.allocators import get_allocator

    return get_allocator(name)


class OnboardPolicy:
    """Never offload."""

    name = "onboard"

    def __init__(self) -> None:
        self._allocator = _allocator("onboard")

    def plan(self, context: PlanningContext) -> PolicyDecision:
        problem = AllocationProblem(context.services, 0.0, context.rtt_ms, context.slo_ms)
        return PolicyDecision(self._allocator.solve(problem), budget_mbps=0.0)

    def observe(self, sample: ThroughputSample) -> None:
        pass


class NaivePolicy:
    """Every camera to its most accurate cloud configuration, every frame, whatever the uplink."""

    name = "naive"

    def __init__(self) -> None:
        self._allocator = _allocator("naive")

    def plan(self, context: PlanningContext) -> PolicyDecision:
        # The budget is ignored by this allocator: it sends whatever the uplink.
        problem = AllocationProblem(context.services, 0.0, context.rtt_ms, context.slo_ms)
        return PolicyDecision(self._allocator.solve(problem))

    def observe(self, sample: ThroughputSample) -> None:
        pass


class MeasuringPolicy:
    """Base of the policies that plan from their own measurements, with probing after silence."""

    name = "measuring"

    def __init__(self, probe_interval_ms: float = PROBE_INTERVAL_MS) -> None:
        self.probe_interval_ms = probe_interval_ms
        self._last_learnt_ms = -math.inf
        self._probe_camera = 0

    def observe(self, sample: ThroughputSample) -> None:
        self._last_learnt_ms = sample.observed_ms
        self._record(sample)

    def _record(self, sample: ThroughputSample) -> None:
        raise NotImplementedError

    def _allocate(self, context: PlanningContext) -> PolicyDecision:
        raise NotImplementedError

    def plan(self, context: PlanningContext) -> PolicyDecision:
        decision = self._allocate(context)
        sends_nothing = all(_is_fallback(context.services, camera, option)
                            for camera, option in decision.allocation.choices.items())
        if sends_nothing and context.now_ms - self._last_learnt_ms >= self.probe_interval_ms:
            self._add_probe(context, decision.allocation)
            # Waiting for the probe's answer before probing again.
            self._last_learnt_ms = context.now_ms
        return decision

    def _add_probe(self, context: PlanningContext, allocation: Allocation) -> None:
        service = context.services[self._probe_camera % len(context.services)]
        self._probe_camera += 1
        fallback_utility = max(option.utility for option in service.options if option.is_fallback)
        # A probe is a real request: only one whose result would beat the on-car one is worth it.
        reachable = [option for option in service.options if not option.is_fallback
                     and option.utility > fallback_utility and math.isfinite(
                         critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, context.rtt_ms, context.slo_ms))]
        if not reachable:
            return
        cheapest = min(reachable, key=lambda option: (option.size_mbit, -option.utility))
        allocation.choices[service.name] = cheapest.name
        allocation.bandwidth_mbps[service.name] = critical_bandwidth_mbps(
            cheapest.size_mbit, cheapest.runtime_ms, context.rtt_ms, context.slo_ms)
        allocation.extra["probe"] = service.name


def _is_fallback(services: Sequence[Service], camera: str, option_name: str) -> bool:
    for service in services:
        if service.name == camera:
            return any(option.name == option_name and option.is_fallback for option in service.options)
    return True


class PointEstimatePolicy(MeasuringPolicy):
    """Allocates for the point estimate of recent throughput (`turbo`: exact; `equal`: equal split)."""

    def __init__(self, name: str, allocator_name: str, initial_estimate_mbps: float = INITIAL_ESTIMATE_MBPS,
                 probe_interval_ms: float = PROBE_INTERVAL_MS) -> None:
        from optimizer.bandwidth import HarmonicMeanEstimator

        super().__init__(probe_interval_ms)
        self.name = name
        self._allocator = _allocator(allocator_name)
        self._estimator = HarmonicMeanEstimator(POINT_ESTIMATE_SAMPLES)
        self._initial_estimate_mbps = initial_estimate_mbps

    def _record(self, sample: ThroughputSample) -> None:
        self._estimator.observe(sample.observed_ms, sample.throughput_mbps)

    def _allocate(self, context: PlanningContext) -> PolicyDecision:
        estimate = self._estimator.estimate_mbps()
        budget = self._initial_estimate_mbps if estimate is None else float(estimate)
        problem = AllocationProblem(context.services, budget, context.rtt_ms, context.slo_ms)
        return PolicyDecision(self._allocator.solve(problem), budget_mbps=budget, estimate_mbps=budget)


class QuantilePolicy(MeasuringPolicy):
    """turbo-q: plan at the forecast quantile that maximises expected utility over recent samples."""

    name = "turbo-q"

    def __init__(self, initial_estimate_mbps: float = INITIAL_ESTIMATE_MBPS,
                 probe_interval_ms: float = PROBE_INTERVAL_MS) -> None:
        from optimizer.bandwidth import QuantileForecaster
        from optimizer.quantile import QuantilePlanner

        super().__init__(probe_interval_ms)
        self._forecaster = QuantileForecaster(FORECAST_SAMPLES)
        self._planner = QuantilePlanner()
        self._exact = _allocator("exact")
        self._initial_estimate_mbps = initial_estimate_mbps

    def _record(self, sample: ThroughputSample) -> None:
        self._forecaster.observe(sample.observed_ms, sample.throughput_mbps)

    def _allocate(self, context: PlanningContext) -> PolicyDecision:
        forecast_mbps = self._forecaster.samples_mbps()
        if forecast_mbps.shape[0] == 0:
            budget = self._initial_estimate_mbps
            problem = AllocationProblem(context.services, budget, context.rtt_ms, context.slo_ms)
            return PolicyDecision(self._exact.solve(problem), budget_mbps=budget, estimate_mbps=budget)
        allocation = self._planner.plan(context.services, context.rtt_ms, context.slo_ms, forecast_mbps)
        budget = float(allocation.extra.get("planning_budget_mbps", math.nan))
        estimate = self._forecaster.estimate_mbps()
        return PolicyDecision(allocation, budget_mbps=budget,
                              estimate_mbps=math.nan if estimate is None else float(estimate))


class OraclePolicy:
    """The upper bound, and the only policy given the trace: it plans for the true capacity of the
    coming frame interval times `capacity_fraction`. The replay runs it at each of
    `ORACLE_CAPACITY_FRACTIONS` and keeps the best in hindsight (`job.best_oracle_run`): planning at
    exactly the capacity is not the best one can do, because TURBO's critical bandwidth,
    size / (SLO - RTT - runtime), leaves out the on-car encode time and the rate a 10 Hz stream
    needs when that slack exceeds the frame interval, and because a frame whose camera still
    waits for a reply goes out late."""

    name = "oracle"

    def __init__(self, schedule: DeliverySchedule, capacity_fraction: float = 1.0) -> None:
        self._schedule = schedule
        self.capacity_fraction = capacity_fraction
        self._allocator = _allocator("exact")

    def plan(self, context: PlanningContext) -> PolicyDecision:
        capacity = self._schedule.capacity_mbps(context.now_ms, context.now_ms + context.frame_interval_ms)
        budget = capacity * self.capacity_fraction
        problem = AllocationProblem(context.services, budget, context.rtt_ms, context.slo_ms)
        return PolicyDecision(self._allocator.solve(problem), budget_mbps=budget, estimate_mbps=capacity)

    def observe(self, sample: ThroughputSample) -> None:
        pass


def make_policy(name: str, schedule: DeliverySchedule) -> object:
    """A fresh policy by name. Only `oracle` receives the schedule."""
    factories: dict[str, Callable[[], object]] = {
        "onboard": OnboardPolicy,
        "naive": NaivePolicy,
        "equal": lambda: PointEstimatePolicy("equal", "equal"),
        "turbo": lambda: PointEstimatePolicy("turbo", "exact"),
        "turbo-q": QuantilePolicy,
        "oracle": lambda: OraclePolicy(schedule),
    }
    if name not in factories:
        raise UserError(f"unknown policy '{name}' (choose from {', '.join(POLICY_NAMES)})")
    return factories[name]()


def check_policy_names(names: Sequence[str]) -> tuple[str, ...]:
    """Validate and de-duplicate policy names, keeping the canonical order."""
    unknown = [name for name in names if name not in POLICY_NAMES]
    if unknown:
        raise UserError(f"unknown policy '{unknown[0]}' (choose from {', '.join(POLICY_NAMES)})")
    return tuple(name for name in POLICY_NAMES if name in set(names))
