"""The commands as separate processes, as `avcloud replay --live` runs them: READY lines, clean
exits on SIGTERM, one-line errors for bad input, and (slow) the whole system with CurveZMQ
end to end through the link emulator."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # stderr (logs) goes to a file so that a chatty process can never block on a full pipe.
    log_path = Path(env["AVCLOUD_CACHE"]).parent / f"{args[0]}-{time.monotonic_ns()}.log"
    process = subprocess.Popen([sys.executable, "-m", "avcloud", *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=log_path.open("w"))
    process.log_path = log_path
    return process


def wait_ready(process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("READY"):
            return line
        if not line and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before READY: {process.log_path.read_text()[-2000:]}")
    raise AssertionError("no READY line")


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("did not exit on SIGTERM") from None


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "AVCLOUD_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def test_linkemu_process_ready_and_clean_exit(tmp_path, env):
    trace = tmp_path / "12mbps.up"
    trace.write_text("1\n")
    port = free_port()
    process = start(["linkemu", "--uplink", str(trace), "--delay-ms", "5", "--listen", f"tcp://127.0.0.1:{port}",
                     "--upstream", "tcp://127.0.0.1:1"], env)
    try:
        assert f"127.0.0.1:{port}" in wait_ready(process)
    finally:
        assert stop(process) == 0


def test_bad_input_is_a_one_line_error_exit_2(tmp_path, env):
    result = subprocess.run([sys.executable, "-m", "avcloud", "onboard", "-p", "slo_ms:=soon", "-p",
                             "security.insecure:=true"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "slo_ms" in result.stderr
    result = subprocess.run([sys.executable, "-m", "avcloud", "linkemu", "--uplink", str(tmp_path / "none.up")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "none.up" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_all_processes_with_curve_through_the_link_emulator(tmp_path, env):
    from avcloud.keys import generate_keypair
    from datasets.synthetic import write_synthetic_scene

    cameras = ["FRONT", "SIDE_LEFT"]
    frames = 30
    slo_ms = 400  # the real fallback model runs on a shared CPU here
    scene = write_synthetic_scene(tmp_path / "scene.tfrecord", frames=frames, cameras=cameras, progress=False,
                                  workers=1)
    generate_keypair("cloud", tmp_path / "server")
    car_public, car_secret = generate_keypair("car-0", tmp_path / "car-0", allowlist_dir=tmp_path / "cars")
    cloud_port, link_port, camera_port, output_port = (free_port() for _ in range(4))
    (tmp_path / "cloud.yaml").write_text(
        f"bind: tcp://127.0.0.1:{cloud_port}\nhttp_port: null\n"
        "models:\n  - name: avd-cloud-s\n    simulated_runtime_ms: 20\n"
        f"security:\n  server_secret_key: {tmp_path / 'server' / 'cloud.key_secret'}\n"
        f"  allowlist_dir: {tmp_path / 'cars'}\n")
    (tmp_path / "profile.csv").write_text(
        "Model,Network Transport Size [Mb],Runtime [ms],Utility\n"
        "avd-onboard,0,0,0.3\n"
        "avd-cloud-s-imgcompNone-inpcomp75,0.3,25,0.5\n")
    trace = tmp_path / "24mbps.up"
    trace.write_text("1\n1\n")
    params = [
        "-p", f"cameras:={json.dumps(cameras)}", "-p", f"profile_path:={tmp_path / 'profile.csv'}",
        "-p", f"slo_ms:={slo_ms}", "-p", "onboard_threads:=1", "-p", f"security.client_secret_key:={car_secret}",
        "-p", f"security.server_public_key:={tmp_path / 'server' / 'cloud.key'}",
        "-p", f"endpoints.cameras:=tcp://127.0.0.1:{camera_port}",
        "-p", f"endpoints.outputs:=tcp://127.0.0.1:{output_port}",
        "-p", f"endpoints.cloud:=tcp://127.0.0.1:{link_port}",
    ]
    out = tmp_path / "results.jsonl"
    processes = []
    try:
        processes.append(start(["cloud", "serve", "--config", str(tmp_path / "cloud.yaml")], env))
        wait_ready(processes[-1])
        processes.append(start(["linkemu", "--uplink", str(trace), "--delay-ms", "10",
                                "--listen", f"tcp://127.0.0.1:{link_port}",
                                "--upstream", f"tcp://127.0.0.1:{cloud_port}"], env))
        wait_ready(processes[-1])
        processes.append(start(["onboard", *params], env))
        wait_ready(processes[-1])
        recorder = start(["record", "--out", str(out), "--connect", f"tcp://127.0.0.1:{output_port}",
                          "--rows", str(frames * len(cameras)), "--duration-s", "60"], env)
        processes.append(recorder)
        wait_ready(recorder)
        player = start(["play", str(scene), "--rate", "10", "--bind", f"tcp://127.0.0.1:{camera_port}",
                        "--start-delay-s", "2"], env)
        processes.append(player)
        wait_ready(player)
        assert player.wait(60) == 0
        assert recorder.wait(30) == 0
    finally:
        codes = [stop(process) for process in reversed(processes)]
    assert codes == [0] * len(processes)
    from avcloud.commands.record import read_recording

    rows = read_recording(out)
    keys = [(row["frame_index"], row["camera"]) for row in rows]
    assert sorted(keys) == sorted((index, camera) for index in range(frames) for camera in cameras)
    assert sum(row["source"] == "cloud" for row in rows) >= len(rows) // 2
    assert all(row["latency_ms"] <= slo_ms + 20 for row in rows)
