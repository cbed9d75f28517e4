"""Allocation policies: one declarative spec per name, read by the daemon and by the replay.

A policy is everything that decides what a car sends: how it plans (the planner method and
the allocator), what it believes about its uplink (the estimator, its window and its start
value) and what it does when that belief is old (after `stale_after_ms` without a sample, a
plan that sends nothing gets one discovery request, a real request that measures the link
again; each one that times out unanswered doubles the wait before the next, up to
`max_discovery_wait_ms`, and any reply sets it back).

| name | planner | allocator | plans with |
|---|---|---|---|
| `onboard` | point | onboard | nothing: every camera on the on-car fallback |
| `naive` | point | naive | nothing: every camera sends its most accurate cloud option |
| `equal` | point | equal | point estimate; equal share per camera, best option within it |
| `turbo` | point | exact | point estimate: harmonic mean of the last samples (TURBO) |
| `turbo-q` | quantile | exact | forecast distribution; the quantile that maximises expected utility |
| `oracle` | oracle | exact | the trace's true capacity over the next frame interval (replay only) |

`oracle` with `oracle_lag_ms` set to one frame interval plans from the true capacity of the last
interval instead: a car that measured its link perfectly, a reference (not a bound: a planner
without foresight can beat it) for what better measurement would be worth. `turbo-q` with
`forecast_from_trace` is the same view handed to turbo-q's own forecaster and planner.

`onboard`, `naive` and `equal` are the published baselines: one request in flight per camera,
TURBO's critical bandwidth size / (SLO - RTT - runtime). `turbo`, `turbo-q` and `oracle` run
the agent as avcloud ships it: a camera's next upload may start once its previous one has left
the uplink (`max_in_flight_per_camera` 2), and options are planned at the rate of a camera that
sends every frame, size / min(slack, frame interval) (`stream_rate_cap`). `turbo` is TURBO's
planner (the point estimate, the exact allocation) on that agent, so that turbo-q's lead over it
is its forecast's alone; TURBO as published is `turbo` with `max_in_flight_per_camera=1
stream_rate_cap=false`. turbo-q also judges a plan's chance of arriving in time over the frame
intervals its deadline spans (`success_horizon`), and where they are several, counts a shortfall
over them as partial: the FIFO uplink still carries the frame's first bytes in time
(`horizon_partial_miss_cost`).

The onboard daemon takes a name (`-p policy:=turbo-q`) and optional field overrides; the replay
and the live replay take the same names, and every run records the full spec it used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from avcloud.errors import UserError
from optimizer.allocators import ALLOCATORS
from optimizer.bandwidth import DEFAULT_INTERVAL_MS, EwmaEstimator, HarmonicMeanEstimator, QuantileForecaster

PlannerMethod = Literal["point", "quantile", "oracle"]
EstimatorName = Literal["harmonic", "ewma"]
PLANNER_METHODS: tuple[str, ...] = ("point", "quantile", "oracle")
ESTIMATORS: tuple[str, ...] = ("harmonic", "ewma")


@dataclass(frozen=True)
class PolicySpec:
    """Every setting that makes one allocation policy; see the module docstring."""

    name: str
    planner: PlannerMethod = "point"
    allocator: str = "exact"  # optimizer.allocators registry name (point and oracle planners)
    estimator: EstimatorName = "harmonic"  # point estimate of the uplink (quantile: the forecaster)
    estimator_window: int = 5  # samples in the harmonic mean
    ewma_alpha: float = 0.3
    initial_estimate_mbps: float = 1.0  # planned with until the first sample
    # No sample this long and a plan that sends nothing: one discovery request. One frame interval
    # at 10 Hz: a car learns its link only in the intervals it uses (docs/BANDWIDTH.md), so an
    # interval without a sample is one without a view; over the sweep's shared traces 1000 ms
    # here gave turbo-q 20.36 and 80% of oracle's gain in 18 of 40 settings, 100 ms with the
    # backoff below 20.48 and 23 (with a backoff on every miss 20.44 and 20; with none, 25
    # requests into a 9 s outage instead of 8).
    stale_after_ms: float = 100.0
    # A discovery request that times out with no reply doubles the wait before the next, up to
    # this (TCP's retransmission backoff; never below `stale_after_ms`); any reply, late too,
    # sets it back to `stale_after_ms`, or longer where the smallest discovery request would hold
    # the uplink more than a quarter of the time (onboard/daemon.py). A dark link then gets at
    # most one a second.
    max_discovery_wait_ms: float = 1000.0
    ping_interval_ms: float = 1000.0  # RTT pings (inf: none, for a policy that never sends)
    quantile_window: int = 50  # one-step forecast errors the quantile planner sees
    quantile_min_samples: int = 2  # fewer samples: plan at the point estimate
    quantiles: tuple[float, ...] | None = None  # None: optimizer.quantile.DEFAULT_QUANTILES
    # Quantile planner: recalibrate the forecast from its own misses. Off by default: measured on
    # the bundled and shared traces, the raw forecast is already calibrated against the next sample
    # (12% / 49% / 88% below its P10 / P50 / P90), and recalibrating did not raise mAP.
    forecast_recalibration: bool = False
    # Quantile planner: a miss also costs this fraction of the plan's gain (its bytes delay the next
    # frames). 0.25 since the virtual uplink queue stopped counting a delay once per queued request:
    # over the sweep's 48 settings turbo-q 19.97 -> 20.11 mAP, below turbo - 0.2 in 1 setting
    # instead of 3, fewer misses than turbo in 83% instead of 92% (docs/BANDWIDTH.md).
    miss_cost: float = 0.25
    # Quantile planner: judge a plan's success on the mean capacity over the frame intervals its
    # deadline spans ((SLO - RTT) // frame interval, optimizer.quantile) instead of one interval.
    # On for turbo-q: over six windows of every measured trace it raised turbo-q's mAP at SLO 400
    # (the only SLO where the span exceeds one interval) by 0.36 points, in 13 of 18 settings.
    success_horizon: bool = False
    # Quantile planner with a success horizon: where the deadline spans more than one frame
    # interval, a horizon that carries only part of a plan's bytes still gets its first ones
    # through (one FIFO uplink), and the bytes that miss cost this fraction of the plan's gain
    # (optimizer.quantile); None: all-or-nothing with `miss_cost` at every horizon. The cost
    # trades mAP for misses (docs/BANDWIDTH.md). 0.5 for turbo-q: over the 48 SLO 400 settings of
    # the shared and held-out traces, against 0.75, turbo-q 22.75 -> 22.80 and 20.42 -> 20.53 mAP,
    # below turbo - 0.2 in 1 -> 0 and 1 -> 0, fewer misses than turbo in 17 -> 13 of 18 and 27
    # -> 26 of 30; against the all-or-nothing model (before 0.75) it was below turbo - 0.2 in 5.
    horizon_partial_miss_cost: float | None = None
    # Oracle only: plan for this fraction of the true capacity; the replay tries each and keeps the
    # best in hindsight (planning at exactly the capacity is not the best one can do).
    oracle_capacity_fractions: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    # Oracle only: plan from the capacity of the frame interval that began this long ago instead of
    # the coming one. 0 is the upper bound; one frame interval is a car that knew its last interval
    # exactly (what a perfect measurement could tell it; a reference, not a bound).
    oracle_lag_ms: float = 0.0
    # Quantile planner, replay only: its forecaster is fed the trace's true capacity of each frame
    # interval, the one that began `oracle_lag_ms` ago, instead of the car's samples. turbo-q's
    # planner with a perfect view of its link: a reference for how much of turbo-q's shortfall is
    # that view (benchmarks/bench_policies.py), not a policy a car can run.
    forecast_from_trace: bool = False
    # Requests in flight per camera: with 2, a camera's next upload starts once the previous one
    # has left the uplink (by the car's estimate) and overlaps its cloud run and reply, which
    # pays when RTT + cloud runtime exceed the frame interval. 1 waits for the reply.
    max_in_flight_per_camera: int = 1
    # Plan every option at size / min(slack, frame interval), the rate of a camera that sends every
    # frame (optimizer.problem.StreamRateServices), instead of TURBO's size / slack.
    stream_rate_cap: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.planner in PLANNER_METHODS, f"planner must be one of {', '.join(PLANNER_METHODS)}"),
            (self.allocator in ALLOCATORS, f"allocator must be one of {', '.join(ALLOCATORS)}"),
            (self.estimator in ESTIMATORS, f"estimator must be one of {', '.join(ESTIMATORS)}"),
            (isinstance(self.estimator_window, int) and self.estimator_window >= 1, "estimator_window must be >= 1"),
            (0 < self.ewma_alpha <= 1, "ewma_alpha must be in (0, 1]"),
            (math.isfinite(self.initial_estimate_mbps) and self.initial_estimate_mbps > 0,
             "initial_estimate_mbps must be a finite number > 0"),
            (self.stale_after_ms > 0 and not math.isnan(self.stale_after_ms), "stale_after_ms must be > 0"),
            (self.max_discovery_wait_ms > 0 and not math.isnan(self.max_discovery_wait_ms),
             "max_discovery_wait_ms must be > 0"),
            (self.ping_interval_ms > 0 and not math.isnan(self.ping_interval_ms), "ping_interval_ms must be > 0"),
            (isinstance(self.quantile_window, int) and self.quantile_window >= 2, "quantile_window must be >= 2"),
            (isinstance(self.quantile_min_samples, int) and self.quantile_min_samples >= 1,
             "quantile_min_samples must be >= 1"),
            (self.quantiles is None or (len(self.quantiles) > 0 and all(0 <= q <= 1 for q in self.quantiles)),
             "quantiles must be numbers in [0, 1]"),
            (math.isfinite(self.miss_cost) and self.miss_cost >= 0, "miss_cost must be a finite number >= 0"),
            (self.horizon_partial_miss_cost is None or _is_finite_number_at_least_0(self.horizon_partial_miss_cost),
             "horizon_partial_miss_cost must be a finite number >= 0 or null"),
            (len(self.oracle_capacity_fractions) > 0 and all(f > 0 for f in self.oracle_capacity_fractions),
             "oracle_capacity_fractions must be numbers > 0"),
            (math.isfinite(self.oracle_lag_ms) and self.oracle_lag_ms >= 0, "oracle_lag_ms must be a finite number >= 0"),
            (isinstance(self.max_in_flight_per_camera, int) and not isinstance(self.max_in_flight_per_camera, bool)
             and 1 <= self.max_in_flight_per_camera <= 8, "max_in_flight_per_camera must be an integer in 1..8"),
            (isinstance(self.stream_rate_cap, bool), "stream_rate_cap must be true or false"),
            (isinstance(self.success_horizon, bool), "success_horizon must be true or false"),
            (isinstance(self.forecast_from_trace, bool), "forecast_from_trace must be true or false"),
            (not self.forecast_from_trace or self.planner == "quantile",
             "forecast_from_trace needs the quantile planner"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(f"policy '{self.name}': {message}")

    @property
    def measures(self) -> bool:
        """Whether the policy's plan depends on its own uplink measurements."""
        return self.planner != "oracle" and self.allocator not in ("onboard", "naive")

    def with_overrides(self, overrides: Mapping[str, Any]) -> PolicySpec:
        """A copy with some fields replaced; UserError naming an unknown field or a bad value."""
        known = {item.name for item in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"policy '{self.name}': unknown field '{unknown[0]}' (fields: {', '.join(sorted(known))})")
        values = dict(overrides)
        for key in ("quantiles", "oracle_capacity_fractions"):
            if values.get(key) is not None:
                values[key] = tuple(float(value) for value in values[key])
        try:
            return dataclasses.replace(self, **values)
        except TypeError as error:
            raise UserError(f"policy '{self.name}': {error}") from None

    def to_json_dict(self) -> dict[str, Any]:
        # Every field is a plain value or a tuple of numbers: no deep copy (`dataclasses.asdict`
        # costs a fleet of 1000 cars a fifth of a second).
        data = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        for key in ("quantiles", "oracle_capacity_fractions"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


def _is_finite_number_at_least_0(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec for spec in (
        PolicySpec("onboard", allocator="onboard", ping_interval_ms=math.inf),
        PolicySpec("naive", allocator="naive"),
        PolicySpec("equal", allocator="equal"),
        # avcloud's agent: it pipelines uploads and plans at the stream rate. TURBO's planner, the
        # forecast and the oracle all run on it, so that each one's gain over another is the
        # planner's own.
        PolicySpec("turbo", allocator="exact", max_in_flight_per_camera=2, stream_rate_cap=True),
        PolicySpec("turbo-q", planner="quantile", max_in_flight_per_camera=2, stream_rate_cap=True,
                   success_horizon=True, horizon_partial_miss_cost=0.5),
        PolicySpec("oracle", planner="oracle", max_in_flight_per_camera=2, stream_rate_cap=True),
    )
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
# The daemon plans with this policy unless its params name another.
DEFAULT_POLICY = "turbo-q"


def get_policy(name: str, overrides: Mapping[str, Any] | None = None) -> PolicySpec:
    """The named policy, with optional field overrides; UserError naming the choices."""
    spec = POLICIES.get(name)
    if spec is None:
        raise UserError(f"unknown policy '{name}' (choose from {', '.join(POLICY_NAMES)})")
    return spec.with_overrides(overrides) if overrides else spec


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings (as typed on a command line) as policy overrides; the values are read
    as YAML scalars or lists (2, 0.5, true, [0.1, 0.2]). UserError naming a malformed one; the
    fields and values are checked when applied (`PolicySpec.with_overrides`)."""
    import yaml

    overrides: dict[str, Any] = {}
    for assignment in assignments:
        field, separator, text = assignment.partition("=")
        if not separator or not field.strip() or not text.strip():
            raise UserError(f"policy setting '{assignment}': expected FIELD=VALUE, e.g. max_in_flight_per_camera=2")
        try:
            overrides[field.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"policy setting '{assignment}': cannot read the value") from None
    get_policy(DEFAULT_POLICY, overrides)  # unknown field or bad value: one line now, before any work
    return overrides


def check_policy_names(names: Sequence[str]) -> tuple[str, ...]:
    """Validate and de-duplicate policy names, keeping the canonical order."""
    for name in names:
        get_policy(name)
    return tuple(name for name in POLICY_NAMES if name in set(names))


def make_estimator(spec: PolicySpec, frame_interval_ms: float | None = None):
    """The bandwidth estimator the spec asks for (`observe(time_ms, mbps, transfer_ms)`,
    `estimate_mbps()`); a forecaster forecasts the next `frame_interval_ms` (default 100 ms)."""
    if spec.forecast_from_trace:
        raise UserError(f"policy '{spec.name}': forecast_from_trace reads the trace's capacity: it runs only in a replay")
    if spec.planner == "quantile":
        return QuantileForecaster(window=spec.quantile_window, alpha=spec.ewma_alpha,
                                  recalibrate=spec.forecast_recalibration,
                                  interval_ms=frame_interval_ms or DEFAULT_INTERVAL_MS)
    if spec.estimator == "ewma":
        return EwmaEstimator(spec.ewma_alpha)
    return HarmonicMeanEstimator(spec.estimator_window)
