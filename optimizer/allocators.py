"""Allocation methods behind one protocol, and the registry the CLI and the replay pick from.

Adding a method is one class with `name`, capability flags and `solve(problem) -> Allocation`,
and one line in `ALLOCATORS`. Every method reports `Allocation.utility` as the weighted total
of its choices, `bandwidth_mbps` as each choice's critical bandwidth and `solve_us` as measured.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Protocol, runtime_checkable

from avcloud.errors import UserError
from avcloud.types import Allocation, AllocationProblem, Service
from optimizer.cell import CellAllocation, CellProblem, CellVehicle, solve_cell
from optimizer.convex import BooleanProgramAllocator, LpAllocator
from optimizer.exact import PreparedServices, ProblemArrays
from optimizer.problem import (
    allocation_from_indices,
    budget_limit_mbps,
    check_link,
    check_problem,
    critical_bandwidths_mbps,
    fallback_index,
)


@runtime_checkable
class Allocator(Protocol):
    """An allocation method. Capability flags:
    exact: returns the true optimum of the knapsack;
    supports_weights: honours Service.weight in its choices;
    bandwidth_aware: its choices always fit the budget."""

    name: str
    exact: bool
    supports_weights: bool
    bandwidth_aware: bool

    def solve(self, problem: AllocationProblem) -> Allocation: ...


class ExactAllocator:
    """The true optimum (see optimizer/exact.py), with the budget-independent work cached.

    The cache is keyed on the identity of the services tuple plus RTT and SLO: pass the same
    tuple every frame and a new budget costs a binary search; a new RTT rebuilds only the
    frontiers. `prepare()` exposes the prepared problem for callers that solve many budgets.
    """

    name = "exact"
    exact = True
    supports_weights = True
    bandwidth_aware = True

    def __init__(self, cache_size: int = 16) -> None:
        self.cache_size = cache_size
        self._arrays: OrderedDict[int, ProblemArrays] = OrderedDict()
        self._prepared: OrderedDict[tuple[int, float, float], PreparedServices] = OrderedDict()

    def prepare(self, services: tuple[Service, ...], rtt_ms: float, slo_ms: float) -> PreparedServices:
        key = (id(services), rtt_ms, slo_ms)
        prepared = self._prepared.get(key)
        if prepared is not None and prepared.services is services:
            self._prepared.move_to_end(key)
            return prepared
        arrays = self._arrays.get(id(services))
        if arrays is None or arrays.services is not services:
            arrays = ProblemArrays(services)
            if isinstance(services, tuple):  # only immutable tuples are safe to cache by identity
                _remember(self._arrays, id(services), arrays, self.cache_size)
        # The cache entries hold the tuple itself, so its id cannot be reused while cached.
        prepared = PreparedServices(services, rtt_ms, slo_ms, arrays)
        if isinstance(services, tuple):
            _remember(self._prepared, key, prepared, self.cache_size)
        return prepared

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        check_link(problem.budget_mbps, problem.rtt_ms, problem.slo_ms)
        prepared = self.prepare(problem.services, problem.rtt_ms, problem.slo_ms)
        indices, bandwidths = prepared.solve(problem.budget_mbps)
        allocation = allocation_from_indices(problem.services, indices, bandwidths)
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation


class CellAllocator:
    """The cell-level solver (optimizer/cell.py): exact, for one car (each service one row of
    the joint problem) through `solve`, and for a whole cell through `solve_cell`."""

    name = "cell"
    exact = True
    supports_weights = True
    bandwidth_aware = True

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        check_problem(problem)
        vehicle = CellVehicle("vehicle", problem.services)
        cell = solve_cell(CellProblem((vehicle,), problem.budget_mbps, problem.rtt_ms, problem.slo_ms))
        allocation = cell.vehicles["vehicle"]
        allocation.extra.update(cell.extra)
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation

    def solve_cell(self, problem: CellProblem) -> CellAllocation:
        return solve_cell(problem)


def _remember(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


class OnboardAllocator:
    """Baseline: every service uses its on-car fallback; nothing is sent."""

    name = "onboard"
    exact = False
    supports_weights = False
    bandwidth_aware = True

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        check_problem(problem)
        indices = [fallback_index(service) for service in problem.services]
        allocation = allocation_from_indices(problem.services, indices, [0.0] * len(indices))
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation


class NaiveCloudAllocator:
    """Baseline as in prior work: every service sends its single most accurate cloud option,
    whatever the uplink. Options that cannot meet the SLO at any bandwidth are skipped (a
    service with none stays on the car). The reported bandwidths may exceed the budget; extra
    `within_budget` says whether they do not."""

    name = "naive"
    exact = False
    supports_weights = False
    bandwidth_aware = False

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        check_problem(problem)
        # Any cloud option that can meet the SLO at some bandwidth beats staying on the car.
        indices, bandwidths = _best_option_per_service(
            problem, lambda option, cost: not option.is_fallback and math.isfinite(cost), prefer_cloud=True)
        allocation = allocation_from_indices(problem.services, indices, bandwidths)
        allocation.extra["within_budget"] = sum(bandwidths) <= budget_limit_mbps(problem.budget_mbps)
        # Its bandwidths are what the options would need, not grants: the agent sends whatever they are.
        allocation.extra["bandwidth_aware"] = False
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation


class EqualSplitAllocator:
    """Baseline: each of n services gets budget / n and picks its most useful option within that
    share (bandwidth-aware, but no joint choice). Ties go to the cheaper option."""

    name = "equal"
    exact = False
    supports_weights = False
    bandwidth_aware = True

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        check_problem(problem)
        share_limit_mbps = budget_limit_mbps(problem.budget_mbps) / len(problem.services)
        indices, bandwidths = _best_option_per_service(problem, lambda option, cost: cost <= share_limit_mbps)
        allocation = allocation_from_indices(problem.services, indices, bandwidths)
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0
        return allocation


# Baselines plan the same services at the same RTT and SLO frame after frame: their option costs
# are remembered (keyed by identity, holding the frozen service so its id stays its own).
_COSTS: OrderedDict[tuple[int, float, float], tuple[Service, list[float], int]] = OrderedDict()
_COSTS_KEPT = 64


def _costs_and_fallback(service: Service, rtt_ms: float, slo_ms: float) -> tuple[list[float], int]:
    key = (id(service), rtt_ms, slo_ms)
    found = _COSTS.get(key)
    if found is None or found[0] is not service:
        found = (service, critical_bandwidths_mbps(service, rtt_ms, slo_ms).tolist(), fallback_index(service))
        _remember(_COSTS, key, found, _COSTS_KEPT)
    return found[1], found[2]


def _best_option_per_service(problem: AllocationProblem, eligible, prefer_cloud: bool = False):
    """Per service, the most useful option among those `eligible(option, critical_bandwidth)`
    accepts (the fallback is the starting incumbent); ties go to the cheaper option. With
    `prefer_cloud`, any eligible option replaces the fallback whatever its utility."""
    indices, bandwidths = [], []
    for service in problem.services:
        costs, best = _costs_and_fallback(service, problem.rtt_ms, problem.slo_ms)
        for index, option in enumerate(service.options):
            if not eligible(option, costs[index]):
                continue
            incumbent = service.options[best]
            if (
                (prefer_cloud and incumbent.is_fallback)
                or option.utility > incumbent.utility
                or (option.utility == incumbent.utility and costs[index] < costs[best])
            ):
                best = index
        indices.append(best)
        bandwidths.append(float(costs[best]))
    return indices, bandwidths


ALLOCATORS: dict[str, type] = {
    "exact": ExactAllocator,
    "lp": LpAllocator,
    "milp": BooleanProgramAllocator,
    "onboard": OnboardAllocator,
    "naive": NaiveCloudAllocator,
    "equal": EqualSplitAllocator,
    "cell": CellAllocator,
}


def get_allocator(method: str) -> Allocator:
    """A fresh allocator for a method name; UserError naming the choices for an unknown one."""
    allocator_class = ALLOCATORS.get(method)
    if allocator_class is None:
        raise UserError(f"unknown method '{method}' (choose from {', '.join(ALLOCATORS)})")
    return allocator_class()


# Planners of cars with the same profile (a fleet's vehicles, a replay's policies) plan with the
# same services tuples; one allocator for them all prepares each (tuple, RTT, SLO) table once
# instead of once per car. Planning is single-threaded (the daemon's loop, the replay's clock).
_SHARED: dict[tuple[int, str], tuple[tuple, Allocator]] = {}
_SHARED_KEPT = 64
SHARED_EXACT_CACHE_SIZE = 1024  # prepared tables: a fleet's cars plan at hundreds of (RTT, SLO) steps


def shared_allocator(method: str, services: tuple[Service, ...]) -> Allocator:
    """The allocator every planner of these services (by identity) shares for a method name."""
    key = (id(services), method)
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not services:
        allocator = ExactAllocator(SHARED_EXACT_CACHE_SIZE) if method == "exact" else get_allocator(method)
        if len(_SHARED) >= _SHARED_KEPT:
            _SHARED.clear()
        entry = _SHARED[key] = (services, allocator)  # holds the tuple, so its id cannot be reused
    return entry[1]
