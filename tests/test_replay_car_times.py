"""Declared car-side times: the replay's table does not move with the load of the machine that
made the profile (the car's encode and on-car fallback times, as the cloud's runtimes)."""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import FamilyCache, constant_opportunities

from avcloud.errors import DataError, UserError
from avcloud.link import DeliverySchedule
from avcloud.replay.car_times import REFERENCE_TABLE, check_car_choice, read_car_table, resolve_car
from avcloud.replay.inputs import ProfiledScene, UplinkTrace
from avcloud.replay.inputs import make_case as make_replay_case
from avcloud.types import Option, Service

FALLBACK = "avd-onboard-imgcompNone-inpcompNone"
MEASURED_ENCODE = {"avd-cloud-l-imgcomp90-inpcompNone": 9.0, "other-imgcompNone-inpcomp50": 3.0}


def test_the_reference_car_declares_the_family_and_keeps_the_measured_time_of_other_configurations():
    encode, runtime = read_car_table(REFERENCE_TABLE)
    car = resolve_car("reference", MEASURED_ENCODE, FALLBACK, 7.5)
    assert car.encode_ms == {"avd-cloud-l-imgcomp90-inpcompNone": encode["avd-cloud-l-imgcomp90-inpcompNone"],
                             "other-imgcompNone-inpcomp50": 3.0}
    assert car.fallback_runtime_ms == runtime[FALLBACK] != 7.5
    assert car.source == {"avd-cloud-l-imgcomp90-inpcompNone": "declared", "other-imgcompNone-inpcomp50": "measured",
                          FALLBACK: "declared"}


def test_measured_keeps_the_profiles_times():
    car = resolve_car("measured", MEASURED_ENCODE, FALLBACK, 7.5)
    assert car.encode_ms == MEASURED_ENCODE and car.fallback_runtime_ms == 7.5
    assert set(car.source.values()) == {"measured"}


def test_a_users_table_must_cover_every_configuration(tmp_path):
    table = tmp_path / "car.csv"
    table.write_text("Model,Encode [ms],Runtime [ms]\navd-cloud-l-imgcomp90-inpcompNone,2.0,\n"
                     "other-imgcompNone-inpcomp50,1.0,\n" + f"{FALLBACK},0,3.25\n")
    car = resolve_car(str(table), MEASURED_ENCODE, FALLBACK, 7.5)
    assert car.encode_ms == {"avd-cloud-l-imgcomp90-inpcompNone": 2.0, "other-imgcompNone-inpcomp50": 1.0}
    assert car.fallback_runtime_ms == 3.25
    table.write_text("Model,Encode [ms],Runtime [ms]\navd-cloud-l-imgcomp90-inpcompNone,2.0,\n" + f"{FALLBACK},0,3\n")
    with pytest.raises(DataError, match="no time for configuration other-imgcompNone-inpcomp50"):
        resolve_car(str(table), MEASURED_ENCODE, FALLBACK, 7.5)
    table.write_text("Model,Encode [ms]\navd-cloud-l-imgcomp90-inpcompNone,fast\n")
    with pytest.raises(DataError, match="line 2: column 'Encode \\[ms\\]': not a number"):
        read_car_table(table)


def test_a_bad_car_choice_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="choose 'reference', 'measured' or a CSV"):
        check_car_choice("fast")
    with pytest.raises(UserError, match="no such file"):
        check_car_choice(str(tmp_path / "missing.csv"))


def test_the_default_replay_is_the_same_whatever_load_the_profile_was_timed_under():
    """A profile timed on a busy machine (car-side times 1.3x) replays exactly as one timed on a
    quiet one; with `measured`, it does not."""
    names = ["avd-cloud-s-imgcompNone-inpcomp50", "avd-cloud-m-imgcompNone-inpcomp95", "avd-cloud-l-imgcomp90-inpcompNone"]
    trace = UplinkTrace("t", "t", DeliverySchedule(constant_opportunities(6.0)))
    scenarios = {}
    for load_factor in (1.0, 1.3):
        fallback = Option(FALLBACK, 0.0, 4.0 * load_factor, 0.1)
        options = (fallback, *(Option(name, 0.5, 20.0, 0.3) for name in names))
        scene = ProfiledScene("fake", "fake", np.array([0, 1]), 10.0, (Service("FRONT", options),),
                              FamilyCache([fallback.name, *names]), {"FRONT": []},
                              {name: 2.0 * load_factor for name in names}, "profile", "note")
        for car in ("reference", "measured"):
            scenarios[car, load_factor] = make_replay_case(scene, trace, 50.0, 200.0, car=car).scenario
    quiet, busy = scenarios["reference", 1.0], scenarios["reference", 1.3]
    encode, runtime = read_car_table(REFERENCE_TABLE)
    assert list(quiet.encode_ms) == [encode[name] for name in quiet.config_names]
    assert quiet.fallback_runtime_ms == runtime[FALLBACK]
    assert (quiet.encode_ms == busy.encode_ms).all() and quiet.fallback_runtime_ms == busy.fallback_runtime_ms
    assert quiet.services == busy.services
    measured_quiet, measured_busy = scenarios["measured", 1.0], scenarios["measured", 1.3]
    assert list(measured_quiet.encode_ms) == [2.0] * 3 and measured_busy.fallback_runtime_ms == pytest.approx(5.2)


def test_a_profile_without_encode_times_reads_as_none_measured(tmp_path):
    """The profile's `Encode [ms]` column is optional (a TURBO-style table has none)."""
    table = tmp_path / "profile.csv"
    table.write_text(f"Model,Runtime [ms]\n{FALLBACK},4.0\n{FALLBACK},6.0\navd-cloud-l-imgcomp90-inpcompNone,90\n")
    assert read_car_table(table) == ({}, {FALLBACK: 5.0, "avd-cloud-l-imgcomp90-inpcompNone": 90.0})
