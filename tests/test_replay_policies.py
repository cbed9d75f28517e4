"""Every named policy, run as the shipped agent by the replay, on a small fake profile and cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from replay_fakes import CAMERAS, FALLBACK, FRAMES, OPTIONS, constant_opportunities, make_case, mean_score_map

from avcloud.errors import UserError
from avcloud.replay.job import (
    CaseResult,
    ReplayOptions,
    best_oracle_run,
    check_options,
    results_document,
    run_case,
)
from avcloud.replay.metrics import plan_success_calibration, summarise_policies
from avcloud.replay.simulator import RequestOutcome, simulate_policy
from optimizer.policies import POLICY_NAMES, check_policy_names, get_policy


def run(name: str, case, **kwargs):
    return simulate_policy(get_policy(name), case.scenario, case.schedule, case.detections_at, **kwargs)


def test_every_policy_runs_and_onboard_sends_nothing():
    case = make_case(constant_opportunities(6.0))
    result = run_case(case, POLICY_NAMES, map_function=mean_score_map)
    assert set(result.summaries) == set(POLICY_NAMES)
    onboard = result.summaries["onboard"]
    assert onboard["requests_sent"] == 0 and onboard["mean_uplink_mbps"] == 0
    assert onboard["map"] == pytest.approx(0.30)
    assert onboard["gain_over_onboard_points"] == pytest.approx(0.0)
    assert result.summaries["oracle"]["fraction_of_oracle_gain"] == pytest.approx(1.0)


def test_every_frame_of_every_camera_is_published_exactly_once_under_every_policy():
    case = make_case(constant_opportunities(3.0), frames=40)
    for name in POLICY_NAMES:
        result = run(name, case)
        assert result.counters["published"] == 40 * len(CAMERAS), name
        assert all(cell is not None for row in result.published for cell in row), name


def test_naive_sends_the_most_accurate_configuration_and_misses_on_a_thin_uplink():
    case = make_case(constant_opportunities(2.0))
    result = run("naive", case)
    planned = {case.scenario.config_names[k] for k in np.unique(result.planned_config)}
    assert planned == {"l-imgcomp90-inpcompNone"}
    sent = np.isin(result.outcome, [RequestOutcome.ON_TIME, RequestOutcome.LATE])
    assert np.count_nonzero(result.outcome == RequestOutcome.LATE) / np.count_nonzero(sent) > 0.9


def test_turbo_learns_a_constant_uplink_from_its_own_transfers():
    case = make_case(constant_opportunities(6.0))
    result = run("turbo", case)
    assert result.estimate_mbps[0] == pytest.approx(1.0)  # the policy's start value before any sample
    assert result.samples and np.median([s.throughput_mbps for s in result.samples]) == pytest.approx(6.0, rel=0.1)
    assert np.nanmedian(result.estimate_mbps[20:]) == pytest.approx(6.0, rel=0.1)
    sent = np.isin(result.outcome, [RequestOutcome.ON_TIME, RequestOutcome.LATE])
    assert np.count_nonzero(result.outcome == RequestOutcome.LATE) <= 0.05 * np.count_nonzero(sent)


def test_the_agent_measures_the_rtt_with_pings():
    case = make_case(constant_opportunities(6.0), frames=30, rtt_ms=50.0)
    result = run("turbo", case)
    # Pings share the uplink with requests, so a sample can only be later than the true RTT.
    assert np.nanmin(result.rtt_estimate_ms[5:]) >= 50.0
    assert np.nanmedian(result.rtt_estimate_ms[5:]) == pytest.approx(50.0, abs=2.0)


def test_bandwidth_aware_policies_beat_onboard_and_naive_on_a_steady_uplink():
    case = make_case(constant_opportunities(6.0))
    summaries = run_case(case, POLICY_NAMES, map_function=mean_score_map).summaries
    maps = {name: summary["map"] for name, summary in summaries.items()}
    # No order between oracle and turbo here: on a steady link the oracle's best fraction of the
    # capacity (of six) can fall just short of what turbo's measured estimate plans at.
    assert maps["oracle"] > maps["onboard"]
    assert maps["turbo"] > maps["onboard"]
    assert maps["turbo"] > maps["naive"]
    assert maps["turbo"] >= maps["equal"]


def test_estimating_policy_does_not_see_an_outage_coming():
    # 6 Mbps for 5 s, then nothing for 5 s (the trace loops every 10 s).
    steady = constant_opportunities(6.0, 5.0)
    case = make_case(np.concatenate([steady, [10000]]))
    turbo = run("turbo", case)
    oracle = run("oracle", case)
    outage = slice(51, 99)
    late = RequestOutcome.LATE
    assert np.count_nonzero(turbo.outcome[outage] == late) > 0
    # The oracle knows the outage and plans (almost) nothing into it.
    assert np.count_nonzero(oracle.outcome[outage] == late) < np.count_nonzero(turbo.outcome[outage] == late)


def test_a_lagged_oracle_plans_from_the_last_interval_and_so_meets_an_outage_one_frame_late():
    steady = constant_opportunities(6.0, 5.0)  # 6 Mbps for 5 s, then nothing until the trace loops
    case = make_case(np.concatenate([steady, [10000]]))
    interval_ms = case.scenario.frame_interval_ms
    first_dark = int(5000.0 // interval_ms)
    ahead = run("oracle", case, oracle_capacity_fraction=1.0)
    lagged = simulate_policy(get_policy("oracle", {"oracle_lag_ms": interval_ms}), case.scenario, case.schedule,
                             case.detections_at, oracle_capacity_fraction=1.0)
    assert ahead.budget_mbps[first_dark] < 0.5  # at most the steady stretch's last packet
    assert lagged.budget_mbps[first_dark] == pytest.approx(6.0, rel=0.05)  # the last interval carried 6 Mbps
    assert lagged.budget_mbps[first_dark + 1] < 0.5
    assert lagged.budget_mbps[first_dark - 1] == pytest.approx(ahead.budget_mbps[first_dark - 2])
    with pytest.raises(UserError, match="oracle_lag_ms"):
        get_policy("oracle", {"oracle_lag_ms": -1.0})


def test_turbo_q_given_the_true_past_forecasts_from_the_trace_not_from_its_own_samples():
    steady = constant_opportunities(6.0, 5.0)  # 6 Mbps for 5 s, then nothing until the trace loops
    case = make_case(np.concatenate([steady, [10000]]))
    interval_ms = case.scenario.frame_interval_ms
    first_dark = int(5000.0 // interval_ms)
    view = simulate_policy(get_policy("turbo-q", {"oracle_lag_ms": interval_ms, "forecast_from_trace": True}),
                           case.scenario, case.schedule, case.detections_at)
    measured = run("turbo-q", case)
    # From the first plan it knows the link (the car's own view starts at its 1 Mbps seed).
    assert view.estimate_mbps[0] == pytest.approx(6.0, rel=0.05) and measured.estimate_mbps[0] == pytest.approx(1.0)
    # The last interval before the dark one carried 6 Mbps; the next plan has seen a dark interval.
    assert view.estimate_mbps[first_dark] == pytest.approx(6.0, rel=0.05)
    assert view.estimate_mbps[first_dark + 1] < 2.0 < measured.estimate_mbps[first_dark + 1]
    with pytest.raises(UserError, match="quantile planner"):
        get_policy("turbo", {"forecast_from_trace": True})


def test_a_car_cannot_run_a_forecast_from_the_trace():
    from onboard.measurement import build_measurement

    with pytest.raises(UserError, match="only in a replay"):
        build_measurement(get_policy("turbo-q", {"forecast_from_trace": True}), initial_rtt_ms=50.0)


def test_the_oracle_judges_its_requests_by_the_capacity_it_plans_from_not_by_a_measurement():
    # Dark for 3 s, then 30 Mbps: an oracle judged by a measured estimate (still its 1 Mbps seed,
    # as it sent nothing in the dark) drops requests its plan sent before it measures again.
    case = make_case(constant_opportunities(30.0) + 3000)
    result = run("oracle", case, oracle_capacity_fraction=0.8)
    first_lit = int(3000 // case.scenario.frame_interval_ms)
    assert result.estimate_mbps[first_lit - 1] == 0.0  # the outage is the truth, not a missing sample
    assert result.estimate_mbps[first_lit + 1] == pytest.approx(30.0, rel=0.02)
    assert result.counters["requests_sent"] > 0 and result.counters["dropped_stale"] == 0


def test_oracle_keeps_the_capacity_fraction_that_served_the_most_utility():
    case = make_case(constant_opportunities(6.0), frames=60)
    utilities = {option.name: option.utility for option in OPTIONS}

    def served_utility(result):
        return sum(utilities[FALLBACK.name] if k == -1 else utilities[case.scenario.config_names[k]]
                   for k in result.served_config().ravel())

    best = best_oracle_run(case)
    singles = [run("oracle", case, oracle_capacity_fraction=fraction)
               for fraction in get_policy("oracle").oracle_capacity_fractions]
    assert served_utility(best) == pytest.approx(max(served_utility(result) for result in singles))
    assert np.nanmax(best.budget_mbps) <= 6.0 + 1e-9 and best.policy == "oracle"
    assert best.policy_spec["chosen_capacity_fraction"] in get_policy("oracle").oracle_capacity_fractions


def test_a_policy_whose_plan_sends_nothing_rediscovers_the_link_with_one_cheap_request_a_second():
    # 0.5 Mbps: below every cloud option's critical bandwidth, so the allocation alone never sends.
    case = make_case(constant_opportunities(0.5))
    result = run("turbo", case)
    discoveries = np.argwhere(result.planned_config != -1)
    assert 0 < len(discoveries) <= FRAMES // 10 + 1  # at least one, at most about one per second
    assert {case.scenario.config_names[result.planned_config[tuple(p)]] for p in discoveries} == {
        "s-imgcompNone-inpcomp50"}


def test_a_discovery_request_added_to_an_empty_plan_is_not_scored_as_the_plan():
    # turbo-q's plan sends nothing on 0.5 Mbps (a chance of 1 of arriving whole); the request the
    # agent adds to rediscover the link is not that plan, and the success model is not scored on it.
    case = make_case(constant_opportunities(0.5))
    result = run("turbo-q", case)
    discovery_frames = np.unique(np.argwhere(result.planned_config != -1)[:, 0])
    assert len(discovery_frames) > 0
    assert np.isnan(result.planned_success_probability[discovery_frames]).all()
    assert plan_success_calibration(result) is None


def test_policies_that_ignore_the_uplink_never_rediscover():
    case = make_case(constant_opportunities(0.5), frames=40)
    assert run("onboard", case).counters["requests_sent"] == 0


def test_policy_names_are_checked():
    assert check_policy_names(["oracle", "turbo", "turbo"]) == ("turbo", "oracle")
    with pytest.raises(UserError, match="unknown policy 'fast'"):
        check_policy_names(["fast"])
    with pytest.raises(UserError, match="must be below"):
        check_options(ReplayOptions(rtt_ms=300.0, slo_ms=200.0))


def test_results_document_records_every_figure_and_the_full_spec_of_every_policy():
    case = make_case(constant_opportunities(6.0), frames=30)
    result = run_case(case, ("onboard", "turbo", "oracle"), map_function=mean_score_map)
    document = json.loads(json.dumps(results_document([result], ReplayOptions(policies=("onboard", "turbo", "oracle")))))
    assert document["schema"] == 1 and document["mode"] == "simulated"
    assert document["settings"]["rtt_ms"] == 50.0 and document["settings"]["slo_ms"] == 200.0
    (case_figures,) = document["cases"]
    assert case_figures["frames"] == 30 and case_figures["cameras"] == list(CAMERAS)
    assert case_figures["policy_specs"]["turbo"] == get_policy("turbo").to_json_dict()
    for name in ("onboard", "turbo", "oracle"):
        figures = case_figures["policies"][name]
        for key in ("map", "map_per_camera", "gain_over_onboard_points", "fraction_of_oracle_gain", "cloud_share",
                    "deadline_miss_rate", "mean_uplink_mbps", "mean_solve_us", "requests_sent", "agent_counters"):
            assert key in figures, (name, key)
        assert set(figures["map_per_camera"]) == set(CAMERAS)


def test_metrics_score_what_the_agent_published():
    case = make_case(constant_opportunities(6.0), frames=20)
    result = run("turbo", case)
    summaries = summarise_policies({"turbo": result}, case.scenario, case.detections, case.ground_truths,
                                   mean_score_map)
    published = [cell[0, 4] for row in result.published for cell in row]
    assert summaries["turbo"]["map"] == pytest.approx(np.mean(published))
    served = result.served_config()
    assert summaries["turbo"]["cloud_share"] == pytest.approx(np.count_nonzero(served != -1) / served.size)
    assert result.counters["published_cloud"] == np.count_nonzero(served != -1)


def test_case_result_keeps_the_runs_for_plots():
    case = make_case(constant_opportunities(6.0), frames=10)
    result = run_case(case, ("turbo",), map_function=mean_score_map)
    assert isinstance(result, CaseResult) and result.runs["turbo"].planned_config.shape == (10, len(CAMERAS))
