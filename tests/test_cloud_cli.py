"""`avcloud cloud serve` as a user runs it: start-up checks, READY, serving, SIGTERM."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avcloud import keys
from avcloud.commands import cloud as cloud_command
from avcloud.errors import UserError
from cloudside.client import CloudClient
from cloudside.config import CloudConfig, load_cloud_config
from cloudside.service import CloudService

REPO_ROOT = Path(__file__).resolve().parents[1]
EMULATED_CONFIG = """
bind: tcp://127.0.0.1:0
http_port: 0
shutdown_grace_ms: 500
models:
  - name: emulated
    simulated_runtime_ms: 5
    simulated_decode: false
"""


def avcloud(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avcloud", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def run_cloud_command(argv: list[str]) -> int:
    """The subcommand in-process, as avcloud.cli dispatches it (a UserError there means exit 2)."""
    parser = argparse.ArgumentParser()
    cloud_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_serve_without_keys_refuses_with_one_line(tmp_path):
    config = tmp_path / "cloud.yaml"
    config.write_text(EMULATED_CONFIG)
    with pytest.raises(UserError) as refused:
        run_cloud_command(["cloud", "serve", "--config", str(config)])
    message = str(refused.value)
    assert "refusing to start" in message and "--insecure" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("models: []\n", "field 'models'"), ("models: [{name: a}]\nqueue_limit: -1\n", "field 'queue_limit'"),
     ("models: [{name: a, speed: 3}]\n", "field 'models.0.speed'"), ("models: [\n", "invalid YAML")],
)
def test_bad_config_is_a_one_line_error(tmp_path, text, fragment):
    config = tmp_path / "cloud.yaml"
    config.write_text(text)
    with pytest.raises(UserError) as refused:
        run_cloud_command(["cloud", "serve", "--config", str(config), "--insecure"])
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_cli_exit_code_and_message_for_user_errors(tmp_path):
    result = avcloud("cloud", "serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: cannot read" in result.stderr and "Traceback" not in result.stderr


def test_example_config_loads_with_paths_relative_to_it():
    config = load_cloud_config(REPO_ROOT / "docs" / "examples" / "cloud.yaml")
    assert config.security.allowlist_dir == REPO_ROOT / "docs" / "examples" / "keys" / "allowed"
    assert config.scheduler == "edf" and config.models[0].simulated


def test_serve_insecure_warns_serves_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "cloud.yaml"
    config.write_text(EMULATED_CONFIG)
    process = subprocess.Popen([sys.executable, "-m", "avcloud", "cloud", "serve", "--config", str(config),
                                "--insecure", "--scheduler", "fifo"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY"):
                break
        ready = lines[-1] if lines else ""
        assert ready.startswith("READY"), "".join(lines) + process.stderr.read() if process.poll() is not None else lines
        assert "INSECURE" in ready and "scheduler fifo" in ready
        address = re.search(r"on (tcp://\S+?),", ready).group(1)
        with CloudClient(address, vehicle="cli-test") as client:
            reply = client.infer(b"\x00" * 12, task="FRONT", model="emulated", codec="raw", shape=(2, 2, 3),
                                 budget_ms=2000)
        assert reply is not None and reply[0].status == "ok"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        assert "stopped" in stdout
        assert "INSECURE" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_serve_with_keys_accepts_allowlisted_vehicle(tmp_path):
    server_dir, cars_dir = tmp_path / "server", tmp_path / "cars"
    assert avcloud("keys", "generate", "cloud", "--dir", str(server_dir)).returncode == 0
    keys.generate_keypair("car-1", tmp_path / "car-1", allowlist_dir=cars_dir)
    config = tmp_path / "cloud.yaml"
    config.write_text(EMULATED_CONFIG + "security:\n  server_secret_key: server/cloud.key_secret\n"
                      "  allowlist_dir: cars\n")
    process = subprocess.Popen([sys.executable, "-m", "avcloud", "cloud", "serve", "--config", str(config)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ready.startswith("READY"):
            ready = process.stdout.readline()
            if not ready:
                break
        assert ready.startswith("READY") and "CurveZMQ" in ready
        address = re.search(r"on (tcp://\S+?),", ready).group(1)
        with CloudClient(address, "car-1", tmp_path / "car-1" / "car-1.key_secret", server_dir / "cloud.key") as client:
            assert client.ping(timeout_ms=5000) is not None
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_ping_command_reports_pongs_and_silence(capsys):
    config = CloudConfig.model_validate({"bind": "tcp://127.0.0.1:0", "http_port": None,
                                         "models": [{"name": "emulated", "simulated_runtime_ms": 1}]})
    with CloudService(config, insecure=True, announce=lambda line: None) as running:
        assert run_cloud_command(["cloud", "ping", "--address", running.address, "--count", "2"]) == 0
        assert capsys.readouterr().out.count("pong from") == 2
        address = running.address
    assert run_cloud_command(["cloud", "ping", "--address", address, "--count", "1", "--timeout-ms", "100"]) == 1
    assert "no reply" in capsys.readouterr().out
