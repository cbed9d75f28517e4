"""Every allocation method through one suite of shared problems, plus the exact solver against
brute force and against the cvxpy boolean program on random instances (hypothesis)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avcloud.errors import DataError, UserError
from avcloud.types import AllocationProblem, Option, Service, critical_bandwidth_mbps
from optimizer.allocators import ALLOCATORS, Allocator, ExactAllocator, get_allocator
from optimizer.exact import PreparedServices
from optimizer.problem import budget_limit_mbps

RTT_MS = 20.0
SLO_MS = 150.0


def service(name: str, *options: tuple[str, float, float, float], weight: float = 1.0) -> Service:
    return Service(name, tuple(Option(*option) for option in options), weight)


def brute_force_optimum(problem: AllocationProblem) -> float:
    """Best weighted utility over every combination that fits (the definition, by enumeration)."""
    per_service = []
    for s in problem.services:
        reachable = []
        for option in s.options:
            bandwidth = critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, problem.rtt_ms, problem.slo_ms)
            if math.isfinite(bandwidth):
                reachable.append((bandwidth, s.weight * option.utility))
        per_service.append(reachable)
    limit = budget_limit_mbps(problem.budget_mbps)
    best = -math.inf
    for combination in itertools.product(*per_service):
        if sum(b for b, _ in combination) <= limit:
            best = max(best, sum(v for _, v in combination))
    return best


# Critical bandwidths at RTT 20 / SLO 150: size / ((130 - runtime) / 1000).
# cam A: fb 0.30; a1: 1.3 Mb, 65 ms -> 20 Mbps, 0.50; a2: 2.6 Mb, 65 ms -> 40 Mbps, 0.60;
#        a3 runtime 140 ms -> never meets the SLO, utility 0.99.
# cam B: fb 0.20; b1: 0.65 Mb, 65 ms -> 10 Mbps, 0.45; b2: 3.25 Mb, 65 ms -> 50 Mbps, 0.58.
CAM_A = service(
    "A", ("fb", 0.0, 0.0, 0.30), ("a1", 1.3, 65.0, 0.50), ("a2", 2.6, 65.0, 0.60), ("a3", 0.1, 140.0, 0.99)
)
CAM_B = service("B", ("fb", 0.0, 0.0, 0.20), ("b1", 0.65, 65.0, 0.45), ("b2", 3.25, 65.0, 0.58))

SHARED_PROBLEMS = {
    "two_cameras": AllocationProblem((CAM_A, CAM_B), 30.0, RTT_MS, SLO_MS),
    "zero_budget": AllocationProblem((CAM_A, CAM_B), 0.0, RTT_MS, SLO_MS),
    "budget_exactly_a_sum": AllocationProblem((CAM_A, CAM_B), 20.0 + 50.0, RTT_MS, SLO_MS),
    "huge_budget": AllocationProblem((CAM_A, CAM_B), 1e6, RTT_MS, SLO_MS),
    "all_cloud_infeasible": AllocationProblem(
        (service("C", ("fb", 0.0, 0.0, 0.1), ("slow", 1.0, 200.0, 0.9)),), 100.0, RTT_MS, SLO_MS
    ),
    "only_fallback": AllocationProblem(
        (service("D", ("fb", 0.0, 5.0, 0.25)), service("E", ("fb", 0.0, 5.0, 0.35))), 10.0, RTT_MS, SLO_MS
    ),
    "weighted": AllocationProblem((Service("A", CAM_A.options, 3.0), CAM_B), 30.0, RTT_MS, SLO_MS),
    "ties": AllocationProblem(
        (
            service("T1", ("fb", 0.0, 0.0, 1.0), ("x", 1.3, 65.0, 2.0), ("y", 1.3, 65.0, 2.0)),
            service("T2", ("fb", 0.0, 0.0, 1.0), ("x", 1.3, 65.0, 2.0)),
        ),
        20.0,
        RTT_MS,
        SLO_MS,
    ),
}


@pytest.fixture(params=sorted(ALLOCATORS))
def allocator(request) -> Allocator:
    return get_allocator(request.param)


@pytest.mark.parametrize("problem_name", sorted(SHARED_PROBLEMS))
def test_every_method_reports_consistent_allocations(allocator: Allocator, problem_name: str):
    problem = SHARED_PROBLEMS[problem_name]
    allocation = allocator.solve(problem)
    assert isinstance(allocator, Allocator)
    assert list(allocation.choices) == [s.name for s in problem.services]
    expected_utility = 0.0
    for s in problem.services:
        option = next(o for o in s.options if o.name == allocation.choices[s.name])
        bandwidth = critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, problem.rtt_ms, problem.slo_ms)
        assert math.isfinite(bandwidth), "no method may choose an option that can never meet the SLO"
        assert allocation.bandwidth_mbps[s.name] == pytest.approx(bandwidth, rel=1e-12)
        expected_utility += s.weight * option.utility
    assert allocation.utility == pytest.approx(expected_utility, abs=1e-12)
    assert allocation.solve_us > 0
    optimum = brute_force_optimum(problem)
    if allocator.bandwidth_aware:
        assert allocation.total_bandwidth_mbps <= budget_limit_mbps(problem.budget_mbps)
        assert allocation.utility <= optimum + 1e-9
    if allocator.exact:
        assert allocation.utility == pytest.approx(optimum, abs=1e-9)


def test_hand_computed_optimum_of_two_cameras():
    # Budget 30: A a1 (20) + B b1 (10) = 0.95 beats A fb + B b1 (0.75) and A a1 + B fb (0.70).
    allocation = get_allocator("exact").solve(SHARED_PROBLEMS["two_cameras"])
    assert allocation.choices == {"A": "a1", "B": "b1"}
    assert allocation.utility == pytest.approx(0.95)
    assert allocation.bandwidth_mbps == pytest.approx({"A": 20.0, "B": 10.0})


def test_budget_exactly_equal_to_a_sum_is_feasible():
    # 70 = a1 (20) + b2 (50): utility 1.08, better than a2 + b1 (1.05 for 50 Mbps).
    for method in ("exact", "milp"):
        allocation = get_allocator(method).solve(SHARED_PROBLEMS["budget_exactly_a_sum"])
        assert allocation.choices == {"A": "a1", "B": "b2"}, method


def test_weights_change_the_choice():
    # With weight 3 on A, A's upgrade to a1 (+0.2 * 3) beats B's b1 (+0.25) for the same 20 Mbps.
    problem = AllocationProblem(
        (Service("A", CAM_A.options, 3.0), CAM_B), 20.0, RTT_MS, SLO_MS
    )
    allocation = get_allocator("exact").solve(problem)
    assert allocation.choices == {"A": "a1", "B": "fb"}
    assert allocation.utility == pytest.approx(3 * 0.5 + 0.2)


def test_baselines_follow_their_rules():
    problem = SHARED_PROBLEMS["two_cameras"]
    onboard = get_allocator("onboard").solve(problem)
    assert onboard.choices == {"A": "fb", "B": "fb"} and onboard.total_bandwidth_mbps == 0
    naive = get_allocator("naive").solve(problem)
    # a3 is more accurate but can never meet the SLO; a2 is the most accurate reachable one.
    assert naive.choices == {"A": "a2", "B": "b2"}
    assert naive.total_bandwidth_mbps == pytest.approx(90.0)
    assert naive.extra["within_budget"] is False
    equal = get_allocator("equal").solve(problem)
    # Each camera gets 15 Mbps: A cannot afford a1 (20), B takes b1 (10).
    assert equal.choices == {"A": "fb", "B": "b1"}


def test_lp_reports_relaxation_and_fractionality():
    lp = get_allocator("lp")
    fractional = lp.solve(SHARED_PROBLEMS["two_cameras"])
    # Hull of A: fb (0, .3) -> a1 (20, .5) -> a2 (40, .6); B: fb (0, .2) -> b1 (10, .45) -> b2 (50, .58).
    # Slopes .025 (b1), .01 (a1), .005 (a2), .00325 (b2): budget 30 takes b1 and a1 exactly.
    assert fractional.extra["fractional"] is False
    assert fractional.extra["relaxation_utility"] == pytest.approx(0.95, abs=1e-6)
    halfway = lp.solve(AllocationProblem((CAM_A, CAM_B), 20.0, RTT_MS, SLO_MS))
    assert halfway.extra["fractional"] is True
    assert halfway.extra["relaxation_utility"] == pytest.approx(0.75 + 0.5 * 0.2, abs=1e-6)
    assert halfway.choices == {"A": "fb", "B": "b1"}


def test_exact_lp_relaxation_matches_cvxpy_lp():
    problem = AllocationProblem((CAM_A, CAM_B), 20.0, RTT_MS, SLO_MS)
    relaxation = PreparedServices(problem.services, RTT_MS, SLO_MS).lp_relaxation(20.0)
    assert relaxation.fractional
    assert relaxation.value == pytest.approx(get_allocator("lp").solve(problem).extra["relaxation_utility"], abs=1e-6)
    assert relaxation.price == pytest.approx(0.01)


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="unknown method 'fastest'.*exact"):
        get_allocator("fastest")


def test_registry_has_exactly_the_documented_methods():
    assert set(ALLOCATORS) == {"exact", "lp", "milp", "onboard", "naive", "equal", "cell"}


@pytest.mark.parametrize("method", sorted(ALLOCATORS))
def test_service_without_fallback_is_rejected(method):
    problem = AllocationProblem((service("X", ("cloud", 1.0, 10.0, 0.5)),), 10.0, RTT_MS, SLO_MS)
    with pytest.raises(DataError, match="service 'X' has no on-car fallback"):
        get_allocator(method).solve(problem)


def test_exact_cache_follows_budget_and_rtt_changes():
    allocator = ExactAllocator()
    services = (CAM_A, CAM_B)
    for budget, rtt, expected in [(30, 20, 0.95), (70, 20, 1.08), (9.99, 20, 0.5), (30, 20, 0.95),
                                  (30, 84, 0.5), (30, 20, 0.95)]:
        # RTT 84 ms: slack 46 ms, b1 needs 0.65 / 0.046 = 14.1 Mbps, a1 28.3 Mbps; only one fits.
        allocation = allocator.solve(AllocationProblem(services, float(budget), float(rtt), SLO_MS))
        brute = brute_force_optimum(AllocationProblem(services, float(budget), float(rtt), SLO_MS))
        assert allocation.utility == pytest.approx(brute, abs=1e-12)
        if rtt == 20:
            assert allocation.utility == pytest.approx(expected)


# ---------------------------------------------------------------- random instances (hypothesis)

SIZES_MBIT = st.one_of(st.sampled_from([0.65, 1.3, 2.6, 3.25]), st.floats(0.01, 20.0))
RUNTIMES_MS = st.one_of(st.sampled_from([0.0, 65.0, 129.0, 130.0, 200.0]), st.floats(0.0, 160.0))
UTILITIES = st.one_of(st.integers(0, 4).map(float), st.floats(0.0, 1.0))


@st.composite
def random_problems(draw, max_services: int = 4, max_options: int = 5) -> AllocationProblem:
    services = []
    for index in range(draw(st.integers(1, max_services))):
        options = [Option("fb", 0.0, draw(RUNTIMES_MS), draw(UTILITIES))]
        for number in range(draw(st.integers(0, max_options - 1))):
            options.append(Option(f"o{number}", draw(SIZES_MBIT), draw(RUNTIMES_MS), draw(UTILITIES)))
        services.append(Service(f"s{index}", tuple(options), draw(st.sampled_from([1.0, 1.0, 0.0, 0.5, 2.0]))))
    services = tuple(services)
    if draw(st.booleans()):
        # A budget that is exactly the sum of one reachable option per service (edge of feasibility).
        total = 0.0
        for s in services:
            bandwidths = [critical_bandwidth_mbps(o.size_mbit, o.runtime_ms, RTT_MS, SLO_MS) for o in s.options]
            total += draw(st.sampled_from([b for b in bandwidths if math.isfinite(b)]))
        budget = total
    else:
        budget = draw(st.one_of(st.just(0.0), st.floats(0.0, 400.0)))
    return AllocationProblem(services, budget, RTT_MS, SLO_MS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_problems())
def test_exact_equals_brute_force(problem):
    allocation = get_allocator("exact").solve(problem)
    assert allocation.total_bandwidth_mbps <= budget_limit_mbps(problem.budget_mbps)
    assert allocation.utility == pytest.approx(brute_force_optimum(problem), abs=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_problems(max_services=12, max_options=4))
def test_exact_bounded_path_equals_plain_path(problem):
    # 9+ services take the LP-bounded DP; both must agree with the plain frontier DP.
    prepared = PreparedServices(problem.services, RTT_MS, SLO_MS)
    bounded_dp, _ = prepared._bounded_dp(budget_limit_mbps(problem.budget_mbps))
    plain_dp = prepared._merge(range(len(problem.services)), budget_limit_mbps(problem.budget_mbps))
    assert bounded_dp.values.max() == pytest.approx(plain_dp.values.max(), abs=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_problems(max_services=4, max_options=4))
def test_exact_equals_cvxpy_boolean_program(problem):
    exact = get_allocator("exact").solve(problem)
    boolean = _shared_milp.solve(problem)
    assert boolean.total_bandwidth_mbps <= budget_limit_mbps(problem.budget_mbps)
    assert abs(exact.utility - boolean.utility) <= 1e-9


_shared_milp = get_allocator("milp")  # compiled programs are cached per shape across examples


@pytest.mark.slow
def test_exact_equals_cvxpy_boolean_program_on_large_random_instances():
    rng = np.random.default_rng(7)
    exact, boolean = ExactAllocator(), get_allocator("milp")
    for _ in range(20):
        services = tuple(
            Service(
                f"s{index}",
                (Option("fb", 0.0, 0.0, float(rng.uniform(0.2, 0.4))),)
                + tuple(
                    Option(f"o{k}", float(rng.uniform(0.3, 10)), float(rng.uniform(30, 140)), float(rng.uniform(0.3, 0.8)))
                    for k in range(30)
                ),
            )
            for index in range(40)
        )
        problem = AllocationProblem(services, float(rng.uniform(0, 800)), RTT_MS, SLO_MS)
        assert abs(exact.solve(problem).utility - boolean.solve(problem).utility) <= 1e-9


# ---------------------------------------------------------------- cvxpy extension points


def test_boolean_program_honours_minimum_utility_per_service():
    from optimizer.convex import BooleanProgramAllocator, InfeasibleAllocationError

    problem = AllocationProblem((CAM_A, CAM_B), 60.0, RTT_MS, SLO_MS)
    assert get_allocator("exact").solve(problem).choices == {"A": "a2", "B": "b1"}  # 1.05
    constrained = BooleanProgramAllocator(min_utility_by_service={"B": 0.58}).solve(problem)
    assert constrained.choices == {"A": "fb", "B": "b2"}  # b2 takes 50 of the 60 Mbps
    assert constrained.utility == pytest.approx(0.88)
    with pytest.raises(InfeasibleAllocationError):
        BooleanProgramAllocator(min_utility_by_service={"A": 0.6, "B": 0.58}).solve(problem)


def test_boolean_program_honours_share_cap():
    from optimizer.convex import BooleanProgramAllocator

    problem = AllocationProblem((CAM_A, CAM_B), 60.0, RTT_MS, SLO_MS)
    # At most 30 Mbps each: a2 (40) is out, so a1 + b1.
    capped = BooleanProgramAllocator(max_share=0.5).solve(problem)
    assert capped.choices == {"A": "a1", "B": "b1"}


def test_lp_with_clarabel_matches_highs():
    from optimizer.convex import LpAllocator

    problem = AllocationProblem((CAM_A, CAM_B), 20.0, RTT_MS, SLO_MS)
    highs = LpAllocator().solve(problem)
    clarabel = LpAllocator(solver="CLARABEL").solve(problem)
    assert clarabel.extra["relaxation_utility"] == pytest.approx(highs.extra["relaxation_utility"], abs=1e-6)
    assert clarabel.total_bandwidth_mbps <= budget_limit_mbps(20.0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_problems(max_services=6, max_options=5))
def test_exact_dp_path_equals_brute_force(problem):
    # The first solve of a fresh table goes through the meet in the middle; with it disabled the
    # same budget takes the frontier DP, which must agree.
    import optimizer.exact as exact

    saved = exact.MEET_IN_THE_MIDDLE_MAX_COMBINATIONS
    exact.MEET_IN_THE_MIDDLE_MAX_COMBINATIONS = 0
    try:
        indices, bandwidths = PreparedServices(problem.services, RTT_MS, SLO_MS).solve(problem.budget_mbps)
    finally:
        exact.MEET_IN_THE_MIDDLE_MAX_COMBINATIONS = saved
    utility = sum(s.weight * s.options[i].utility for s, i in zip(problem.services, indices, strict=True))
    assert sum(bandwidths) <= budget_limit_mbps(problem.budget_mbps)
    assert utility == pytest.approx(brute_force_optimum(problem), abs=1e-9)


def test_known_options_in_a_new_tuple_with_new_weights():
    # The options of a tuple already read are remembered by identity; a new tuple of them with
    # other weights (another car with the same profile) must still be solved with its own weights.
    allocator = ExactAllocator()
    first = allocator.solve(AllocationProblem((CAM_A, CAM_B), 20.0, RTT_MS, SLO_MS))
    assert first.choices == {"A": "fb", "B": "b1"}
    heavy_a = (Service("A", CAM_A.options, 3.0), Service("B", CAM_B.options, 1.0))
    second = allocator.solve(AllocationProblem(heavy_a, 20.0, RTT_MS, SLO_MS))
    assert second.choices == {"A": "a1", "B": "fb"}
    assert second.utility == pytest.approx(brute_force_optimum(AllocationProblem(heavy_a, 20.0, RTT_MS, SLO_MS)))


def test_an_invalid_options_tuple_is_refused_every_time():
    broken = (Option("fb", 0.0, 0.0, 0.2), Option("x", -1.0, 10.0, 0.5))
    for _ in range(2):
        with pytest.raises(DataError, match="service 'X' option 'x': size_mbit must be"):
            get_allocator("exact").solve(AllocationProblem((Service("X", broken),), 10.0, RTT_MS, SLO_MS))
