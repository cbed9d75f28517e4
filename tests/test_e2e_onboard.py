"""End to end on loopback: cloud service + link emulator + onboard node + player + recorder.

The cloud model is emulated (the service's simulated runner), the fallback detector is a small
fake, everything else is real: ZeroMQ sockets, the trace-driven link, OpenCV compression, the
exact allocator, the node's event loop and deadlines.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest

from avcloud.commands.play import CameraPlayer
from avcloud.commands.record import ResultRecorder
from avcloud.link import DeliverySchedule
from avcloud.linkemu import LinkEmulator
from avcloud.types import ALL_CAMERAS, GroundTruth, Option, Service
from cloudside.config import CloudConfig
from cloudside.service import CloudService
from datasets.scene import CameraImage, SceneFrame
from datasets.traces import markov_lte_trace
from onboard.inference import CompressionEncoder
from onboard.node import OnboardNode
from onboard.params import OnboardParams

# Real sockets, real processes' timing: these run under `make test-all`. The same promises are
# checked deterministically on the simulated clock in tests/test_agent_invariants.py.
pytestmark = pytest.mark.realtime

SLO_MS = 150.0
FRAME_PERIOD_MS = 100.0  # the player's 10 Hz
# A result may be published this late: the node's poll loop and the OS scheduler add at most a
# fifth of a frame period on an otherwise quiet machine (these tests are `realtime`).
LATE_TOLERANCE_MS = 0.2 * FRAME_PERIOD_MS
FALLBACK_NAME = "avd-onboard"
CLOUD_MODEL = "cloud-m"
MODEL_INPUT_WH = (320, 192)
OPTIONS = (
    Option(FALLBACK_NAME, 0.0, 0.0, 0.30),
    Option(f"{CLOUD_MODEL}-imgcompNone-inpcomp75", 0.10, 25.0, 0.55),
    Option(f"{CLOUD_MODEL}-imgcompNone-inpcomp95", 0.25, 25.0, 0.60),
    Option(f"{CLOUD_MODEL}-imgcomp90-inpcompNone", 0.80, 30.0, 0.62),
)


def synthetic_frames(cameras: tuple[str, ...], count: int, width: int = 640, height: int = 400) -> list[SceneFrame]:
    rng = np.random.default_rng(7)
    jpegs = {}
    for camera in cameras:
        image = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 3)
        jpegs[camera] = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    empty = GroundTruth(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    return [SceneFrame(index, 1_000_000 + index * 100_000,
                       {camera: CameraImage(camera, width, height, jpegs[camera], empty) for camera in cameras})
            for index in range(count)]


def fake_fallback(image_bgr: np.ndarray, full_size_wh: tuple[int, int]) -> np.ndarray:
    time.sleep(0.005)
    width, height = full_size_wh
    return np.array([[0, 0, width / 4, height / 4, 0.5, 1]], dtype=np.float32)


def cloud_config(port: int = 0, runtime_ms: float = 8.0, security: dict | None = None) -> CloudConfig:
    # One emulated GPU serves every camera: 5 cameras x 10 Hz x 8 ms keeps it below full load.
    return CloudConfig.model_validate(dict(
        bind=f"tcp://127.0.0.1:{port}", http_port=None, shutdown_grace_ms=0, max_batch_size=4,
        models=[{"name": CLOUD_MODEL, "simulated_runtime_ms": runtime_ms, "simulated_decode": False}],
        security=security or {}))


@dataclass
class Loopback:
    """The whole system on 127.0.0.1, every port picked free."""

    cameras: tuple[str, ...]
    uplink: DeliverySchedule
    delay_ms: float = 10.0
    queue_bytes: int = 300_000
    cloud_security: dict | None = None  # None: --insecure
    node_security: dict = field(default_factory=lambda: {"insecure": True})
    encode_workers: int = 0
    cloud: CloudService | None = None
    emulator: LinkEmulator | None = None
    node: OnboardNode | None = None
    player: CameraPlayer | None = None
    recorder: ResultRecorder | None = None
    out: io.StringIO = field(default_factory=io.StringIO)
    played: list[tuple[int, str, float]] = field(default_factory=list)  # (frame, camera, monotonic s)
    cloud_port: int = 0
    _recorder_thread: threading.Thread | None = None

    def start(self) -> Loopback:
        self.cloud = CloudService(cloud_config(security=self.cloud_security), insecure=self.cloud_security is None,
                                  announce=lambda line: None).start()
        self.cloud_port = int(self.cloud.address.rsplit(":", 1)[1])
        self.emulator = LinkEmulator(("127.0.0.1", self.cloud_port), self.uplink, None, self.delay_ms,
                                     self.queue_bytes).start()
        self.player = CameraPlayer("tcp://127.0.0.1:*", rate_hz=10.0)
        params = OnboardParams.model_validate(dict(
            cameras=list(self.cameras), slo_ms=SLO_MS, rtt_ms=2 * self.delay_ms, initial_bandwidth_mbps=5.0,
            heartbeat_period_ms=200.0, reconnect_after_timeouts=3, min_reconnect_interval_ms=500.0,
            onboard_model=FALLBACK_NAME, security=self.node_security, encode_workers=self.encode_workers,
            endpoints={"cameras": self.player.bound_endpoint, "outputs": "tcp://127.0.0.1:*",
                       "cloud": self.emulator.address}))
        from onboard.planning import build_planner
        from optimizer.policies import get_policy

        services = tuple(Service(camera, OPTIONS) for camera in self.cameras)
        self.node = OnboardNode(params, services=services, planner=build_planner(services, get_policy("turbo")),
                                fallback=fake_fallback, encoder=CompressionEncoder({CLOUD_MODEL: MODEL_INPUT_WH}),
                                log_stream=io.StringIO())
        self.node.start()
        self.recorder = ResultRecorder(self.node.outputs_endpoint)
        self._recorder_thread = threading.Thread(target=self.recorder.record, args=(self.out,), daemon=True)
        self._recorder_thread.start()
        time.sleep(0.5)  # let SUB sockets join (PUB drops messages sent before a subscriber connects)
        return self

    def play(self, frames: list[SceneFrame], during=None) -> None:
        """Play frames in real time; `during(position)` runs after each frame is published."""
        for position, frame in enumerate(frames):
            self.player.play([frame])
            sent_s = time.monotonic()
            self.played += [(frame.index, camera, sent_s) for camera in frame.cameras]
            if during is not None:
                during(position)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - sent_s)))

    def finish(self) -> list[dict]:
        time.sleep((SLO_MS + 300.0) / 1000.0)  # every deadline has passed, results have arrived
        self.recorder.stop_requested.set()
        self._recorder_thread.join(5)
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def stop(self) -> None:
        for part in (self.node, ):
            if part is not None:
                part.shutdown()
        for part in (self.player, self.recorder):
            if part is not None:
                part.close()
        if self.emulator is not None:
            self.emulator.stop()
        if self.cloud is not None:
            self.cloud.stop()


def check_one_result_per_task_on_time(system: Loopback, rows: list[dict]) -> None:
    keys = Counter((row["frame_index"], row["camera"]) for row in rows)
    played = {(frame, camera) for frame, camera, _ in system.played}
    assert set(keys) == played, f"missing: {sorted(played - set(keys))[:5]}, extra: {sorted(set(keys) - played)[:5]}"
    assert max(keys.values()) == 1, "a task got more than one result for a frame"
    latencies = np.array([row["latency_ms"] for row in rows])
    assert latencies.max() <= SLO_MS + LATE_TOLERANCE_MS, sorted(latencies)[-5:]
    for row in rows:
        assert row["source"] in ("cloud", "onboard")
        assert row["deadline_met"] == (row["latency_ms"] <= SLO_MS)


def check_cloud_used_whenever_in_time(system: Loopback) -> None:
    counters = system.node.agent.counters
    in_time_ok = counters.replies - counters.replies_not_ok - counters.replies_discarded
    assert counters.published_cloud == in_time_ok


def run_pipeline(cameras: tuple[str, ...], seconds: float, encode_workers: int = 0) -> None:
    trace = DeliverySchedule(markov_lte_trace(seed=3, duration_s=max(60.0, seconds * 2), mean_mbps=12.0,
                                              fade_rate_per_min=0.0))
    system = Loopback(cameras, trace, encode_workers=encode_workers).start()
    try:
        system.play(synthetic_frames(cameras, int(seconds * 10)))
        rows = system.finish()
        check_one_result_per_task_on_time(system, rows)
        check_cloud_used_whenever_in_time(system)
        sources = Counter(row["source"] for row in rows)
        assert sources["cloud"] >= 0.5 * len(rows), sources  # a 12 Mbps link carries most frames
        cloud_rows = [row for row in rows if row["source"] == "cloud"]
        assert all(row["config"].startswith(CLOUD_MODEL) for row in cloud_rows)
        measurement = system.node.agent.measurement
        assert measurement.replies > 0 and measurement.samples_mbps
    finally:
        system.stop()


def test_pipeline_publishes_one_result_per_task_and_uses_the_cloud():
    run_pipeline(("FRONT", "SIDE_LEFT"), seconds=3.0, encode_workers=2)  # parallel compression path


@pytest.mark.slow
def test_pipeline_30s_five_cameras():
    run_pipeline(ALL_CAMERAS, seconds=30.0)


def gap_trace(gap_start_ms: int, gap_ms: int, total_ms: int, packets_per_ms: int = 1) -> DeliverySchedule:
    times = np.arange(1, total_ms + 1)
    times = times[(times < gap_start_ms) | (times >= gap_start_ms + gap_ms)]
    return DeliverySchedule(np.repeat(times, packets_per_ms))


def run_zero_capacity(gap_s: float, seconds: float) -> None:
    cameras = ("FRONT", "SIDE_LEFT")
    # Trace time 0 is the emulator start; playing starts about a second later.
    gap_start_ms = 2500
    system = Loopback(cameras, gap_trace(gap_start_ms, int(gap_s * 1000), 600_000), queue_bytes=100_000).start()
    peak_pending = []
    try:
        system.play(synthetic_frames(cameras, int(seconds * 10)),
                    during=lambda _: peak_pending.append(system.node.agent.pending_frames))
        rows = system.finish()
        check_one_result_per_task_on_time(system, rows)
        # Bounded memory: the emulator never queued more than its limit plus one read, and the node
        # holds only the frames within their deadline.
        assert system.emulator.stats()["uplink_peak_queued_bytes"] <= system.queue_bytes + 65536
        assert max(peak_pending) <= 2 * len(cameras) * (SLO_MS / 100.0 + 1)
        emulator_start_s = time.monotonic() - system.emulator.now_ms() / 1000.0
        gap_start_s = emulator_start_s + gap_start_ms / 1000.0
        in_gap = [row for row in rows if gap_start_s + 0.3 <= row["received_ms"] / 1000 <= gap_start_s + gap_s - 0.1]
        assert in_gap and all(row["source"] == "onboard" for row in in_gap)
        recovered = [row for row in rows if row["received_ms"] / 1000 >= gap_start_s + gap_s + 2.0]
        assert recovered and any(row["source"] == "cloud" for row in recovered)
    finally:
        system.stop()


def test_zero_capacity_link_falls_back_and_recovers_short():
    run_zero_capacity(gap_s=2.0, seconds=7.0)


@pytest.mark.slow
def test_zero_capacity_link_for_10s_falls_back_and_recovers():
    run_zero_capacity(gap_s=10.0, seconds=16.0)


def run_cloud_restart(down_s: float, seconds: float) -> None:
    cameras = ("FRONT", "SIDE_LEFT")
    trace = DeliverySchedule(np.repeat(np.arange(1, 1001), 2))  # 24 Mbps, steady
    system = Loopback(cameras, trace).start()
    events: dict[str, float] = {}
    frames = synthetic_frames(cameras, int(seconds * 10))
    kill_at, restart_at = 15, 15 + int(down_s * 10)

    def chaos(position: int) -> None:
        if position == kill_at:
            system.cloud.stop(grace_ms=0)
            events["killed_s"] = time.monotonic()
        elif position == restart_at:
            system.cloud = CloudService(cloud_config(system.cloud_port), insecure=True,
                                        announce=lambda line: None).start()
            events["restarted_s"] = time.monotonic()

    try:
        system.play(frames, during=chaos)
        rows = system.finish()
        check_one_result_per_task_on_time(system, rows)
        down = [row for row in rows if events["killed_s"] + 0.3 <= row["received_ms"] / 1000 <= events["restarted_s"]]
        assert down and all(row["source"] == "onboard" for row in down)
        back = [row["received_ms"] / 1000 for row in rows
                if row["source"] == "cloud" and row["received_ms"] / 1000 > events["restarted_s"]]
        assert back, "no cloud result after the restart"
        assert back[0] - events["restarted_s"] <= 2.0
    finally:
        system.stop()


def test_cloud_killed_and_restarted_short():
    run_cloud_restart(down_s=1.5, seconds=4.5)


@pytest.mark.slow
def test_cloud_killed_and_restarted_mid_run():
    run_cloud_restart(down_s=5.0, seconds=12.0)


def test_curve_end_to_end_through_the_emulator_and_unknown_vehicles_get_nothing(tmp_path):
    from avcloud.keys import generate_keypair

    generate_keypair("cloud", tmp_path / "server")
    generate_keypair("car-0", tmp_path / "car-0", allowlist_dir=tmp_path / "cars")  # the allow-list: public keys only
    _, stranger_secret = generate_keypair("stranger", tmp_path / "elsewhere")
    cloud_security = {"server_secret_key": str(tmp_path / "server" / "cloud.key_secret"),
                      "allowlist_dir": str(tmp_path / "cars")}
    trace = DeliverySchedule(np.repeat(np.arange(1, 1001), 2))
    cameras = ("FRONT",)
    for secret, expect_cloud in ((tmp_path / "car-0" / "car-0.key_secret", True), (stranger_secret, False)):
        node_security = {"client_secret_key": str(secret),
                         "server_public_key": str(tmp_path / "server" / "cloud.key")}
        system = Loopback(cameras, trace, cloud_security=cloud_security, node_security=node_security).start()
        try:
            system.play(synthetic_frames(cameras, 15))
            rows = system.finish()
            check_one_result_per_task_on_time(system, rows)
            sources = Counter(row["source"] for row in rows)
            if expect_cloud:
                assert sources["cloud"] >= 10, sources
            else:
                assert sources == {"onboard": 15}
                assert system.node.agent.counters.replies == 0
        finally:
            system.stop()
