"""`avcloud dataset` and `avcloud trace` commands: output contract and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avcloud.cli import main
from datasets.tfrecord import TFRecordReader


def test_commands_run_through_the_real_entry_point():
    repo_root = Path(__file__).resolve().parents[1]
    bundled = repo_root / "datasets" / "data" / "synthetic-lte-uplink.up"
    result = subprocess.run([sys.executable, "-m", "avcloud", "trace", "info", str(bundled), "--json"],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "synthetic-lte-uplink.up"
    result = subprocess.run([sys.executable, "-m", "avcloud", "dataset", "inspect", str(bundled)],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "synthetic-lte-uplink.up: record 0" in result.stderr


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "two_cameras.tfrecord"
    assert main(["dataset", "synth", "--out", str(path), "--seed", "7", "--frames", "3",
                 "--cameras", "FRONT,side_left", "--no-progress", "--workers", "1"]) == 0
    return path


def _inspect(capsys, *args):
    code = main(["dataset", "inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_json_contract(scene_path, capsys):
    code, out, _ = _inspect(capsys, scene_path, "--json")
    assert code == 0
    document = json.loads(out)
    assert document["format"] == "waymo-v1"
    assert document["frames"] == 3
    assert document["cameras"] == ["FRONT", "SIDE_LEFT"]
    assert len(document["frames_detail"]) == 3
    first = document["frames_detail"][0]
    assert isinstance(first["timestamp_micros"], int)
    front = first["cameras"]["FRONT"]
    assert (front["width"], front["height"]) == (1920, 1280)
    assert front["jpeg_bytes"] > 10_000
    assert set(front["labels"]) <= {"VEHICLE", "PEDESTRIAN", "SIGN", "CYCLIST"} and front["labels"]["VEHICLE"] > 0
    assert first["cameras"]["SIDE_LEFT"]["height"] == 886


def test_inspect_summary_and_table(scene_path, capsys):
    code, out, _ = _inspect(capsys, scene_path, "--json", "--summary")
    assert code == 0
    assert json.loads(out) == {"format": "waymo-v1", "frames": 3, "cameras": ["FRONT", "SIDE_LEFT"]}
    code, out, _ = _inspect(capsys, scene_path)
    assert code == 0 and "SIDE_LEFT" in out and "1920x886" in out


def test_inspect_v2_directory(scene_path, tmp_path, capsys):
    out_dir = tmp_path / "v2"
    assert main(["dataset", "to-v2", str(scene_path), "--out", str(out_dir)]) == 0
    capsys.readouterr()
    code, out, _ = _inspect(capsys, out_dir, "--json")
    v2 = json.loads(out)
    _, out, _ = _inspect(capsys, scene_path, "--json")
    v1 = json.loads(out)
    assert v2["format"] == "waymo-v2"
    assert {k: v for k, v in v2.items() if k != "format"} == {k: v for k, v in v1.items() if k != "format"}


@pytest.fixture
def damaged(scene_path, tmp_path):
    def make(kind):
        data = bytearray(scene_path.read_bytes())
        offsets = TFRecordReader(scene_path).index
        path = tmp_path / f"{kind}.tfrecord"
        if kind == "data":
            data[offsets[1] + 12 + 1000] ^= 0xFF
        elif kind == "length":
            data[offsets[2] + 3] ^= 0x01
        elif kind == "truncated":
            data = data[: offsets[2] + 5000]
        elif kind == "not_a_frame":
            from datasets.tfrecord import encode_record

            data = data[: offsets[1]] + encode_record(b"\xff\xff\xff garbage") + data[offsets[1]:]
        path.write_bytes(bytes(data))
        return path
    return make


@pytest.mark.parametrize(
    ("kind", "record", "reason"),
    [("data", 1, "bad data CRC"), ("length", 2, "bad length CRC"), ("truncated", 2, "truncated"),
     ("not_a_frame", 1, "not a Frame")],
)
def test_damaged_files_fail_with_one_line(damaged, capsys, kind, record, reason):
    path = damaged(kind)
    code, out, err = _inspect(capsys, path, "--json")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(path) in lines[0] and f"record {record}" in lines[0] and reason in lines[0]


def test_skip_corrupt_reads_on_and_reports(damaged, capsys):
    code, out, err = _inspect(capsys, damaged("data"), "--json", "--skip-corrupt")
    assert code == 0
    document = json.loads(out)
    assert document["frames"] == 2 and document["skipped_records"] == 1
    assert "skipped 1 corrupt record" in err
    code, out, _ = _inspect(capsys, damaged("not_a_frame"), "--json", "--skip-corrupt")
    assert code == 0 and json.loads(out)["frames"] == 3 and json.loads(out)["skipped_records"] == 1


def test_inspect_missing_path(tmp_path, capsys):
    code, _, err = _inspect(capsys, tmp_path / "nope.tfrecord")
    assert code == 2 and "nope.tfrecord: no such file" in err


def test_synth_rejects_unknown_camera(tmp_path, capsys):
    assert main(["dataset", "synth", "--out", str(tmp_path / "x.tfrecord"), "--cameras", "FRONT,REAR"]) == 2
    assert "REAR" in capsys.readouterr().err


def test_trace_info_json_and_errors(tmp_path, capsys):
    path = tmp_path / "t.up"
    path.write_text("1\n2\n")
    assert main(["trace", "info", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == "t.up" and stats["duration_s"] == 0.002 and stats["mean_mbps"] == pytest.approx(12.0)
    bad = tmp_path / "bad.up"
    bad.write_text("1\nx\n")
    assert main(["trace", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2" in err and len(err.strip().splitlines()) == 1


def test_trace_synth_and_convert(tmp_path, capsys):
    lte = tmp_path / "lte.up"
    assert main(["trace", "synth", "--out", str(lte), "--seed", "2", "--duration-s", "30", "--mbps", "8"]) == 0
    two_column = tmp_path / "lte.txt"
    assert main(["trace", "convert", str(lte), "--out", str(two_column), "--two-column"]) == 0
    capsys.readouterr()
    assert main(["trace", "info", str(two_column), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["duration_s"] == 30.0 and stats["mean_mbps"] == pytest.approx(8.0, rel=0.15)
    step = tmp_path / "step.up"
    assert main(["trace", "synth", "--out", str(step), "--kind", "step", "--levels-mbps", "0,6", "--step-s", "5"]) == 0
    capsys.readouterr()
    assert main(["trace", "info", str(step), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seconds_at_zero"] == 5
