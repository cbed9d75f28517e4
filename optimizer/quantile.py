"""Planning under an uncertain uplink (beyond TURBO, which trusts its point estimate).

Given a forecast distribution of the next interval's bandwidth (equally likely samples, e.g.
`QuantileForecaster.samples_mbps()`), `QuantilePlanner` solves the exact allocation at each
quantile q of a grid, and keeps the allocation with the highest expected utility over the
forecast.

Model of a miss. The allocation's services share one uplink. If the realised bandwidth b covers
the total critical bandwidth of the allocation, every cloud result arrives in time: sending in
order of deadline slack (earliest deadline first), service k finishes after
sum_{j<=k} S_j / b <= slack_k * sum_{j<=k} b_c,j / b <= slack_k, because S_j = b_c,j * slack_j
and slack_j <= slack_k. If b falls short of the total, we count every service that sends as
missing its deadline and falling back to its on-car result. That is exact when the link is
shared in proportion to demand (every transfer is slowed by the same factor b / total, so each
one, having been given exactly its critical bandwidth, is late) and a lower bound for any other
order, where some early senders might still make it. Services that chose the fallback keep it
either way. So, with P = P(b >= total), U the allocation's utility and F the all-fallback one:
    expected utility = P * U + (1 - P) * (F - c * (U - F)).
A miss costs more than its fallback: the bytes it put on the uplink are still there when the
next frame wants to send (the car plans around its backlog, so the next frame sends less).
`miss_cost` c is that loss as a fraction of the allocation's gain; 0 is the plain model.

Horizon. With a deadline that spans k frame intervals (`horizon_intervals`: k = (SLO - RTT) //
interval under the policy field `success_horizon`, on for turbo-q), a frame's requests may use
the uplink over those k intervals, and a shortfall in one can be made up in the next. P is then
taken over the mean capacity of k intervals, each drawn independently from the forecast
(`HORIZON_DRAWS` fixed draws, so a plan is deterministic). Independence understates how long a
slow spell lasts on a real link; the miss cost and the lower quantiles on the grid keep that risk
priced.

Partial shortfalls over a horizon (`horizon_partial_miss_cost` h, set for turbo-q). The uplink is
one FIFO queue, so a horizon whose mean capacity b carries only part of a plan's total sends the
frame's first bytes in time and misses the rest: the plan keeps about the share min(1,
limit(b) / total) of its gain, the fluid view of that queue (limit(b) is the largest total b
carries, see `budget_limit_mbps`). The bytes that miss still delay the next frames, at h times the
gain, so
    expected utility = F + (U - F) * (E[min(1, limit(b) / total)] - h * (1 - P)).
Only where the deadline spans more than one interval: there a frame's spill-over still lands
within its own deadline. Over one interval it lands in the next frame's and every later frame
queues behind it, which the all-or-nothing model with its miss cost is the better account of:
measured on 16 settings at SLO 100 / 200 (docs/BANDWIDTH.md), the partial model there raised
turbo-q's misses from 19% to 25% and lowered its mAP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from avcloud.errors import DataError
from avcloud.types import Allocation, Service
from optimizer.allocators import ExactAllocator
from optimizer.bandwidth import sorted_quantiles
from optimizer.problem import allocation_from_indices, budget_limit_mbps, check_link, fallback_index

HORIZON_DRAWS = 512
DEFAULT_QUANTILES: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))


class QuantilePlanner:
    """Chooses the quantile of the bandwidth forecast to plan at, maximising expected utility.

    `quantiles=(q,)` plans at that one quantile of the forecast (a fixed-risk policy). The
    services tuple should be the same object every frame, so the exact solver's cache is reused
    and each grid point costs a binary search.
    """

    def __init__(self, quantiles: Sequence[float] = DEFAULT_QUANTILES, allocator: ExactAllocator | None = None,
                 miss_cost: float = 0.0, horizon_partial_miss_cost: float | None = None):
        quantiles = tuple(float(q) for q in quantiles)
        if not quantiles or any(not 0 <= q <= 1 for q in quantiles):
            raise ValueError("quantiles must be a non-empty list of numbers in [0, 1]")
        for name, cost in (("miss_cost", miss_cost), ("horizon_partial_miss_cost", horizon_partial_miss_cost)):
            if cost is not None and not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        self.quantiles = tuple(sorted(set(quantiles)))
        self.allocator = allocator or ExactAllocator()
        self.miss_cost = miss_cost
        self.horizon_partial_miss_cost = horizon_partial_miss_cost
        self._fallback_services: tuple[Service, ...] | None = None
        self._fallback_value = 0.0
        self._draws: dict[tuple[int, int], np.ndarray] = {}

    def plan(
        self,
        services: tuple[Service, ...],
        rtt_ms: float,
        slo_ms: float,
        bandwidth_samples_mbps: np.ndarray,
        horizon_intervals: int = 1,
    ) -> Allocation:
        started_ns = time.perf_counter_ns()
        samples_mbps = np.asarray(bandwidth_samples_mbps, dtype=float).reshape(-1)
        if samples_mbps.shape[0] > 1 and (samples_mbps[1:] < samples_mbps[:-1]).any():
            samples_mbps = np.sort(samples_mbps)
        if samples_mbps.shape[0] == 0:
            raise DataError("the bandwidth forecast has no samples")
        if not (np.all(np.isfinite(samples_mbps)) and samples_mbps[0] >= 0):
            raise DataError("bandwidth samples must be finite numbers >= 0")
        check_link(0.0, rtt_ms, slo_ms)
        prepared = self.allocator.prepare(services, rtt_ms, slo_ms)
        fallback_utility = self._fallback_utility(services)
        # A sample b carries a total T iff T <= budget_limit(b); budget_limit is increasing in b.
        sample_limits_mbps = budget_limit_mbps(self._horizon_means(samples_mbps, horizon_intervals))
        partial = horizon_intervals > 1 and self.horizon_partial_miss_cost is not None
        budgets = sorted_quantiles(samples_mbps, self.quantiles)
        found = prepared.whole_frontier_states(budgets)
        if found is not None:  # every grid point at once from the cached frontier
            states, totals_mbps, utilities = found
            expected_values, successes = self._expected_utilities(
                np.asarray(utilities, dtype=float), np.asarray(totals_mbps, dtype=float), sample_limits_mbps,
                fallback_utility, partial)
            chosen = int(np.argmax(expected_values))  # ties go to the earlier (lower, safer) quantile
            indices, bandwidths = prepared.solution_of_state(int(states[chosen]))
            return self._allocation(services, indices, bandwidths, self.quantiles[chosen], float(budgets[chosen]),
                                    float(expected_values[chosen]), float(successes[chosen]), started_ns)
        best = None
        seen: set[tuple[int, ...]] = set()
        budgets_mbps = budgets.tolist()
        solved_budget_mbps = None
        for quantile, budget_mbps in zip(self.quantiles, budgets_mbps, strict=True):
            if budget_mbps == solved_budget_mbps:
                continue  # the same budget as the lower quantile: the same allocation
            solved_budget_mbps = budget_mbps
            indices, bandwidths = prepared.solve(budget_mbps)
            if tuple(indices) in seen:
                continue
            seen.add(tuple(indices))
            total_mbps = sum(bandwidths)
            utility = sum(s.weight * s.options[i].utility for s, i in zip(services, indices, strict=True))
            expected_values, successes = self._expected_utilities(
                np.array([utility]), np.array([total_mbps]), sample_limits_mbps, fallback_utility, partial)
            expected, success = float(expected_values[0]), float(successes[0])
            # Ties go to the earlier (lower, safer) quantile.
            if best is None or expected > best[0]:
                best = (expected, success, quantile, budget_mbps, indices, bandwidths)
        expected, success, quantile, budget_mbps, indices, bandwidths = best
        return self._allocation(services, indices, bandwidths, quantile, budget_mbps, expected, success, started_ns)

    def _expected_utilities(self, utilities: np.ndarray, totals_mbps: np.ndarray, sample_limits_mbps: np.ndarray,
                            fallback_utility: float, partial: bool) -> tuple[np.ndarray, np.ndarray]:
        """Expected utility of each plan (its utility and total critical bandwidth) over the sorted
        sample limits, and its chance of full success P (see the module docstring)."""
        samples = sample_limits_mbps.shape[0]
        successes = (samples - np.searchsorted(sample_limits_mbps, totals_mbps, side="left")) / samples
        gains = utilities - fallback_utility
        if not partial:
            return successes * utilities + (1.0 - successes) * (fallback_utility - self.miss_cost * gains), successes
        carried_shares = np.minimum(1.0, sample_limits_mbps[None, :] / np.maximum(totals_mbps[:, None], 1e-12))
        carried_shares = np.where(totals_mbps > 0, carried_shares.mean(axis=1), 1.0)
        return fallback_utility + gains * (carried_shares - self.horizon_partial_miss_cost * (1.0 - successes)), successes

    def _horizon_means(self, sorted_samples_mbps: np.ndarray, intervals: int) -> np.ndarray:
        """Sorted equally likely values of the mean capacity over `intervals` intervals drawn
        independently from the forecast; the forecast itself for one interval."""
        if intervals <= 1 or sorted_samples_mbps.shape[0] < 2:
            return sorted_samples_mbps
        key = (sorted_samples_mbps.shape[0], intervals)
        draws = self._draws.get(key)
        if draws is None:
            draws = np.random.default_rng(key).integers(0, key[0], size=(HORIZON_DRAWS, intervals))
            self._draws[key] = draws
        return np.sort(sorted_samples_mbps[draws].mean(axis=1))

    def _fallback_utility(self, services: tuple[Service, ...]) -> float:
        """The all-on-car utility, remembered for the services tuple planned with every frame."""
        if self._fallback_services is not services:
            self._fallback_services = services
            self._fallback_value = sum(s.weight * s.options[fallback_index(s)].utility for s in services)
        return self._fallback_value

    @staticmethod
    def _allocation(services, indices, bandwidths, quantile, budget_mbps, expected, success, started_ns) -> Allocation:
        allocation = allocation_from_indices(
            services,
            indices,
            bandwidths,
            extra={
                "planning_quantile": quantile,
                "planning_budget_mbps": budget_mbps,
                "expected_utility": expected,
                "success_probability": success,
            },
        )
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation
