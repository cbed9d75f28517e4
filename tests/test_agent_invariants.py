"""The daemon's promises, on the simulated clock: deterministic, and independent of machine load.

The shipped agent runs in the replay's simulated world (a trace-driven uplink, the cloud's
scheduler) while the uplink goes dark, the cloud is killed or slows down. Whatever happens: one
result per camera per frame, on-car results while the cloud cannot help, and the cloud used
again soon after it can.
"""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import CAMERAS, constant_opportunities, make_case

from avcloud.replay.simulator import CloudFaults, simulate_policy
from optimizer.policies import get_policy

FRAME_MS = 100.0


def steady_then_outage_then_steady(mbps: float, outage_start_s: float, outage_end_s: float, end_s: float):
    before = constant_opportunities(mbps, outage_start_s)
    after = outage_end_s * 1000 + constant_opportunities(mbps, end_s - outage_end_s)
    return np.concatenate([before, after])


def cloud_served(run) -> np.ndarray:
    return run.served_config() >= 0  # [frames, cameras]


def assert_one_result_per_camera_per_frame(run, frames: int) -> None:
    assert run.counters["published"] == frames * len(CAMERAS)
    assert all(cell is not None for row in run.published for cell in row)
    assert run.counters["frames"] == frames * len(CAMERAS)


def first_cloud_frame_after(run, frame: int) -> int | None:
    later = np.flatnonzero(cloud_served(run)[frame:].any(axis=1))
    return frame + int(later[0]) if later.size else None


@pytest.mark.parametrize("policy", ["turbo", "turbo-q"])
def test_a_10_s_uplink_outage_falls_back_and_recovers(policy):
    frames = 300  # 30 s; the uplink is dark from 5 s to 15 s
    case = make_case(steady_then_outage_then_steady(6.0, 5.0, 15.0, 30.0), frames=frames)
    run = simulate_policy(get_policy(policy), case.scenario, case.schedule, case.detections_at)
    assert_one_result_per_camera_per_frame(run, frames)
    served = cloud_served(run)
    assert served[:50].mean() > 0.3  # the cloud helps before the outage
    # Nothing sent into the outage can come back: on-car results only (a request sent just before
    # it may still have made it in its first frames).
    assert not served[55:150].any()
    # Back within 3 s of the link returning, and most frames use the cloud again afterwards.
    recovered = first_cloud_frame_after(run, 150)
    assert recovered is not None and recovered <= 180, recovered
    assert served[200:].mean() > 0.3
    # During the outage the agent keeps trying, but at most one discovery request a second.
    sent_during_outage = sum(1 for enqueue_ms, _, size in run.transfers if 6000 <= enqueue_ms < 15000 and size > 1000)
    assert sent_during_outage <= 10


def test_a_killed_cloud_is_survived_reconnected_and_used_again():
    frames = 250
    case = make_case(constant_opportunities(6.0, 25.0), frames=frames)
    faults = CloudFaults(down_ms=((5000.0, 15000.0),))
    run = simulate_policy(get_policy("turbo"), case.scenario, case.schedule, case.detections_at, cloud_faults=faults)
    assert_one_result_per_camera_per_frame(run, frames)
    served = cloud_served(run)
    assert served[:50].mean() > 0.3
    assert not served[52:150].any()
    assert run.counters["transport_resets"] >= 1  # nothing came back: the agent reconnected
    recovered = first_cloud_frame_after(run, 150)
    assert recovered is not None and recovered <= 180, recovered
    assert served[200:].mean() > 0.3


def test_a_slow_cloud_is_survived_and_used_again_when_fast():
    frames = 200
    case = make_case(constant_opportunities(6.0, 20.0), frames=frames)
    # Ten times slower for 5 s: every runtime (30-60 ms) exceeds what the 200 ms deadline leaves.
    faults = CloudFaults(slow_ms=((5000.0, 10000.0, 10.0),))
    run = simulate_policy(get_policy("turbo"), case.scenario, case.schedule, case.detections_at, cloud_faults=faults)
    assert_one_result_per_camera_per_frame(run, frames)
    served = cloud_served(run)
    assert not served[52:100].any()
    assert run.counters["replies_not_ok"] + run.counters["timeouts"] > 0  # expired at the cloud or late
    recovered = first_cloud_frame_after(run, 100)
    assert recovered is not None and recovered <= 130, recovered
    assert served[150:].mean() > 0.3


def test_the_same_inputs_give_the_same_run():
    case = make_case(constant_opportunities(4.0), frames=60)
    first = simulate_policy(get_policy("turbo-q"), case.scenario, case.schedule, case.detections_at)
    second = simulate_policy(get_policy("turbo-q"), case.scenario, case.schedule, case.detections_at)
    assert (first.outcome == second.outcome).all() and first.transfers == second.transfers
