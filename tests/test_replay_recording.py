"""A replayed policy run as an MCAP recording: every frame's results, allocation and estimate."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from replay_fakes import CAMERAS, constant_opportunities, make_case

from avcloud.recording import read_mcap
from avcloud.replay.recording import write_policy_mcap
from avcloud.replay.simulator import simulate_policy
from optimizer.policies import get_policy


def test_a_replayed_run_is_recorded_message_by_message(tmp_path):
    case = make_case(constant_opportunities(6.0), frames=20)
    run = simulate_policy(get_policy("turbo"), case.scenario, case.schedule, case.detections_at)
    path = write_policy_mcap(case, run, tmp_path / "turbo.mcap", images=False)
    messages = list(read_mcap(path))
    topics = Counter(message.topic for message in messages)
    assert topics["/allocation"] == 20 and topics["/uplink/bandwidth"] == 20
    for camera in CAMERAS:
        assert topics[f"/perception/{camera}/result"] == 20
    results = [message.message for message in messages if message.topic.endswith("/result")]
    sources = Counter(result.source for result in results)
    served = run.served_config()
    assert sources["cloud"] == np.count_nonzero(served >= 0) and sources["onboard"] == np.count_nonzero(served < 0)
    assert sources["cloud"] > 0
    cloud = next(result for result in results if result.source == "cloud")
    assert cloud.config in case.scenario.config_names and cloud.deadline_met


def test_a_recording_of_a_run_that_kept_nothing_is_one_clear_error(tmp_path):
    from avcloud.errors import UserError
    from avcloud.replay.live import run_from_recording

    case = make_case(constant_opportunities(6.0), frames=3)
    recorded = run_from_recording("turbo", [], case.scenario, wall_s=0.0)
    with pytest.raises(UserError, match="only a simulated run"):
        write_policy_mcap(case, recorded, tmp_path / "x.mcap", images=False)
