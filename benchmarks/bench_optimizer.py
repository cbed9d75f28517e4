"""Solve time and optimality gap of the allocation methods on random TURBO-shaped instances.

Shapes: (a) 5 services x 49 options (the TURBO table: 1 on-car fallback + 48 cloud
configurations), (b) 12 x 49, (c) 200 x 50. Sizes and runtimes are drawn around TURBO's
published EfficientDet figures (../shared/profiles/turbo_effdet_sizes_runtimes.csv) when that
file exists, else around a built-in spread of the same range; utilities are random (TURBO does
not publish them). Budgets span 0 .. the sum of every service's largest reachable critical
bandwidth. For every instance, every method is timed (`Allocation.solve_us`) and compared with
the cvxpy boolean program solved by HiGHS with zero MIP gap.

Exact solver timings (fresh tables): `exact_cold` = a services tuple of option objects never
seen before (reading them, frontiers and solve); `exact_new_tuple` = a new services tuple (new
weights) of options already seen, as another car with the same profile; `exact_new_rtt` = same
services, new RTT (frontiers rebuilt); `exact_new_budget` = same services and link, new budget
(the replay's per-frame case). These are timed in a pass of their own after the comparison
with cvxpy; `*_after_cvxpy` are the same kinds of solve right after each instance's cvxpy solves,
on caches cvxpy left cold. cvxpy timings are re-solves of a program compiled once per shape
with new parameter values. The exact solver runs its compiled kernels (optimizer/kernels.py,
numba; compiled or loaded from the on-disk cache during the warm-up, outside the timings);
`AVCLOUD_PURE_NUMPY=1` times the numpy reference path instead. The JSON says which ran
(`exact_solver_path`).

Joint cell (`cell_*`, optimizer/cell.py): 10, 100 and 1000 cars x 5 cameras x 10 options (1
fallback + 9 TURBO rows), each car its own RTT, one SLO, an uplink of 2-20 Mbps per car.
`cell_fresh` = a cell of option objects never seen before, split into `cell_fresh_table` (reading
the option objects into the cell's arrays) and `cell_fresh_after_table` (the solve on those
arrays); `cell_known` = the same cars with new
RTTs and a new capacity (the fleet's per-frame case); `cell_max_min` = the max-min fairness
variant; `cell_gpu` = with a GPU pool of half a worker per car. The cvxpy/HiGHS boolean program
(`CellBooleanProgram`) is solved on the first `reference_instances` cells of each size (it takes
about a minute per 1000-car cell), plain (`cvxpy_highs_boolean`) and with the same GPU pool
(`cvxpy_highs_boolean_gpu`), and the exact solver must equal it within 1e-6.

    .venv/bin/python benchmarks/bench_optimizer.py --out runs/bench/optimizer.json
    .venv/bin/python benchmarks/bench_optimizer.py --quick
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchjson import write_report  # noqa: E402

from avcloud.types import AllocationProblem, Option, Service  # noqa: E402
from optimizer.allocators import get_allocator  # noqa: E402
from optimizer.problem import critical_bandwidths_mbps  # noqa: E402

TURBO_TABLE = REPO_ROOT.parent / "shared" / "profiles" / "turbo_effdet_sizes_runtimes.csv"
SHAPES = {"a_5x49": (5, 49), "b_12x49": (12, 49), "c_200x50": (200, 50)}
FULL_GAP_INSTANCES = {"a_5x49": 5000, "b_12x49": 4000, "c_200x50": 1000}  # 10,000 in all
QUICK_GAP_INSTANCES = {"a_5x49": 150, "b_12x49": 100, "c_200x50": 20}
GAP_TOLERANCE = 1e-9
COMPARED_METHODS = ("exact", "lp", "equal", "onboard")


def cloud_rows() -> tuple[np.ndarray, np.ndarray, str]:
    """(size Mb, runtime ms) of the 48 cloud configurations, and where they come from."""
    if TURBO_TABLE.exists():
        with TURBO_TABLE.open(newline="") as handle:
            rows = [
                (float(r["Network Transport Size [Mb]"]), float(r["Runtime [ms]"]))
                for r in csv.DictReader(handle)
                if float(r["Network Transport Size [Mb]"]) > 0
            ]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), str(TURBO_TABLE)
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(0.5), np.log(60.0), 48))
    runtimes = rng.uniform(30.0, 290.0, 48)
    return sizes, runtimes, "built-in spread (0.5-60 Mb, 30-290 ms)"


def random_services(rng: np.random.Generator, count: int, options: int, base_sizes, base_runtimes) -> tuple:
    services = []
    cloud_count = options - 1
    for index in range(count):
        rows = np.arange(cloud_count) % base_sizes.shape[0]
        sizes = base_sizes[rows] * rng.lognormal(0.0, 0.15, cloud_count)
        runtimes = base_runtimes[rows] * rng.uniform(0.9, 1.1, cloud_count)
        fallback_utility = rng.uniform(0.15, 0.35)
        utilities = fallback_utility + rng.uniform(0.0, 0.35, cloud_count)
        service_options = (Option("onboard", 0.0, 0.0, float(fallback_utility)),) + tuple(
            Option(f"cfg{k}", float(sizes[k]), float(runtimes[k]), float(utilities[k])) for k in range(cloud_count)
        )
        services.append(Service(f"camera{index}", service_options))
    return tuple(services)


def random_cell(rng: np.random.Generator, vehicles: int, cameras: int, options: int, base_sizes, base_runtimes):
    """A cell of `vehicles` cars with `cameras` cameras of `options` options each (1 fallback +
    cloud rows drawn from the TURBO table, sizes and runtimes jittered, random utilities), each
    car with its own RTT (10-40 ms), one SLO (150-300 ms), and an uplink of 2-20 Mbps per car."""
    from optimizer.cell import CellProblem, CellVehicle

    cars = []
    for vehicle in range(vehicles):
        services = []
        for camera in range(cameras):
            rows = rng.choice(base_sizes.shape[0], options - 1, replace=False)
            fallback_utility = float(rng.uniform(0.15, 0.35))
            sizes = base_sizes[rows] * rng.lognormal(0.0, 0.15, options - 1)
            runtimes = base_runtimes[rows] * rng.uniform(0.9, 1.1, options - 1)
            utilities = fallback_utility + rng.uniform(0.0, 0.35, options - 1)
            services.append(Service(f"camera{camera}", (Option("onboard", 0.0, 0.0, fallback_utility),) + tuple(
                Option(f"cfg{k}", float(sizes[k]), float(runtimes[k]), float(utilities[k])) for k in range(options - 1))))
        cars.append(CellVehicle(f"car{vehicle}", tuple(services), rtt_ms=float(rng.uniform(10.0, 40.0))))
    return CellProblem(tuple(cars), float(vehicles * rng.uniform(2.0, 20.0)), slo_ms=float(rng.uniform(150.0, 300.0)))


def max_total_mbps(services, rtt_ms: float, slo_ms: float) -> float:
    total = 0.0
    for service in services:
        bandwidths = critical_bandwidths_mbps(service, rtt_ms, slo_ms)
        total += float(np.max(bandwidths[np.isfinite(bandwidths)]))
    return total


def summarise_us(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples)
    return {
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "count": int(values.shape[0]),
    }


def numpy_call_us() -> float:
    values = np.ones(245)
    best = math.inf
    for _ in range(20):
        started_ns = time.perf_counter_ns()
        for _ in range(1000):
            values + 1.0
        best = min(best, (time.perf_counter_ns() - started_ns) / 1000.0 / 1000)
    return best


def run_shape(name: str, count: int, options: int, instances: int, rng, base_sizes, base_runtimes) -> dict:
    allocators = {method: get_allocator(method) for method in COMPARED_METHODS}
    boolean = get_allocator("milp")
    times: dict[str, list[float]] = {
        k: [] for k in ("exact_cold", "exact_new_tuple", "exact_new_rtt", "exact_new_budget", "lp", "milp",
                        "exact_new_tuple_after_cvxpy", "exact_new_rtt_after_cvxpy")}
    instances_seen = []
    differences: dict[str, list[float]] = {method: [] for method in COMPARED_METHODS}
    relaxation_gaps, fractional = [], 0
    started = time.perf_counter()
    # Warm-up: compile the cvxpy programs for this shape, and load the exact solver's kernels,
    # outside the timings.
    warm_services = random_services(rng, count, options, base_sizes, base_runtimes)
    for allocator in (allocators["lp"], boolean, allocators["exact"]):
        allocator.solve(AllocationProblem(warm_services, 1.0, 20.0, 150.0))
    for _ in range(instances):
        services = random_services(rng, count, options, base_sizes, base_runtimes)
        rtt_ms = float(rng.uniform(10.0, 40.0))
        slo_ms = float(rng.uniform(150.0, 300.0))
        budget_mbps = float(rng.uniform(0.0, max_total_mbps(services, rtt_ms, slo_ms)))
        problem = AllocationProblem(services, budget_mbps, rtt_ms, slo_ms)
        reference = boolean.solve(problem)
        times["milp"].append(reference.solve_us)
        for method, allocator in allocators.items():
            allocation = allocator.solve(problem)
            differences[method].append(allocation.utility - reference.utility)
            if method == "exact":
                times["exact_cold"].append(allocation.solve_us)
            elif method == "lp":
                times["lp"].append(allocation.solve_us)
                relaxation_gaps.append(float(allocation.extra["relaxation_utility"]) - reference.utility)
                fractional += bool(allocation.extra["fractional"])
        exact = allocators["exact"]
        # The same fresh-table solves right after the cvxpy solves, whose memory traffic leaves
        # the caches cold: reported beside the figures of the pass below.
        reweighted = tuple(Service(s.name, s.options, 3.0) for s in services)
        times["exact_new_tuple_after_cvxpy"].append(
            exact.solve(AllocationProblem(reweighted, budget_mbps, rtt_ms, slo_ms)).solve_us)
        times["exact_new_rtt_after_cvxpy"].append(
            exact.solve(AllocationProblem(services, budget_mbps, rtt_ms + 2.0, slo_ms)).solve_us)
        instances_seen.append((services, budget_mbps, rtt_ms, slo_ms))
    # Fresh tables, timed in a pass of their own: each instance's options are known (its first
    # solve, untimed), and the new tuple, the new RTT and the new budget have never been seen.
    for services, budget_mbps, rtt_ms, slo_ms in instances_seen:
        exact = allocators["exact"]
        exact.solve(AllocationProblem(services, budget_mbps, rtt_ms, slo_ms))
        reweighted = tuple(Service(s.name, s.options, 2.0) for s in services)
        times["exact_new_tuple"].append(exact.solve(AllocationProblem(reweighted, budget_mbps, rtt_ms, slo_ms)).solve_us)
        other_rtt = AllocationProblem(services, budget_mbps, rtt_ms + 1.0, slo_ms)
        times["exact_new_rtt"].append(exact.solve(other_rtt).solve_us)
        # Two solves build the cached frontier; the third new budget is the per-frame case.
        exact.solve(AllocationProblem(services, budget_mbps * 0.5, rtt_ms, slo_ms))
        times["exact_new_budget"].append(
            exact.solve(AllocationProblem(services, budget_mbps * 0.75, rtt_ms, slo_ms)).solve_us
        )
    exact_differences = np.abs(np.asarray(differences["exact"]))
    return {
        "services": count,
        "options_per_service": options,
        "instances": instances,
        "seconds": round(time.perf_counter() - started, 1),
        "solve_us": {method: summarise_us(samples) for method, samples in times.items()},
        "gap_vs_milp": {
            method: {
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "instances_with_abs_gap_over_1e-9": int(np.sum(np.abs(values) > GAP_TOLERANCE)),
            }
            for method, values in ((m, np.asarray(d)) for m, d in differences.items())
        },
        "exact_max_abs_gap": float(exact_differences.max()),
        "lp_relaxation_minus_milp": {"mean": float(np.mean(relaxation_gaps)), "max": float(np.max(relaxation_gaps))},
        "lp_fractional_share": fractional / instances,
    }


CELL_SIZES = (10, 100, 1000)
FULL_CELL_INSTANCES = {10: 200, 100: 100, 1000: 30}
QUICK_CELL_INSTANCES = {10: 20, 100: 10, 1000: 3}
FULL_CELL_REFERENCES = {10: 50, 100: 10, 1000: 3}
QUICK_CELL_REFERENCES = {10: 5, 100: 2, 1000: 0}
FULL_CELL_VARIANTS = {10: 20, 100: 10, 1000: 3}  # instances of the max-min and GPU variants
QUICK_CELL_VARIANTS = {10: 3, 100: 2, 1000: 1}


def run_cell(vehicles: int, instances: int, references: int, variants: int, rng, base_sizes, base_runtimes) -> dict:
    import dataclasses

    from optimizer.cell import solve_cell
    from optimizer.convex import CellBooleanProgram

    started = time.perf_counter()
    times: dict[str, list[float]] = {"cell_fresh": [], "cell_fresh_table": [], "cell_fresh_after_table": [],
                                     "cell_known": [], "cell_max_min": [], "cell_gpu": [], "cvxpy_highs_boolean": [],
                                     "cvxpy_highs_boolean_gpu": []}
    free_rows, differences, gpu_differences = [], [], []
    reference = CellBooleanProgram()
    for index in range(instances):
        problem = random_cell(rng, vehicles, 5, 10, base_sizes, base_runtimes)
        allocation = solve_cell(problem)
        times["cell_fresh"].append(allocation.solve_us)
        times["cell_fresh_table"].append(allocation.extra["table_us"])
        times["cell_fresh_after_table"].append(allocation.solve_us - allocation.extra["table_us"])
        # The same cars a frame later: new RTTs, a new capacity.
        later = dataclasses.replace(
            problem, capacity_mbps=float(vehicles * rng.uniform(2.0, 20.0)),
            vehicles=tuple(dataclasses.replace(v, rtt_ms=float(rng.uniform(10.0, 40.0))) for v in problem.vehicles))
        known = solve_cell(later)
        times["cell_known"].append(known.solve_us)
        free_rows.append(int(known.extra["free_rows"]))
        if index < references:
            started_ns = time.perf_counter_ns()
            optimum = reference.solve(later)
            times["cvxpy_highs_boolean"].append((time.perf_counter_ns() - started_ns) / 1000.0)
            differences.append(known.utility - optimum.utility)
        if index < variants:
            times["cell_max_min"].append(solve_cell(dataclasses.replace(later, fairness="max-min")).solve_us)
            with_gpu = dataclasses.replace(later, gpu_workers=0.5 * vehicles)
            exact_gpu = solve_cell(with_gpu)
            times["cell_gpu"].append(exact_gpu.solve_us)
            if index < references:  # the boolean program with the same two constraints
                started_ns = time.perf_counter_ns()
                optimum = reference.solve(with_gpu)
                times["cvxpy_highs_boolean_gpu"].append((time.perf_counter_ns() - started_ns) / 1000.0)
                gpu_differences.append(exact_gpu.utility - optimum.utility)
    return {
        "vehicles": vehicles,
        "cameras_per_vehicle": 5,
        "options_per_camera": 10,
        "instances": instances,
        "reference_instances": references,
        "variant_instances": variants,
        "seconds": round(time.perf_counter() - started, 1),
        "solve_ms": {name: {k: (v / 1000.0 if k != "count" else v) for k, v in summarise_us(samples).items()}
                     for name, samples in times.items() if samples},
        "free_rows_in_core": {"median": float(np.median(free_rows)), "max": int(np.max(free_rows))},
        "max_abs_gap_vs_milp": float(np.max(np.abs(differences))) if differences else None,
        "max_abs_gap_vs_milp_with_gpu": float(np.max(np.abs(gpu_differences))) if gpu_differences else None,
    }


def _numba_version() -> str | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="a few hundred instances instead of 10,000")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)} (empty: none)")
    parser.add_argument("--cells", default=",".join(map(str, CELL_SIZES)),
                        help="cars per cell for the joint-cell rows (empty: none)")
    args = parser.parse_args(argv)
    base_sizes, base_runtimes, source = cloud_rows()
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()
    calibration_us = numpy_call_us()
    plan = QUICK_GAP_INSTANCES if args.quick else FULL_GAP_INSTANCES
    results = {}
    for name in filter(None, args.shapes.split(",")):
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}")
        count, options = SHAPES[name]
        results[name] = run_shape(name, count, options, plan[name], rng, base_sizes, base_runtimes)
        print(f"{name}: done in {results[name]['seconds']} s", file=sys.stderr)
    cells = {}
    for text in filter(None, args.cells.split(",")):
        vehicles = int(text)
        plans = (QUICK_CELL_INSTANCES, QUICK_CELL_REFERENCES, QUICK_CELL_VARIANTS) if args.quick else (
            FULL_CELL_INSTANCES, FULL_CELL_REFERENCES, FULL_CELL_VARIANTS)
        instances, references, variants = (plan.get(vehicles, plan[CELL_SIZES[-1]]) for plan in plans)
        cells[f"cell_{vehicles}x5x10"] = run_cell(vehicles, instances, references, variants, rng, base_sizes,
                                                  base_runtimes)
        print(f"cell {vehicles}: done in {cells[f'cell_{vehicles}x5x10']['seconds']} s", file=sys.stderr)
    import cvxpy

    from optimizer import exact

    report = {
        "benchmark": "optimizer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "seed": args.seed,
        "size_runtime_source": source,
        "exact_solver_path": "numpy (reference)" if exact.KERNELS is None else "compiled kernels (numba)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cvxpy": cvxpy.__version__,
            "numba": _numba_version(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            # One small numpy call (adding a scalar to 245 floats), best of many: the machine's
            # speed at the time (about 0.4 us on an idle core of this class of machine).
            "numpy_call_us_before_after": [round(calibration_us, 3), round(numpy_call_us(), 3)],
        },
        "total_instances": sum(r["instances"] for r in results.values()),
        "shapes": results,
        "cells": cells,
    }
    if "a_5x49" in results and "c_200x50" in results:
        a, c = results["a_5x49"]["solve_us"], results["c_200x50"]["solve_us"]
        report["targets"] = {
            "a_exact_new_budget_median_le_100us": a["exact_new_budget"]["median"] <= 100,
            "a_exact_new_budget_p99_le_1ms": a["exact_new_budget"]["p99"] <= 1000,
            "a_exact_cold_median_le_100us": a["exact_cold"]["median"] <= 100,
            "a_exact_cold_p99_le_1ms": a["exact_cold"]["p99"] <= 1000,
            "c_exact_cold_median_le_20ms": c["exact_cold"]["median"] <= 20_000,
            "exact_gap_zero_everywhere": all(r["exact_max_abs_gap"] <= GAP_TOLERANCE for r in results.values()),
            "a_exact_new_rtt_median_le_50us": a["exact_new_rtt"]["median"] <= 50,
            "a_exact_new_tuple_median_le_50us": a["exact_new_tuple"]["median"] <= 50,
        }
    if "cell_1000x5x10" in cells:
        big = cells["cell_1000x5x10"]
        targets = report.setdefault("targets", {})
        targets["cell_1000_known_median_le_20ms"] = big["solve_ms"]["cell_known"]["median"] <= 20
        # A cell of option objects never seen: the solve on its arrays alone, and with reading them.
        targets["cell_1000_fresh_after_table_median_le_20ms"] = big["solve_ms"]["cell_fresh_after_table"]["median"] <= 20
        targets["cell_1000_fresh_median_le_20ms"] = big["solve_ms"]["cell_fresh"]["median"] <= 20
    if cells:
        gaps = [c[key] for c in cells.values() for key in ("max_abs_gap_vs_milp", "max_abs_gap_vs_milp_with_gpu")
                if c[key] is not None]
        report.setdefault("targets", {})["cell_equals_milp_within_1e-6"] = all(g <= 1e-6 for g in gaps)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
