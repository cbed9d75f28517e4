"""A fleet of shipped agents on one clock: one vehicle is the single-car replay exactly, vehicles
drive the scene from spread offsets, and a fixed pool's gain shrinks as the fleet grows."""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import constant_opportunities
from test_fleet_fakes import FakeFleetInputs, fake_scene

from avcloud.fleet.coordinator import CellPolicySettings, cell_allocator_available
from avcloud.fleet.metrics import break_even_vehicles, jain_index, summarise_fleet
from avcloud.fleet.scoring import SceneScorer
from avcloud.fleet.simulation import rotated_scenario, simulate_fleet, start_phases_ms, vehicle_cases
from avcloud.link import DeliverySchedule
from avcloud.replay.inputs import ReplayCase
from avcloud.replay.job import run_case
from avcloud.replay.metrics import datasets_map
from optimizer.policies import get_policy

CELL_8_MBPS = DeliverySchedule(constant_opportunities(8.0, 30.0))


def replay_case(scene, schedule) -> ReplayCase:
    return ReplayCase("fake-scene", "fake.tfrecord", "fake-trace", "fake.up", schedule, scene.scenario,
                      scene.ground_truths, scene.source, "profile.parquet", "fake profile")


def fleet_summary(policy: str, scene, vehicles: int, schedule=CELL_8_MBPS, scheduler="pf", workers=None, **kwargs):
    run = simulate_fleet(get_policy(policy), vehicle_cases([scene], vehicles), [schedule], scheduler, workers, **kwargs)
    return run, summarise_fleet(run, [SceneScorer(scene.source, scene.scenario.fallback_config)], {})


@pytest.mark.parametrize("scheduler", ["per-vehicle", "pf", "equal"])
@pytest.mark.parametrize("policy", ["turbo", "turbo-q", "naive"])
def test_one_vehicle_reproduces_the_single_car_replay_exactly(policy, scheduler):
    scene = fake_scene(frames=60)
    single = run_case(replay_case(scene, CELL_8_MBPS), [policy], map_function=datasets_map)
    expected_run, expected = single.runs[policy], single.summaries[policy]
    run, summary = fleet_summary(policy, scene, 1, scheduler=scheduler)
    vehicle, got_run = summary["per_vehicle"][0], run.runs[0]
    assert got_run.transfers == expected_run.transfers
    assert np.array_equal(got_run.outcome, expected_run.outcome)
    assert np.array_equal(got_run.planned_config, expected_run.planned_config)
    assert np.array_equal(got_run.result_ms, expected_run.result_ms, equal_nan=True)
    assert got_run.counters == expected_run.counters
    assert vehicle["map"] == expected["map"] and vehicle["map_per_camera"] == expected["map_per_camera"]
    for key in ("cloud_share", "requests_sent", "requests_on_time", "deadline_miss_rate", "agent_counters",
                "offered_mbps", "mean_planning_budget_mbps"):
        assert vehicle[key] == expected[key], key
    assert summary["map"]["mean"] == expected["map"]
    assert summary["jain_map"] == (1.0 if expected["map"] > 0 else None)  # undefined when nothing scores


def test_vehicles_drive_the_scene_from_spread_offsets_wrapping_around():
    scene = fake_scene(frames=60)
    cases = vehicle_cases([scene], 4)
    assert [case.offset_frames for case in cases] == [0, 15, 30, 45]
    assert cases[0].scenario is scene.scenario
    rotated = cases[1].scenario
    assert list(rotated.frame_indices[:3]) == [15, 16, 17] and list(rotated.frame_indices[-2:]) == [13, 14]
    assert np.array_equal(rotated.size_bytes[0], scene.scenario.size_bytes[15])
    assert np.array_equal(rotated.capture_ms, scene.scenario.capture_ms)
    assert cases[2].detections_at(0, 1, scene.scenario.fallback_config) is scene.source.detections(
        30, scene.scenario.cameras[1], scene.scenario.fallback_config)
    assert rotated_scenario(scene.scenario, 60) is scene.scenario
    assert start_phases_ms(4, 100.0) == [0.0, 25.0, 50.0, 75.0]
    assert start_phases_ms(3, 100.0, "aligned") == [0.0, 0.0, 0.0]


def test_many_scenes_are_shared_out_in_turn():
    first, second = fake_scene(frames=40), fake_scene(frames=60)
    cases = vehicle_cases([first, second], 5)
    assert [(case.scene, case.offset_frames) for case in cases] == [(0, 0), (1, 0), (0, 13), (1, 30), (0, 26)]


def test_every_vehicle_publishes_every_frame_once_on_a_busy_cell():
    run, summary = fleet_summary("turbo-q", fake_scene(frames=40), 6, workers=2)
    for policy_run in run.runs:
        assert policy_run.counters["published"] == policy_run.outcome.size
        assert all(cell is not None for row in policy_run.published for cell in row)
    assert 0 < summary["gpu_utilisation"] <= 1.0
    assert 0 < summary["uplink_utilisation"] <= 1.0
    assert len(summary["per_vehicle"]) == 6


@pytest.mark.parametrize("scheduler", ["per-vehicle", "pf"])
def test_with_a_fixed_pool_offloadings_gain_shrinks_as_the_fleet_grows(scheduler):
    scene = fake_scene(frames=60)
    gains = []
    # Far apart: between neighbouring sizes the cars' back-off from a busy pool (the cloud wait)
    # can move the gain by a few hundredths either way (per-vehicle, 60 frames: 3.96 at 3, 4.00 at 8).
    for vehicles in (1, 3, 16):
        _, summary = fleet_summary("turbo-q", scene, vehicles, scheduler=scheduler, workers=1)
        gains.append(summary["gain_points"]["mean"])
    assert gains[0] > gains[1] > gains[2] >= 0.0


def test_a_fleet_run_is_deterministic():
    scene = fake_scene(frames=40)
    _, first = fleet_summary("turbo", scene, 4, workers=2, scheduler="equal")
    _, second = fleet_summary("turbo", scene, 4, workers=2, scheduler="equal")
    first.pop("timing"), second.pop("timing")
    assert first == second


def test_aligned_cameras_make_a_worse_burst_than_spread_ones():
    scene = fake_scene(frames=60)
    _, spread = fleet_summary("turbo", scene, 4, phase="spread")
    _, aligned = fleet_summary("turbo", scene, 4, phase="aligned")
    assert spread["map"]["mean"] >= aligned["map"]["mean"]


def test_jains_index():
    assert jain_index([0.2, 0.2, 0.2]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / 20)
    assert jain_index([]) is None and jain_index([0.0, 0.0]) is None


def test_break_even_is_the_first_fleet_size_whose_gain_falls_below_the_threshold():
    points = [{"vehicles": n, "gain_points": {"mean": gain}} for n, gain in ((8, 0.4), (1, 9.0), (4, 1.5), (2, 5.0))]
    assert break_even_vehicles(points, 1.0) == 8
    assert break_even_vehicles(points, 2.0) == 4
    assert break_even_vehicles(points, 0.1) is None


@pytest.mark.skipif(not cell_allocator_available(), reason="optimizer/cell.py (the cell-level allocator) is absent")
def test_the_cell_coordinator_solves_once_per_frame_and_keeps_within_the_cell():
    from avcloud.fleet.job import FleetPoint, FleetSettings, run_point

    inputs = FakeFleetInputs(frames=40)
    result = run_point(inputs, FleetSettings("pf"), FleetPoint(4, 2, "cell"))
    assert result["counters"]["coordinator_solves"] == 40  # one joint allocation per frame interval
    assert result["requests_sent"] > 0 and result["gain_points"]["mean"] > 0
    for vehicle in result["per_vehicle"]:
        assert vehicle["agent_counters"]["published"] == 40 * 3
    # Every vehicle plans with its share: together they never plan for more than the cell has.
    assert sum(vehicle["mean_planning_budget_mbps"] for vehicle in result["per_vehicle"]) <= 8.0 * 0.9 + 1e-9


@pytest.mark.skipif(not cell_allocator_available(), reason="optimizer/cell.py (the cell-level allocator) is absent")
def test_max_min_fairness_lifts_the_worst_vehicle():
    from avcloud.fleet.job import FleetPoint, FleetSettings, run_point

    # 20 Mbps: enough for each of the 4 vehicles to send a camera at the stream rate, not for all of them
    # to send as much as the total-utility optimum gives the best placed ones.
    inputs = FakeFleetInputs(frames=40, cell_mbps=(20.0,))
    total = run_point(inputs, FleetSettings("pf"), FleetPoint(4, None, "cell"))
    fair = run_point(inputs, FleetSettings("pf", cell=CellPolicySettings(fairness="max-min")),
                     FleetPoint(4, None, "cell"))
    assert fair["map"]["min"] > total["map"]["min"]
    assert fair["jain_map"] > total["jain_map"]


@pytest.mark.slow
def test_one_vehicle_reproduces_the_default_replay_exactly():
    """The acceptance check on the real default scene and profile (cached under $AVCLOUD_CACHE)."""
    from avcloud.fleet.job import FleetInputs, FleetPoint, FleetSettings, load_inputs, run_point
    from avcloud.replay.inputs import make_case, open_profiled_scene, open_trace
    from avcloud.replay.job import default_scene_path, default_trace_path

    case = make_case(open_profiled_scene(default_scene_path(), "demo", False), open_trace(default_trace_path()),
                     50.0, 200.0)
    single = run_case(case, ["turbo", "turbo-q"], map_function=datasets_map)
    inputs = FleetInputs((), (), 50.0, 200.0)
    load_inputs(inputs)
    for scheduler in ("per-vehicle", "pf"):
        for policy in ("turbo", "turbo-q"):
            vehicle = run_point(inputs, FleetSettings(scheduler), FleetPoint(1, None, policy))["per_vehicle"][0]
            expected = single.summaries[policy]
            for key in ("map", "map_per_camera", "cloud_share", "requests_sent", "deadline_miss_rate", "agent_counters"):
                assert vehicle[key] == expected[key], (scheduler, policy, key)
