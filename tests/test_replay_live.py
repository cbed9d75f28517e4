"""Live replay: scoring a recording like a simulated run (fast), and sim-vs-live agreement (slow)."""

from __future__ import annotations

import pytest
from test_replay_policies import constant_opportunities, make_case

from avcloud.replay.live import (
    LIVE_POLICIES,
    RecordedDetections,
    apply_node_counters,
    node_counters,
    run_from_recording,
)
from avcloud.replay.simulator import FALLBACK_INDEX, RequestOutcome


def recorded_row(frame, camera, source, config, detections=()):
    return {"frame_index": frame, "camera": camera, "source": source, "config": config, "latency_ms": 10.0,
            "deadline_met": source == "cloud", "detections": [list(d) for d in detections]}


def test_recording_becomes_a_run_with_cloud_rows_on_time_and_car_rows_late_or_fallback():
    case = make_case(constant_opportunities(6.0), frames=3)
    scenario = case.scenario
    cloud = scenario.config_names[0]
    rows = [
        recorded_row(0, "FRONT", "cloud", cloud, [(0, 0, 5, 5, 0.9, 1)]),
        recorded_row(1, "FRONT", "onboard", cloud),
        recorded_row(2, "FRONT", "onboard", scenario.fallback_config, [(1, 1, 4, 4, 0.5, 2)]),
    ]
    run = run_from_recording("turbo", rows, scenario, wall_s=1.0)
    assert list(run.planned_config[:, 0]) == [0, 0, FALLBACK_INDEX]
    assert list(run.outcome[:, 0]) == [RequestOutcome.ON_TIME, RequestOutcome.LATE, RequestOutcome.FALLBACK]
    assert list(run.served_config()[:, 0]) == [0, FALLBACK_INDEX, FALLBACK_INDEX]
    published = RecordedDetections(rows)
    assert published.detections(0, "FRONT", cloud).shape == (1, 6)
    assert published.detections(2, "FRONT", scenario.fallback_config)[0, 4] == pytest.approx(0.5)
    assert published.detections(1, "SIDE_LEFT", cloud).shape == (0, 6)  # nothing published: no detections


def test_node_counters_give_the_live_deadline_miss_rate(tmp_path):
    log = tmp_path / "turbo-onboard.log"
    log.write_text('{"event": "activated"}\nnot json\n'
                   '{"event": "finalized", "requests_sent": 40, "published_cloud": 30, "timeouts": 10}\n')
    summary = {"requests_sent": 0, "deadline_miss_rate": None}
    apply_node_counters(summary, node_counters(log), rows=250)
    assert summary["requests_sent"] == 40 and summary["requests_late"] == 10
    assert summary["deadline_miss_rate"] == 0.25 and summary["results_published"] == 250
    assert node_counters(tmp_path / "absent.log") == {}


def test_oracle_has_no_live_counterpart():
    assert "oracle" not in LIVE_POLICIES and {"onboard", "naive", "equal", "turbo", "turbo-q"} == set(LIVE_POLICIES)


@pytest.mark.slow
@pytest.mark.xfail(reason="on a 2-core machine the live cloud service's real model shares the CPU with the car's "
                          "processes, so live cloud runtimes are several times the profiled ones and most replies are "
                          "late (one 60-frame turbo run: 67 sent, 49 late); the simulator uses the profiled runtimes",
                   strict=False)
def test_simulated_and_live_runs_agree():
    """Same short scene, trace and policy: deadline-hit rate within 5 points, mAP within 2 points."""
    from avcloud.replay.job import ReplayOptions, run_replay
    from avcloud.replay.live import run_live_replay

    options = ReplayOptions(policies=("turbo",), progress=False, max_frames=100)
    (live,) = run_live_replay(options)
    (simulated,) = run_replay(options)
    sim_hit = 1.0 - (simulated.summaries["turbo"]["deadline_miss_rate"] or 0.0)
    live_hit = 1.0 - (live.summaries["turbo"]["deadline_miss_rate"] or 0.0)
    assert live.summaries["turbo"]["requests_sent"] > 0 and simulated.summaries["turbo"]["requests_sent"] > 0
    assert abs(sim_hit - live_hit) <= 0.05
    assert abs(simulated.summaries["turbo"]["map"] - live.summaries["turbo"]["map"]) <= 0.02
