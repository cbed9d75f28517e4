"""A fleet split over several processes makes exactly the decisions it makes on one: every plan,
outcome, result time, transfer, throughput sample and published detection of every vehicle, and
the shared cell's and cloud's figures (avcloud/fleet/parallel.py)."""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import constant_opportunities
from test_fleet_fakes import fake_scene

from avcloud.fleet.coordinator import cell_allocator_available
from avcloud.fleet.parallel import can_run_on_processes, processes_for
from avcloud.fleet.simulation import FleetRun, simulate_fleet, vehicle_cases
from avcloud.link import DeliverySchedule
from avcloud.replay.simulator import ReplayedCar
from optimizer.policies import get_policy

pytestmark = pytest.mark.skipif(not can_run_on_processes(), reason="needs fork")

STEADY_8_MBPS = DeliverySchedule(constant_opportunities(8.0, 30.0))
STEADY_60_MBPS = DeliverySchedule(constant_opportunities(60.0, 30.0))
# 480 Mbps for 50 ms in every 500 ms, 26 Mbps between: sends, deliveries and replies bunch.
BURSTY = DeliverySchedule(np.sort(np.concatenate(
    [start + np.ceil((np.arange(2000) + 1) / 40).astype(np.int64) for start in range(0, 30000, 500)]
    + [start + 50 + np.ceil((np.arange(1000) + 1) / 2.2).astype(np.int64) for start in range(0, 30000, 500)])))


def fingerprint(run: FleetRun) -> dict:
    """Everything a fleet run decided, comparable with ==."""
    vehicles = []
    for policy_run in run.runs:
        vehicles.append((
            policy_run.planned_config.tolist(), policy_run.outcome.tolist(),
            np.nan_to_num(policy_run.result_ms, nan=-1.0).tolist(),
            np.nan_to_num(policy_run.estimate_mbps, nan=-1.0).tolist(),
            np.nan_to_num(policy_run.budget_mbps, nan=-1.0).tolist(),
            np.nan_to_num(policy_run.latency_ms, nan=-1.0).tolist(),
            policy_run.transfers, [(sample.observed_ms, sample.throughput_mbps) for sample in policy_run.samples],
            policy_run.counters, policy_run.published_config,
            [[None if detections is None else detections.tobytes() for detections in row]
             for row in policy_run.published],
        ))
    return {"vehicles": vehicles, "cloud_busy_ms": run.cloud_busy_ms, "delivered_packets": run.delivered_packets,
            "delivered_bytes": run.delivered_bytes_per_vehicle, "counters": run.counters,
            "horizon_ms": run.horizon_ms}


@pytest.mark.parametrize("policy, vehicles, scheduler, workers, phase, schedule", [
    ("turbo-q", 12, "pf", 2, "spread", STEADY_60_MBPS),
    ("turbo", 9, "equal", 1, "aligned", BURSTY),  # cars sending at one instant, a pool that queues
    ("equal", 6, "pf", 3, "aligned", STEADY_60_MBPS),
    ("equal", 6, "equal", 3, "aligned", STEADY_60_MBPS),  # every car joins the round at one instant
    ("turbo-q", 7, "per-vehicle", None, "aligned", BURSTY),
    ("oracle", 5, "per-vehicle", 1, "spread", STEADY_60_MBPS),
    ("turbo", 10, "pf", 2, "spread", STEADY_8_MBPS),  # a thin share: mostly discovery and pings
])
def test_several_processes_decide_exactly_as_one(policy, vehicles, scheduler, workers, phase, schedule):
    cases = vehicle_cases([fake_scene(frames=40)], vehicles)
    runs = {processes: simulate_fleet(get_policy(policy), cases, [schedule], scheduler, workers, phase,
                                      processes=processes)
            for processes in (1, 2, 3)}
    assert [run.processes for run in runs.values()] == [1, 2, 3]
    one = fingerprint(runs[1])
    assert sum(run.counters["requests_sent"] for run in runs[1].runs) > 0  # the cloud was used
    assert fingerprint(runs[2]) == one
    assert fingerprint(runs[3]) == one


def test_scenes_with_other_round_trips_encode_times_and_camera_delays_decide_exactly_as_one():
    """The windows are the shortest RTT/2 of the fleet; cameras arriving one after another and
    compression taking time put the cars' own events between the network's."""
    from replay_fakes import CAMERAS, OPTIONS
    from test_fleet_fakes import FakeSource

    from avcloud.fleet.simulation import SceneInputs
    from avcloud.replay.inputs import build_scenario
    from avcloud.types import Service

    def scene(rtt_ms: float, slo_ms: float, encode_ms: float, camera_input_ms: float) -> SceneInputs:
        source = FakeSource(30)
        services = tuple(Service(camera, OPTIONS) for camera in CAMERAS)
        encode = {option.name: encode_ms for option in OPTIONS if not option.is_fallback}
        scenario = build_scenario(services, source, source.frame_indices, 10.0, rtt_ms, slo_ms, encode, camera_input_ms)
        return SceneInputs(f"fake-{rtt_ms:g}", scenario, source, {})

    cases = vehicle_cases([scene(50.0, 200.0, 1.3, 2.0), scene(30.0, 150.0, 0.7, 0.0)], 8)
    runs = [simulate_fleet(get_policy("turbo-q"), cases, [STEADY_60_MBPS], "pf", 2, processes=processes)
            for processes in (1, 2, 3)]
    assert sum(run.counters["requests_sent"] for run in runs[0].runs) > 0
    assert fingerprint(runs[1]) == fingerprint(runs[0])
    assert fingerprint(runs[2]) == fingerprint(runs[0])


def test_a_fleet_with_no_round_trip_or_one_vehicle_stays_on_one_process():
    no_rtt = vehicle_cases([fake_scene(frames=20, rtt_ms=0.0)], 4)
    assert simulate_fleet(get_policy("turbo"), no_rtt, [STEADY_8_MBPS], "pf", processes=2).processes == 1
    one = vehicle_cases([fake_scene(frames=20)], 1)
    assert simulate_fleet(get_policy("turbo"), one, [STEADY_8_MBPS], "pf", processes=2).processes == 1


@pytest.mark.skipif(not cell_allocator_available(), reason="the cell allocator is not installed")
def test_the_cell_coordinator_plans_every_car_at_once_so_stays_on_one_process():
    from avcloud.fleet.coordinator import CELL_POLICY_SPEC, CellCoordinator, CellPolicySettings

    cases = vehicle_cases([fake_scene(frames=20)], 4)
    scenario = cases[0].scenario

    def coordinator(clock):
        return CellCoordinator([case.scenario.services for case in cases], STEADY_8_MBPS, clock, CellPolicySettings(),
                               scenario.rtt_ms, scenario.slo_ms, scenario.frame_interval_ms, 2)

    run = simulate_fleet(CELL_POLICY_SPEC, cases, [STEADY_8_MBPS], "pf", 2, coordinator=coordinator, processes=2)
    assert run.processes == 1


def test_a_failure_in_another_process_is_raised_here_and_nothing_hangs(monkeypatch):
    original = ReplayedCar._start_frame

    def failing(self, f):
        if self.event_rank == 2 and f == 5:  # vehicle 1: the second process's
            raise ValueError("scripted failure")
        original(self, f)

    monkeypatch.setattr(ReplayedCar, "_start_frame", failing)
    cases = vehicle_cases([fake_scene(frames=20)], 4)
    with pytest.raises(RuntimeError, match="scripted failure"):
        simulate_fleet(get_policy("turbo"), cases, [STEADY_8_MBPS], "pf", 2, processes=2)


def test_a_process_that_dies_is_one_clear_error(monkeypatch):
    import os

    original = ReplayedCar._start_frame

    def dying(self, f):
        if self.event_rank == 2 and f == 5:  # vehicle 1, in the second process: killed, say
            os._exit(9)
        original(self, f)

    monkeypatch.setattr(ReplayedCar, "_start_frame", dying)
    cases = vehicle_cases([fake_scene(frames=20)], 4)
    with pytest.raises(ChildProcessError, match="ended unexpectedly with exit code 9"):
        simulate_fleet(get_policy("turbo"), cases, [STEADY_8_MBPS], "pf", 2, processes=2)


def test_processes_are_worth_it_only_for_fleets_large_enough():
    assert processes_for(10, 2) == 1
    assert processes_for(32, 2) == 2
    assert processes_for(100, 8) == 6
    assert processes_for(1000, 2) == 2


def test_bad_process_counts_are_refused():
    cases = vehicle_cases([fake_scene(frames=20)], 2)
    with pytest.raises(ValueError, match="processes must be at least 1"):
        simulate_fleet(get_policy("turbo"), cases, [STEADY_8_MBPS], "pf", processes=0)
