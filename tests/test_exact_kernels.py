"""The exact solver's compiled kernels (optimizer/kernels.py) against its numpy reference path
and against brute force, and the switches that select the numpy path."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avcloud.types import Option, Service, critical_bandwidth_mbps
from optimizer import exact
from optimizer.exact import PreparedServices, ProblemArrays, build_frontier_table
from optimizer.problem import budget_limit_mbps

pytest.importorskip("numba")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    """Every test starts on the kernel path, whatever the environment asked for."""
    from optimizer import kernels

    monkeypatch.setattr(exact, "KERNELS", kernels)
    return kernels


def numpy_prepared(monkeypatch, services, rtt_ms, slo_ms) -> PreparedServices:
    with monkeypatch.context() as patch:
        patch.setattr(exact, "KERNELS", None)
        return PreparedServices(services, rtt_ms, slo_ms)


def random_services(rng: np.random.Generator, count: int, max_options: int) -> tuple[Service, ...]:
    """Services with 1..max_options options each (so tables are padded), the fallback anywhere
    in the list, numbers on a coarse grid (ties in cost, utility or both), some options too slow
    for any SLO, and weights that may be 0."""
    services = []
    for index in range(count):
        option_count = int(rng.integers(1, max_options + 1))
        fallback_position = int(rng.integers(0, option_count))
        options = []
        for position in range(option_count):
            utility = float(rng.integers(-2, 8)) / 4.0
            if position == fallback_position:
                options.append(Option(f"o{position}", 0.0, 0.0, utility))
            else:
                options.append(Option(f"o{position}", float(rng.integers(1, 6)) / 2.0,
                                      float(rng.choice([0.0, 50.0, 100.0, 130.0, 400.0])), utility))
        if rng.random() < 0.3:  # a second fallback, sometimes as useful as the first
            options.append(Option("o_extra", 0.0, 5.0, float(rng.integers(-2, 8)) / 4.0))
        weight = float(rng.choice([0.0, 0.5, 1.0, 2.0]))
        services.append(Service(f"s{index}", tuple(options), weight))
    return tuple(services)


def brute_force_best(services, rtt_ms: float, slo_ms: float, budget_mbps: float) -> tuple[float, float]:
    """Best weighted utility over every combination whose critical bandwidths sum within the
    budget itself, and within the budget's tolerance limit: the exact optimum lies between."""
    per_service = []
    for service in services:
        per_service.append([
            (critical_bandwidth_mbps(o.size_mbit, o.runtime_ms, rtt_ms, slo_ms), service.weight * o.utility)
            for o in service.options
        ])
    limit_mbps = budget_limit_mbps(budget_mbps)
    best_within_budget = best_within_limit = -math.inf
    for combination in itertools.product(*per_service):
        total_mbps = sum(cost for cost, _ in combination)
        value = sum(value for _, value in combination)
        if total_mbps <= budget_mbps:
            best_within_budget = max(best_within_budget, value)
        if total_mbps <= limit_mbps:
            best_within_limit = max(best_within_limit, value)
    return best_within_budget, best_within_limit


def budgets_to_try(rng: np.random.Generator, services, rtt_ms: float, slo_ms: float) -> list[float]:
    """Zero, random budgets, and budgets exactly equal to the sum of some reachable options."""
    budgets = [0.0, float(rng.uniform(0.0, 30.0)), 1e6]
    for _ in range(2):
        total_mbps = 0.0
        for service in services:
            option = service.options[int(rng.integers(0, len(service.options)))]
            cost = critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, rtt_ms, slo_ms)
            total_mbps += cost if math.isfinite(cost) else 0.0
        budgets.append(total_mbps)
    return budgets


def utility_of(services, indices) -> float:
    return sum(s.weight * s.options[i].utility for s, i in zip(services, indices, strict=True))


def assert_same_tables(kernel_path: PreparedServices, numpy_path: PreparedServices) -> None:
    kernel_table, numpy_table = kernel_path.table, numpy_path.table
    assert kernel_table.starts == numpy_table.starts
    np.testing.assert_array_equal(kernel_table.option_indices, numpy_table.option_indices)
    # Bit for bit: the same critical bandwidths and the same weighted utilities.
    assert kernel_table.costs.tobytes() == numpy_table.costs.tobytes()
    np.testing.assert_array_equal(kernel_table.values, numpy_table.values)


def test_kernel_frontiers_equal_numpy_frontiers_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(11)
    for _ in range(300):
        services = random_services(rng, int(rng.integers(1, 7)), 9)
        rtt_ms, slo_ms = float(rng.choice([0.0, 20.0, 33.3])), float(rng.choice([100.0, 150.0, 170.7]))
        assert_same_tables(PreparedServices(services, rtt_ms, slo_ms),
                           numpy_prepared(monkeypatch, services, rtt_ms, slo_ms))


def test_kernel_frontier_costs_are_the_scalar_critical_bandwidths(compiled_kernels):
    rng = np.random.default_rng(12)
    for _ in range(100):
        services = random_services(rng, 4, 12)
        rtt_ms, slo_ms = float(rng.uniform(0.0, 40.0)), float(rng.uniform(60.0, 300.0))
        prepared = PreparedServices(services, rtt_ms, slo_ms)
        for frontier, service in zip(prepared.frontiers, services, strict=True):
            for cost, index in zip(frontier.costs.tolist(), frontier.option_indices.tolist(), strict=True):
                option = service.options[index]
                assert cost == critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, rtt_ms, slo_ms)


def test_kernel_path_equals_numpy_path_and_brute_force(monkeypatch):
    rng = np.random.default_rng(13)
    for _ in range(250):
        services = random_services(rng, int(rng.integers(1, 6)), 7)
        rtt_ms, slo_ms = float(rng.choice([10.0, 20.0])), float(rng.choice([120.0, 150.0]))
        for budget_mbps in budgets_to_try(rng, services, rtt_ms, slo_ms):
            kernel_indices, kernel_bandwidths = PreparedServices(services, rtt_ms, slo_ms).solve(budget_mbps)
            numpy_indices, numpy_bandwidths = numpy_prepared(monkeypatch, services, rtt_ms, slo_ms).solve(budget_mbps)
            assert kernel_indices == numpy_indices
            assert kernel_bandwidths == numpy_bandwidths
            assert sum(kernel_bandwidths) <= budget_limit_mbps(budget_mbps)
            best_within_budget, best_within_limit = brute_force_best(services, rtt_ms, slo_ms, budget_mbps)
            utility = utility_of(services, kernel_indices)
            assert best_within_budget - 1e-12 <= utility <= best_within_limit + 1e-12


def test_kernel_declines_large_halves_and_the_dp_takes_over(monkeypatch):
    """Past the meet-in-the-middle size the kernel hands over to the frontier DP, which must
    see the same frontiers the numpy path builds."""
    monkeypatch.setattr(exact, "MEET_IN_THE_MIDDLE_MAX_COMBINATIONS", 2)
    rng = np.random.default_rng(14)
    for _ in range(100):
        services = random_services(rng, int(rng.integers(2, 6)), 7)
        budget_mbps = float(rng.uniform(0.0, 20.0))
        kernel_choice = PreparedServices(services, 20.0, 150.0).solve(budget_mbps)
        assert kernel_choice == numpy_prepared(monkeypatch, services, 20.0, 150.0).solve(budget_mbps)
        best_within_budget, best_within_limit = brute_force_best(services, 20.0, 150.0, budget_mbps)
        assert best_within_budget - 1e-12 <= utility_of(services, kernel_choice[0]) <= best_within_limit + 1e-12


def test_later_solves_and_whole_frontier_use_the_kernel_frontiers(monkeypatch):
    rng = np.random.default_rng(15)
    for _ in range(50):
        services = random_services(rng, 4, 8)
        kernel_path = PreparedServices(services, 20.0, 150.0)
        numpy_path = numpy_prepared(monkeypatch, services, 20.0, 150.0)
        for budget_mbps in (5.0, 12.5, 0.0, 40.0):  # the second solve on builds the whole frontier
            assert kernel_path.solve(budget_mbps) == numpy_path.solve(budget_mbps)
        budgets_mbps = np.array([0.0, 3.0, 9.0, 100.0])
        states, costs, values = kernel_path.whole_frontier_states(budgets_mbps)
        numpy_states, numpy_costs, numpy_values = numpy_path.whole_frontier_states(budgets_mbps)
        np.testing.assert_array_equal(states, numpy_states)
        np.testing.assert_array_equal(costs, numpy_costs)
        np.testing.assert_array_equal(values, numpy_values)
        for state in states.tolist():
            assert kernel_path.solution_of_state(state) == numpy_path.solution_of_state(state)


def test_one_service_and_many_services(monkeypatch):
    rng = np.random.default_rng(16)
    for count in (1, 9, 30):  # one service; past the meet-in-the-middle size; the bounded DP
        services = random_services(rng, count, 6)
        for budget_mbps in (0.0, 2.5, 25.0):
            assert PreparedServices(services, 20.0, 150.0).solve(budget_mbps) == numpy_prepared(
                monkeypatch, services, 20.0, 150.0).solve(budget_mbps)


def test_a_new_services_tuple_of_known_options_gets_its_own_weights():
    options = (Option("fb", 0.0, 0.0, 0.3), Option("cloud", 1.3, 65.0, 0.5))
    other = (Option("fb", 0.0, 0.0, 0.2), Option("cloud", 0.65, 65.0, 0.9))
    first = ProblemArrays((Service("a", options, 1.0), Service("b", other, 1.0)))
    second = ProblemArrays((Service("x", options, 2.0), Service("y", other, 0.0)))
    assert second.sizes_mbit is first.sizes_mbit  # the options' tables are shared
    np.testing.assert_array_equal(second.values, [[0.6, 1.0], [0.0, 0.0]])
    # 1.3 Mb at 20 Mbps or 0.65 Mb at 10 Mbps: only the weighted one is worth its bandwidth.
    assert PreparedServices(second.services, 20.0, 150.0, second).solve(20.0)[0] == [1, 0]


def test_option_tables_are_read_only():
    arrays = ProblemArrays((Service("a", (Option("fb", 0.0, 0.0, 0.3), Option("c", 1.0, 10.0, 0.5))),))
    with pytest.raises(ValueError):
        arrays.sizes_mbit[0, 0] = 5.0


def test_numpy_table_is_built_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(exact, "build_frontier_table", lambda *args: calls.append(args))
    services = random_services(np.random.default_rng(17), 5, 9)
    prepared = PreparedServices(services, 20.0, 150.0)
    prepared.solve(10.0)
    assert prepared._table is None and not calls
    assert prepared.table.starts[-1] == len(prepared.table.option_indices)
    assert not calls  # built from the kernel's arrays, not by the numpy code


def run_python(code: str, **environment: str) -> str:
    env = {**os.environ, **environment}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


SOLVE_SNIPPET = """
from avcloud.types import Option, Service
from optimizer import exact
services = (Service("a", (Option("fb", 0.0, 0.0, 0.3), Option("a1", 1.3, 65.0, 0.5))),
            Service("b", (Option("fb", 0.0, 0.0, 0.2), Option("b1", 0.65, 65.0, 0.45))))
print(exact.KERNELS is None, exact.PreparedServices(services, 20.0, 150.0).solve(10.0))
"""


def test_environment_variable_selects_the_numpy_path():
    assert run_python(SOLVE_SNIPPET, AVCLOUD_PURE_NUMPY="1") == "True ([0, 1], [0.0, 10.0])"
    assert run_python(SOLVE_SNIPPET, AVCLOUD_PURE_NUMPY="0") == "False ([0, 1], [0.0, 10.0])"


def test_numpy_path_when_numba_cannot_be_imported():
    blocked = "import sys\nsys.modules['numba'] = None  # import numba now raises ImportError\n"
    assert run_python(blocked + SOLVE_SNIPPET, AVCLOUD_PURE_NUMPY="0") == "True ([0, 1], [0.0, 10.0])"


def test_build_frontier_table_stays_the_reference(monkeypatch):
    """The numpy frontier build is still reachable directly (and equals the kernel's)."""
    services = random_services(np.random.default_rng(18), 3, 9)
    arrays = ProblemArrays(services)
    table = build_frontier_table(arrays, 20.0, 150.0)
    assert table.starts == PreparedServices(services, 20.0, 150.0, arrays).table.starts


# ---------------------------------------------------------------- the cell solver's kernels


def random_cell_table(rng: np.random.Generator, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A (row x column) knapsack table on a coarse grid (ties), a cost-0 fallback per row,
    unreachable columns (inf), and sometimes a column no row has on its frontier."""
    costs = rng.integers(0, 6, (rows, width)).astype(float)
    costs[rng.random((rows, width)) < 0.2] = math.inf
    costs[np.arange(rows), rng.integers(0, width, rows)] = 0.0
    values = rng.integers(-2, 6, (rows, width)) / 4.0
    if rng.random() < 0.3:  # every row's second-cheapest point is dominated
        values = np.where(costs == 0.0, 10.0, values)
    return costs, values


def test_cell_row_frontiers_and_hulls_equal_the_numpy_ones(monkeypatch):
    from optimizer.cell import RowFrontiers, _upper_hulls

    rng = np.random.default_rng(21)
    for _ in range(300):
        costs, values = random_cell_table(rng, int(rng.integers(1, 12)), int(rng.integers(1, 9)))
        kernel = RowFrontiers(costs, values)
        kernel_hull, kernel_sizes = _upper_hulls(kernel)
        with monkeypatch.context() as patch:
            patch.setattr(exact, "KERNELS", None)
            reference = RowFrontiers(costs, values)
            reference_hull, reference_sizes = _upper_hulls(reference)
        for name in ("order", "present", "costs", "values"):
            np.testing.assert_array_equal(getattr(kernel, name), getattr(reference, name), err_msg=name)
            assert getattr(kernel, name).dtype == getattr(reference, name).dtype
        np.testing.assert_array_equal(kernel_sizes, reference_sizes)
        for row, size in enumerate(reference_sizes.tolist()):
            np.testing.assert_array_equal(kernel_hull[row, :size], reference_hull[row, :size])


@pytest.mark.parametrize("compiled", [True, False])
def test_cell_hull_reaches_past_a_column_every_row_dominates(monkeypatch, compiled):
    """Dominated points stay in place in `RowFrontiers`, so a column can be empty on every row
    while a later one still holds each row's best point: the hull must reach it."""
    from optimizer.cell import RowFrontiers, _upper_hulls

    if not compiled:
        monkeypatch.setattr(exact, "KERNELS", None)
    # Sorted by cost: (0, 0.1) fallback, (1, 0.05) dominated in both rows, then (2, 0.5) / (3, 0.9).
    costs = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]])
    values = np.array([[0.1, 0.05, 0.5], [0.1, 0.05, 0.9]])
    frontier = RowFrontiers(costs, values)
    assert not frontier.present[:, 1].any()
    hull, sizes = _upper_hulls(frontier)
    assert sizes.tolist() == [2, 2]
    assert hull[:, :2].tolist() == [[0, 2], [0, 2]]


def test_cell_kernels_refuse_a_row_without_fallback():
    from optimizer.cell import RowFrontiers

    with pytest.raises(ValueError, match="fallback"):
        RowFrontiers(np.array([[1.0, 2.0]]), np.array([[0.1, 0.2]]))


def test_cell_solutions_equal_on_both_paths(monkeypatch):
    from optimizer.cell import solve_multiple_choice

    rng = np.random.default_rng(22)
    for _ in range(60):
        costs, values = random_cell_table(rng, int(rng.integers(1, 40)), int(rng.integers(2, 8)))
        limit = float(rng.uniform(0.0, 3.0 * costs.shape[0]))
        kernel = solve_multiple_choice(costs, values, limit)
        with monkeypatch.context() as patch:
            patch.setattr(exact, "KERNELS", None)
            reference = solve_multiple_choice(costs, values, limit)
        np.testing.assert_array_equal(kernel.choices, reference.choices)
        assert (kernel.value, kernel.upper_bound, kernel.lower_bound, kernel.price) == (
            reference.value, reference.upper_bound, reference.lower_bound, reference.price)
