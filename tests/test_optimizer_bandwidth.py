"""Bandwidth estimators and the quantile planner."""

from __future__ import annotations

import numpy as np
import pytest

from avcloud.errors import DataError
from avcloud.types import AllocationProblem, Option, Service
from optimizer.allocators import ExactAllocator
from optimizer.bandwidth import EwmaEstimator, HarmonicMeanEstimator, QuantileForecaster
from optimizer.quantile import QuantilePlanner


def test_estimators_return_none_before_any_sample():
    for estimator in (EwmaEstimator(0.5), HarmonicMeanEstimator(3), QuantileForecaster(10)):
        assert estimator.estimate_mbps() is None
    forecaster = QuantileForecaster(10)
    assert forecaster.quantile_mbps(0.5) is None
    assert forecaster.forecast() == {"p10": None, "p50": None, "p90": None}


def test_ewma_follows_its_recursion():
    estimator = EwmaEstimator(alpha=0.25)
    for time_ms, sample in enumerate([8.0, 16.0, 0.0]):
        estimator.observe(float(time_ms), sample)
    # 8 -> 8 + 0.25 * (16 - 8) = 10 -> 10 + 0.25 * (0 - 10) = 7.5
    assert estimator.estimate_mbps() == pytest.approx(7.5)


def test_harmonic_mean_of_last_window_resists_bursts():
    estimator = HarmonicMeanEstimator(window=3)
    for time_ms, sample in enumerate([1.0, 10.0, 10.0, 100.0]):
        estimator.observe(float(time_ms), sample)
    # Last three: 10, 10, 100 -> 3 / (0.1 + 0.1 + 0.01) = 14.29, far below their mean of 40.
    assert estimator.estimate_mbps() == pytest.approx(3 / 0.21)
    estimator.observe(4.0, 0.0)
    assert estimator.estimate_mbps() == 0.0


def test_samples_must_be_ordered_finite_and_non_negative():
    estimator = EwmaEstimator()
    estimator.observe(10.0, 5.0)
    with pytest.raises(ValueError, match="time order"):
        estimator.observe(5.0, 5.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        estimator.observe(11.0, float("nan"))
    with pytest.raises(ValueError, match="finite number >= 0"):
        HarmonicMeanEstimator().observe(0.0, -1.0)


def test_quantile_forecaster_brackets_a_noisy_link():
    rng = np.random.default_rng(3)
    forecaster = QuantileForecaster(window=200, alpha=0.2)
    realised = []
    for step in range(400):
        sample = 20.0 * rng.lognormal(0.0, 0.3)
        if step >= 200:
            realised.append(sample)
        forecaster.observe(step * 100.0, sample)
    forecast = forecaster.forecast()
    assert forecast["p10"] < forecast["p50"] < forecast["p90"]
    assert 14.0 < forecast["p50"] < 28.0
    # The interval should hold roughly 80% of fresh draws from the same link.
    fresh = 20.0 * rng.lognormal(0.0, 0.3, 5000)
    inside = np.mean((fresh >= forecast["p10"]) & (fresh <= forecast["p90"]))
    assert 0.65 < inside < 0.95
    assert forecaster.estimate_mbps() == pytest.approx(forecast["p50"])


def test_quantile_forecaster_scales_with_the_level():
    low, high = QuantileForecaster(50), QuantileForecaster(50)
    pattern = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2] * 5
    for step, factor in enumerate(pattern):
        low.observe(step * 100.0, 5.0 * factor)
        high.observe(step * 100.0, 50.0 * factor)
    # Multiplicative errors: ten times the level gives (about) ten times every quantile.
    for q in (0.1, 0.5, 0.9):
        assert high.quantile_mbps(q) == pytest.approx(10 * low.quantile_mbps(q), rel=0.01)


def test_only_transfers_shorter_than_the_interval_have_their_errors_scaled():
    pattern = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2] * 5
    whole, long_transfers, short_transfers = (QuantileForecaster(50, interval_ms=interval)
                                              for interval in (None, 100.0, 100.0))
    for step, factor in enumerate(pattern):
        whole.observe(step * 100.0, 5.0 * factor, transfer_ms=25.0)
        long_transfers.observe(step * 100.0, 5.0 * factor, transfer_ms=150.0)
        short_transfers.observe(step * 100.0, 5.0 * factor, transfer_ms=25.0)
    assert long_transfers.forecast() == whole.forecast()
    # A quarter of the interval: errors at half their size, the median where the level is.
    narrow, wide = short_transfers.forecast(), whole.forecast()
    assert wide["p90"] / wide["p10"] == pytest.approx((narrow["p90"] / narrow["p10"]) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="interval_ms"):
        QuantileForecaster(interval_ms=0.0)


def test_quantile_forecaster_with_one_sample_forecasts_that_sample():
    forecaster = QuantileForecaster()
    forecaster.observe(0.0, 12.5)
    assert forecaster.forecast() == {"p10": 12.5, "p50": 12.5, "p90": 12.5}


# ------------------------------------------------------------------- quantile planner

SERVICES = (
    Service("FRONT", (Option("car", 0.0, 0.0, 0.3), Option("cloud", 1.0, 30.0, 0.8))),
    Service("SIDE", (Option("car", 0.0, 0.0, 0.3), Option("cloud", 1.0, 30.0, 0.5))),
)
# RTT 20, SLO 150: each cloud option needs 1.0 / 0.1 = 10 Mbps.


def test_planner_picks_the_quantile_with_highest_expected_utility():
    # Bandwidth is 25 Mbps 60% of the time and 15 Mbps otherwise.
    samples = np.array([15.0] * 40 + [25.0] * 60)
    plan = QuantilePlanner().plan(SERVICES, 20.0, 150.0, samples)
    # Both cloud (1.3, needs 20) succeeds 60%: 0.6 * 1.3 + 0.4 * 0.6 = 1.02.
    # FRONT only (1.1, needs 10) always succeeds: 1.1. The planner must take the safe plan.
    assert plan.choices == {"FRONT": "cloud", "SIDE": "car"}
    assert plan.extra["expected_utility"] == pytest.approx(1.1)
    assert plan.extra["success_probability"] == 1.0
    assert plan.extra["planning_budget_mbps"] < 20.0
    assert plan.extra["planning_quantile"] <= 0.4


def test_planner_takes_the_risk_when_it_pays():
    # Bandwidth is 25 Mbps 90% of the time: 0.9 * 1.3 + 0.1 * 0.6 = 1.23 > 1.1.
    samples = np.array([15.0] * 10 + [25.0] * 90)
    plan = QuantilePlanner().plan(SERVICES, 20.0, 150.0, samples)
    assert plan.choices == {"FRONT": "cloud", "SIDE": "cloud"}
    assert plan.extra["expected_utility"] == pytest.approx(1.23)
    assert plan.extra["planning_budget_mbps"] >= 20.0


def test_planner_equals_exact_solve_when_bandwidth_is_certain():
    samples = np.full(30, 12.0)
    plan = QuantilePlanner().plan(SERVICES, 20.0, 150.0, samples)
    exact = ExactAllocator().solve(AllocationProblem(SERVICES, 12.0, 20.0, 150.0))
    assert plan.choices == exact.choices
    assert plan.extra["planning_budget_mbps"] == 12.0


def test_planner_rejects_empty_or_bad_samples():
    with pytest.raises(DataError, match="no samples"):
        QuantilePlanner().plan(SERVICES, 20.0, 150.0, np.array([]))
    with pytest.raises(DataError, match="finite"):
        QuantilePlanner().plan(SERVICES, 20.0, 150.0, np.array([1.0, np.nan]))


@pytest.mark.parametrize("partial_miss_cost, horizon_intervals", [(None, 1), (0.75, 3)])
def test_quantile_planner_from_the_cached_frontier_equals_one_solve_per_quantile(
        monkeypatch, partial_miss_cost, horizon_intervals):
    from optimizer.exact import PreparedServices

    rng = np.random.default_rng(1)
    instances = []
    for _ in range(150):
        services = []
        for position in range(int(rng.integers(1, 6))):
            options = [Option("fb", 0.0, 0.0, float(rng.uniform(0, 0.3)))]
            options += [Option(f"o{k}", float(rng.uniform(0.05, 3)), float(rng.uniform(5, 80)), float(rng.uniform(0, 1)))
                        for k in range(int(rng.integers(1, 8)))]
            services.append(Service(f"s{position}", tuple(options), weight=float(rng.uniform(0.5, 2))))
        instances.append((tuple(services), rng.lognormal(1.5, 0.6, size=int(rng.integers(2, 40)))))
    def plans():
        planner = QuantilePlanner(miss_cost=0.25, horizon_partial_miss_cost=partial_miss_cost)
        return [planner.plan(services, 50.0, 200.0, samples, horizon_intervals) for services, samples in instances]

    fast = plans()
    monkeypatch.setattr(PreparedServices, "whole_frontier_states", lambda self, budgets: None)
    slow = plans()
    for one, other in zip(fast, slow, strict=True):
        assert one.choices == other.choices
        assert one.extra["expected_utility"] == pytest.approx(other.extra["expected_utility"], abs=1e-9)
        assert one.extra["planning_quantile"] == other.extra["planning_quantile"]


def test_a_deadline_spanning_several_intervals_takes_a_risk_one_interval_would_not():
    # One camera: the cloud option needs 0.45 Mb / 100 ms = 4.5 Mbps. The forecast is 1..10 Mbps,
    # equally likely: one interval carries it 60% of the time, which a miss cost of 2 does not pay
    # for; the mean of 4 independent intervals carries it about 3 times in 4, which does.
    services = (Service("FRONT", (Option("car", 0.0, 0.0, 0.2), Option("cloud", 0.45, 0.0, 0.6))),)
    samples = np.arange(1.0, 11.0)
    planner = QuantilePlanner(miss_cost=2.0)
    one_interval = planner.plan(services, 0.0, 100.0, samples)
    four_intervals = planner.plan(services, 0.0, 100.0, samples, horizon_intervals=4)
    assert one_interval.choices == {"FRONT": "car"}
    assert four_intervals.choices == {"FRONT": "cloud"}
    assert 0.65 < four_intervals.extra["success_probability"] < 0.9
    again = QuantilePlanner(miss_cost=2.0).plan(services, 0.0, 100.0, samples, horizon_intervals=4)
    assert again.extra["success_probability"] == four_intervals.extra["success_probability"]  # fixed draws


def test_a_shortfall_over_a_horizon_loses_only_the_bytes_it_cannot_carry():
    # One camera whose cloud option needs 0.45 Mb / 100 ms = 4.5 Mbps; the forecast is 3..5 Mbps,
    # equally likely. The mean of three intervals rarely carries it all, so all or nothing (miss
    # cost 0.5) keeps the car's result; but the FIFO uplink carries about 4 / 4.5 of its bytes in
    # time even then, worth more than the cost of the rest.
    services = (Service("FRONT", (Option("car", 0.0, 0.0, 0.2), Option("cloud", 0.45, 0.0, 0.6))),)
    samples = np.linspace(3.0, 5.0, 21)
    planner = QuantilePlanner(miss_cost=0.5, horizon_partial_miss_cost=0.25)
    spanning = planner.plan(services, 0.0, 100.0, samples, horizon_intervals=3)
    assert spanning.choices == {"FRONT": "cloud"}
    success = spanning.extra["success_probability"]
    assert success < 0.2
    # Between the plan's worst carried share (3 / 4.5) and all of it, less the cost of the misses.
    gain = 0.4
    assert 0.2 + gain * (3.0 / 4.5 - 0.25 * (1 - success)) < spanning.extra["expected_utility"] < \
        0.2 + gain * (1.0 - 0.25 * (1 - success))
    # Over one interval the spill-over lands in the next frame's: all or nothing, as before.
    assert planner.plan(services, 0.0, 100.0, samples, horizon_intervals=1).choices == {"FRONT": "car"}
    # Without the partial model the horizon alone does not take this risk.
    assert QuantilePlanner(miss_cost=0.5).plan(services, 0.0, 100.0, samples, horizon_intervals=3).choices == {
        "FRONT": "car"}
    # Nor with a cost of the missed bytes above what the carried share is worth.
    cautious = QuantilePlanner(miss_cost=0.5, horizon_partial_miss_cost=2.0)
    assert cautious.plan(services, 0.0, 100.0, samples, horizon_intervals=3).choices == {"FRONT": "car"}


def test_a_success_horizon_spans_the_frames_of_the_deadline():
    from onboard.planning import build_planner
    from optimizer.policies import get_policy

    services = (Service("FRONT", (Option("car", 0.0, 0.0, 0.2), Option("cloud", 0.45, 0.0, 0.6))),)
    spanning = build_planner(services, get_policy("turbo-q"), frame_interval_ms=100.0)  # turbo-q's default
    assert [spanning.inner.horizon_intervals(50.0, slo_ms) for slo_ms in (100.0, 200.0, 400.0)] == [1, 1, 3]
    one_frame = build_planner(services, get_policy("turbo-q", {"success_horizon": False}), frame_interval_ms=100.0)
    assert one_frame.inner.horizon_intervals(50.0, 400.0) == 1
