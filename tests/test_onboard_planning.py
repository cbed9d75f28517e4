"""The daemon's planners: RTT quantisation keeps the solver's preparation cached and stays conservative."""

import pytest

from avcloud.types import Option, Service
from onboard.planning import build_planner, planning_rtt_ms
from optimizer.policies import get_policy

OPTIONS = (Option("car", 0.0, 0.0, 0.2), Option("cloud", 1.0, 50.0, 0.5))


def test_planning_rtt_rounds_up_to_the_step():
    assert planning_rtt_ms(40.0) == 40.0
    assert planning_rtt_ms(40.1) == 45.0
    assert planning_rtt_ms(44.9) == 45.0


def test_an_rtt_just_above_a_step_plans_like_the_next_step():
    services = (Service("FRONT", OPTIONS),)
    planner = build_planner(services, get_policy("turbo"))
    # cloud needs 1 Mb / (200 - 50 - rtt) ms: 10.0 Mbps at rtt 50, 10.53 Mbps at rtt 55.
    at_step = planner.plan(10.2, 50.0, 200.0, [])
    just_above = planner.plan(10.2, 50.2, 200.0, [])
    assert at_step.choices == {"FRONT": "cloud"}
    assert just_above.choices == {"FRONT": "car"}  # planned at 55 ms, where 10.2 Mbps is not enough


def test_a_stream_rate_cap_charges_a_long_slack_option_one_frame_interval():
    from avcloud.types import critical_bandwidth_mbps
    from optimizer.problem import StreamRateServices

    services = (Service("FRONT", OPTIONS),)
    stream = StreamRateServices(services, frame_interval_ms=100.0)
    capped = stream.at(50.0, 400.0)  # slack 300 ms > 100 ms
    (car, cloud) = capped[0].options
    assert car == OPTIONS[0]
    assert critical_bandwidth_mbps(cloud.size_mbit, cloud.runtime_ms, 50.0, 400.0) == pytest.approx(1.0 / 0.1)
    assert (cloud.name, cloud.runtime_ms, cloud.utility) == ("cloud", 50.0, 0.5)
    assert stream.at(50.0, 400.0) is capped  # one tuple per (RTT, SLO): the solver's caches stay warm
    assert stream.at(50.0, 180.0)[0].options == OPTIONS  # slack 80 ms: TURBO's own rate


def test_stream_rate_cap_policy_plans_with_the_stream_rate():
    services = (Service("FRONT", OPTIONS),)
    plain = build_planner(services, get_policy("turbo", {"stream_rate_cap": False}), frame_interval_ms=100.0)
    capped = build_planner(services, get_policy("turbo"), frame_interval_ms=100.0)
    # At SLO 400, RTT 50: TURBO's rate is 1 Mb / 300 ms = 3.3 Mbps, the stream's 10 Mbps.
    assert plain.plan(5.0, 50.0, 400.0, []).choices == {"FRONT": "cloud"}
    assert capped.plan(5.0, 50.0, 400.0, []).choices == {"FRONT": "car"}
    assert capped.plan(10.5, 50.0, 400.0, []).bandwidth_mbps["FRONT"] == pytest.approx(10.0)


def test_policy_settings_from_the_command_line():
    from avcloud.errors import UserError
    from optimizer.policies import parse_overrides

    assert parse_overrides(["max_in_flight_per_camera=2", "stream_rate_cap=true", "quantiles=[0.2, 0.5]"]) == {
        "max_in_flight_per_camera": 2, "stream_rate_cap": True, "quantiles": [0.2, 0.5]}
    for bad, message in (("max_in_flight_per_camera", "FIELD=VALUE"), ("nonsense=1", "unknown field"),
                         ("max_in_flight_per_camera=0", "1..8"), ("stream_rate_cap=maybe", "true or false"),
                         ("success_horizon=2", "true or false"), ("max_discovery_wait_ms=0", "max_discovery_wait_ms"),
                         ("horizon_partial_miss_cost=-1", "horizon_partial_miss_cost"),
                         ("horizon_partial_miss_cost=true", "horizon_partial_miss_cost")):
        with pytest.raises(UserError, match=message):
            parse_overrides([bad])


class CountingPlanner:
    """Plans cloud above 5 Mbps; counts the solves it was asked for."""

    def __init__(self) -> None:
        self.solves = 0

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps):
        from avcloud.types import Allocation

        self.solves += 1
        choice = "cloud" if bandwidth_mbps > 5.0 else "car"
        return Allocation({"FRONT": choice}, 0.5, {"FRONT": 1.0}, solve_us=123.0, extra={"budget": bandwidth_mbps})


def test_a_frame_with_the_last_frames_inputs_reuses_its_plan_as_a_copy(monkeypatch):
    import itertools

    from onboard import planning
    from onboard.planning import RepeatedPlanReuse

    monkeypatch.setattr(planning.time, "perf_counter_ns", itertools.count(0, 2000).__next__)  # 2 us a read
    inner = CountingPlanner()
    planner = RepeatedPlanReuse(inner)
    first = planner.plan(6.0, 41.0, 200.0, (5.0, 7.0))
    first.choices["FRONT"] = "car"  # the agent edits the allocation it is handed (discovery)
    first.extra["discovery"] = "FRONT"
    again = planner.plan(6.0, 44.0, 200.0, (5.0, 7.0))  # the same planning RTT step (45 ms)
    assert inner.solves == 1 and planner.reused == 1
    assert again.choices == {"FRONT": "cloud"} and again.extra == {"budget": 6.0}  # as solved
    assert again.solve_us == 2.0  # the time this frame's planning took, not the solve's 123 us
    for changed in ((6.0, 46.0, 200.0, (5.0, 7.0)), (6.0, 46.0, 150.0, (5.0, 7.0)),
                    (6.0, 46.0, 150.0, (5.0, 8.0)), (4.0, 46.0, 150.0, (5.0, 8.0))):
        allocation = planner.plan(*changed)
    assert inner.solves == 5
    assert allocation.choices == {"FRONT": "car"}


def test_shipped_planners_reuse_only_identical_inputs():
    services = (Service("FRONT", OPTIONS),)
    for name in ("turbo", "turbo-q", "equal"):
        planner = build_planner(services, get_policy(name), frame_interval_ms=100.0)
        solved = planner.plan(10.2, 50.0, 200.0, [9.0, 11.0, 12.0])
        reused = planner.plan(10.2, 50.0, 200.0, [9.0, 11.0, 12.0])
        assert planner.reused == 1
        assert (reused.choices, reused.bandwidth_mbps, reused.utility) == (solved.choices, solved.bandwidth_mbps,
                                                                           solved.utility)
        planner.plan(10.2, 50.0, 200.0, [9.0, 11.0, 12.5])
        assert planner.reused == 1


def test_cars_with_one_profile_share_one_exact_allocator():
    from optimizer.allocators import ExactAllocator, shared_allocator

    services = (Service("FRONT", OPTIONS),)
    other = (Service("FRONT", OPTIONS),)
    assert shared_allocator("exact", services) is shared_allocator("exact", services)
    assert shared_allocator("exact", other) is not shared_allocator("exact", services)
    assert isinstance(shared_allocator("exact", services), ExactAllocator)
    first, second = (build_planner(services, get_policy("turbo-q"), frame_interval_ms=100.0) for _ in range(2))
    assert first.inner.quantile_planner.allocator is second.inner.quantile_planner.allocator
    # A table prepared for one car serves the next: same plans, and the second finds it cached.
    for planner in (first, second):
        planner.plan(10.2, 50.0, 200.0, [9.0, 11.0, 12.0])
    assert len(first.inner.quantile_planner.allocator._prepared) == 1  # noqa: SLF001


def test_a_stream_view_keeps_the_hundreds_of_deadlines_a_fleet_plans_at():
    from optimizer.problem import StreamRateServices

    stream = StreamRateServices((Service("FRONT", OPTIONS),), frame_interval_ms=100.0)
    first = stream.at(50.0, 400.0)
    for rtt_ms in range(20, 360, 5):
        for slo_ms in (200.0, 250.0, 300.0, 350.0, 400.0):
            stream.at(float(rtt_ms), slo_ms)
    assert stream.at(50.0, 400.0) is first  # the solver's caches keyed by this tuple stay warm
