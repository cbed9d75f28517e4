"""A small fake scene for fleet tests, scored by the real metric, and the checks that it means what
the fleet tests assume (imported by the other tests/test_fleet_*.py files).

Every image holds one vehicle. The on-car model boxes it as a pedestrian (a class without ground
truth: ignored), so on-car only scores 0; every cloud configuration finds it, so a camera's mAP is
about the share of its frames served by the cloud in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from replay_fakes import CAMERAS, OPTIONS, constant_opportunities

from avcloud.fleet.job import LoadedInputs
from avcloud.fleet.scoring import SceneScorer
from avcloud.fleet.simulation import SceneInputs
from avcloud.link import DeliverySchedule
from avcloud.replay.inputs import UplinkTrace, build_scenario
from avcloud.types import GroundTruth, ObjectType, Service

TRUTH = GroundTruth(np.array([[100, 100, 200, 200]], np.float32), np.array([int(ObjectType.VEHICLE)], np.int32))


class FakeSource:
    """Sizes as the profile says (+/- 10 % per frame); detections as the module docstring says."""

    def __init__(self, frames: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.configs = [option.name for option in OPTIONS]
        self.frame_indices = list(range(frames))
        self.cameras = list(CAMERAS)
        self._jitter = rng.uniform(0.9, 1.1, size=(frames, len(CAMERAS)))
        self._size_mbit = {option.name: option.size_mbit for option in OPTIONS}
        self._detections = {}
        for option in OPTIONS:
            object_class = ObjectType.PEDESTRIAN if option.is_fallback else ObjectType.VEHICLE
            self._detections[option.name] = np.array([[100, 100, 200, 200, option.utility, int(object_class)]],
                                                     dtype=np.float32)

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return int(self._size_mbit[config] * 1e6 / 8 * self._jitter[frame_index, CAMERAS.index(camera)])

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        return self._detections[config]


def fake_scene(frames: int = 60, rtt_ms: float = 50.0, slo_ms: float = 200.0) -> SceneInputs:
    source = FakeSource(frames)
    services = tuple(Service(camera, OPTIONS) for camera in CAMERAS)
    scenario = build_scenario(services, source, source.frame_indices, 10.0, rtt_ms, slo_ms, {})
    return SceneInputs("fake-scene", scenario, source, {camera: [TRUTH] * frames for camera in CAMERAS})


@dataclass(frozen=True)
class FakeFleetInputs:
    """Fleet inputs (avcloud.fleet.job.InputsSource) on the fake scene and constant cell traces."""

    frames: int = 60
    cell_mbps: tuple[float, ...] = (8.0,)
    trace_seconds: float = 30.0

    def load(self, progress: bool = False) -> LoadedInputs:
        scene = fake_scene(self.frames)
        traces = [UplinkTrace(f"constant-{mbps:g}mbps", f"constant-{mbps:g}.up",
                              DeliverySchedule(constant_opportunities(mbps, self.trace_seconds)))
                  for mbps in self.cell_mbps]
        return LoadedInputs([scene], traces, [SceneScorer(scene.source, scene.scenario.fallback_config)],
                            {"profiles": ["fake profile"], "cloud_runtimes": None})


def test_the_fake_scene_scores_zero_on_car_and_its_cloud_share_in_the_cloud():
    from avcloud.replay.metrics import datasets_map

    scene = fake_scene(frames=20)
    scorer = SceneScorer(scene.source, scene.scenario.fallback_config)
    assert scorer.onboard_map(scene.scenario, scene.ground_truths) == 0.0
    cloud = scene.source.detections(0, "FRONT", OPTIONS[2].name)
    onboard = scene.source.detections(0, "FRONT", OPTIONS[0].name)
    half = [cloud if frame % 2 else onboard for frame in range(20)]
    assert datasets_map(half, [TRUTH] * 20) == pytest.approx(51 / 101)
