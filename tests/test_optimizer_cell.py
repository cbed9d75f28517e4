"""The cell-level allocator against the cvxpy boolean program solved by HiGHS (the reference):
random and adversarial instances, weights, utility floors, max-min fairness, a GPU pool; the
array-level knapsack against HiGHS directly on larger instances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avcloud.errors import DataError
from avcloud.types import Option, Service
from optimizer.cell import (
    CellProblem,
    CellVehicle,
    InfeasibleCellError,
    solve_cell,
    solve_multiple_choice,
)
from optimizer.convex import CellBooleanProgram
from optimizer.problem import budget_limit_mbps

REFERENCE = CellBooleanProgram()


def random_vehicles(rng: np.random.Generator, vehicles: int, cameras: int, options: int, integer: bool = False,
                    weighted: bool = False, own_links: bool = False) -> tuple[CellVehicle, ...]:
    """Cameras with one fallback and `options - 1` cloud options; `integer` draws small integer
    utilities and sizes, so that many choices tie (the adversarial case for the reduction)."""
    result = []
    for v in range(vehicles):
        services = []
        for c in range(cameras):
            rows = [Option("fb", 0.0, float(rng.uniform(0, 30)), float(rng.integers(0, 3) if integer else rng.uniform(0.1, 0.3)))]
            for k in range(options - 1):
                size = float(rng.integers(1, 6) / 2 if integer else rng.uniform(0.2, 4.0))
                runtime = float(rng.choice([20.0, 40.0, 60.0]) if integer else rng.uniform(10, 120))
                utility = float(rng.integers(0, 6) if integer else rng.uniform(0.2, 0.8))
                rows.append(Option(f"o{k}", size, runtime, utility))
            weight = float(rng.choice([0.5, 1.0, 2.0])) if weighted else 1.0
            services.append(Service(f"cam{c}", tuple(rows), weight))
        result.append(CellVehicle(
            f"v{v}", tuple(services),
            weight=float(rng.choice([1.0, 3.0])) if weighted else 1.0,
            rtt_ms=float(rng.uniform(10, 60)) if own_links else None,
            slo_ms=float(rng.choice([150.0, 200.0])) if own_links else None,
        ))
    return tuple(result)


def capacity_for(vehicles, rng, share: float | None = None) -> float:
    """A capacity between nothing and everything's most demanding option (at the cell link 30/200)."""
    total = 0.0
    for vehicle in vehicles:
        for service in vehicle.services:
            rtt = 30.0 if vehicle.rtt_ms is None else vehicle.rtt_ms
            slo = 200.0 if vehicle.slo_ms is None else vehicle.slo_ms
            needs = [o.size_mbit / ((slo - o.runtime_ms - rtt) / 1000) for o in service.options
                     if o.size_mbit > 0 and slo - o.runtime_ms - rtt > 0]
            total += max(needs, default=0.0)
    return total * (rng.uniform(0.05, 0.7) if share is None else share)


def check_against_reference(problem: CellProblem) -> None:
    ours = solve_cell(problem)
    reference = REFERENCE.solve(problem)
    assert ours.total_bandwidth_mbps <= budget_limit_mbps(problem.capacity_mbps) * (1 + 1e-12)
    if problem.gpu_workers is not None:
        assert ours.gpu_load <= budget_limit_mbps(problem.gpu_workers) * (1 + 1e-12)
    assert abs(ours.utility - reference.utility) <= 1e-6 * (1 + abs(reference.utility)), (ours.utility, reference.utility)
    # The reported utility is what the choices are worth.
    total = 0.0
    by_name = {vehicle.name: vehicle for vehicle in problem.vehicles}
    for name, allocation in ours.vehicles.items():
        vehicle = by_name[name]
        worth = sum(s.weight * next(o for o in s.options if o.name == allocation.choices[s.name]).utility
                    for s in vehicle.services)
        assert allocation.utility == pytest.approx(worth, abs=1e-12)
        total += vehicle.weight * worth
    assert ours.utility == pytest.approx(total, abs=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_random_cells_equal_the_boolean_program(seed):
    rng = np.random.default_rng(seed)
    vehicles = random_vehicles(rng, int(rng.integers(1, 9)), int(rng.integers(1, 6)), int(rng.integers(2, 8)),
                               integer=seed % 3 == 0, weighted=seed % 2 == 1, own_links=seed % 4 == 2)
    check_against_reference(CellProblem(vehicles, capacity_for(vehicles, rng), rtt_ms=30.0, slo_ms=200.0))


@pytest.mark.parametrize("seed", range(4))
def test_identical_vehicles_with_tied_options(seed):
    # Every camera the same, integer sizes and utilities: every hull segment has the same slope,
    # so the LP's price ties across all cameras and nothing can be fixed by reduced costs.
    rng = np.random.default_rng(100 + seed)
    camera = Service("cam", (Option("fb", 0.0, 0.0, 1.0), Option("a", 1.7, 30.0, 2.0), Option("b", 3.4, 30.0, 3.0),
                             Option("c", 5.1, 30.0, 4.0)))
    vehicles = tuple(CellVehicle(f"v{v}", (camera, Service("cam2", camera.options))) for v in range(12))
    check_against_reference(CellProblem(vehicles, capacity_for(vehicles, rng), rtt_ms=30.0, slo_ms=200.0))


@pytest.mark.parametrize("fairness", ["max-min", 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_fairness_equals_the_boolean_program(seed, fairness):
    rng = np.random.default_rng(200 + seed)
    vehicles = random_vehicles(rng, int(rng.integers(2, 7)), 3, 4, integer=seed % 2 == 0, weighted=True)
    capacity = capacity_for(vehicles, rng, share=float(rng.uniform(0.2, 0.6)))
    problem = CellProblem(vehicles, capacity, rtt_ms=30.0, slo_ms=200.0, fairness=fairness)
    try:
        reference = REFERENCE.solve(problem)
    except InfeasibleCellError:
        with pytest.raises(InfeasibleCellError):
            solve_cell(problem)
        return
    ours = solve_cell(problem)
    assert abs(ours.utility - reference.utility) <= 1e-6 * (1 + abs(reference.utility))
    if fairness == "max-min":
        assert ours.extra["max_min_utility"] == pytest.approx(reference.extra["max_min_utility"], abs=1e-6)
        assert ours.min_vehicle_utility >= reference.extra["max_min_utility"] - 1e-6
    else:
        assert ours.min_vehicle_utility >= fairness - 1e-6


def test_max_min_lifts_the_worst_vehicle():
    # Two vehicles, one uplink that carries one upgrade: the weighted total favours the heavy
    # vehicle, max-min gives the upgrade to whichever is worse off.
    camera = Service("cam", (Option("fb", 0.0, 0.0, 0.2), Option("up", 1.0, 50.0, 0.9)))
    poor = Service("cam", (Option("fb", 0.0, 0.0, 0.1), Option("up", 1.0, 50.0, 0.5)))
    vehicles = (CellVehicle("rich", (camera,), weight=3.0), CellVehicle("poor", (poor,)))
    # RTT 30, SLO 200: slack 120 ms, one upgrade needs 1 / 0.12 = 8.33 Mbps.
    total = solve_cell(CellProblem(vehicles, 9.0, rtt_ms=30.0, slo_ms=200.0))
    assert total.vehicles["rich"].choices == {"cam": "up"} and total.vehicles["poor"].choices == {"cam": "fb"}
    fair = solve_cell(CellProblem(vehicles, 9.0, rtt_ms=30.0, slo_ms=200.0, fairness="max-min"))
    assert fair.vehicles["poor"].choices == {"cam": "up"}
    assert fair.min_vehicle_utility == pytest.approx(0.2)
    with pytest.raises(InfeasibleCellError):
        solve_cell(CellProblem(vehicles, 9.0, rtt_ms=30.0, slo_ms=200.0, fairness=0.5))


def test_vehicle_weights_and_own_links_change_the_choice():
    camera = Service("cam", (Option("fb", 0.0, 0.0, 0.2), Option("up", 1.0, 50.0, 0.9)))
    near = CellVehicle("near", (camera,), rtt_ms=10.0)  # needs 1 / 0.14 = 7.1 Mbps
    far = CellVehicle("far", (camera,), rtt_ms=90.0)  # needs 1 / 0.06 = 16.7 Mbps
    cell = solve_cell(CellProblem((near, far), 17.0, rtt_ms=30.0, slo_ms=200.0))
    assert cell.vehicles["near"].choices == {"cam": "up"} and cell.vehicles["far"].choices == {"cam": "fb"}
    heavy_far = CellVehicle("far", (camera,), weight=2.0, rtt_ms=90.0)
    cell = solve_cell(CellProblem((near, heavy_far), 17.0, rtt_ms=30.0, slo_ms=200.0))
    assert cell.vehicles["far"].choices == {"cam": "up"}
    assert cell.total_bandwidth_mbps == pytest.approx(1 / 0.06)


@pytest.mark.parametrize("seed", range(3))
def test_gpu_pool_equals_the_boolean_program(seed):
    rng = np.random.default_rng(300 + seed)
    vehicles = random_vehicles(rng, 4, 3, 4, integer=seed == 0)
    capacity = capacity_for(vehicles, rng, share=0.5)
    # Sent cameras at 10 Hz with 10-120 ms runtimes use 0.1-1.2 workers each: a pool of 1-3 binds.
    check_against_reference(CellProblem(vehicles, capacity, rtt_ms=30.0, slo_ms=200.0,
                                        gpu_workers=float(rng.uniform(1.0, 3.0))))


def test_gpu_pool_limits_the_load():
    camera = Service("cam", (Option("fb", 0.0, 0.0, 0.2), Option("big", 1.0, 80.0, 0.9),
                             Option("small", 1.0, 20.0, 0.6)))
    vehicles = tuple(CellVehicle(f"v{v}", (camera,)) for v in range(3))
    free = solve_cell(CellProblem(vehicles, 100.0, rtt_ms=30.0, slo_ms=200.0))
    assert all(a.choices == {"cam": "big"} for a in free.vehicles.values())
    assert free.gpu_load == pytest.approx(3 * 0.8)
    pooled = solve_cell(CellProblem(vehicles, 100.0, rtt_ms=30.0, slo_ms=200.0, gpu_workers=1.0))
    assert pooled.gpu_load <= 1.0 + 1e-12
    # Big uses 0.8 of a worker, small 0.2: three small (1.8, load 0.6) beat big + small + fallback (1.7, load 1.0).
    assert all(a.choices == {"cam": "small"} for a in pooled.vehicles.values())
    reference = REFERENCE.solve(CellProblem(vehicles, 100.0, rtt_ms=30.0, slo_ms=200.0, gpu_workers=1.0))
    assert pooled.utility == pytest.approx(reference.utility, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_on_arrays_equals_highs(seed):
    # Larger instances straight on arrays, against HiGHS through scipy (no cvxpy compile).
    rng = np.random.default_rng(400 + seed)
    rows, columns = 400, 10
    costs = rng.uniform(0.5, 20.0, (rows, columns))
    costs[rng.random((rows, columns)) < 0.1] = math.inf
    values = rng.uniform(0.0, 1.0, (rows, columns))
    if seed % 2:
        costs, values = np.round(costs), np.round(values * 4)  # ties everywhere
    costs[:, 0] = 0.0
    limit = float(np.where(np.isfinite(costs), costs, 0).max(axis=1).sum() * rng.uniform(0.05, 0.6))
    result = solve_multiple_choice(costs, values, limit)
    index = np.arange(rows)
    assert costs[index, result.choices].sum() <= limit
    assert values[index, result.choices].sum() == pytest.approx(_highs_optimum(costs, values, limit), abs=1e-6)


def _highs_optimum(costs, values, limit) -> float:
    import scipy.sparse as sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    row_ids, column_ids = np.nonzero(np.isfinite(costs))
    count = row_ids.shape[0]
    membership = sparse.csr_matrix((np.ones(count), (row_ids, np.arange(count))), shape=(costs.shape[0], count))
    result = milp(-values[row_ids, column_ids], integrality=np.ones(count), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(membership, 1, 1),
                               LinearConstraint(costs[row_ids, column_ids][None, :], -np.inf, limit)],
                  options={"mip_rel_gap": 0.0})
    assert result.success
    return -float(result.fun)


def test_hundred_vehicles_equal_the_boolean_program():
    # A tight uplink (2-20 Mbps per car, 5 cameras each): the capacity binds and the core is not trivial.
    rng = np.random.default_rng(450)
    vehicles = random_vehicles(rng, 100, 5, 10, weighted=True, own_links=True)
    check_against_reference(CellProblem(vehicles, 100 * float(rng.uniform(2, 20)), rtt_ms=30.0, slo_ms=200.0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_thousand_vehicles_equal_the_boolean_program(seed):
    rng = np.random.default_rng(500 + seed)
    vehicles = random_vehicles(rng, 1000, 5, 10, weighted=True, own_links=True)
    capacity = 1000 * float(rng.uniform(2, 20)) if seed else capacity_for(vehicles, rng)
    check_against_reference(CellProblem(vehicles, capacity, rtt_ms=30.0, slo_ms=200.0))


def test_bad_cells_are_one_line_errors():
    camera = Service("cam", (Option("fb", 0.0, 0.0, 0.2),))
    with pytest.raises(DataError, match="at least one vehicle"):
        solve_cell(CellProblem((), 10.0))
    with pytest.raises(DataError, match="vehicle 'a' appears twice"):
        solve_cell(CellProblem((CellVehicle("a", (camera,)), CellVehicle("a", (camera,))), 10.0))
    with pytest.raises(DataError, match="vehicle 'a': service 'cam' has no on-car fallback"):
        solve_cell(CellProblem((CellVehicle("a", (Service("cam", (Option("x", 1.0, 1.0, 1.0),)),)),), 10.0))
    with pytest.raises(DataError, match="fairness must be"):
        solve_cell(CellProblem((CellVehicle("a", (camera,)),), 10.0, fairness="fair"))
    with pytest.raises(DataError, match="budget_mbps must be"):
        solve_cell(CellProblem((CellVehicle("a", (camera,)),), -1.0))
    with pytest.raises(DataError, match="gpu_workers"):
        solve_cell(CellProblem((CellVehicle("a", (camera,)),), 1.0, gpu_workers=math.nan))
    # Among many vehicles of one shape (read as one block), the bad one is named.
    cloud = Option("cloud", 1.0, 10.0, 0.5)
    good = [CellVehicle(f"v{index}", (Service("cam", (camera.options[0], cloud)),)) for index in range(5)]
    for bad_service, message in [
        (Service("cam", (camera.options[0], cloud), weight=-1.0), "vehicle 'bad': service 'cam': weight must be"),
        (Service("cam", (camera.options[0], cloud), weight="heavy"), "vehicle 'bad': service 'cam': weight must be"),
        (Service("cam", (camera.options[0], Option("cloud", 1.0, 10.0, "high"))), "utility must be a finite number"),
        (Service("cam", (camera.options[0], Option("fb", 1.0, 10.0, 0.5))), "option 'fb' appears twice"),
    ]:
        vehicles = (*good[:2], CellVehicle("bad", (bad_service,)), *good[2:])
        with pytest.raises(DataError, match=message):
            solve_cell(CellProblem(vehicles, 10.0))
