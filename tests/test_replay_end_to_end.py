"""End to end: the replay on real traces (optional, ../shared) and on the real default profile (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avcloud.replay.inputs import open_trace
from avcloud.replay.job import ReplayOptions, run_case, run_replay
from optimizer.policies import POLICY_NAMES

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="../shared/traces not present")
@pytest.mark.parametrize("trace_name", ["Verizon-LTE-short.up", "TMobile-LTE-short.up"])
def test_bandwidth_aware_policies_gain_on_a_measured_lte_uplink(trace_name):
    from replay_fakes import make_case, mean_score_map

    trace = open_trace(SHARED_TRACES / trace_name)
    case = make_case(trace.schedule.opportunities_ms, frames=200)
    summaries = run_case(case, POLICY_NAMES, map_function=mean_score_map).summaries
    maps = {name: summary["map"] for name, summary in summaries.items()}
    assert maps["turbo"] > maps["onboard"]
    assert maps["turbo"] > maps["naive"]
    assert maps["oracle"] >= maps["turbo"]


@pytest.mark.slow
def test_default_demo_reproduces_the_papers_ranking():
    """The default scene and trace (profiling on first use; cached in $AVCLOUD_CACHE afterwards).

    The paper's ranking: on-car only and naive below equal, equal below TURBO, TURBO below oracle;
    turbo-q between equal and oracle too. turbo-q against turbo is not ranked on this one 20 s
    window, where the two are within a few requests of each other and their order has changed with
    the agent (README, Results); the policy sweep over 288 windows of measured traces compares them
    (benchmarks/bench_policies.py)."""
    (result,) = run_replay(ReplayOptions(progress=False))
    maps = {name: summary["map"] for name, summary in result.summaries.items()}
    assert maps["oracle"] >= max(maps["turbo-q"], maps["turbo"])
    assert min(maps["turbo-q"], maps["turbo"]) > maps["equal"] > maps["naive"]
    assert maps["turbo"] > maps["naive"]
    assert maps["turbo"] > maps["onboard"]
