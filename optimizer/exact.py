"""Exact multiple-choice knapsack over utility curves: one option per service, maximise the
weighted utility subject to the sum of critical bandwidths fitting the budget.

Method (all exact, no approximation):
1. Per service, drop options that can never meet the SLO and options dominated by a cheaper,
   at-least-as-useful one: what is left is the service's Pareto frontier (its staircase). All
   services at once, on a (service x option) table padded to the widest service.
2. One budget on a fresh table (a new services tuple or a new RTT): drop the frontier points
   over the budget and, when the services' frontiers are small (the usual 5 cameras), enumerate
   every combination of the first half of the services and every combination of the second,
   and pair each first-half combination with the most valuable second-half combination that
   still fits (meet in the middle: a sort and a binary search, no DP).
3. Few services, larger frontiers: dynamic programming over merged Pareto frontiers. Merging
   the partial frontier with the next service's frontier and pruning dominated (cost, value)
   pairs keeps every pair that can still be optimal. Without a budget cap the result is the
   whole problem's frontier, which `PreparedServices` keeps from the second solve on, so a later
   budget is one binary search.
4. Many services: the LP relaxation (greedy over the services' concave hulls) gives a dual
   price lambda and an integer solution (lower bound LB). The Lagrangian bound
   lambda * B + sum_s max_o (v_o - lambda * c_o) is a valid upper bound for any completion, so
   options and partial states whose bound falls below LB are dropped before and during the same
   frontier DP. Bounds are compared with a tolerance on the safe side (we keep, never drop,
   anything within 1e-9 relative of LB).
Ties: the returned utility is always the optimum; which of several equally useful choices is
returned depends on the path taken (the cached whole frontier returns the cheapest of them).

Steps 1 and 2 run as compiled kernels (optimizer/kernels.py, numba) when numba imports; they
make the same floating-point operations in the same order, so both paths return the same
choices. `AVCLOUD_PURE_NUMPY=1` in the environment selects the numpy code, the reference.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from itertools import chain, islice
from operator import attrgetter, is_

import numpy as np

from avcloud.types import Service
from optimizer.problem import budget_limit_mbps, check_services

# Up to this many services the plain frontier DP is fast; above it the LP reduction pays off.
PLAIN_DP_MAX_SERVICES = 8
# The whole problem's frontier is kept for re-use only while it stays this small.
CACHED_FRONTIER_MAX_STATES = 200_000
BOUND_RELATIVE_TOLERANCE = 1e-9
# Meet in the middle while each half has at most this many combinations (padded widths).
MEET_IN_THE_MIDDLE_MAX_COMBINATIONS = 4096

_SIZE_MBIT = attrgetter("size_mbit")
_RUNTIME_MS = attrgetter("runtime_ms")
_UTILITY = attrgetter("utility")
_NAME = attrgetter("name")
_OPTIONS = attrgetter("options")
_WEIGHT = attrgetter("weight")


def _load_kernels():
    """The compiled kernels, or None for the numpy path: asked for by AVCLOUD_PURE_NUMPY, or
    numba is missing or cannot load (the numpy path is the same solver, only slower)."""
    if os.environ.get("AVCLOUD_PURE_NUMPY", "0") not in ("", "0"):
        return None
    try:
        from optimizer import kernels
    except Exception:  # noqa: BLE001 - numba fails in many ways (missing, version check, LLVM load)
        return None
    return kernels


# Module-level so tests can switch paths; read when a PreparedServices is made.
KERNELS = _load_kernels()


# Options tuples already read and found valid, by identity (they are immutable; the entry holds
# the tuple, so its id cannot be reused while cached): (tuple, (3, n) sizes/runtimes/utilities).
_OPTION_NUMBERS: dict[int, tuple[tuple, np.ndarray]] = {}
_OPTION_NUMBERS_KEPT = 65_536


def _cached_numbers(options: tuple) -> np.ndarray | None:
    entry = _OPTION_NUMBERS.get(id(options))
    return entry[1] if entry is not None and entry[0] is options else None


def read_option_numbers(option_tuples: Sequence[tuple], counts: Sequence[int],
                        remember: bool = True) -> np.ndarray | None:
    """(3, total) sizes, runtimes and utilities of every option of these options tuples, in
    order; None if any option is invalid (a number not finite or negative, no fallback, a name
    twice in one tuple). Valid tuples are remembered by identity unless `remember` is False (a
    caller that keeps its own larger blocks: a cell's vehicles)."""
    cached = list(map(_cached_numbers, option_tuples))
    if not any(numbers is None for numbers in cached):
        return np.concatenate(cached, axis=1) if cached else np.zeros((3, 0))
    options = list(chain.from_iterable(option_tuples))
    total = len(options)
    numbers = np.empty((3, total))
    try:  # straight into the array: a cell's 50,000 fresh options take a few ms this way
        for row, field in enumerate((_SIZE_MBIT, _RUNTIME_MS, _UTILITY)):
            numbers[row] = np.fromiter(map(field, options), float, total)
    except (TypeError, ValueError):
        return None
    if 0 in counts:
        return None
    sizes, runtimes = numbers[0], numbers[1]
    starts = np.cumsum([0, *counts[:-1]])
    # Finite and >= 0 (NaN fails every comparison); at least one fallback (size 0) per tuple.
    if not (
        np.isfinite(numbers[2]).all()
        and ((sizes >= 0) & (sizes < math.inf) & (runtimes >= 0) & (runtimes < math.inf)).all()
        and (np.add.reduceat(sizes == 0, starts) > 0).all()
        and all(len(set(map(_NAME, options))) == len(options) for options in option_tuples)
    ):
        return None
    if remember:
        for options, start, count in zip(option_tuples, starts.tolist(), counts, strict=True):
            _OPTION_NUMBERS[id(options)] = (options, numbers[:, start:start + count])
        forget_oldest(_OPTION_NUMBERS, _OPTION_NUMBERS_KEPT)
    return numbers


def forget_oldest(cache: dict, kept: int) -> None:
    """Past `kept` entries, drop the oldest half at once (deleting a dict's first entry one at a
    time costs a scan over the deleted slots each time)."""
    if len(cache) > kept:
        for key in list(islice(cache, len(cache) - kept // 2)):
            del cache[key]


# The padded option tables of a list of options tuples, by the tuples' identities: another car
# with the same profile is a new services tuple (own names and weights) of the same options
# tuples. The entry holds the tuples, so their ids cannot be reused while cached.
_OPTION_TABLES: dict[tuple[int, ...], tuple[list[tuple], tuple[np.ndarray | None, ...]]] = {}
_OPTION_TABLES_KEPT = 256


def _option_tables(option_tuples: list[tuple], services: tuple[Service, ...]) -> tuple[np.ndarray | None, ...]:
    """(sizes_mbit, runtimes_ms, slack_runtimes_ms, utilities, padding, is_fallback) of these
    options tuples, padded to the widest (padding None when all are as wide); read-only, as
    every problem with these options shares them. DataError if an option is invalid."""
    counts = list(map(len, option_tuples))
    cached = list(map(_cached_numbers, option_tuples))
    if 0 in counts or any(numbers is None for numbers in cached):
        numbers = read_option_numbers(option_tuples, counts)
        if numbers is None:
            check_services(services)  # names the offending service or option
            raise AssertionError("check_services accepted options read_option_numbers refused")
    else:
        numbers = np.concatenate(cached, axis=1)
    width = max(counts)
    shape = (len(counts), width)
    if min(counts) == width:
        padding = None
        sizes_mbit, runtimes_ms, utilities = numbers.reshape(3, *shape)
    else:
        padding = np.arange(width) >= np.array(counts)[:, None]
        present = ~padding
        sizes_mbit = np.ones(shape)
        sizes_mbit[present] = numbers[0]
        runtimes_ms = np.zeros(shape)
        runtimes_ms[present] = numbers[1]
        utilities = np.zeros(shape)
        utilities[present] = numbers[2]
    is_fallback = sizes_mbit == 0
    # Runtimes as the critical bandwidth sees them: a fallback's slack is infinite (so its size 0
    # needs 0 Mbps whatever the SLO), padding's is never positive.
    slack_runtimes_ms = np.where(is_fallback, -math.inf, runtimes_ms)
    if padding is not None:
        slack_runtimes_ms[padding] = math.inf
    tables = (sizes_mbit, runtimes_ms, slack_runtimes_ms, utilities, padding, is_fallback)
    for table in tables:
        if table is not None:
            table.setflags(write=False)
    return tables


class ProblemArrays:
    """All options of a services tuple as (service x option) tables, padded to the widest
    service (the part that depends on nothing else). Padding cells can never meet an SLO.

    Validates the services on the way (vectorised; an options tuple already found valid is
    remembered by identity): raises DataError naming the service/option.
    """

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = services = tuple(services)
        option_tuples = list(map(_OPTIONS, services))
        weights = list(map(_WEIGHT, services))
        # All finite and >= 0: a NaN or inf makes the sum NaN or inf (as does an overflow, which
        # check_services then accepts).
        if (not services or len(set(map(_NAME, services))) != len(services)
                or not (min(weights) >= 0 and sum(weights) < math.inf)):
            check_services(services)  # names the offending service
        key = tuple(map(id, option_tuples))
        entry = _OPTION_TABLES.get(key)
        if entry is None or not all(map(is_, entry[0], option_tuples)):
            entry = (option_tuples, _option_tables(option_tuples, services))
            _OPTION_TABLES[key] = entry
            forget_oldest(_OPTION_TABLES, _OPTION_TABLES_KEPT)
        (self.sizes_mbit, self.runtimes_ms, self.slack_runtimes_ms, self.utilities, self.padding,
         self.is_fallback) = entry[1]
        self.weights = np.array(weights, dtype=float)

    # Only the numpy frontier build needs these (the kernels weigh the utilities themselves).
    @cached_property
    def values(self) -> np.ndarray:
        return self.utilities * self.weights[:, None]

    @cached_property
    def negated_values(self) -> np.ndarray:
        return -self.values

    @cached_property
    def imaginary_values(self) -> np.ndarray:
        return self.values * 1j  # (cost, value) pairs as complex numbers: one array

    @cached_property
    def row_numbers(self) -> np.ndarray:
        return np.arange(self.values.shape[0])[:, None]

    def critical_bandwidths_mbps(self, rtt_ms: float, slo_ms: float) -> np.ndarray:
        """Critical bandwidth of every cell (inf where the SLO is out of reach, and on padding);
        the same arithmetic as `avcloud.types.critical_bandwidth_mbps`, bit for bit."""
        slack_s = slo_ms - self.slack_runtimes_ms
        slack_s -= rtt_ms
        slack_s /= 1000.0
        bandwidths_mbps = np.full(slack_s.shape, math.inf)
        np.divide(self.sizes_mbit, slack_s, out=bandwidths_mbps, where=slack_s > 0)
        return bandwidths_mbps


class Frontier:
    """A service's Pareto frontier: critical bandwidth ascending, weighted utility strictly ascending."""

    __slots__ = ("costs", "values", "option_indices")

    def __init__(self, costs: np.ndarray, values: np.ndarray, option_indices: np.ndarray) -> None:
        self.costs = costs
        self.values = values
        self.option_indices = option_indices


class FrontierTable:
    """Every service's frontier, concatenated in service order: `points` as complex numbers
    cost + 1j * value (so that one addition sums both), `costs` (ascending within a service) and
    `values` (strictly ascending within a service) their parts, `option_indices` into the
    service's options; service s owns [starts[s], starts[s + 1])."""

    __slots__ = ("points", "costs", "values", "option_indices", "starts")

    def __init__(self, points: np.ndarray, option_indices: np.ndarray, starts: list[int]):
        self.points = points
        self.costs = points.real
        self.values = points.imag
        self.option_indices = option_indices
        self.starts = starts

    def frontiers(self) -> list[Frontier]:
        bounds = self.starts
        costs, values = np.ascontiguousarray(self.costs), np.ascontiguousarray(self.values)
        return [
            Frontier(costs[start:end], values[start:end], self.option_indices[start:end])
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]


def build_frontier_table(arrays: ProblemArrays, rtt_ms: float, slo_ms: float) -> FrontierTable:
    """Every service's frontier at once: per row, sort by (critical bandwidth, utility
    descending, table order) and keep the reachable points strictly more useful than every
    cheaper one."""
    bandwidths_mbps = arrays.critical_bandwidths_mbps(rtt_ms, slo_ms)
    order = np.lexsort((arrays.negated_values, bandwidths_mbps), axis=1)
    points = (bandwidths_mbps + arrays.imaginary_values)[arrays.row_numbers, order]
    values = points.imag
    keep = np.empty(points.shape, dtype=bool)
    keep[:, 0] = True  # the cheapest option of a row is an on-car fallback (cost 0)
    np.greater(values[:, 1:], np.maximum.accumulate(values, axis=1)[:, :-1], out=keep[:, 1:])
    keep &= points.real < math.inf
    starts = [0]
    for length in keep.sum(axis=1).tolist():
        starts.append(starts[-1] + length)
    return FrontierTable(points[keep], order[keep], starts)


def build_frontiers(arrays: ProblemArrays, rtt_ms: float, slo_ms: float) -> list[Frontier]:
    """Every service's frontier (see `build_frontier_table`), one object per service."""
    return build_frontier_table(arrays, rtt_ms, slo_ms).frontiers()


def _strict_records(values: np.ndarray) -> np.ndarray:
    """Mask of entries strictly above every earlier entry (the first is always kept)."""
    keep = np.empty(values.shape[0], dtype=bool)
    if values.shape[0]:
        keep[0] = True
        keep[1:] = values[1:] > np.maximum.accumulate(values)[:-1]
    return keep


def search_limit_mbps(limit_mbps: float) -> float:
    """Searching a hair below the limit keeps every accepted pair's sum, added in any order,
    within it, and still finds every pair whose sum is within the budget itself."""
    return limit_mbps - 1e-13 * (1.0 + limit_mbps)


def meet_in_the_middle(table: FrontierTable, limit_mbps: float) -> list[int] | None:
    """The optimal frontier point per service for one budget, by pairing every combination of
    the first half of the services with the best fitting combination of the second half; None
    when the halves would have too many combinations (use the DP)."""
    bounds = table.starts
    # Points over the limit can never be part of a solution; a service's points are cost-sorted.
    within = np.add.reduceat(table.costs <= limit_mbps, bounds[:-1]).tolist()
    half = len(within) // 2
    if half == 0:
        return [within[0] - 1]
    if math.prod(within[:half]) > MEET_IN_THE_MIDDLE_MAX_COMBINATIONS or (
            math.prod(within[half:]) > MEET_IN_THE_MIDDLE_MAX_COMBINATIONS):
        return None
    parts = [table.points[start:start + count] for start, count in zip(bounds, within, strict=False)]
    first = parts[0]
    for part in parts[1:half]:
        first = np.add.outer(first, part).ravel()
    second = parts[half]
    for part in parts[half + 1:]:
        second = np.add.outer(second, part).ravel()
    order = second.real.argsort(kind="stable")
    second_costs = second.real[order]
    second_values = second.imag[order]
    best_second = np.empty(order.shape[0] + 1)
    best_second[0] = -math.inf  # no partner fits
    np.maximum.accumulate(second_values, out=best_second[1:])
    partners = second_costs.searchsorted(search_limit_mbps(limit_mbps) - first.real, side="right")
    chosen = int((first.imag + best_second[partners]).argmax())
    second_choice = int(order[int(second_values[: int(partners[chosen])].argmax())])
    points = []
    for combination, counts in ((chosen, within[:half]), (second_choice, within[half:])):
        for count in reversed(counts):
            combination, point = divmod(combination, count)
            points.append(point)
    # Unravelled last service first within each half.
    return points[:half][::-1] + points[half:][::-1]


class _FrontierDP:
    """Pareto states (cost ascending, value strictly ascending) over some services, with
    back-pointers to recover each service's frontier point."""

    def __init__(self, initial_cost: float = 0.0, initial_value: float = 0.0) -> None:
        self.costs = np.array([initial_cost])
        self.values = np.array([initial_value])
        # The first merge may take the service's frontier as the states only from (0, 0).
        self._from_zero = initial_cost == 0.0 and initial_value == 0.0
        self.fixed_positions: list[int] = []  # services folded into the initial state
        # Per merged service: (service position, pair index of each state or None, frontier width).
        # A state's pair index p means: previous state p // width, frontier point p % width.
        self.stages: list[tuple[int, np.ndarray | None, int]] = []

    def merge(self, position: int, costs: np.ndarray, values: np.ndarray, cap: float) -> None:
        width = costs.shape[0]
        if not self.stages and self._from_zero:  # first service: its frontier is the state set
            keep = costs <= cap
            self.costs, self.values = costs[keep], values[keep]
            self.stages.append((position, None, width))
            return
        pair_costs = np.add.outer(self.costs, costs).ravel()
        pair_values = np.add.outer(self.values, values).ravel()
        # Sorting by cost alone suffices: among equal costs a later, larger value is kept too,
        # which leaves a harmless dominated state but keeps values strictly rising.
        order = np.argsort(pair_costs, kind="stable")
        if cap < math.inf:
            order = order[: np.searchsorted(pair_costs[order], cap, side="right")]
        pairs = order[_strict_records(pair_values[order])]
        self.costs, self.values = pair_costs[pairs], pair_values[pairs]
        self.stages.append((position, pairs, width))

    def keep_states(self, mask: np.ndarray) -> None:
        """Drop states; the last stage's back-pointers are filtered to match."""
        self.costs, self.values = self.costs[mask], self.values[mask]
        position, pairs, width = self.stages[-1]
        self.stages[-1] = (position, np.flatnonzero(mask) if pairs is None else pairs[mask], width)

    def backtrack(self, state: int, points_out: list[int], point_maps: dict[int, np.ndarray] | None = None) -> None:
        """Write the frontier point each merged (or fixed) service takes in this final state."""
        for position in self.fixed_positions:
            points_out[position] = int(point_maps[position][0])
        for position, pairs, width in reversed(self.stages):
            pair = state if pairs is None else int(pairs[state])
            state, point = divmod(pair, width)
            if point_maps is not None and position in point_maps:
                point = int(point_maps[position][point])
            points_out[position] = point


def _best_combination(first: _FrontierDP, second: _FrontierDP, limit_mbps: float) -> tuple[int, int]:
    """The most valuable pair of states whose costs fit together (both Pareto-sorted)."""
    partners = np.searchsorted(second.costs, limit_mbps - first.costs, side="right") - 1
    # The subtraction may round; never accept a pair whose sum exceeds the limit.
    valid = partners >= 0
    partners = np.where(valid, partners, 0)
    over = first.costs + second.costs[partners] > limit_mbps
    partners = np.where(over, partners - 1, partners)
    valid &= partners >= 0
    totals = np.where(valid, first.values + second.values[np.maximum(partners, 0)], -math.inf)
    best = int(np.argmax(totals))
    return best, int(partners[best])


# Per thread: the kernel writes a solve's result there, read once it has returned.
_SCRATCH = threading.local()


def _kernel_scratch(kernels, service_count: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The float and integer scratch arrays of `kernels.solve_fresh`, kept and grown as needed
    (allocating a dozen small arrays per call would cost about as much as the solve)."""
    floats_needed, integers_needed = kernels.scratch_sizes(service_count, width, MEET_IN_THE_MIDDLE_MAX_COMBINATIONS)
    scratch = getattr(_SCRATCH, "arrays", None)
    if scratch is None or scratch[0].shape[0] < floats_needed or scratch[1].shape[0] < integers_needed:
        scratch = (np.empty(floats_needed), np.empty(integers_needed, dtype=np.int64))
        _SCRATCH.arrays = scratch
    return scratch


class PreparedServices:
    """Everything about (services, RTT, SLO) that does not depend on the budget.

    `solve(budget_mbps)` returns the optimal option index per service. From the second solve on,
    a problem of up to a few dozen services keeps its whole frontier, after which each solve is
    one binary search.
    """

    def __init__(
        self,
        services: Sequence[Service],
        rtt_ms: float,
        slo_ms: float,
        arrays: ProblemArrays | None = None,
    ) -> None:
        self.arrays = arrays if arrays is not None else ProblemArrays(services)
        self.services = self.arrays.services
        self.rtt_ms = rtt_ms
        self.slo_ms = slo_ms
        self._table: FrontierTable | None = None
        self._kernels = KERNELS  # None: the numpy path throughout
        self._frontiers: list[Frontier] | None = None
        self._solve_count = 0
        self._whole: _FrontierDP | None = None
        self._whole_too_large = len(self.services) > 3 * PLAIN_DP_MAX_SERVICES
        self._segments: HullSegments | None = None
        self._flat: tuple[np.ndarray, ...] | None = None

    @property
    def table(self) -> FrontierTable:
        """Every service's frontier, built on first use (by the kernel when numba is there)."""
        if self._table is None:
            if self._kernels is not None:
                arrays = self.arrays
                costs, values, option_indices, starts = self._kernels.frontier_table(
                    arrays.sizes_mbit, arrays.slack_runtimes_ms, arrays.utilities, arrays.weights,
                    float(self.rtt_ms), float(self.slo_ms))
                points = np.empty(costs.shape[0], dtype=complex)
                points.real = costs
                points.imag = values
                self._table = FrontierTable(points, option_indices, starts.tolist())
            else:
                self._table = build_frontier_table(self.arrays, self.rtt_ms, self.slo_ms)
        return self._table

    @property
    def frontiers(self) -> list[Frontier]:
        if self._frontiers is None:
            self._frontiers = self.table.frontiers()
        return self._frontiers

    def solve(self, budget_mbps: float) -> tuple[list[int], list[float]]:
        """Option index (into each service's options) and critical bandwidth of the optimum."""
        limit_mbps = budget_limit_mbps(budget_mbps)
        self._solve_count += 1
        if self._whole is None and len(self.services) <= PLAIN_DP_MAX_SERVICES and (
                self._solve_count == 1 or self._whole_too_large):
            kernels = self._kernels
            if kernels is not None and self._table is None:
                # One compiled call, frontiers and all, in scratch arrays (a later solve that needs
                # the frontiers builds them again).
                arrays = self.arrays
                service_count, width = arrays.sizes_mbit.shape
                float_scratch, integer_scratch = _kernel_scratch(kernels, service_count, width)
                if kernels.solve_fresh(arrays.sizes_mbit, arrays.slack_runtimes_ms, arrays.utilities, arrays.weights,
                                       float(self.rtt_ms), float(self.slo_ms), limit_mbps,
                                       search_limit_mbps(limit_mbps), MEET_IN_THE_MIDDLE_MAX_COMBINATIONS,
                                       float_scratch, integer_scratch):
                    return integer_scratch[:service_count].tolist(), float_scratch[:service_count].tolist()
            else:
                points = meet_in_the_middle(self.table, limit_mbps)
                if points is not None:
                    flat = [start + point for start, point in zip(self.table.starts, points, strict=False)]
                    return self.table.option_indices[flat].tolist(), self.table.points[flat].real.tolist()
        if self._whole is None and self._solve_count >= 2 and not self._whole_too_large:
            self._whole = self._merge(range(len(self.frontiers)), math.inf, CACHED_FRONTIER_MAX_STATES)
            self._whole_too_large = self._whole is None
        points = [0] * len(self.services)
        if self._whole is not None:
            state = int(np.searchsorted(self._whole.costs, limit_mbps, side="right")) - 1
            self._whole.backtrack(state, points)
        elif len(self.services) <= PLAIN_DP_MAX_SERVICES:
            half = len(self.services) // 2
            first = self._merge(range(half), limit_mbps)
            second = self._merge(range(half, len(self.services)), limit_mbps)
            first_state, second_state = _best_combination(first, second, limit_mbps)
            first.backtrack(first_state, points)
            second.backtrack(second_state, points)
        else:
            dp, point_maps = self._bounded_dp(limit_mbps)
            dp.backtrack(int(np.argmax(dp.values)), points, point_maps)
        indices = [int(f.option_indices[p]) for f, p in zip(self.frontiers, points, strict=True)]
        bandwidths = [float(f.costs[p]) for f, p in zip(self.frontiers, points, strict=True)]
        return indices, bandwidths

    def whole_frontier_states(self, budgets_mbps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Many budgets at once: per budget, the optimal state of the whole problem's cached
        frontier, its total critical bandwidth and its value (None when the problem is too large
        to keep its whole frontier). `solution_of_state(state)` gives the options of a state."""
        if self._whole is None and not self._whole_too_large:
            self._whole = self._merge(range(len(self.frontiers)), math.inf, CACHED_FRONTIER_MAX_STATES)
            self._whole_too_large = self._whole is None
        if self._whole is None:
            return None
        limits_mbps = budget_limit_mbps(np.asarray(budgets_mbps, dtype=float))
        states = np.searchsorted(self._whole.costs, limits_mbps, side="right") - 1
        return states, self._whole.costs[states], self._whole.values[states]

    def solution_of_state(self, state: int) -> tuple[list[int], list[float]]:
        """Option index and critical bandwidth per service of a state of the whole frontier."""
        assert self._whole is not None, "whole_frontier_states() first"
        points = [0] * len(self.services)
        self._whole.backtrack(int(state), points)
        indices = [int(f.option_indices[p]) for f, p in zip(self.frontiers, points, strict=True)]
        bandwidths = [float(f.costs[p]) for f, p in zip(self.frontiers, points, strict=True)]
        return indices, bandwidths

    def _merge(self, positions, cap_mbps: float, state_limit: int | None = None) -> _FrontierDP | None:
        dp = _FrontierDP()
        for position in positions:
            frontier = self.frontiers[position]
            dp.merge(position, frontier.costs, frontier.values, cap_mbps)
            if state_limit is not None and dp.costs.shape[0] > state_limit:
                return None
        return dp

    def lp_relaxation(self, budget_mbps: float) -> LpRelaxation:
        return LpRelaxation(self.hull_segments(), budget_limit_mbps(budget_mbps))

    def hull_segments(self) -> HullSegments:
        if self._segments is None:
            self._segments = HullSegments(self.frontiers)
        return self._segments

    def _flat_frontiers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All frontier points as flat arrays: costs, values, owner service, point number, starts."""
        if self._flat is None:
            lengths = [f.costs.shape[0] for f in self.frontiers]
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.intp)
            owners = np.repeat(np.arange(len(lengths), dtype=np.intp), lengths)
            self._flat = (
                np.concatenate([f.costs for f in self.frontiers]),
                np.concatenate([f.values for f in self.frontiers]),
                owners,
                np.arange(owners.shape[0], dtype=np.intp) - starts[owners],
                starts,
            )
        return self._flat

    def _bounded_dp(self, limit_mbps: float) -> tuple[_FrontierDP, dict[int, np.ndarray] | None]:
        """DP over the frontier points that survive the Lagrangian bound. Services left with a
        single point are fixed in one step; returns the DP and, per merged service position, the
        map from its surviving point number to frontier point."""
        relaxation = LpRelaxation(self.hull_segments(), limit_mbps)
        price = relaxation.price
        lower_bound = relaxation.integer_value
        tolerance = BOUND_RELATIVE_TOLERANCE * (1.0 + abs(lower_bound))
        costs, values, owners, point_numbers, starts = self._flat_frontiers()
        reduced = values - price * costs
        best_reduced = np.maximum.reduceat(reduced, starts)
        upper_bound = price * limit_mbps + float(best_reduced.sum())
        # A point can only be part of a solution worth upper_bound - (M_s - reduced value).
        survives = (upper_bound - (best_reduced[owners] - reduced) >= lower_bound - tolerance) & (costs <= limit_mbps)
        survivor_counts = np.bincount(owners[survives], minlength=len(self.frontiers))
        if np.any(survivor_counts == 0):  # only if rounding made the bound unsafe
            return self._merge(range(len(self.frontiers)), limit_mbps), None
        fixed = survives & (survivor_counts[owners] == 1)
        dp = _FrontierDP(float(costs[fixed].sum()), float(values[fixed].sum()))
        point_maps: dict[int, np.ndarray] = {}
        fixed_owners = owners[fixed].tolist()
        for position, point in zip(fixed_owners, point_numbers[fixed].tolist(), strict=True):
            point_maps[position] = np.array([point])
        dp.fixed_positions = fixed_owners
        free = [int(p) for p in np.flatnonzero(survivor_counts > 1)]
        free.sort(key=lambda p: survivor_counts[p])
        remaining_best = np.concatenate([np.cumsum(best_reduced[free][::-1])[::-1][1:], [0.0]]) if free else []
        for step, position in enumerate(free):
            points = np.flatnonzero(survives[starts[position]: starts[position] + self.frontiers[position].costs.shape[0]])
            point_maps[position] = points
            frontier = self.frontiers[position]
            dp.merge(position, frontier.costs[points], frontier.values[points], limit_mbps)
            bound = dp.values - price * dp.costs + price * limit_mbps + remaining_best[step]
            survivors = bound >= lower_bound - tolerance
            if not survivors.all():
                dp.keep_states(survivors)
        if dp.values.shape[0] == 0 or dp.values.max() < lower_bound - tolerance:
            # Only possible if rounding made the bound unsafe; the plain DP is exact regardless.
            return self._merge(range(len(self.frontiers)), limit_mbps), None
        return dp, point_maps


class HullSegments:
    """The segments of every service's upper concave hull, sorted by slope (steepest first):
    what the LP relaxation walks down for any budget. Budget-independent, so built once."""

    def __init__(self, frontiers: Sequence[Frontier]) -> None:
        slopes, cost_steps, value_steps, owners, targets = [], [], [], [], []
        self.service_count = len(frontiers)
        self.base_cost = self.base_value = 0.0
        for position, frontier in enumerate(frontiers):
            frontier_costs, frontier_values = frontier.costs.tolist(), frontier.values.tolist()
            hull = _upper_hull(frontier_costs, frontier_values)
            self.base_cost += frontier_costs[0]
            self.base_value += frontier_values[0]
            for start, end in zip(hull[:-1], hull[1:], strict=True):
                cost_step = frontier_costs[end] - frontier_costs[start]
                value_step = frontier_values[end] - frontier_values[start]
                slopes.append(value_step / cost_step)
                cost_steps.append(cost_step)
                value_steps.append(value_step)
                owners.append(position)
                targets.append(end)
        order = np.argsort(-np.asarray(slopes, dtype=float), kind="stable")
        self.slopes = np.asarray(slopes, dtype=float)[order]
        self.cost_steps = np.asarray(cost_steps, dtype=float)[order]
        self.value_steps = np.asarray(value_steps, dtype=float)[order]
        self.owners = np.asarray(owners, dtype=np.intp)[order]
        self.targets = np.asarray(targets, dtype=np.intp)[order]
        # cumsum adds in sequence, the same sums a step-by-step walk would make.
        self.cumulative_cost = np.cumsum(np.concatenate(([self.base_cost], self.cost_steps)))[1:]
        self.cumulative_value = np.cumsum(np.concatenate(([self.base_value], self.value_steps)))[1:]
        # Smallest step at or after each position: lets the greedy walk stop early.
        self.smallest_later_step = np.minimum.accumulate(self.cost_steps[::-1])[::-1]
        self._lists = (self.cost_steps.tolist(), self.value_steps.tolist(), self.owners.tolist(),
                       self.targets.tolist(), self.smallest_later_step.tolist())


class LpRelaxation:
    """The LP relaxation of the problem: greedy over the services' concave hulls.

    `value` is the relaxation optimum, `price` its dual price (utility per Mbps of the segment
    the budget cuts; 0 when everything fits), `fractional` whether the optimum needs a fraction
    of a segment, and `integer_points`/`integer_value`/`integer_cost` a feasible integer
    solution (the segments that fit, in slope order; a lower bound on the optimum).
    """

    def __init__(self, segments: HullSegments, limit_mbps: float) -> None:
        if segments.base_cost > limit_mbps:
            raise ValueError("even the cheapest options exceed the budget")
        taken = int(np.searchsorted(segments.cumulative_cost, limit_mbps, side="right"))
        cost = float(segments.cumulative_cost[taken - 1]) if taken else segments.base_cost
        value = float(segments.cumulative_value[taken - 1]) if taken else segments.base_value
        self.value = value
        self.price = 0.0
        self.fractional = False
        if taken < segments.slopes.shape[0]:
            self.price = float(segments.slopes[taken])
            fraction = (limit_mbps - cost) / segments.cost_steps[taken]
            if fraction > 0:
                self.fractional = True
                self.value = value + fraction * float(segments.value_steps[taken])
        self._greedy_integer(segments, limit_mbps)

    def _greedy_integer(self, segments: HullSegments, limit_mbps: float) -> None:
        """Down the slope order, take each segment that still fits (a service whose segment does
        not fit takes none of its later ones). It must fit with a margin, so that summing its
        costs in any order stays within the limit."""
        safe_limit_mbps = limit_mbps - 1e-9 * (1.0 + limit_mbps)
        taken = int(np.searchsorted(segments.cumulative_cost, safe_limit_mbps, side="right"))
        points = np.zeros(segments.service_count, dtype=np.intp)  # hulls start at the cheapest point
        np.maximum.at(points, segments.owners[:taken], segments.targets[:taken])
        cost = float(segments.cumulative_cost[taken - 1]) if taken else segments.base_cost
        value = float(segments.cumulative_value[taken - 1]) if taken else segments.base_value
        cost_steps, value_steps, owners, targets, smallest_later = segments._lists
        blocked: set[int] = set()
        for segment in range(taken, len(cost_steps)):
            if safe_limit_mbps - cost < smallest_later[segment]:
                break  # nothing later can fit
            owner = owners[segment]
            if owner in blocked:
                continue
            if cost + cost_steps[segment] <= safe_limit_mbps:
                points[owner] = targets[segment]
                cost += cost_steps[segment]
                value += value_steps[segment]
            else:
                blocked.add(owner)
        self.integer_points = points.tolist()
        self.integer_cost = cost
        self.integer_value = value


def _upper_hull(costs: list[float], values: list[float]) -> list[int]:
    """Indices of the upper concave hull of a frontier (costs ascending, values strictly rising)."""
    hull: list[int] = []
    for index in range(len(costs)):
        while len(hull) >= 2:
            first, middle = hull[-2], hull[-1]
            # Drop the middle point unless the slope strictly decreases through it.
            left = (values[middle] - values[first]) * (costs[index] - costs[middle])
            right = (values[index] - values[middle]) * (costs[middle] - costs[first])
            if left > right:
                break
            hull.pop()
        hull.append(index)
    return hull
