"""`avcloud fleet`: bad input is one line and exit code 2, before any scene is rendered or profiled."""

from __future__ import annotations

import pytest

from avcloud.cli import main
from avcloud.errors import UserError
from avcloud.fleet.coordinator import cell_allocator_available


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))  # nothing may be rendered or profiled


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["fleet", "--no-progress", "--executor", "local", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def short_trace(tmp_path):
    path = tmp_path / "five-seconds.up"
    path.write_text("\n".join(str(ms) for ms in range(1, 5001)) + "\n")
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--vehicles", "0"], "--vehicles must be at least 1 (got 0)"),
    (["--vehicles", "2", "-3"], "--vehicles must be at least 1 (got -3)"),
    (["--vehicles", "two"], "--vehicles: 'two' is not a whole number"),
    (["--vehicles", "1", "--workers", "11"],
     "--workers 11 is more than the 10 requests 1 vehicle(s) can have in flight at once (2 per camera)"),
    (["--vehicles", "1", "4", "--workers", "11"], "--workers 11 is more than the 10 requests 1 vehicle(s)"),
    (["--vehicles", "1", "--workers", "6", "--policy", "equal"],
     "--workers 6 is more than the 5 requests 1 vehicle(s) can have in flight at once (1 per camera)"),
    (["--workers", "0"], "--workers must be at least 1 or 'unlimited' (got 0)"),
    (["--workers", "lots"], "--workers: 'lots' is neither a whole number nor 'unlimited'"),
    (["--scheduler", "fifo"], "unknown --scheduler 'fifo' (choose from pf, equal, per-vehicle)"),
    (["--phase", "random"], "unknown --phase 'random'"),
    (["--executor", "threads"], "unknown --executor 'threads'"),
    (["--processes", "0"], "--processes must be at least 1 (got 0)"),
    (["--processes", "many"], "--processes: 'many' is not a whole number"),
    (["--policy", "turbo,warp-drive"], "unknown policy 'warp-drive'"),
    (["--policy", "oracle"], "use it with --scheduler per-vehicle"),
    (["--rtt-ms", "250"], "--rtt-ms 250 must be below --slo-ms 200"),
    (["--frames", "1"], "--frames must be at least 2"),
    (["--cloud", "fast"], "choose 'reference', 'measured'"),
    (["--car", "fast"], "--car 'fast': choose 'reference', 'measured'"),
    (["--pf-window-ms", "0"], "--pf-window-ms must be a finite number > 0"),
    (["--cell-fairness", "fair"], "--cell-fairness: 'fair' is not 'none', 'max-min' or a number"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_a_cell_trace_shorter_than_the_scene_is_refused(capsys, short_trace):
    code, err = run_cli(capsys, "--trace", short_trace)
    assert code == 2
    assert err.count("\n") == 1 and "five-seconds.up: 5 s long, shorter than the fleet's" in err, err


def test_a_per_vehicle_trace_shorter_than_the_scene_is_refused_too(capsys, short_trace, tmp_path):
    long_trace = tmp_path / "long.up"
    long_trace.write_text("\n".join(str(ms) for ms in range(1, 60_001)) + "\n")
    code, err = run_cli(capsys, "--scheduler", "per-vehicle", "--trace", str(long_trace), short_trace)
    assert code == 2 and err.count("\n") == 1 and "five-seconds.up" in err


def test_missing_files_are_named(capsys, tmp_path):
    code, err = run_cli(capsys, "--trace", str(tmp_path / "absent.up"))
    assert code == 2 and err.count("\n") == 1 and "absent.up: no such file" in err
    code, err = run_cli(capsys, "--scene", str(tmp_path / "nowhere.tfrecord"))
    assert code == 2 and err.count("\n") == 1 and "nowhere.tfrecord: no such file" in err


@pytest.mark.skipif(cell_allocator_available(), reason="optimizer/cell.py is there: the cell policy runs")
def test_the_cell_policy_needs_the_cell_allocator(capsys):
    code, err = run_cli(capsys, "--policy", "cell")
    assert code == 2 and err.count("\n") == 1 and "optimizer/cell.py" in err


@pytest.mark.skipif(not cell_allocator_available(), reason="optimizer/cell.py (the cell-level allocator) is absent")
@pytest.mark.parametrize("args, message", [
    (["--policy", "cell", "--scheduler", "per-vehicle"], "coordinates the vehicles of one shared cell"),
    (["--policy", "cell", "--cell-capacity-fraction", "1.5"], "--cell-capacity-fraction must be in (0, 1]"),
    (["--policy", "cell", "--cell-gpu-fraction", "0.8", "--workers", "unlimited"], "give --workers a number"),
])
def test_bad_cell_policy_settings(capsys, args, message):
    code, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--cell-capacity-fraction", "0"], "--cell-capacity-fraction must be in (0, 1]"),
    (["--cell-gpu-fraction", "-1"], "--cell-gpu-fraction must be in [0, 1]"),
])
def test_cell_settings_out_of_range_are_refused_without_the_cell_policy(capsys, args, message):
    code, err = run_cli(capsys, *args)  # the default policies: turbo and turbo-q
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_fleet_larger_than_the_machine_can_hold_is_refused_before_it_is_built(capsys):
    code, err = run_cli(capsys, "--vehicles", "4", "100000000")
    assert code == 2
    assert err.count("\n") == 1 and "--vehicles 100000000: a fleet this size needs about" in err, err


def test_the_memory_estimate_scales_with_the_fleet_and_the_scene():
    from avcloud.fleet.job import check_fleet_memory

    twenty_seconds_ms, cameras = 20_000.0, 5
    check_fleet_memory(1000, twenty_seconds_ms, cameras, memory_bytes=int(1e9))  # about 0.39 GB: fits
    with pytest.raises(UserError, match="--vehicles 3000: a fleet this size needs about 1.2 GB"):
        check_fleet_memory(3000, twenty_seconds_ms, cameras, memory_bytes=int(1e9))
    check_fleet_memory(3000, twenty_seconds_ms / 4, cameras, memory_bytes=int(1e9))  # a shorter scene fits
