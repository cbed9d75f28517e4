"""Every CLI's bad input ends in one line naming the file, field or flag, and exit code 2: never
a traceback, a hang or a half-written file (issue 12). Run in-process through avcloud.cli.main,
plus one real process per exit path."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from avcloud.cli import main

REPO = Path(__file__).resolve().parents[1]
BINARY = bytes(range(256)) * 4  # not UTF-8, with NUL bytes: what a wrong file passed as YAML looks like
INSTANCE = ('{"services":[{"name":"FRONT","options":[{"name":"fb","size_mbit":0,"runtime_ms":0,"utility":0.2},'
            '{"name":"a","size_mbit":1,"runtime_ms":10,"utility":0.5}]}],"budget_mbps":5,"rtt_ms":20,"slo_ms":100}\n')


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    paths = {
        "binary.yaml": BINARY, "empty.tfrecord": b"", "garbage.tfrecord": b"\x00garbage" * 10,
        "instances.jsonl": INSTANCE.encode(), "binary.jsonl": BINARY, "deep.yaml": b"[" * 5000 + b"]" * 5000,
        "list.yaml": b"- a\n- b\n", "bad.yaml": b"models: [\n", "junk.key": b"hello",
        "cloud.yaml": b"models:\n  - name: m\n    simulated_runtime_ms: 1\n",
    }
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in paths} | {"dir": tmp_path}


# (argv with {name} placeholders for the files above, fragment the one line must contain)
CASES = {
    "cloud binary config": (["cloud", "serve", "--config", "{binary.yaml}", "--insecure"],
                            "binary.yaml: not a UTF-8 text file"),
    "cloud missing config": (["cloud", "serve", "--config", "{dir}/missing.yaml"], "missing.yaml: cannot read"),
    "cloud invalid yaml": (["cloud", "serve", "--config", "{bad.yaml}", "--insecure"], "bad.yaml: line"),
    "cloud deeply nested yaml": (["cloud", "serve", "--config", "{deep.yaml}", "--insecure"], "deep.yaml"),
    "cloud yaml not a mapping": (["cloud", "serve", "--config", "{list.yaml}", "--insecure"], "expected a mapping"),
    "cloud nan parameter": (["cloud", "serve", "--config", "{cloud.yaml}", "--insecure", "-p",
                             "downlink_allowance_ms:=.nan"], "field 'downlink_allowance_ms'"),
    "cloud zero pixel limit": (["cloud", "serve", "--config", "{cloud.yaml}", "--insecure", "-p",
                                "max_image_pixels:=0"], "field 'max_image_pixels'"),
    "cloud unknown field": (["cloud", "serve", "--config", "{cloud.yaml}", "--insecure", "-p", "queue_limt:=3"],
                            "field 'queue_limt'"),
    "cloud ping key without server key": (["cloud", "ping", "--key", "{junk.key}"], "--key and --server-key"),
    "onboard binary params": (["onboard", "--params-file", "{binary.yaml}"], "binary.yaml: not a UTF-8 text file"),
    "onboard rtt over slo": (["onboard", "-p", "rtt_ms:=150", "-p", "slo_ms:=100", "-p", "security.insecure:=true"],
                             "rtt_ms 150 must be below slo_ms 100"),
    "onboard nan slo": (["onboard", "-p", "slo_ms:=.nan", "-p", "security.insecure:=true"], "field 'slo_ms'"),
    "solve output to a full disk": (["solve", "--instances", "{instances.jsonl}", "--out", "/dev/full"],
                                    "--out /dev/full: cannot write (No space left on device); 0 of 1"),
    "solve output in a missing directory": (["solve", "--instances", "{instances.jsonl}", "--out",
                                             "{dir}/no/such/dir/out.jsonl"], "out.jsonl: cannot write"),
    "solve binary instances": (["solve", "--instances", "{binary.jsonl}"], "binary.jsonl: cannot read"),
    "solve nan budget": (["solve", "--profile", "{instances.jsonl}", "--budget-mbps", "nan", "--rtt-ms", "20",
                          "--slo-ms", "100"], "--budget-mbps must be a finite number"),
    "record to a full disk (mcap)": (["record", "--out", "/dev/full", "--format", "mcap", "--duration-s", "1"],
                                     "/dev/full: cannot write (No space left on device) after 0 result(s)"),
    "record nan duration": (["record", "--out", "{dir}/r.jsonl", "--duration-s", "nan"],
                            "--duration-s must be a finite number > 0"),
    "record zero rows": (["record", "--out", "{dir}/r.mcap", "--rows", "0"],
                              "--rows must be at least 1"),
    "play nan rate": (["play", "{empty.tfrecord}", "--rate", "nan"], "--rate must be a finite number > 0"),
    "play infinite rate": (["play", "{empty.tfrecord}", "--rate", "inf"], "--rate must be a finite number > 0"),
    "play zero rate": (["play", "{empty.tfrecord}", "--rate", "0"], "--rate must be a finite number > 0"),
    "play negative delay": (["play", "{empty.tfrecord}", "--start-delay-s", "-1"], "--start-delay-s"),
    "play empty scene": (["play", "{empty.tfrecord}"], "empty.tfrecord: not a Waymo scene (too short"),
    "play missing scene": (["play", "{dir}/missing.tfrecord"], "missing.tfrecord"),
    "dataset inspect empty file": (["dataset", "inspect", "{empty.tfrecord}"],
                                   "empty.tfrecord: not a Waymo scene (too short for a TFRecord: 0 bytes)"),
    "dataset inspect garbage": (["dataset", "inspect", "{garbage.tfrecord}"], "garbage.tfrecord"),
    "dataset inspect missing": (["dataset", "inspect", "{dir}/missing.tfrecord"], "missing.tfrecord"),
    "keys bad name": (["keys", "generate", "../evil", "--dir", "{dir}"], "key name '../evil'"),
    "keys secret into the allow-list": (["keys", "generate", "car-1", "--dir", "{dir}/allow", "--allow-into",
                                         "{dir}/allow"], "must not hold secret keys"),
    "keys show junk": (["keys", "show", "{junk.key}"], "junk.key: not a CurveZMQ certificate"),
    "keys show binary": (["keys", "show", "{binary.yaml}"], "binary.yaml: not a CurveZMQ certificate"),
    # Outputs under a file (a folder that cannot be made): long work checks first, the rest fail
    # at the write with the path and the system's reason.
    "trace synth under a file": (["trace", "synth", "--out", "{junk.key}/x.up"], "junk.key/x.up: Not a directory"),
    "trace convert under a file": (["trace", "convert", str(REPO / "datasets/data/synthetic-lte-uplink.up"),
                                    "--out", "{junk.key}/y.up"], "junk.key/y.up: Not a directory"),
    "dataset synth under a file": (["dataset", "synth", "--out", "{junk.key}/s.tfrecord", "--frames", "2"],
                                   "--out {junk.key}/s.tfrecord: cannot write there"),
    "models train under a file": (["models", "train", "--out", "{junk.key}/m", "--steps", "1"],
                                  "--out {junk.key}/m: cannot write there"),
}


def expand(argv: list[str], files: dict[str, Path]) -> list[str]:
    out = []
    for part in argv:
        for name, path in files.items():
            part = part.replace("{" + name + "}", str(path))
        out.append(part)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, files, capsys):
    argv, fragment = CASES[case]
    code = main(expand(argv, files))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"avcloud {argv[0]}: error: "), captured.err
    assert expand([fragment], files)[0] in lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("argv, long_work", [
    (["replay", "--no-progress"], "avcloud.replay.job.run_replay"),
    (["fleet", "--no-progress", "--executor", "local", "--vehicles", "1"], "avcloud.fleet.job.run_fleet_job"),
])
def test_a_report_folder_that_cannot_be_made_is_refused_before_the_work(argv, long_work, files, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError(f"{long_work} ran before its report folder was checked")

    monkeypatch.setattr(long_work, no_work)
    code = main([*argv, "--out", str(files["junk.key"] / "report")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"--out {files['junk.key'] / 'report'}: cannot write there" in lines[0]


def test_record_to_a_full_disk_stops_with_one_line_saying_how_many(capsys):
    """JSONL to /dev/full: results arrive, the first write fails, one line says what the file holds."""
    from onboard.topics import DetectionResult, encode_detection_result

    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    publisher.linger = 0
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def publish() -> None:
        frame = 0
        while not stop.is_set():
            result = DetectionResult(frame, "FRONT", "onboard", 10.0, "avd-onboard", True, np.zeros((0, 6), np.float32))
            publisher.send_multipart(encode_detection_result("/perception/FRONT/detections", result))
            frame += 1
            time.sleep(0.01)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        code = main(["record", "--out", "/dev/full", "--connect", f"tcp://127.0.0.1:{port}", "--duration-s", "30"])
    finally:
        stop.set()
        thread.join(5)
        publisher.close()
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines == ["avcloud record: error: --out /dev/full: cannot write (No space left on device) after 0 "
                     "result(s); the file keeps those 0, readable"]


def test_exit_code_2_from_a_real_process(files):
    result = subprocess.run([sys.executable, "-m", "avcloud", "cloud", "serve", "--config", str(files["binary.yaml"])],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"avcloud cloud: error: {files['binary.yaml']}: not a UTF-8 text file (byte 128 is 0x80); expected YAML"]
