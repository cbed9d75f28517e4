"""Live replay: the real processes on loopback, in real time, scored like the simulated replay.

Per policy, one fresh stack: `avcloud cloud serve` (the zoo's cloud models), `avcloud linkemu`
(uplink from the trace, RTT/2 delay each way), `avcloud onboard` (the daemon with the policy's
planner), `avcloud record` and finally `avcloud play`. Each prints a READY line; we wait for it,
and tear everything down (SIGINT, then SIGKILL) whatever happens. The recorder's rows (one per
published result: source cloud/onboard, chosen configuration, detections) become a `PolicyRun`
so the same metrics apply; detections are the ones really published, not the cache's.

`oracle` needs the future of the trace and has no live counterpart; it is skipped live.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from avcloud.errors import DataError, UserError
from avcloud.replay.inputs import ProfiledScene, make_case, open_profiled_scene, open_trace
from avcloud.replay.job import (
    CaseResult,
    ReplayOptions,
    check_options,
    default_scene_path,
    default_trace_path,
)
from avcloud.replay.metrics import add_relative_figures, datasets_map, summarise_policies
from avcloud.replay.simulator import FALLBACK_INDEX, PolicyRun, ReplayScenario, RequestOutcome
from avcloud.types import empty_detections
from optimizer.policies import get_policy

READY_TIMEOUT_S = 120.0
# Seconds from launching the link emulator and the player until the first frame and trace time 0.
LIVE_START_MARGIN_S = 4.0


def runs_live(policy: str) -> bool:
    """Every policy runs live except those that plan from the trace's future (oracle)."""
    return get_policy(policy).planner != "oracle"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ProcessGroup:
    """Child `avcloud` processes started in order, each awaited until it prints READY."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, arguments: Sequence[str], wait_ready: bool = True) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "avcloud", *arguments]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(log_path, "w"),  # noqa: SIM115
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes.append((name, process))
        if wait_ready:
            self.wait_ready(name, process)
        return process

    def wait_ready(self, name: str, process: subprocess.Popen) -> None:
        log_path = self.log_dir / f"{name}.log"
        ready = threading.Event()
        lines: list[str] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if line.startswith("READY"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-400:].strip().splitlines()
                why = tail[-1] if tail else "no output"
                raise DataError(f"live replay: {name} did not become ready ({why}); see {log_path}")

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def cloud_config(bind: str, models: Sequence[str], workers: int = 1) -> dict:
    return {
        "bind": bind,
        "http_port": None,
        # One inference thread: the cloud shares this machine's cores with the car's processes, and
        # onnxruntime's default pool (a spinning thread per core) would take the car's CPU too.
        "models": [{"name": model, "backend": "onnxruntime", "num_threads": 1} for model in models],
        "scheduler": "edf",
        "workers": workers,
    }


@contextlib.contextmanager
def _work_dir():
    """Process logs and recordings of a live run; kept when $AVCLOUD_KEEP_LIVE_LOGS is set."""
    if os.environ.get("AVCLOUD_KEEP_LIVE_LOGS"):
        work = tempfile.mkdtemp(prefix="avcloud-live-")
        print(f"live replay: logs kept in {work}")
        yield work
    else:
        with tempfile.TemporaryDirectory(prefix="avcloud-live-") as work:
            yield work


def run_policy_live(policy: str, scene: ProfiledScene, trace_path: str, scenario: ReplayScenario,
                    rtt_ms: float, slo_ms: float, work_dir: Path, frames: int, cloud_workers: int = 1) -> list[dict]:
    """One policy on a fresh stack; returns the recorder's rows."""
    from avcloud.commands.record import read_recording

    cloud_port, emu_port, camera_port, output_port = (free_port() for _ in range(4))
    models = sorted(set(scenario.models.values()))
    config_path = work_dir / "cloud.yaml"
    config_path.write_text(yaml.safe_dump(cloud_config(f"tcp://127.0.0.1:{cloud_port}", models, cloud_workers)))
    recording = work_dir / f"{policy}.jsonl"
    group = ProcessGroup(work_dir)
    try:
        group.start(f"{policy}-cloud", ["cloud", "serve", "--config", str(config_path), "--insecure"])
        parameters = {
            # The same named policy the simulated replay runs (optimizer/policies.py).
            "cameras": list(scenario.cameras), "profile_path": scene.profile_path, "policy": policy,
            "slo_ms": slo_ms, "rtt_ms": rtt_ms,
            "endpoints.cameras": f"tcp://127.0.0.1:{camera_port}",
            "endpoints.outputs": f"tcp://127.0.0.1:{output_port}",
            "endpoints.cloud": f"tcp://127.0.0.1:{emu_port}", "security.insecure": True, "log_replies": True,
        }
        overrides = [item for key, value in parameters.items()
                     for item in ("-p", f"{key}:={yaml.safe_dump(value, default_flow_style=True).strip()}")]
        group.start(f"{policy}-onboard", ["onboard", *overrides])
        group.start(f"{policy}-record", ["record", "--out", str(recording), "--connect",
                                         f"tcp://127.0.0.1:{output_port}", "--idle-exit-s", "3"])
        # The simulator starts the trace with the first frame; so does the live stack: the link
        # emulator and the player share a wall-clock start a few seconds ahead (their start-up
        # time). The daemon connects to the emulator's port as soon as it listens.
        start_unix_s = time.time() + LIVE_START_MARGIN_S
        emulator = group.start(f"{policy}-linkemu", [
            "linkemu", "--uplink", trace_path, "--delay-ms", f"{rtt_ms / 2:g}",
            "--listen", f"tcp://127.0.0.1:{emu_port}", "--upstream", f"tcp://127.0.0.1:{cloud_port}",
            "--trace-start-unix", f"{start_unix_s:.3f}"], wait_ready=False)
        player = group.start(f"{policy}-play", ["play", scene.path, "--rate", f"{1000.0 / scenario.frame_interval_ms:g}",
                                                "--bind", f"tcp://127.0.0.1:{camera_port}", "--frames", str(frames),
                                                "--cameras", *scenario.cameras, "--start-at-unix",
                                                f"{start_unix_s:.3f}"], wait_ready=False)
        group.wait_ready(f"{policy}-linkemu", emulator)
        group.wait_ready(f"{policy}-play", player)
        player.wait(timeout=frames * scenario.frame_interval_ms / 1000.0 + 60)
        time.sleep(slo_ms / 1000.0 + 1.0)  # the last frames' deadlines pass and results are published
    finally:
        group.stop_all()
    if not recording.exists():
        raise DataError(f"live replay: the recorder wrote nothing for policy {policy}; logs in {work_dir}")
    return read_recording(recording)


class RecordedDetections:
    """A DetectionSource over what the live stack published (empty where nothing was published)."""

    def __init__(self, rows: Sequence[dict]) -> None:
        self._by_key = {(int(row["frame_index"]), str(row["camera"])): row for row in rows}
        self.configs: list[str] = []
        self.frame_indices = sorted({key[0] for key in self._by_key})
        self.cameras = sorted({key[1] for key in self._by_key})

    def row(self, frame_index: int, camera: str) -> dict | None:
        return self._by_key.get((frame_index, camera))

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        row = self.row(frame_index, camera)
        if row is None or not row["detections"]:
            return empty_detections()
        return np.asarray(row["detections"], dtype=np.float32).reshape(-1, 6)

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return 0


def node_counters(log_path: Path) -> dict:
    """The onboard node's final counters (its `finalized` JSON log line); empty if it logged none."""
    counters: dict = {}
    with contextlib.suppress(OSError):
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "finalized":
                    counters = entry
    return counters


def apply_node_counters(summary: dict, counters: dict, rows: int) -> None:
    """What only the node knows: requests really sent, and how many came back in time."""
    summary["results_published"] = rows
    sent = counters.get("requests_sent")
    if not isinstance(sent, int):
        return
    on_time = int(counters.get("published_cloud", 0))
    summary["requests_sent"] = sent
    summary["requests_on_time"] = on_time
    summary["requests_late"] = max(0, sent - on_time)
    summary["deadline_miss_rate"] = (sent - on_time) / sent if sent else None
    summary["node_counters"] = {key: value for key, value in counters.items() if isinstance(value, int | float)}


def run_from_recording(policy: str, rows: Sequence[dict], scenario: ReplayScenario, wall_s: float) -> PolicyRun:
    """The recorder's rows as a PolicyRun: planned = the row's configuration, on time = served by the cloud."""
    frames, cameras = scenario.num_frames, len(scenario.cameras)
    planned = np.full((frames, cameras), FALLBACK_INDEX, dtype=np.int32)
    outcome = np.zeros((frames, cameras), dtype=np.int8)
    position = {int(index): f for f, index in enumerate(scenario.frame_indices)}
    for row in rows:
        f = position.get(int(row["frame_index"]))
        if f is None or row["camera"] not in scenario.cameras:
            continue
        c = scenario.cameras.index(row["camera"])
        config = scenario.config_position.get(str(row.get("config")))
        if config is None:
            continue
        planned[f, c] = config
        # A cloud choice published from the car was late or never sent; the recording cannot tell which.
        outcome[f, c] = RequestOutcome.ON_TIME if row["source"] == "cloud" else RequestOutcome.LATE
    nan = np.full(frames, np.nan)
    return PolicyRun(policy, planned, outcome, np.full((frames, cameras), np.nan), nan, nan.copy(),
                     np.zeros(frames), np.zeros(frames), 0, 0.0, [], [], wall_s)


def run_live_replay(options: ReplayOptions) -> list[CaseResult]:
    """Every scene x trace x policy (except oracle) on the real processes, in real time."""
    chosen = check_options(options)
    policy_names = [name for name in chosen if runs_live(name)]
    if not policy_names:
        raise UserError("live replay: none of the chosen policies can run live (oracle needs the future)")
    if "oracle" in chosen:
        print("live replay: skipping oracle (it needs the future of the trace)", file=sys.stderr)
    trace_paths = [Path(p) for p in options.trace_paths] or [default_trace_path()]
    traces = [open_trace(path) for path in trace_paths]
    results = []
    for scene_path in [Path(p) for p in options.scene_paths] or [default_scene_path()]:
        scene = open_profiled_scene(scene_path, options.preset, options.progress, options.profile_dir,
                                    options.models or None)
        for trace in traces:
            case = make_case(scene, trace, options.rtt_ms, options.slo_ms, options.max_frames)
            runs, summaries = {}, {}
            with _work_dir() as work:
                for name in policy_names:
                    started = time.perf_counter()
                    rows = run_policy_live(name, scene, trace.path, case.scenario, options.rtt_ms, options.slo_ms,
                                           Path(work), case.scenario.num_frames, options.cloud_workers or 1)
                    runs[name] = run_from_recording(name, rows, case.scenario, time.perf_counter() - started)
                    summaries.update(summarise_policies({name: runs[name]}, case.scenario, RecordedDetections(rows),
                                                        case.ground_truths, datasets_map))
                    apply_node_counters(summaries[name], node_counters(Path(work) / f"{name}-onboard.log"),
                                        len(rows))
            add_relative_figures(summaries)
            results.append(CaseResult(case=case, runs=runs, summaries=summaries))
    return results
