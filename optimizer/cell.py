"""Cell-level allocation: one exact allocation over every camera of every vehicle in a cell.

The vehicles of a cell share its uplink (capacity B, Mbps) and, optionally, a pool of GPU
workers (capacity G, worker-seconds of inference per second). Each camera of each vehicle is a
service with its options, as for one car; each vehicle has its own RTT and SLO (or the cell's).
Per frame the coordinator picks one option per camera:

    maximise    sum_v W_v * U_v,  U_v = sum_{c in v} w_c * u(option of c)
    subject to  sum over cameras of the critical bandwidth b_c <= B
                sum over sent cameras of runtime_ms / 1000 * frame_rate_hz <= G   (optional)
                U_v >= floor_v for every vehicle                                  (optional)

W_v is the vehicle's weight (`CellVehicle.weight`), w_c the camera's (`Service.weight`); U_v is
the vehicle's camera-weighted utility, the quantity fairness is about. A camera sent to the cloud
at frame rate f keeps one GPU worker busy runtime_ms * f / 1000 of the time, so G = K workers
is the pool's capacity (scale it down to keep headroom for queueing); on-car options use none.

Fairness (`CellProblem.fairness`): None maximises the weighted total (honouring any per-vehicle
`utility_floor`); a number is a floor for every vehicle; "max-min" first finds the largest t such
that every vehicle can have U_v >= t, then maximises the weighted total subject to U_v >= t.

Method (exact; the cvxpy boolean programs in `optimizer.convex` are the reference):
1. Per camera, its Pareto frontier and the upper concave hull of that frontier, for all cameras
   at once on a (camera x option) table (compiled, optimizer/kernels.py, when numba imports;
   the numpy code, the reference, otherwise or with AVCLOUD_PURE_NUMPY=1).
2. The LP relaxation: the hull segments of every camera sorted by slope (utility per Mbps) and
   taken greedily until the capacity is spent. The slope of the segment the capacity cuts is the
   dual price lambda; the LP optimum equals the Lagrangian bound
   UB = lambda * B + sum_c max_o (v_o - lambda * b_o). Greedy over the remaining segments that
   still fit gives a feasible integer solution, LB.
3. Any solution x satisfies value(x) <= UB - sum_c r_c(x_c), where r_c(o) = max_o' (v_o' - lambda
   b_o') - (v_o - lambda b_o) >= 0 is the option's reduced cost. So a solution worth at least T
   uses only options with r <= UB - T: every other option is dropped, and a camera left with one
   option is fixed (folded into the start state). Usually a few dozen cameras stay free.
4. The free cameras are solved by a Pareto-frontier DP (cost ascending, value strictly
   ascending) in which every partial state is dropped whose Lagrangian bound, under any of a
   few dual prices (the LP's, its neighbours in slope order, quantiles of the free cameras'
   slopes), falls below T: value + p * (B - cost) + the free cameras still to come at their best
   value - p * cost. Every such bound is valid, so every solution worth at least T survives.
5. The core grows in rounds: T = UB - gap with gap = (UB - LB) / 16, then x4 per round. A round
   that finds a solution worth at least T has found the optimum (everything worth more was
   kept); otherwise the optimum is below T and the next round widens the gap, until T reaches
   the best solution found so far, where the round is the full reduction and exact by (3).
   Bounds are compared with a tolerance on the safe side (we keep anything within 1e-9
   relative), so the result is the optimum.
With the GPU pool the reduction uses two prices, lambda for bandwidth and mu for the GPU: mu by
bisection on the Lagrangian dual mu * G + LP(values - mu * GPU load), the incumbent from the
exact one-capacity optimum under GPU prices around it (sent back to the fallback where it still
overuses the GPU), and the free cameras of each round by a bounded enumeration over both
capacities (a boolean program solved by HiGHS at zero gap if it outgrows 200,000 states). This
variant is exact but slower (seconds at 1000 cars). A floor is a per-vehicle constraint, so the
floor variants work per vehicle: each vehicle's frontier of (bandwidth, U_v) states (the exact
single-car DP), cut at its floor, is one multiple-choice class of the same solver.

API, for a coordinator: build `CellVehicle(name, services, weight, rtt_ms, slo_ms,
utility_floor)` per car and `CellProblem(vehicles, capacity_mbps, rtt_ms, slo_ms, gpu_workers,
frame_rate_hz, fairness)`; `solve_cell(problem)` returns a `CellAllocation`. Pass the same
services tuple for a car from frame to frame: its options are then read once (remembered by
identity), and a frame costs the solve alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avcloud.errors import DataError
from avcloud.types import Allocation, Service
from optimizer import exact
from optimizer.exact import _WEIGHT, _FrontierDP, forget_oldest, read_option_numbers
from optimizer.problem import allocation_from_indices, budget_limit_mbps, check_link

BOUND_RELATIVE_TOLERANCE = 1e-9
# The greedy integer solution is returned as optimal when it is this close to the upper bound.
OPTIMAL_RELATIVE_TOLERANCE = 1e-12
FAIRNESS_MODES = (None, "max-min")
# The first round of the core keeps options within this fraction of UB - LB (then x4 per round).
CORE_FIRST_GAP_FRACTION = 1 / 16
# The core's bounds try this many dual prices spread over the free rows' slopes (and the LP's).
CORE_PRICE_QUANTILES = 9
CORE_STATE_PRICES = "lp"


class InfeasibleCellError(DataError):
    """The vehicles' utility floors cannot all be met within the cell's capacities."""


@dataclass(frozen=True)
class CellVehicle:
    """One vehicle of the cell: its cameras, its weight, and optionally its own link and floor."""

    name: str
    services: tuple[Service, ...]
    weight: float = 1.0
    rtt_ms: float | None = None  # None: the cell's
    slo_ms: float | None = None  # None: the cell's
    utility_floor: float | None = None  # lowest acceptable camera-weighted utility U_v


@dataclass(frozen=True)
class CellProblem:
    """One frame of a cell: every vehicle, the uplink capacity and optionally the GPU pool's.

    `fairness`: None (weighted total), "max-min", or a number (a floor on U_v for every vehicle).
    `gpu_workers`: the pool's capacity in worker-seconds per second (None: no GPU constraint);
    a sent camera uses runtime_ms / 1000 * frame_rate_hz of it."""

    vehicles: tuple[CellVehicle, ...]
    capacity_mbps: float
    rtt_ms: float = 50.0
    slo_ms: float = 200.0
    gpu_workers: float | None = None
    frame_rate_hz: float = 10.0
    fairness: str | float | None = None


class CellAllocation:
    """The cell's allocation. `option_indices[v]` is vehicle v's option index per camera (in its
    services' order); `vehicle_utilities[v]` its camera-weighted utility U_v; `utility` the
    objective sum_v W_v U_v. `vehicles` (built on first use) maps each vehicle's name to an
    `Allocation` of its cameras, as a single car's allocator returns it."""

    def __init__(self, problem: CellProblem, table: CellTable, choices: np.ndarray, solve_us: float,
                 extra: dict[str, object]) -> None:
        rows = np.arange(choices.shape[0])
        self._problem = problem
        self._table = table
        self._choices = choices
        self._bandwidths_mbps = table.bandwidths_mbps[rows, choices]
        starts = table.row_starts
        self.vehicle_utilities = np.add.reduceat(table.camera_values[rows, choices], starts[:-1])
        self.utility = float(np.dot(table.vehicle_weights, self.vehicle_utilities))
        self.total_bandwidth_mbps = float(self._bandwidths_mbps.sum())
        self.gpu_load = float(table.gpu_loads[rows, choices].sum())  # worker-seconds per second
        self.min_vehicle_utility = float(self.vehicle_utilities.min())
        self.solve_us = solve_us
        self.extra = extra
        self._vehicles: dict[str, Allocation] | None = None

    @property
    def option_indices(self) -> list[list[int]]:
        choices = self._choices.tolist()
        starts = self._table.row_starts
        return [choices[start:end] for start, end in zip(starts[:-1], starts[1:], strict=True)]

    @property
    def vehicles(self) -> dict[str, Allocation]:
        if self._vehicles is None:
            choices = self._choices.tolist()
            bandwidths = self._bandwidths_mbps.tolist()
            starts = self._table.row_starts
            self._vehicles = {
                vehicle.name: allocation_from_indices(vehicle.services, choices[start:end], bandwidths[start:end])
                for vehicle, start, end in zip(self._problem.vehicles, starts[:-1], starts[1:], strict=True)
            }
        return self._vehicles


# ---------------------------------------------------------------- the multiple-choice knapsack on arrays


@dataclass
class KnapsackResult:
    """Chosen column per row; `upper_bound`/`lower_bound` of the reduction, `free_rows` solved
    by the core DP (or program), `core_states` the largest DP state count."""

    choices: np.ndarray
    value: float
    upper_bound: float
    lower_bound: float
    price: float
    free_rows: int
    core_states: int = 0
    gpu_price: float = 0.0


def solve_multiple_choice(costs: np.ndarray, values: np.ndarray, limit: float,
                          gpu_costs: np.ndarray | None = None, gpu_limit: float | None = None) -> KnapsackResult:
    """max sum_r values[r, x_r] s.t. sum_r costs[r, x_r] <= limit (and the same for `gpu_costs`),
    exactly. `costs` is inf where a column cannot be chosen; every row must have a column of cost
    0 (and GPU cost 0): the on-car fallback. `limit` is used as is (apply `budget_limit_mbps`)."""
    costs = np.asarray(costs, dtype=float)
    values = np.asarray(values, dtype=float)
    if gpu_costs is not None:
        return _solve_two_constraints(costs, values, limit, np.asarray(gpu_costs, dtype=float), float(gpu_limit))
    frontier = RowFrontiers(costs, values)
    result = _solve_frontiers(frontier, limit)
    result.choices = frontier.order[np.arange(costs.shape[0]), result.choices]
    return result


class RowFrontiers:
    """Every row's Pareto frontier on a (row x point) table sorted by cost: where `present`, costs
    and values strictly ascending; elsewhere (dominated, unreachable or padding) cost inf and
    value -inf. `order` is each point's original column."""

    def __init__(self, costs: np.ndarray, values: np.ndarray) -> None:
        if exact.KERNELS is not None:
            self.order, self.present, self.costs, self.values, every_row_has_fallback = (
                exact.KERNELS.row_frontiers(np.ascontiguousarray(costs), np.ascontiguousarray(values)))
            if not every_row_has_fallback:
                raise ValueError("every row needs a column of cost 0 (the fallback)")
            return
        rows = np.arange(costs.shape[0])[:, None]
        order = np.lexsort((-values, costs), axis=1)
        sorted_costs = costs[rows, order]
        sorted_values = values[rows, order]
        keep = np.empty(costs.shape, dtype=bool)
        keep[:, 0] = True
        np.greater(sorted_values[:, 1:], np.maximum.accumulate(sorted_values, axis=1)[:, :-1], out=keep[:, 1:])
        keep &= sorted_costs < math.inf
        if not (sorted_costs[:, 0] == 0).all():
            raise ValueError("every row needs a column of cost 0 (the fallback)")
        self.order = order
        self.present = keep
        # Points off the frontier stay in place, marked like padding.
        sorted_costs[~keep] = math.inf
        sorted_values[~keep] = -math.inf
        self.costs = sorted_costs
        self.values = sorted_values


def _upper_hulls(frontier: RowFrontiers) -> tuple[np.ndarray, np.ndarray]:
    """Each row's upper concave hull by the monotone chain, all rows at once: (the hull's points
    per row, left-aligned, and how many). A point is popped when it lies on or below the chord
    from the point under it to the new point, so the hull's slopes strictly decrease."""
    costs, values = frontier.costs, frontier.values
    if exact.KERNELS is not None:
        return exact.KERNELS.upper_hulls(frontier.present, costs, values)
    row_count, width = costs.shape
    hull = np.zeros((row_count, width), dtype=np.intp)
    sizes = np.ones(row_count, dtype=np.intp)
    for column in range(1, width):
        rows = np.flatnonzero(frontier.present[:, column])
        if rows.shape[0] == 0:
            continue  # dominated points stay in place: a later column may still hold hull points
        new_costs, new_values = costs[rows, column], values[rows, column]
        pending = np.arange(rows.shape[0])
        while pending.shape[0]:
            pending = pending[sizes[rows[pending]] >= 2]
            if not pending.shape[0]:
                break
            at = rows[pending]
            top = hull[at, sizes[at] - 1]
            under = hull[at, sizes[at] - 2]
            top_costs, top_values = costs[at, top], values[at, top]
            pop = (top_values - values[at, under]) * (new_costs[pending] - top_costs) <= (
                new_values[pending] - top_values) * (top_costs - costs[at, under])
            pending = pending[pop]
            sizes[rows[pending]] -= 1
        hull[rows, sizes[rows]] = column
        sizes[rows] += 1
    return hull, sizes


class _Segments:
    """Every row's hull segments, steepest first."""

    def __init__(self, frontier: RowFrontiers) -> None:
        hull, sizes = _upper_hulls(frontier)
        rows, positions = np.nonzero(np.arange(hull.shape[1] - 1) < (sizes - 1)[:, None])
        points = hull[rows, positions]
        targets = hull[rows, positions + 1]
        cost_steps = frontier.costs[rows, targets] - frontier.costs[rows, points]
        value_steps = frontier.values[rows, targets] - frontier.values[rows, points]
        slopes = value_steps / cost_steps
        order = np.argsort(-slopes, kind="stable")
        self.rows = rows[order]
        self.starts = points[order]
        self.targets = targets[order]
        self.cost_steps = cost_steps[order]
        self.value_steps = value_steps[order]
        self.slopes = slopes[order]
        self.cumulative_cost = np.cumsum(self.cost_steps)
        self.cumulative_value = np.cumsum(self.value_steps)


def _greedy(frontier: RowFrontiers, segments: _Segments, limit: float) -> tuple[np.ndarray, float, float, int]:
    """The LP relaxation's price and a feasible integer solution: every segment before the one
    the limit cuts, then each later segment that still fits and continues its row's walk.
    Returns (points, price, LP value, number of segments taken before the cut)."""
    base_value = float(frontier.values[:, 0].sum())
    taken = int(np.searchsorted(segments.cumulative_cost, limit, side="right"))
    price, lp_value = 0.0, base_value
    if taken:
        lp_value += float(segments.cumulative_value[taken - 1])
    if taken < segments.slopes.shape[0]:
        price = float(segments.slopes[taken])
        used = float(segments.cumulative_cost[taken - 1]) if taken else 0.0
        lp_value += (limit - used) / float(segments.cost_steps[taken]) * float(segments.value_steps[taken])
    # The integer walk keeps a margin so that summing its costs in any order stays within the limit.
    safe_limit = limit - 1e-9 * (1.0 + abs(limit))
    safe_taken = int(np.searchsorted(segments.cumulative_cost, safe_limit, side="right"))
    points = np.zeros(frontier.costs.shape[0], dtype=np.intp)
    np.maximum.at(points, segments.rows[:safe_taken], segments.targets[:safe_taken])
    remaining = safe_limit - (float(segments.cumulative_cost[safe_taken - 1]) if safe_taken else 0.0)
    later = safe_taken + np.flatnonzero(segments.cost_steps[safe_taken:] <= remaining)
    if later.shape[0]:
        rows, starts, targets = segments.rows.tolist(), segments.starts.tolist(), segments.targets.tolist()
        steps = segments.cost_steps.tolist()
        point_list = points.tolist()
        for segment in later.tolist():
            row = rows[segment]
            if point_list[row] == starts[segment] and steps[segment] <= remaining:
                point_list[row] = targets[segment]
                remaining -= steps[segment]
        points = np.array(point_list, dtype=np.intp)
    return points, price, lp_value, taken


def _solve_frontiers(frontier: RowFrontiers, limit: float) -> KnapsackResult:
    """Steps 2-4 of the module docstring on precomputed frontiers; choices are frontier points.

    The core is grown in rounds: a round with threshold T = UB - gap keeps only options whose
    reduced cost is at most gap and states whose bound is at least T, so it finds the best
    solution worth at least T if there is one (then it is optimal); otherwise the optimum is
    below T, and the next round quadruples the gap, up to UB - (best solution so far), where the
    round is the full exact reduction."""
    rows = np.arange(frontier.costs.shape[0])
    segments = _Segments(frontier)
    points, price, _, taken = _greedy(frontier, segments, limit)
    lower_bound = float(frontier.values[rows, points].sum())
    prices = _nearby_prices(segments, taken, price)
    finite_costs = np.where(frontier.present, frontier.costs, 0.0)
    reduced = np.where(frontier.present, frontier.values - price * finite_costs, -math.inf)
    best_reduced = reduced.max(axis=1)
    upper_bound = price * limit + float(best_reduced.sum())
    scale = 1.0 + abs(upper_bound)
    if lower_bound >= upper_bound - OPTIMAL_RELATIVE_TOLERANCE * scale:
        return KnapsackResult(points, lower_bound, upper_bound, lower_bound, price, 0)
    tolerance = BOUND_RELATIVE_TOLERANCE * scale
    excess = np.where(frontier.present & (frontier.costs <= limit), best_reduced[:, None] - reduced, math.inf)
    best_points, best_value = points, lower_bound
    target_gap = (upper_bound - lower_bound) * CORE_FIRST_GAP_FRACTION
    free_rows = largest = 0
    while True:
        gap = min(target_gap, upper_bound - best_value)
        threshold = upper_bound - gap - tolerance
        found, value, free_rows, states = _core_dp(frontier, excess <= gap + tolerance, prices, limit, threshold)
        largest = max(largest, states)
        if found is not None and value > best_value:
            best_points, best_value = found, value
        if (found is not None and value >= threshold) or gap >= upper_bound - best_value:
            break
        target_gap *= 4
    return KnapsackResult(best_points, best_value, upper_bound, lower_bound, price, free_rows, largest)


def _nearby_prices(segments: _Segments, taken: int, price: float) -> np.ndarray:
    """Dual prices for the core's bounds: the LP's own and the slopes of segments at doubling
    distances on either side of the cut. Each gives a valid Lagrangian bound; the core uses the
    smallest, which follows the LP bound of what is left as a function of the capacity left
    (one price alone is loose when the capacity left is far from the LP's)."""
    count = segments.slopes.shape[0]
    picks = [taken + step for step in (-512, -128, -32, -8, -2, 1, 3, 9, 33, 129, 513)]
    picks = [pick for pick in picks if 0 <= pick < count]
    others = np.unique(segments.slopes[picks])
    return np.concatenate(([price], others[others != price]))


def _core_prices(prices: np.ndarray, survives: np.ndarray, costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Add to `prices` the quantiles of the slopes between consecutive surviving options of the
    free rows: the slopes of the LP of what the core has left to decide."""
    rows, points = np.nonzero(survives)
    same_row = rows[1:] == rows[:-1]
    if not same_row.any():
        return prices
    cost_steps = costs[rows[1:], points[1:]] - costs[rows[:-1], points[:-1]]
    value_steps = values[rows[1:], points[1:]] - values[rows[:-1], points[:-1]]
    slopes = (value_steps[same_row] / cost_steps[same_row])
    slopes = slopes[np.isfinite(slopes) & (slopes > 0)]
    if slopes.shape[0] == 0:
        return prices
    quantiles = np.unique(np.quantile(slopes, np.linspace(0.0, 1.0, CORE_PRICE_QUANTILES)))
    return np.concatenate((prices, quantiles[~np.isin(quantiles, prices)]))


class _CoreDP:
    """Pareto states (cost ascending, value strictly ascending) over the free rows, with
    back-pointers. A merge lays the pairs out point-major (one cost-sorted run per point of the
    new row, which the stable sort merges quickly) and drops, before sorting, every pair over
    the limit or whose Lagrangian bound under some price is below the threshold."""

    def __init__(self, cost: float, value: float) -> None:
        self.costs = np.array([cost])
        self.values = np.array([value])
        self.stages: list[tuple[int, np.ndarray, int, np.ndarray]] = []  # row, pairs, states before, points

    def merge(self, row: int, points: np.ndarray, costs: np.ndarray, values: np.ndarray, limit: float,
              prices: np.ndarray, bound_floors: np.ndarray) -> None:
        """Keep pairs with cost <= limit and value - price * cost >= bound floor for every price."""
        state_count = self.costs.shape[0]
        pair_costs = np.add.outer(costs, self.costs).ravel()
        pair_values = np.add.outer(values, self.values).ravel()
        if prices.shape[0] == 1:
            fits = pair_values - pair_costs * prices[0] >= bound_floors[0]
        else:
            fits = ((pair_values[:, None] - pair_costs[:, None] * prices) - bound_floors).min(axis=1) >= 0
        candidates = np.flatnonzero((pair_costs <= limit) & fits)
        order = candidates[np.argsort(pair_costs[candidates], kind="stable")]
        pairs = order[_strict_records(pair_values[order])]
        self.costs, self.values = pair_costs[pairs], pair_values[pairs]
        self.stages.append((row, pairs, state_count, points))

    def backtrack(self, state: int, chosen: np.ndarray) -> None:
        for row, pairs, state_count, points in reversed(self.stages):
            point, state = divmod(int(pairs[state]), state_count)
            chosen[row] = points[point]


def _strict_records(values: np.ndarray) -> np.ndarray:
    """Mask of entries strictly above every earlier entry (the first is always kept)."""
    keep = np.empty(values.shape[0], dtype=bool)
    if values.shape[0]:
        keep[0] = True
        np.greater(values[1:], np.maximum.accumulate(values)[:-1], out=keep[1:])
    return keep


def _core_dp(frontier: RowFrontiers, survives: np.ndarray, prices: np.ndarray, limit: float,
             threshold: float) -> tuple[np.ndarray | None, float, int, int]:
    """The best solution among those using only `survives` options and worth at least
    `threshold`: (points or None, value, free rows, most states). A partial solution's bound
    under price p is its value + p * (limit - its cost) + the rows still to come at their best
    value - p * cost; it is dropped when its smallest bound is below the threshold."""
    counts = survives.sum(axis=1)
    if (counts == 0).any():
        return None, -math.inf, 0, 0
    fixed = counts == 1
    fixed_points = np.argmax(survives, axis=1)
    fixed_rows = np.flatnonzero(fixed)
    free = np.flatnonzero(~fixed)
    start_cost = float(frontier.costs[fixed_rows, fixed_points[fixed_rows]].sum())
    start_value = float(frontier.values[fixed_rows, fixed_points[fixed_rows]].sum())
    if start_cost > limit:
        return None, -math.inf, int(free.shape[0]), 0
    free_survives = survives[free]
    free_costs = np.where(free_survives, frontier.costs[free], 0.0)
    lp_price = float(prices[0])
    prices = _core_prices(prices, free_survives, frontier.costs[free], frontier.values[free])
    # Best value - p * cost of each free row under each price: (free rows, prices).
    reduced = np.where(free_survives[:, :, None], frontier.values[free][:, :, None] - free_costs[:, :, None] * prices,
                       -math.inf)
    row_best = reduced.max(axis=1)
    # Drop the options that cannot reach the threshold even with every other row at its best.
    everyone = (start_value - start_cost * prices) + prices * limit + row_best.sum(axis=0)
    option_bounds = (everyone - row_best)[:, None, :] + reduced
    free_survives &= option_bounds.min(axis=2) >= threshold
    counts = free_survives.sum(axis=1)
    if (counts == 0).any():
        return None, -math.inf, int(free.shape[0]), 0
    order = np.argsort(counts, kind="stable")
    free, free_survives, row_best = free[order], free_survives[order], row_best[order]
    # Rows still to come after each step, at their best, under each price the states are checked with.
    state_prices = prices if CORE_STATE_PRICES == "all" else np.array([lp_price])
    row_best = row_best if CORE_STATE_PRICES == "all" else row_best[:, list(prices).index(lp_price)][:, None]
    prices = state_prices
    suffix = np.concatenate((np.cumsum(row_best[::-1], axis=0)[::-1][1:], np.zeros((1, prices.shape[0]))))
    dp = _CoreDP(start_cost, start_value)
    largest = 1
    for step, row in enumerate(free.tolist()):
        points = np.flatnonzero(free_survives[step])
        dp.merge(row, points, frontier.costs[row, points], frontier.values[row, points], limit, prices,
                 threshold - prices * limit - suffix[step])
        if dp.costs.shape[0] == 0:
            return None, -math.inf, int(free.shape[0]), largest
        largest = max(largest, dp.costs.shape[0])
    chosen = fixed_points.copy()
    dp.backtrack(int(np.argmax(dp.values)), chosen)
    value = float(frontier.values[np.arange(chosen.shape[0]), chosen].sum())
    return chosen, value, int(free.shape[0]), largest


# HiGHS settings for the core of the two-constraint problem: the true optimum, not one within a gap.
_HIGHS_EXACT = {"mip_rel_gap": 0.0, "mip_abs_gap": 1e-12, "mip_feasibility_tolerance": 1e-10,
                "primal_feasibility_tolerance": 1e-10}
DUAL_SEARCH_STEPS = 30
INTEGER_SEARCH_STEPS = 6


def _solve_two_constraints(costs: np.ndarray, values: np.ndarray, limit: float, gpu_costs: np.ndarray,
                           gpu_limit: float) -> KnapsackResult:
    """Bandwidth and GPU: solve without the GPU constraint (optimal if it fits the GPU too);
    else search the GPU price mu on the Lagrangian dual mu * G + LP(values - mu * gpu), fix
    every option whose reduced cost under (lambda, mu) exceeds UB - LB, and solve the few free
    rows as a boolean program with HiGHS at zero gap."""
    row_count = costs.shape[0]
    rows = np.arange(row_count)
    gpu_costs = np.where(np.isfinite(costs), gpu_costs, 0.0)
    plain = solve_multiple_choice(costs, values, limit)
    if float(gpu_costs[rows, plain.choices].sum()) <= gpu_limit:
        return plain
    finite_costs = np.where(np.isfinite(costs), costs, 0.0)
    free_columns = (costs == 0) & (gpu_costs == 0)
    if not free_columns.any(axis=1).all():
        raise ValueError("every row needs a column of cost 0 and GPU load 0 (the fallback)")
    fallback_choices = np.argmax(np.where(free_columns, values, -math.inf), axis=1)
    lower_bound = float(values[rows, fallback_choices].sum())
    best_choices = fallback_choices
    best = (math.inf, 0.0, 0.0)  # (UB, lambda, mu)
    fallback_values = values[rows, fallback_choices]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(gpu_costs > 0, (values - fallback_values[:, None]) / gpu_costs, 0.0)
    mu_low, mu_high = 0.0, max(float(np.nanmax(np.where(np.isfinite(costs), ratios, 0.0))), 0.0) * 1.01 + 1e-12
    for _ in range(DUAL_SEARCH_STEPS):
        mu = 0.5 * (mu_low + mu_high)
        adjusted = values - mu * gpu_costs
        frontier = RowFrontiers(costs, adjusted)
        segments = _Segments(frontier)
        points, price, _, taken = _greedy(frontier, segments, limit)
        choices = frontier.order[rows, points]
        # The integer walk, sent back to the fallback where it most overuses the GPU, is a candidate.
        choices = _fit_gpu(choices, values, gpu_costs, fallback_choices, gpu_limit)
        value = float(values[rows, choices].sum())
        if value > lower_bound:
            lower_bound, best_choices = value, choices
        reduced = np.where(np.isfinite(costs), adjusted - price * finite_costs, -math.inf)
        upper_bound = price * limit + mu * gpu_limit + float(reduced.max(axis=1).sum())
        if upper_bound < best[0]:
            best = (upper_bound, price, mu)
        # Subgradient sign: the LP solution's GPU use against the pool (the cut segment at its fraction).
        lp_points = np.zeros(row_count, dtype=np.intp)
        np.maximum.at(lp_points, segments.rows[:taken], segments.targets[:taken])
        lp_gpu = float(gpu_costs[rows, frontier.order[rows, lp_points]].sum())
        if lp_gpu > gpu_limit:
            mu_low = mu
        else:
            mu_high = mu
    # Better feasible solutions: the exact one-capacity optimum under GPU prices around the
    # dual's, bisected on whether it fits the GPU (each also sent back to the fallback until it fits).
    mu_fits = max(mu_high, 1e-12)
    for _ in range(INTEGER_SEARCH_STEPS):
        choices = solve_multiple_choice(costs, values - mu_fits * gpu_costs, limit).choices
        if float(gpu_costs[rows, choices].sum()) <= gpu_limit:
            break
        mu_low, mu_fits = mu_fits, mu_fits * 2
    mu_low = min(mu_low, mu_fits)
    for step in range(INTEGER_SEARCH_STEPS):
        mu = mu_fits if step == 0 else 0.5 * (mu_low + mu_fits)
        choices = solve_multiple_choice(costs, values - mu * gpu_costs, limit).choices
        fits = float(gpu_costs[rows, choices].sum()) <= gpu_limit
        choices = _fit_gpu(choices, values, gpu_costs, fallback_choices, gpu_limit)
        value = float(values[rows, choices].sum())
        if value > lower_bound:
            lower_bound, best_choices = value, choices
        if step:
            if fits:
                mu_fits = mu
            else:
                mu_low = mu
    upper_bound, price, mu = best
    scale = 1.0 + abs(upper_bound)
    if lower_bound >= upper_bound - OPTIMAL_RELATIVE_TOLERANCE * scale:
        return KnapsackResult(best_choices, lower_bound, upper_bound, lower_bound, price, 0, gpu_price=mu)
    tolerance = BOUND_RELATIVE_TOLERANCE * scale
    reduced = np.where(np.isfinite(costs), values - price * finite_costs - mu * gpu_costs, -math.inf)
    excess = np.where((costs <= limit) & (gpu_costs <= gpu_limit), reduced.max(axis=1)[:, None] - reduced, math.inf)
    # Rounds as in `_solve_frontiers`: a round keeps the options within `gap` of their row's best
    # and asks HiGHS for a solution worth at least UB - gap; one found is optimal.
    target_gap = (upper_bound - lower_bound) * CORE_FIRST_GAP_FRACTION
    free_rows = 0
    while True:
        gap = min(target_gap, upper_bound - lower_bound)
        threshold = upper_bound - gap - tolerance
        survives = excess <= gap + tolerance
        counts = survives.sum(axis=1)
        if not (counts == 0).any():
            fixed_rows = np.flatnonzero(counts == 1)
            fixed_choices = np.argmax(survives, axis=1)
            free = np.flatnonzero(counts > 1)
            free_rows = int(free.shape[0])
            bandwidth_left = limit - float(costs[fixed_rows, fixed_choices[fixed_rows]].sum())
            gpu_left = gpu_limit - float(gpu_costs[fixed_rows, fixed_choices[fixed_rows]].sum())
            fixed_value = float(values[fixed_rows, fixed_choices[fixed_rows]].sum())
            found = _core_dp_two(costs[free], values[free], gpu_costs[free], survives[free], bandwidth_left,
                                 gpu_left, price, mu, threshold - fixed_value)
            if found is False:  # too many states: the boolean program instead
                found = _core_program(costs[free], values[free], gpu_costs[free], survives[free], bandwidth_left,
                                      gpu_left)
            if found is not None:
                choices = fixed_choices.copy()
                choices[free] = found
                value = float(values[rows, choices].sum())
                if value > lower_bound and float(costs[rows, choices].sum()) <= limit and (
                        float(gpu_costs[rows, choices].sum()) <= gpu_limit):
                    lower_bound, best_choices = value, choices
                if value >= threshold:
                    break
        if gap >= upper_bound - lower_bound:
            break
        target_gap *= 4
    return KnapsackResult(best_choices, lower_bound, upper_bound, lower_bound, price, free_rows, gpu_price=mu)


CORE_TWO_MAX_STATES = 200_000


def _core_dp_two(costs, values, gpu_costs, allowed, bandwidth_limit: float, gpu_limit: float, price: float,
                 gpu_price: float, threshold: float):
    """The free rows with both capacities: every combination of allowed columns that fits both
    and whose Lagrangian bound (value + lambda * bandwidth left + mu * GPU left + the rows to come
    at their best reduced value) reaches `threshold`, built row by row; the best one's column per
    row, None if there is none, False if the states outgrow CORE_TWO_MAX_STATES."""
    row_count = costs.shape[0]
    if row_count == 0:
        return np.zeros(0, dtype=np.intp) if bandwidth_limit >= 0 and gpu_limit >= 0 and threshold <= 0 else None
    finite_costs = np.where(allowed, costs, 0.0)
    reduced = np.where(allowed, values - price * finite_costs - gpu_price * gpu_costs, -math.inf)
    suffix = np.concatenate((np.cumsum(reduced.max(axis=1)[::-1])[::-1][1:], [0.0]))
    floor_base = threshold - price * bandwidth_limit - gpu_price * gpu_limit
    state_costs, state_gpu, state_values = np.zeros(1), np.zeros(1), np.zeros(1)
    stages = []
    for row in range(row_count):
        columns = np.flatnonzero(allowed[row])
        pair_costs = np.add.outer(costs[row, columns], state_costs).ravel()
        pair_gpu = np.add.outer(gpu_costs[row, columns], state_gpu).ravel()
        pair_values = np.add.outer(values[row, columns], state_values).ravel()
        keep = np.flatnonzero((pair_costs <= bandwidth_limit) & (pair_gpu <= gpu_limit) & (
            pair_values - price * pair_costs - gpu_price * pair_gpu >= floor_base - suffix[row]))
        if keep.shape[0] == 0:
            return None
        if keep.shape[0] > CORE_TWO_MAX_STATES:
            return False
        stages.append((columns, keep, state_costs.shape[0]))
        state_costs, state_gpu, state_values = pair_costs[keep], pair_gpu[keep], pair_values[keep]
    state = int(np.argmax(state_values))
    chosen = np.zeros(row_count, dtype=np.intp)
    for row in range(row_count - 1, -1, -1):
        columns, keep, previous_count = stages[row]
        column, state = divmod(int(keep[state]), previous_count)
        chosen[row] = columns[column]
    return chosen


def _fit_gpu(choices: np.ndarray, values: np.ndarray, gpu_costs: np.ndarray, fallback_choices: np.ndarray,
             gpu_limit: float) -> np.ndarray:
    """A solution within the GPU limit: rows go back to their fallback, least value lost per
    GPU load saved first, until the load fits (bandwidth only falls)."""
    rows = np.arange(choices.shape[0])
    loads = gpu_costs[rows, choices]
    excess = float(loads.sum()) - gpu_limit * (1 - 1e-12)
    if excess <= 0:
        return choices
    losses = values[rows, choices] - values[rows, fallback_choices]
    candidates = np.flatnonzero(loads > 0)
    order = candidates[np.argsort(losses[candidates] / loads[candidates], kind="stable")]
    needed = int(np.searchsorted(np.cumsum(loads[order]), excess, side="left")) + 1
    fitted = choices.copy()
    fitted[order[:needed]] = fallback_choices[order[:needed]]
    return fitted


def _core_program(costs, values, gpu_costs, allowed, bandwidth_limit: float, gpu_limit: float) -> np.ndarray | None:
    """The free rows as a boolean program (one allowed column per row, both capacities), solved
    by HiGHS at zero gap; the chosen column per row, or None if there is no solution."""
    if costs.shape[0] == 0:
        return np.zeros(0, dtype=np.intp) if bandwidth_limit >= 0 and gpu_limit >= 0 else None
    import highspy

    row_ids, column_ids = np.nonzero(allowed)
    count = row_ids.shape[0]
    free_rows = costs.shape[0]
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    for option, setting in _HIGHS_EXACT.items():
        highs.setOptionValue(option, setting)
    lp = highspy.HighsLp()
    lp.num_col_ = count
    lp.num_row_ = free_rows + 2
    lp.col_cost_ = -values[row_ids, column_ids]
    lp.col_lower_ = np.zeros(count)
    lp.col_upper_ = np.ones(count)
    lp.row_lower_ = np.concatenate((np.ones(free_rows), [-highspy.kHighsInf, -highspy.kHighsInf]))
    lp.row_upper_ = np.concatenate((np.ones(free_rows), [bandwidth_limit, gpu_limit]))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, 3 * count + 1, 3)
    lp.a_matrix_.index_ = np.stack((row_ids, np.full(count, free_rows), np.full(count, free_rows + 1)), axis=1).ravel()
    lp.a_matrix_.value_ = np.stack((np.ones(count), costs[row_ids, column_ids], gpu_costs[row_ids, column_ids]),
                                   axis=1).ravel()
    lp.integrality_ = [highspy.HighsVarType.kInteger] * count
    highs.passModel(lp)
    highs.run()
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    solution = np.asarray(highs.getSolution().col_value)
    chosen = np.zeros(free_rows, dtype=np.intp)
    taken = solution > 0.5
    chosen[row_ids[taken]] = column_ids[taken]
    return chosen


# ---------------------------------------------------------------- the cell problem


# Vehicles' camera tuples already read and found valid, by identity (the entry holds the tuple,
# so its id cannot be reused while cached): (tuple, (3, cameras, width) sizes/runtimes/utilities,
# padding mask or None, camera weights).
_VEHICLE_BLOCKS: dict[int, tuple[tuple, np.ndarray, np.ndarray | None, np.ndarray]] = {}
_VEHICLE_BLOCKS_KEPT = 16_384


def _vehicle_blocks(vehicles: Sequence[CellVehicle]) -> list[tuple[tuple, np.ndarray, np.ndarray | None, np.ndarray]]:
    """Each vehicle's cameras as one block; reads (and checks) the vehicles not seen before."""
    blocks = [_VEHICLE_BLOCKS.get(id(vehicle.services)) for vehicle in vehicles]
    missing = [index for index, (vehicle, block) in enumerate(zip(vehicles, blocks, strict=True))
               if block is None or block[0] is not vehicle.services]
    if not missing:
        return blocks
    new_vehicles = [vehicles[index] for index in missing]
    services = [service for vehicle in new_vehicles for service in vehicle.services]
    option_tuples = [service.options for service in services]
    counts = [len(options) for options in option_tuples]
    # The cell keeps whole vehicles' blocks: no entry per options tuple (10,000 in a cell of 1000 cars).
    numbers = read_option_numbers(option_tuples, counts, remember=False)
    try:
        weights = np.fromiter(map(_WEIGHT, services), float, len(services))
        valid = numbers is not None and bool(((weights >= 0) & (weights < math.inf)).all())
    except (TypeError, ValueError):
        valid = False
    for vehicle in new_vehicles:
        if not valid or len({service.name for service in vehicle.services}) != len(vehicle.services):
            _check_vehicle_services(vehicle)  # names the vehicle and the offending camera or option
    if not valid:
        raise AssertionError("every vehicle passed check_services but its options or weights were refused")
    cameras = [len(vehicle.services) for vehicle in new_vehicles]
    if len(set(counts)) == 1 and len(set(cameras)) == 1:
        # The usual cell: every car as many cameras, every camera as many options: one reshape.
        shaped = numbers.reshape(3, len(new_vehicles), cameras[0], counts[0])
        vehicle_numbers = list(shaped.transpose(1, 0, 2, 3))  # one (3, cameras, width) view per car
        vehicle_weights = list(weights.reshape(len(new_vehicles), cameras[0]))
        for index, vehicle, block, block_weights in zip(missing, new_vehicles, vehicle_numbers, vehicle_weights,
                                                        strict=True):
            entry = (vehicle.services, block, None, block_weights)
            _VEHICLE_BLOCKS[id(vehicle.services)] = entry
            blocks[index] = entry
        forget_oldest(_VEHICLE_BLOCKS, _VEHICLE_BLOCKS_KEPT)
        return blocks
    offset = camera_offset = 0
    for index, vehicle in zip(missing, new_vehicles, strict=True):
        vehicle_counts = [len(service.options) for service in vehicle.services]
        total = sum(vehicle_counts)
        width = max(vehicle_counts)
        block_numbers = numbers[:, offset:offset + total]
        offset += total
        if min(vehicle_counts) == width:
            padding = None
            block = block_numbers.reshape(3, len(vehicle_counts), width)
        else:
            padding = np.arange(width) >= np.array(vehicle_counts)[:, None]
            block = np.zeros((3, len(vehicle_counts), width))
            block[0] = 1.0  # padding: a size that is not a fallback
            block[:, ~padding] = block_numbers
        entry = (vehicle.services, block, padding, weights[camera_offset:camera_offset + len(vehicle_counts)])
        camera_offset += len(vehicle_counts)
        _VEHICLE_BLOCKS[id(vehicle.services)] = entry
        blocks[index] = entry
    forget_oldest(_VEHICLE_BLOCKS, _VEHICLE_BLOCKS_KEPT)
    return blocks


# The last cell's cameras stacked into one table, kept while the next cell has the same cars'
# camera tuples (a fleet's frames): (the tuples, (numbers, padding, camera weights, counts)).
_LAST_STACK: list = [(), None]


def _stacked_blocks(vehicles: Sequence[CellVehicle]):
    """Every car's cameras as one (3, cameras, width) table of sizes, runtimes and utilities,
    the padding mask (or None), the camera weights and the cameras per car."""
    services = [vehicle.services for vehicle in vehicles]
    previous, stacked = _LAST_STACK
    if len(previous) == len(services) and all(a is b for a, b in zip(previous, services, strict=True)):
        return stacked
    blocks = _vehicle_blocks(vehicles)
    counts = [block[1].shape[1] for block in blocks]
    widths = {block[1].shape[2] for block in blocks}
    if len(widths) == 1 and len(set(counts)) == 1 and all(block[2] is None for block in blocks):
        numbers = np.stack([block[1] for block in blocks], axis=1).reshape(3, sum(counts), -1)
        padding = None
    else:
        width = max(widths)
        numbers = np.zeros((3, sum(counts), width))
        numbers[0] = 1.0
        padding = np.ones((sum(counts), width), dtype=bool)
        row = 0
        for _, block, block_padding, _ in blocks:
            cameras, block_width = block.shape[1], block.shape[2]
            numbers[:, row:row + cameras, :block_width] = block
            padding[row:row + cameras, :block_width] = False if block_padding is None else block_padding
            row += cameras
    stacked = (numbers, padding, np.concatenate([block[3] for block in blocks]), counts)
    _LAST_STACK[:] = [services, stacked]
    return stacked


class CellTable:
    """Every camera of every vehicle as one row of (camera x option) tables: critical
    bandwidth at its vehicle's link, camera-weighted utility, GPU load. Checks the problem on
    the way (DataError naming the vehicle, camera or option)."""

    def __init__(self, problem: CellProblem) -> None:
        vehicles = problem.vehicles
        rtts, slos = _check_cell(problem)
        self.vehicles = vehicles
        numbers, padding, camera_weights, self.camera_counts = _stacked_blocks(vehicles)
        sizes, runtimes, utilities = numbers
        self.vehicle_of_row = np.repeat(np.arange(len(vehicles)), self.camera_counts)
        slack_s = slos[self.vehicle_of_row][:, None] - runtimes
        slack_s -= rtts[self.vehicle_of_row][:, None]
        slack_s /= 1000.0
        bandwidths = np.full(sizes.shape, math.inf)
        np.divide(sizes, slack_s, out=bandwidths, where=slack_s > 0)
        bandwidths[sizes == 0] = 0.0
        if padding is not None:
            bandwidths[padding] = math.inf
        self.bandwidths_mbps = bandwidths
        self.vehicle_weights = np.array([vehicle.weight for vehicle in vehicles], dtype=float)
        self.camera_values = utilities * camera_weights[:, None]  # U_v contributions
        self.values = self.camera_values * self.vehicle_weights[self.vehicle_of_row][:, None]
        self.gpu_loads = np.where(sizes > 0, runtimes * (problem.frame_rate_hz / 1000.0), 0.0)
        if padding is not None:
            self.gpu_loads[padding] = 0.0
        self.row_starts = [0, *np.cumsum(self.camera_counts).tolist()]

    @property
    def services(self) -> list[Service]:
        return [service for vehicle in self.vehicles for service in vehicle.services]


def _check_cell(problem: CellProblem) -> tuple[np.ndarray, np.ndarray]:
    """Checks the cell and its vehicles' own fields (vectorised); returns each vehicle's RTT and SLO."""
    vehicles = problem.vehicles
    if not vehicles:
        raise DataError("a cell problem needs at least one vehicle")
    check_link(problem.capacity_mbps, problem.rtt_ms, problem.slo_ms)
    if problem.gpu_workers is not None and not (math.isfinite(problem.gpu_workers) and problem.gpu_workers >= 0):
        raise DataError(f"gpu_workers must be a finite number >= 0 (got {problem.gpu_workers!r})")
    if not (math.isfinite(problem.frame_rate_hz) and problem.frame_rate_hz > 0):
        raise DataError(f"frame_rate_hz must be a finite number > 0 (got {problem.frame_rate_hz!r})")
    fairness = problem.fairness
    if fairness not in FAIRNESS_MODES and not (
            isinstance(fairness, int | float) and not isinstance(fairness, bool) and math.isfinite(fairness)):
        raise DataError(f"fairness must be None, 'max-min' or a utility floor (got {fairness!r})")
    try:
        rtts = np.array([problem.rtt_ms if v.rtt_ms is None else v.rtt_ms for v in vehicles], dtype=float)
        slos = np.array([problem.slo_ms if v.slo_ms is None else v.slo_ms for v in vehicles], dtype=float)
        weights = np.array([vehicle.weight for vehicle in vehicles], dtype=float)
        floors = np.array([0.0 if v.utility_floor is None else v.utility_floor for v in vehicles], dtype=float)
    except (TypeError, ValueError):
        rtts = slos = weights = floors = np.array([math.nan])
    valid = (
        len({vehicle.name for vehicle in vehicles}) == len(vehicles)
        and ((rtts >= 0) & (rtts < math.inf) & (slos > 0) & (slos < math.inf)).all()
        and ((weights >= 0) & (weights < math.inf)).all()
        and np.isfinite(floors).all()
        and all(vehicle.services for vehicle in vehicles)
    )
    if not valid:
        _check_vehicles_one_by_one(problem)
    return rtts, slos


def _check_vehicles_one_by_one(problem: CellProblem) -> None:
    names = set()
    for vehicle in problem.vehicles:
        if vehicle.name in names:
            raise DataError(f"vehicle '{vehicle.name}' appears twice")
        names.add(vehicle.name)
        if not (isinstance(vehicle.weight, int | float) and math.isfinite(vehicle.weight) and vehicle.weight >= 0):
            raise DataError(f"vehicle '{vehicle.name}': weight must be a finite number >= 0")
        try:
            check_link(problem.capacity_mbps,
                       problem.rtt_ms if vehicle.rtt_ms is None else vehicle.rtt_ms,
                       problem.slo_ms if vehicle.slo_ms is None else vehicle.slo_ms)
        except DataError as error:
            raise DataError(f"vehicle '{vehicle.name}': {error}") from None
        except TypeError:
            raise DataError(f"vehicle '{vehicle.name}': rtt_ms and slo_ms must be numbers") from None
        if vehicle.utility_floor is not None and not (
                isinstance(vehicle.utility_floor, int | float) and math.isfinite(vehicle.utility_floor)):
            raise DataError(f"vehicle '{vehicle.name}': utility_floor must be a finite number")
        if not vehicle.services:
            raise DataError(f"vehicle '{vehicle.name}' has no cameras")


def _check_vehicle_services(vehicle: CellVehicle) -> None:
    from optimizer.problem import check_services

    try:
        check_services(vehicle.services)
    except DataError as error:
        raise DataError(f"vehicle '{vehicle.name}': {error}") from None


def solve_cell(problem: CellProblem) -> CellAllocation:
    """The exact cell allocation (see the module docstring)."""
    started_ns = time.perf_counter_ns()
    table = CellTable(problem)
    # Reading option objects never seen before is most of a fresh cell's time: said apart.
    extra: dict[str, object] = {"table_us": (time.perf_counter_ns() - started_ns) / 1000.0}
    limit = budget_limit_mbps(problem.capacity_mbps)
    floors = _floors(problem)
    if floors is None and problem.fairness != "max-min":
        gpu_limit = None if problem.gpu_workers is None else budget_limit_mbps(problem.gpu_workers)
        result = solve_multiple_choice(table.bandwidths_mbps, table.values, limit,
                                       None if gpu_limit is None else table.gpu_loads, gpu_limit)
        choices = result.choices
    else:
        if problem.gpu_workers is not None:
            raise DataError("a GPU capacity together with utility floors or max-min fairness is not supported")
        choices, result, fair_utility = _solve_with_floors(problem, table, limit, floors)
        if fair_utility is not None:
            extra["max_min_utility"] = fair_utility
    extra.update(upper_bound=result.upper_bound, lower_bound=result.lower_bound, price=result.price,
                 free_rows=result.free_rows, core_states=result.core_states)
    return _cell_allocation(problem, table, choices, started_ns, extra)


def _floors(problem: CellProblem) -> np.ndarray | None:
    """Per-vehicle floor on U_v (-inf where none), or None when no vehicle has one."""
    shared = problem.fairness if isinstance(problem.fairness, int | float) else None
    own = [vehicle.utility_floor for vehicle in problem.vehicles]
    if shared is None and all(floor is None for floor in own):
        return None
    floors = np.array([-math.inf if floor is None else floor for floor in own], dtype=float)
    if shared is not None:
        floors = np.maximum(floors, float(shared))
    return floors


def _cell_allocation(problem: CellProblem, table: CellTable, choices: np.ndarray, started_ns: int,
                     extra: dict[str, object]) -> CellAllocation:
    return CellAllocation(problem, table, choices, (time.perf_counter_ns() - started_ns) / 1000.0, extra)


def _solve_with_floors(problem: CellProblem, table: CellTable, limit: float, floors: np.ndarray | None):
    """Floors (and max-min) per vehicle: each vehicle's frontier of (bandwidth, U_v) states is one
    class; the states below its floor are dropped. Returns (option per camera row, the vehicle-level
    knapsack result, the max-min level or None)."""
    vehicle_count = len(problem.vehicles)
    frontier = RowFrontiers(table.bandwidths_mbps, table.camera_values)
    dps = []
    point_maps = []
    for start, end in zip(table.row_starts[:-1], table.row_starts[1:], strict=True):
        dp = _FrontierDP()
        columns = {}
        for row in range(start, end):
            columns[row - start] = points = np.flatnonzero(frontier.present[row])
            dp.merge(row - start, frontier.costs[row, points], frontier.values[row, points], limit)
        dps.append(dp)
        point_maps.append(columns)
    width = max(dp.costs.shape[0] for dp in dps)
    state_costs = np.full((vehicle_count, width), math.inf)
    state_utilities = np.full((vehicle_count, width), math.inf)  # ascending per row; inf on padding
    for index, dp in enumerate(dps):
        state_costs[index, :dp.costs.shape[0]] = dp.costs
        state_utilities[index, :dp.values.shape[0]] = dp.values
    if floors is None:
        floors = np.full(vehicle_count, -math.inf)
    rows = np.arange(vehicle_count)

    def cheapest_states(thresholds: np.ndarray) -> np.ndarray:
        """Per vehicle, the first (cheapest) state with U_v >= its threshold (within tolerance)."""
        slack = BOUND_RELATIVE_TOLERANCE * (1.0 + np.abs(np.where(np.isfinite(thresholds), thresholds, 0.0)))
        return (state_utilities < (thresholds - slack)[:, None]).sum(axis=1)

    def fits(thresholds: np.ndarray) -> bool:
        first = cheapest_states(thresholds)
        if (first >= width).any():
            return False
        return float(state_costs[rows, first].sum()) <= limit

    fair_utility = None
    if not fits(floors):
        raise InfeasibleCellError("the vehicles' utility floors cannot all be met within the cell capacity")
    if problem.fairness == "max-min":
        candidates = np.unique(state_utilities[np.isfinite(state_utilities)])
        low, high = -1, candidates.shape[0]  # candidates[low] fits (or -1: only the floors), [high] does not
        while high - low > 1:
            middle = (low + high) // 2
            if fits(np.maximum(floors, candidates[middle])):
                low = middle
            else:
                high = middle
        if low >= 0:
            fair_utility = float(candidates[low])
            floors = np.maximum(floors, fair_utility)
    first = cheapest_states(floors)
    base_costs = state_costs[rows, first]
    columns = np.arange(width)
    allowed = (columns >= first[:, None]) & np.isfinite(state_costs)
    class_costs = np.where(allowed, state_costs - base_costs[:, None], math.inf)
    class_values = np.where(allowed, state_utilities, 0.0) * table.vehicle_weights[:, None]
    result = solve_multiple_choice(class_costs, class_values, limit - float(base_costs.sum()))
    points = [0] * len(table.services)
    for index, (dp, start, end) in enumerate(zip(dps, table.row_starts[:-1], table.row_starts[1:], strict=True)):
        camera_points = [0] * (end - start)
        dp.backtrack(int(result.choices[index]), camera_points, point_maps[index])
        points[start:end] = camera_points
    point_array = np.asarray(points, dtype=np.intp)
    choices = frontier.order[np.arange(point_array.shape[0]), point_array]
    return choices, result, fair_utility
