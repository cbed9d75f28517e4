"""The daemon's planners: RTT quantisation keeps the solver's preparation cached and stays conservative."""

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
