"""The allocation as convex programs in cvxpy: the reference for the exact solver and the place
to add constraints the knapsack solver does not know (per-service weights are built in; minimum
utility per service and a cap on each service's share of the budget are provided).

Variables: x[o] for every option of every service (flattened), one-hot per service.
    maximise    sum_o value[o] * x[o]                 (value = service weight * utility)
    subject to  sum_{o in s} x[o] == 1                for every service s
                sum_o cost[o] * x[o] <= budget_limit  (cost = critical bandwidth; see problem.py)
                x[o] <= available[o]                  (0 for options that can never meet the SLO)
                0 <= x <= 1, or x boolean
The LP relaxation (0 <= x <= 1) equals optimising over each service's concave envelope. Both
programs are DPP: parametrised by values, costs, availability and budget, compiled once per
shape (the number of options of each service) and re-solved with new numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from avcloud.errors import DataError
from avcloud.types import Allocation, AllocationProblem, Service
from optimizer.problem import (
    allocation_from_indices,
    budget_limit_mbps,
    check_problem,
    critical_bandwidths_mbps,
    fallback_index,
)

SUPPORT_THRESHOLD = 1e-6  # x above this counts as used (solver tolerances leave tiny values)
# HiGHS options so the boolean program returns the true optimum, not one within its default gap.
HIGHS_EXACT_MIP_OPTIONS = {
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 1e-12,
    "mip_feasibility_tolerance": 1e-10,
    "primal_feasibility_tolerance": 1e-10,
}


class InfeasibleAllocationError(DataError):
    """The extra constraints (minimum utilities, share caps) cannot all be met within the budget."""


class _CompiledProgram:
    """One cvxpy problem for a given shape; parameters are refilled for every solve."""

    def __init__(
        self, counts: tuple[int, ...], boolean: bool, with_min_utility: bool, with_share_cap: bool, solver: str
    ):
        import cvxpy as cp
        import scipy.sparse as sparse

        total = sum(counts)
        service_of_option = np.repeat(np.arange(len(counts)), counts)
        membership = sparse.csr_matrix(
            (np.ones(total), (service_of_option, np.arange(total))), shape=(len(counts), total)
        )
        self.x = cp.Variable(total, boolean=boolean) if boolean else cp.Variable(total, nonneg=True)
        self.values = cp.Parameter(total)
        self.costs = cp.Parameter(total, nonneg=True)
        self.available = cp.Parameter(total, nonneg=True)
        self.budget = cp.Parameter(nonneg=True)
        constraints = [
            membership @ self.x == 1,
            self.costs @ self.x <= self.budget,
            self.x <= self.available,
        ]
        self.utilities = self.min_utility = self.share_cap = None
        if with_min_utility:
            self.utilities = cp.Parameter(total)
            self.min_utility = cp.Parameter(len(counts))
            constraints.append(membership @ cp.multiply(self.utilities, self.x) >= self.min_utility)
        if with_share_cap:
            self.share_cap = cp.Parameter(len(counts), nonneg=True)
            constraints.append(membership @ cp.multiply(self.costs, self.x) <= self.share_cap)
        self.problem = cp.Problem(cp.Maximize(self.values @ self.x), constraints)
        if not self.problem.is_dpp():
            raise AssertionError("allocation program must be DPP to be re-solved without recompiling")
        # Canonicalise now (cvxpy caches the parameter-to-data map), so solves only refill numbers.
        for parameter in self.problem.parameters():
            parameter.value = np.ones(parameter.shape)
        self.problem.get_problem_data(solver)


class ConvexProgramAllocator:
    """Shared machinery of the cvxpy allocators (LP relaxation and boolean program).

    Optional constraints: `min_utility_by_service` (name -> lowest acceptable unweighted
    utility) and `max_share` (no service may take more than this fraction of the budget).
    """

    name = "convex"
    exact = False
    supports_weights = True
    supports_constraints = True
    bandwidth_aware = True
    boolean = False
    default_solver = "HIGHS"

    def __init__(
        self,
        solver: str | None = None,
        min_utility_by_service: Mapping[str, float] | None = None,
        max_share: float | None = None,
        solver_options: Mapping[str, object] | None = None,
    ) -> None:
        self.solver = solver or self.default_solver
        self.min_utility_by_service = dict(min_utility_by_service or {})
        if max_share is not None and not (0 < max_share <= 1):
            raise ValueError("max_share must be in (0, 1]")
        self.max_share = max_share
        self.solver_options = dict(solver_options or {})
        self._programs: dict[tuple[int, ...], _CompiledProgram] = {}
        self.last_compile_us = 0.0

    def _program(self, counts: tuple[int, ...]) -> _CompiledProgram:
        program = self._programs.get(counts)
        if program is None:
            program = _CompiledProgram(
                counts, self.boolean, bool(self.min_utility_by_service), self.max_share is not None, self.solver
            )
            self._programs[counts] = program
        return program

    def _run(self, problem: AllocationProblem, budget_mbps: float) -> tuple[np.ndarray, float, list[np.ndarray]]:
        """Solve with the given budget; returns x, the objective and each service's costs.

        The first problem of a shape compiles the program; that one-time cost is added to
        `self.last_compile_us` and left out of the solve time the allocators report."""
        services = problem.services
        counts = tuple(len(service.options) for service in services)
        if counts not in self._programs:
            compile_started_ns = time.perf_counter_ns()
            self._program(counts)
            self.last_compile_us += (time.perf_counter_ns() - compile_started_ns) / 1000.0
        program = self._program(counts)
        costs = [critical_bandwidths_mbps(s, problem.rtt_ms, problem.slo_ms) for s in services]
        flat_costs = np.concatenate(costs)
        finite = np.isfinite(flat_costs)
        program.costs.value = np.where(finite, flat_costs, 0.0)
        program.available.value = finite.astype(float)
        utilities = np.array([o.utility for s in services for o in s.options], dtype=float)
        weights = np.repeat([s.weight for s in services], counts)
        program.values.value = weights * utilities
        program.budget.value = budget_limit_mbps(budget_mbps)
        if program.utilities is not None:
            program.utilities.value = utilities
            program.min_utility.value = np.array(
                [self.min_utility_by_service.get(s.name, -math.inf) for s in services], dtype=float
            ).clip(min=-1e9)
        if program.share_cap is not None:
            program.share_cap.value = np.full(len(services), self.max_share * budget_limit_mbps(budget_mbps))
        options = dict(self.solver_options)
        if self.boolean and self.solver == "HIGHS":
            options = {**HIGHS_EXACT_MIP_OPTIONS, **options}
        program.problem.solve(solver=self.solver, **options)
        status = program.problem.status
        if status in ("infeasible", "infeasible_inaccurate"):
            raise InfeasibleAllocationError("the allocation constraints cannot all be met within the budget")
        if status not in ("optimal", "optimal_inaccurate") or program.x.value is None:
            raise RuntimeError(f"solver {self.solver} returned status {status}")
        return np.asarray(program.x.value, dtype=float), float(program.problem.value), costs

    def solve(self, problem: AllocationProblem) -> Allocation:
        raise NotImplementedError


def _split(flat: np.ndarray, services: Sequence[Service]) -> list[np.ndarray]:
    bounds = np.cumsum([len(s.options) for s in services])[:-1]
    return np.split(flat, bounds)


def _repair(services: Sequence[Service], indices: list[int], costs: list[np.ndarray], limit_mbps: float) -> None:
    """Solver tolerances can leave a rounded choice a hair over the budget: send the costliest
    services to their fallback until it fits (rare; keeps every returned allocation feasible)."""
    while sum(float(c[i]) for c, i in zip(costs, indices, strict=True)) > limit_mbps:
        worst = max(range(len(services)), key=lambda s: costs[s][indices[s]])
        indices[worst] = fallback_index(services[worst])


class LpAllocator(ConvexProgramAllocator):
    """LP relaxation (concave envelope) with cvxpy; rounds down to a feasible choice.

    Each service takes the cheapest option its LP solution uses; since the cheapest is at most
    the LP's average cost for that service, the rounded choice fits the budget. extra holds
    `relaxation_utility` (the LP optimum, an upper bound on the true optimum) and `fractional`.
    """

    name = "lp"
    boolean = False

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        self.last_compile_us = 0.0
        check_problem(problem)
        x, relaxation_value, costs = self._run(problem, problem.budget_mbps)
        indices = []
        fractional = False
        for service, x_service, cost in zip(problem.services, _split(x, problem.services), costs, strict=True):
            used = np.flatnonzero(x_service > SUPPORT_THRESHOLD)
            if used.shape[0] == 0:
                used = np.array([fallback_index(service)])
            if np.any((x_service > SUPPORT_THRESHOLD) & (x_service < 1 - SUPPORT_THRESHOLD)):
                fractional = True
            indices.append(int(used[np.argmin(cost[used])]))
        _repair(problem.services, indices, costs, budget_limit_mbps(problem.budget_mbps))
        allocation = allocation_from_indices(
            problem.services,
            indices,
            [float(c[i]) for c, i in zip(costs, indices, strict=True)],
            extra={"relaxation_utility": relaxation_value, "fractional": fractional, "solver": self.solver,
                   "compile_us": self.last_compile_us},
        )
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0 - self.last_compile_us
        return allocation


class BooleanProgramAllocator(ConvexProgramAllocator):
    """The boolean program solved exactly by HiGHS (zero MIP gap): the reference optimum."""

    name = "milp"
    exact = True
    boolean = True

    def solve(self, problem: AllocationProblem) -> Allocation:
        started_ns = time.perf_counter_ns()
        self.last_compile_us = 0.0
        check_problem(problem)
        limit_mbps = budget_limit_mbps(problem.budget_mbps)
        budget_mbps = problem.budget_mbps
        for _ in range(4):
            x, _, costs = self._run(problem, budget_mbps)
            indices = [int(np.argmax(x_service)) for x_service in _split(x, problem.services)]
            total_mbps = sum(float(c[i]) for c, i in zip(costs, indices, strict=True))
            if total_mbps <= limit_mbps:
                break
            # HiGHS accepted a point within its feasibility tolerance but over our limit: tighten.
            budget_mbps = max(0.0, budget_mbps - (total_mbps - limit_mbps) - 1e-12)
        else:
            _repair(problem.services, indices, costs, limit_mbps)
        allocation = allocation_from_indices(
            problem.services,
            indices,
            [float(c[i]) for c, i in zip(costs, indices, strict=True)],
            extra={"solver": self.solver, "compile_us": self.last_compile_us},
        )
        allocation.solve_us = (time.perf_counter_ns() - started_ns) / 1000.0 - self.last_compile_us
        return allocation


class CellBooleanProgram:
    """The cell-level allocation (optimizer/cell.py) as one boolean program in cvxpy, solved by
    HiGHS at zero gap: the reference for `optimizer.cell.solve_cell`, fairness included.

    Variables x[o] for every option of every camera of every vehicle, one-hot per camera.
        maximise    sum_o W_v(o) * w_c(o) * u_o * x[o]
        subject to  sum_o b_o x[o] <= B;  sum_o g_o x[o] <= G (if a GPU pool is given)
                    U_v = sum_{o of v} w_c(o) u_o x[o] >= floor_v          (floors)
    Max-min: first maximise t subject to U_v >= t (and the floors), then the weighted total
    subject to U_v >= t* (within a 1e-9 relative tolerance, as the exact solver)."""

    def __init__(self, solver: str = "HIGHS", solver_options: Mapping[str, object] | None = None) -> None:
        self.solver = solver
        self.solver_options = dict(solver_options or {})

    def solve(self, problem) -> object:
        import cvxpy as cp
        import scipy.sparse as sparse

        from optimizer.cell import CellTable, _cell_allocation, _floors

        started_ns = time.perf_counter_ns()
        table = CellTable(problem)
        row_count, width = table.bandwidths_mbps.shape
        available = np.isfinite(table.bandwidths_mbps)
        flat_rows, flat_columns = np.nonzero(available)
        count = flat_rows.shape[0]
        membership = sparse.csr_matrix((np.ones(count), (flat_rows, np.arange(count))), shape=(row_count, count))
        vehicle_membership = sparse.csr_matrix(
            (table.camera_values[flat_rows, flat_columns], (table.vehicle_of_row[flat_rows], np.arange(count))),
            shape=(len(problem.vehicles), count))
        x = cp.Variable(count, boolean=True)
        constraints = [membership @ x == 1,
                       table.bandwidths_mbps[flat_rows, flat_columns] @ x <= budget_limit_mbps(problem.capacity_mbps)]
        if problem.gpu_workers is not None:
            constraints.append(table.gpu_loads[flat_rows, flat_columns] @ x <= budget_limit_mbps(problem.gpu_workers))
        floors = _floors(problem)
        vehicle_utilities = vehicle_membership @ x
        options = {**HIGHS_EXACT_MIP_OPTIONS, **self.solver_options} if self.solver == "HIGHS" else self.solver_options
        extra: dict[str, object] = {"solver": self.solver}
        if problem.fairness == "max-min":
            level = cp.Variable()
            stage = cp.Problem(cp.Maximize(level), [*constraints, vehicle_utilities >= level]
                               + ([vehicle_utilities >= _relaxed(floors)] if floors is not None else []))
            stage.solve(solver=self.solver, **options)
            _check_status(stage.status)
            floors = np.full(len(problem.vehicles), float(level.value)) if floors is None else (
                np.maximum(floors, float(level.value)))
            extra["max_min_utility"] = float(level.value)
        if floors is not None:
            constraints.append(vehicle_utilities >= _relaxed(floors))
        program = cp.Problem(cp.Maximize(table.values[flat_rows, flat_columns] @ x), constraints)
        program.solve(solver=self.solver, **options)
        _check_status(program.status)
        chosen = np.zeros(row_count, dtype=np.intp)
        taken = np.asarray(x.value) > 0.5
        chosen[flat_rows[taken]] = flat_columns[taken]
        extra["objective"] = float(program.value)
        return _cell_allocation(problem, table, chosen, started_ns, extra)


def _relaxed(floors: np.ndarray) -> np.ndarray:
    """Floors within the exact solver's tolerance (-inf floors become a large negative number)."""
    finite = np.where(np.isfinite(floors), floors, -1e9)
    return finite - 1e-9 * (1.0 + np.abs(finite))


def _check_status(status: str) -> None:
    if status in ("infeasible", "infeasible_inaccurate"):
        from optimizer.cell import InfeasibleCellError

        raise InfeasibleCellError("the vehicles' utility floors cannot all be met within the cell capacity")
    if status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"solver returned status {status}")
