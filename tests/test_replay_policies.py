"""Policies with the real optimizer on a small fake profile and fake detection cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avcloud.errors import UserError
from avcloud.link import DeliverySchedule
from avcloud.replay.inputs import ReplayCase, build_scenario
from avcloud.replay.job import CaseResult, ReplayOptions, check_options, results_document, run_case
from avcloud.replay.metrics import summarise_policies
from avcloud.replay.policies import POLICY_NAMES, check_policy_names, make_policy
from avcloud.replay.simulator import RequestOutcome, simulate_policy
from avcloud.types import GroundTruth, Option, Service

CAMERAS = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT")
FALLBACK = Option("car-imgcompNone-inpcompNone", 0.0, 0.0, 0.30)
OPTIONS = (
    FALLBACK,
    Option("s-imgcompNone-inpcomp50", 0.30, 30.0, 0.40),
    Option("m-imgcompNone-inpcomp75", 0.60, 45.0, 0.48),
    Option("l-imgcomp90-inpcompNone", 3.00, 60.0, 0.55),
)
FRAMES = 100


class FakeCache:
    """Sizes as the profile says (+/- 10 % per frame); one 'detection' whose score is the option's utility."""

    def __init__(self, frames: int = FRAMES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.configs = [option.name for option in OPTIONS]
        self.frame_indices = list(range(frames))
        self.cameras = list(CAMERAS)
        self._jitter = rng.uniform(0.9, 1.1, size=(frames, len(CAMERAS)))
        self._utility = {option.name: option.utility for option in OPTIONS}
        self._size_mbit = {option.name: option.size_mbit for option in OPTIONS}

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return int(self._size_mbit[config] * 1e6 / 8 * self._jitter[frame_index, CAMERAS.index(camera)])

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        return np.array([[0, 0, 10, 10, self._utility[config], 1]], dtype=np.float32)


def mean_score_map(detections, ground_truths) -> float:
    """Stand-in metric: the mean utility of what was published (so cloud results raise it)."""
    assert len(detections) == len(ground_truths)
    return float(np.mean([d[0, 4] for d in detections]))


def make_case(opportunities_ms, frames: int = FRAMES, rtt_ms: float = 50.0, slo_ms: float = 200.0) -> ReplayCase:
    cache = FakeCache(frames)
    services = tuple(Service(camera, OPTIONS) for camera in CAMERAS)
    scenario = build_scenario(services, cache, cache.frame_indices, 10.0, rtt_ms, slo_ms, {})
    truth = GroundTruth(np.zeros((1, 4), np.float32), np.ones(1, np.int32))
    return ReplayCase("fake-scene", "fake.tfrecord", "fake-trace", "fake.up", DeliverySchedule(opportunities_ms),
                      scenario, {camera: [truth] * frames for camera in CAMERAS}, cache, "profile.parquet", "fake profile")


def constant_opportunities(mbps: float, duration_s: float = 20.0) -> np.ndarray:
    packets_per_ms = mbps / 12.0
    count = int(duration_s * 1000 * packets_per_ms)
    return np.ceil((np.arange(count) + 1) / packets_per_ms).astype(np.int64)


def test_every_policy_runs_and_onboard_sends_nothing():
    case = make_case(constant_opportunities(6.0))
    result = run_case(case, POLICY_NAMES, map_function=mean_score_map)
    assert set(result.summaries) == set(POLICY_NAMES)
    onboard = result.summaries["onboard"]
    assert onboard["requests_sent"] == 0 and onboard["mean_uplink_mbps"] == 0
    assert onboard["map"] == pytest.approx(0.30)
    assert onboard["gain_over_onboard_points"] == pytest.approx(0.0)
    assert result.summaries["oracle"]["fraction_of_oracle_gain"] == pytest.approx(1.0)


def test_naive_sends_the_most_accurate_configuration_and_misses_on_a_thin_uplink():
    case = make_case(constant_opportunities(2.0))
    run = simulate_policy(make_policy("naive", case.schedule), case.scenario, case.schedule)
    planned = {case.scenario.config_names[k] for k in np.unique(run.planned_config)}
    assert planned == {"l-imgcomp90-inpcompNone"}
    sent = np.isin(run.outcome, [RequestOutcome.ON_TIME, RequestOutcome.LATE])
    assert np.count_nonzero(run.outcome == RequestOutcome.LATE) / np.count_nonzero(sent) > 0.9


def test_turbo_learns_a_constant_uplink_from_its_own_transfers():
    case = make_case(constant_opportunities(6.0))
    run = simulate_policy(make_policy("turbo", case.schedule), case.scenario, case.schedule)
    assert run.estimate_mbps[0] == pytest.approx(1.0)  # the documented start before any sample
    assert run.samples and np.median([s.throughput_mbps for s in run.samples]) == pytest.approx(6.0, rel=0.15)
    assert np.nanmedian(run.estimate_mbps[20:]) == pytest.approx(6.0, rel=0.15)
    sent = np.isin(run.outcome, [RequestOutcome.ON_TIME, RequestOutcome.LATE])
    assert np.count_nonzero(run.outcome == RequestOutcome.LATE) <= 0.05 * np.count_nonzero(sent)


def test_bandwidth_aware_policies_beat_onboard_and_naive_on_a_steady_uplink():
    case = make_case(constant_opportunities(6.0))
    summaries = run_case(case, POLICY_NAMES, map_function=mean_score_map).summaries
    maps = {name: summary["map"] for name, summary in summaries.items()}
    assert maps["oracle"] >= maps["turbo"] > maps["onboard"]
    assert maps["turbo"] > maps["naive"]
    assert maps["turbo"] >= maps["equal"]


def test_estimating_policy_does_not_see_an_outage_coming():
    # 6 Mbps for 5 s, then nothing for 5 s (the trace loops every 10 s).
    steady = constant_opportunities(6.0, 5.0)
    opportunities = np.concatenate([steady, [10000]])
    case = make_case(opportunities)
    turbo = simulate_policy(make_policy("turbo", case.schedule), case.scenario, case.schedule)
    oracle = simulate_policy(make_policy("oracle", case.schedule), case.scenario, case.schedule)
    outage = slice(51, 99)
    assert np.count_nonzero(turbo.outcome[outage] == RequestOutcome.LATE) > 0
    # The oracle knows the outage and plans (almost) nothing into it.
    assert np.count_nonzero(oracle.outcome[outage] == RequestOutcome.LATE) < np.count_nonzero(
        turbo.outcome[outage] == RequestOutcome.LATE)


def test_oracle_keeps_the_capacity_fraction_that_served_the_most_utility():
    from avcloud.replay.job import best_oracle_run
    from avcloud.replay.policies import ORACLE_CAPACITY_FRACTIONS, OraclePolicy

    case = make_case(constant_opportunities(6.0), frames=60)
    utilities = {option.name: option.utility for option in OPTIONS}

    def served_utility(run):
        served = run.served_config()
        return sum(utilities[FALLBACK.name] if k == -1 else utilities[case.scenario.config_names[k]]
                   for k in served.ravel())

    best = best_oracle_run(case)
    singles = [simulate_policy(OraclePolicy(case.schedule, fraction), case.scenario, case.schedule)
               for fraction in ORACLE_CAPACITY_FRACTIONS]
    assert served_utility(best) == pytest.approx(max(served_utility(run) for run in singles))
    assert np.nanmax(best.budget_mbps) <= 6.0 + 1e-9 and best.policy == "oracle"


def test_policy_that_sends_nothing_probes_after_a_silence():
    # 0.5 Mbps: below every cloud option's critical bandwidth, so the allocation alone never sends.
    case = make_case(constant_opportunities(0.5))
    run = simulate_policy(make_policy("turbo", case.schedule), case.scenario, case.schedule)
    probes = np.argwhere(run.planned_config != -1)
    assert 0 < len(probes) <= FRAMES // 10 + 1  # at least one, at most about one per second
    assert {case.scenario.config_names[run.planned_config[tuple(p)]] for p in probes} == {"s-imgcompNone-inpcomp50"}


def test_only_the_oracle_is_given_the_trace():
    schedule = DeliverySchedule(constant_opportunities(6.0))
    for name in POLICY_NAMES:
        policy = make_policy(name, schedule)
        holds_schedule = any(value is schedule for value in vars(policy).values())
        assert holds_schedule == (name == "oracle"), name


def test_policy_names_are_checked():
    assert check_policy_names(["oracle", "turbo", "turbo"]) == ("turbo", "oracle")
    with pytest.raises(UserError, match="unknown policy 'fast'"):
        check_policy_names(["fast"])
    with pytest.raises(UserError, match="must be below"):
        check_options(ReplayOptions(rtt_ms=300.0, slo_ms=200.0))


def test_results_document_has_every_figure_per_policy_and_is_json():
    case = make_case(constant_opportunities(6.0), frames=30)
    result = run_case(case, ("onboard", "turbo", "oracle"), map_function=mean_score_map)
    document = json.loads(json.dumps(results_document([result], ReplayOptions(policies=("onboard", "turbo", "oracle")))))
    assert document["schema"] == 1 and document["mode"] == "simulated"
    assert document["settings"]["rtt_ms"] == 50.0 and document["settings"]["slo_ms"] == 200.0
    (case_figures,) = document["cases"]
    assert case_figures["frames"] == 30 and case_figures["cameras"] == list(CAMERAS)
    for name in ("onboard", "turbo", "oracle"):
        figures = case_figures["policies"][name]
        for key in ("map", "map_per_camera", "gain_over_onboard_points", "fraction_of_oracle_gain", "cloud_share",
                    "deadline_miss_rate", "mean_uplink_mbps", "mean_solve_us", "requests_sent"):
            assert key in figures, (name, key)
        assert set(figures["map_per_camera"]) == set(CAMERAS)


def test_metrics_publish_cloud_detections_only_when_on_time():
    case = make_case(constant_opportunities(6.0), frames=20)
    run = simulate_policy(make_policy("turbo", case.schedule), case.scenario, case.schedule)
    summaries = summarise_policies({"turbo": run}, case.scenario, case.detections, case.ground_truths, mean_score_map)
    served = run.served_config()
    utilities = {option.name: option.utility for option in OPTIONS}
    expected = np.mean([utilities[FALLBACK.name] if k == -1 else utilities[case.scenario.config_names[k]]
                        for k in served.ravel()])
    assert summaries["turbo"]["map"] == pytest.approx(expected)
    assert summaries["turbo"]["cloud_share"] == pytest.approx(np.count_nonzero(served != -1) / served.size)


def test_case_result_keeps_the_runs_for_plots():
    case = make_case(constant_opportunities(6.0), frames=10)
    result = run_case(case, ("turbo",), map_function=mean_score_map)
    assert isinstance(result, CaseResult) and result.runs["turbo"].planned_config.shape == (10, len(CAMERAS))
