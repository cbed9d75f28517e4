"""A small fake profile, detection cache and uplink for replay tests (shared by several test files)."""

from __future__ import annotations

import numpy as np

from avcloud.link import DeliverySchedule
from avcloud.replay.inputs import ReplayCase, build_scenario
from avcloud.types import GroundTruth, Option, Service

CAMERAS = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT")
FALLBACK = Option("car-imgcompNone-inpcompNone", 0.0, 0.0, 0.30)
OPTIONS = (
    FALLBACK,
    Option("s-imgcompNone-inpcomp50", 0.30, 30.0, 0.40),
    Option("m-imgcompNone-inpcomp75", 0.60, 45.0, 0.48),
    Option("l-imgcomp90-inpcompNone", 3.00, 60.0, 0.55),
)
FRAMES = 100


class FakeCache:
    """Sizes as the profile says (+/- 10 % per frame); one 'detection' whose score is the option's utility."""

    def __init__(self, frames: int = FRAMES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.configs = [option.name for option in OPTIONS]
        self.frame_indices = list(range(frames))
        self.cameras = list(CAMERAS)
        self._jitter = rng.uniform(0.9, 1.1, size=(frames, len(CAMERAS)))
        self._utility = {option.name: option.utility for option in OPTIONS}
        self._size_mbit = {option.name: option.size_mbit for option in OPTIONS}

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return int(self._size_mbit[config] * 1e6 / 8 * self._jitter[frame_index, CAMERAS.index(camera)])

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        return np.array([[0, 0, 10, 10, self._utility[config], 1]], dtype=np.float32)


class FamilyCache:
    """Two frames of one camera, with the configurations of the shipped family."""

    def __init__(self, configs) -> None:
        self.configs = list(configs)
        self.frame_indices = [0, 1]
        self.cameras = ["FRONT"]

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return 1000

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        return np.zeros((0, 6), np.float32)


def mean_score_map(detections, ground_truths) -> float:
    """Stand-in metric: the mean utility of what was published (so cloud results raise it)."""
    assert len(detections) == len(ground_truths)
    return float(np.mean([d[0, 4] for d in detections]))


def make_case(opportunities_ms, frames: int = FRAMES, rtt_ms: float = 50.0, slo_ms: float = 200.0) -> ReplayCase:
    cache = FakeCache(frames)
    services = tuple(Service(camera, OPTIONS) for camera in CAMERAS)
    scenario = build_scenario(services, cache, cache.frame_indices, 10.0, rtt_ms, slo_ms, {})
    truth = GroundTruth(np.zeros((1, 4), np.float32), np.ones(1, np.int32))
    return ReplayCase("fake-scene", "fake.tfrecord", "fake-trace", "fake.up", DeliverySchedule(opportunities_ms),
                      scenario, {camera: [truth] * frames for camera in CAMERAS}, cache, "profile.parquet", "fake profile")


def constant_opportunities(mbps: float, duration_s: float = 20.0) -> np.ndarray:
    packets_per_ms = mbps / 12.0
    count = int(duration_s * 1000 * packets_per_ms)
    return np.ceil((np.arange(count) + 1) / packets_per_ms).astype(np.int64)
