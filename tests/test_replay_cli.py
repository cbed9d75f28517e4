"""`avcloud replay`: bad input is one line and exit code 2, before any profiling starts."""

from __future__ import annotations

import pytest

from avcloud.cli import main


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["replay", "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def good_trace(tmp_path):
    path = tmp_path / "steady.up"
    path.write_text("\n".join(str(ms) for ms in range(1, 101)) + "\n")
    return path


def test_missing_scene(capsys, tmp_path, good_trace):
    code, err = run_cli(capsys, "--scene", str(tmp_path / "nowhere.tfrecord"), "--trace", str(good_trace))
    assert code == 2
    assert err.count("\n") == 1 and "nowhere.tfrecord" in err and "no such file" in err


def test_unreadable_trace(capsys, tmp_path):
    scene = tmp_path / "scene.tfrecord"
    scene.write_bytes(b"\0" * 64)
    trace = tmp_path / "broken.up"
    trace.write_text("12 apples and pears\n")
    code, err = run_cli(capsys, "--scene", str(scene), "--trace", str(trace))
    assert code == 2
    assert err.count("\n") == 1 and "broken.up" in err


def test_missing_trace(capsys, tmp_path):
    code, err = run_cli(capsys, "--trace", str(tmp_path / "absent.up"))
    assert code == 2 and err.count("\n") == 1 and "absent.up" in err


def test_unknown_policy(capsys):
    code, err = run_cli(capsys, "--policy", "turbo,warp-drive")
    assert code == 2
    assert err.count("\n") == 1 and "unknown policy 'warp-drive'" in err


@pytest.mark.parametrize("rtt_ms, slo_ms", [("200", "200"), ("250", "200")])
def test_rtt_not_below_slo(capsys, rtt_ms, slo_ms):
    code, err = run_cli(capsys, "--rtt-ms", rtt_ms, "--slo-ms", slo_ms)
    assert code == 2
    assert err.count("\n") == 1 and "--rtt-ms" in err and "--slo-ms" in err


def test_negative_rtt(capsys):
    code, err = run_cli(capsys, "--rtt-ms", "-5")
    assert code == 2 and "--rtt-ms" in err


def test_cloud_workers_must_be_positive(capsys):
    code, err = run_cli(capsys, "--cloud-workers", "0")
    assert code == 2 and err.count("\n") == 1 and "--cloud-workers" in err


@pytest.mark.parametrize("option, value, message", [
    ("--cloud", "fast", "choose 'reference', 'measured'"),
    ("--cloud", "scale:0", "a factor must be a finite number > 0"),
    ("--cloud", "scale:avd-cloud-l=x", "'x' is not a number"),
    ("--cloud", "nowhere.csv", "no such file"),
    ("--car", "fast", "--car 'fast': choose 'reference', 'measured' or a CSV"),
    ("--car", "nowhere.csv", "--car nowhere.csv: no such file"),
    ("--set", "max_in_flight_per_camera", "expected FIELD=VALUE"),
    ("--set", "no_such_field=1", "unknown field 'no_such_field'"),
    ("--set", "max_in_flight_per_camera=0", "max_in_flight_per_camera must be an integer in 1..8"),
    ("--set", "stream_rate_cap=[", "cannot read the value"),
])
def test_bad_cloud_runtime_model_or_policy_setting(capsys, option, value, message):
    code, err = run_cli(capsys, option, value)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_mcap_of_a_policy_not_replayed(capsys):
    code, err = run_cli(capsys, "--policy", "turbo", "--mcap", "oracle")
    assert code == 2 and err.count("\n") == 1 and "--mcap oracle: not among the replayed policies" in err
