"""Declared cloud runtimes: what the replayed cloud takes does not depend on the replaying machine."""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import FamilyCache, constant_opportunities

from avcloud.errors import DataError
from avcloud.link import DeliverySchedule
from avcloud.replay.cloud_runtimes import REFERENCE_TABLE, read_runtime_table, resolve_cloud, with_runtimes
from avcloud.replay.inputs import ProfiledScene, UplinkTrace
from avcloud.replay.inputs import make_case as make_replay_case
from avcloud.types import Option, Service

MEASURED = {"avd-cloud-l-imgcomp90-inpcompNone": 110.0, "avd-cloud-s-imgcompNone-inpcomp50": 14.0,
            "other-imgcompNone-inpcomp50": 7.0}


def test_a_table_row_names_a_configuration_or_a_whole_model(tmp_path):
    table = tmp_path / "gpu.csv"
    table.write_text("Model,Runtime [ms]\navd-cloud-l,9.5\navd-cloud-l-imgcomp90-inpcompNone,12.0\n"
                     "avd-cloud-s,2.0\nother,1.0\n")
    cloud = resolve_cloud(str(table), MEASURED)
    assert cloud.runtime_ms == {"avd-cloud-l-imgcomp90-inpcompNone": 12.0, "avd-cloud-s-imgcompNone-inpcomp50": 2.0,
                                "other-imgcompNone-inpcomp50": 1.0}
    assert set(cloud.source.values()) == {"declared"}


def test_a_table_missing_a_configuration_is_one_clear_error(tmp_path):
    table = tmp_path / "gpu.csv"
    table.write_text("Model,Runtime [ms]\navd-cloud-l,9.5\n")
    with pytest.raises(DataError, match="no runtime for configuration avd-cloud-s-imgcompNone-inpcomp50"):
        resolve_cloud(str(table), MEASURED)


def test_scale_factors_apply_to_the_measured_runtimes():
    assert resolve_cloud("scale:0.5", MEASURED).runtime_ms["avd-cloud-l-imgcomp90-inpcompNone"] == 55.0
    per_model = resolve_cloud("scale:avd-cloud-l=0.1", MEASURED).runtime_ms
    assert per_model["avd-cloud-l-imgcomp90-inpcompNone"] == pytest.approx(11.0)
    assert per_model["avd-cloud-s-imgcompNone-inpcomp50"] == 14.0


def test_the_reference_cloud_covers_the_family_and_falls_back_to_measured_for_other_models():
    declared = read_runtime_table(REFERENCE_TABLE)
    cloud = resolve_cloud("reference", MEASURED)
    assert cloud.runtime_ms["avd-cloud-l-imgcomp90-inpcompNone"] == declared["avd-cloud-l-imgcomp90-inpcompNone"]
    assert cloud.source["other-imgcompNone-inpcomp50"] == "measured"
    assert cloud.runtime_ms["other-imgcompNone-inpcomp50"] == 7.0


def test_the_default_replay_is_the_same_whatever_load_the_profile_was_timed_under():
    """A profile timed on a busy machine (every runtime 5x) replays exactly as one timed on a quiet one."""
    names = ["avd-cloud-s-imgcompNone-inpcomp50", "avd-cloud-m-imgcompNone-inpcomp95", "avd-cloud-l-imgcomp90-inpcompNone"]
    fallback = Option("avd-onboard-imgcompNone-inpcompNone", 0.0, 2.0, 0.1)
    trace = UplinkTrace("t", "t", DeliverySchedule(constant_opportunities(6.0)))
    scenarios = []
    for load_factor in (1.0, 5.0):
        options = (fallback, *(Option(name, 0.5, 20.0 * load_factor, 0.3) for name in names))
        scene = ProfiledScene("fake", "fake", np.array([0, 1]), 10.0, (Service("FRONT", options),),
                              FamilyCache([fallback.name, *names]), {"FRONT": []}, {}, "profile", "note")
        scenarios.append(make_replay_case(scene, trace, 50.0, 200.0).scenario)
    quiet, busy = scenarios
    declared = read_runtime_table(REFERENCE_TABLE)
    assert list(quiet.runtime_ms) == [declared[name] for name in quiet.config_names]
    assert (quiet.runtime_ms == busy.runtime_ms).all() and quiet.services == busy.services


def test_with_runtimes_leaves_the_fallback_alone():
    service = Service("FRONT", (Option("car", 0.0, 3.0, 0.2), Option("m-imgcompNone-inpcomp50", 0.3, 40.0, 0.5)))
    cloud = resolve_cloud("scale:0.5", {"m-imgcompNone-inpcomp50": 40.0})
    (replaced,) = with_runtimes((service,), cloud)
    assert [option.runtime_ms for option in replaced.options] == [3.0, 20.0]
