"""The fleet's fast scoring gives exactly the replay's mAP (datasets.metric), whatever was published."""

from __future__ import annotations

import numpy as np
import pytest

from avcloud.fleet.scoring import SceneScorer
from avcloud.replay.metrics import PublishedDetections, datasets_map, map_per_camera
from avcloud.replay.simulator import FALLBACK_INDEX, PolicyRun, ReplayScenario, RequestOutcome
from avcloud.types import GroundTruth, Option, Service

CAMERAS = ("FRONT", "SIDE_LEFT")
CONFIGS = ("m-imgcompNone-inpcomp50", "l-imgcomp90-inpcompNone")
FALLBACK = "car-imgcompNone-inpcompNone"
FRAMES = 30


class RandomSource:
    """Random labels per image; each configuration's detections are the labels jittered (more for
    the on-car model), plus false alarms, with scores rounded so that ties across images occur."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.configs = [*CONFIGS, FALLBACK]
        self.frame_indices = list(range(FRAMES))
        self.cameras = list(CAMERAS)
        self.truths: dict[tuple[int, str], GroundTruth] = {}
        self._detections: dict[tuple[int, str, str], np.ndarray] = {}
        for frame in range(FRAMES):
            for camera in CAMERAS:
                count = int(rng.integers(0, 6))
                corners = rng.uniform(0, 1500, size=(count, 2))
                sizes = rng.uniform(20, 200, size=(count, 2))
                boxes = np.hstack([corners, corners + sizes]).astype(np.float32)
                classes = rng.integers(1, 5, size=count).astype(np.int32)
                self.truths[(frame, camera)] = GroundTruth(boxes, classes)
                for config, jitter in zip(self.configs, (4.0, 2.0, 15.0), strict=True):
                    keep = rng.random(count) < 0.8
                    found = boxes[keep] + rng.normal(0, jitter, size=(int(keep.sum()), 4)).astype(np.float32)
                    alarms = rng.uniform(0, 1500, size=(int(rng.integers(0, 3)), 2))
                    alarm_boxes = np.hstack([alarms, alarms + 50]).astype(np.float32)
                    rows = np.vstack([found, alarm_boxes])
                    scores = np.round(rng.uniform(0.1, 1.0, size=len(rows)), 1)
                    labels = np.concatenate([classes[keep], rng.integers(1, 5, size=len(alarm_boxes))])
                    self._detections[(frame, camera, config)] = np.column_stack([rows, scores, labels]).astype(np.float32)

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        return self._detections[(frame_index, camera, config)]

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        return 1000


def scenario_for(offset: int) -> ReplayScenario:
    options = (Option(FALLBACK, 0.0, 0.0, 0.1), *(Option(name, 0.5, 20.0, 0.3) for name in CONFIGS))
    frame_indices = np.roll(np.arange(FRAMES), -offset)
    return ReplayScenario(
        cameras=CAMERAS, frame_indices=frame_indices, capture_ms=np.arange(FRAMES) * 100.0,
        services=tuple(Service(camera, options) for camera in CAMERAS), config_names=CONFIGS,
        size_bytes=np.full((FRAMES, len(CAMERAS), len(CONFIGS)), 1000), runtime_ms=np.array([20.0, 40.0]),
        encode_ms=np.zeros(2), fallback_config=FALLBACK, rtt_ms=40.0, slo_ms=200.0,
    )


def random_run(source: RandomSource, scenario: ReplayScenario, seed: int) -> PolicyRun:
    """What an agent might publish: cloud results as decoded copies, on-car results as the cached
    arrays, on-car results reused from the previous frame, and nothing found after a failure."""
    rng = np.random.default_rng(seed)
    planned = rng.integers(-1, len(CONFIGS), size=(FRAMES, len(CAMERAS))).astype(np.int32)
    outcome = np.where(planned == FALLBACK_INDEX, RequestOutcome.FALLBACK,
                       rng.choice([RequestOutcome.ON_TIME, RequestOutcome.LATE], size=planned.shape)).astype(np.int8)
    published = []
    for f in range(FRAMES):
        row = []
        for c, camera in enumerate(CAMERAS):
            frame_index = int(scenario.frame_indices[f])
            if outcome[f, c] == RequestOutcome.ON_TIME:
                row.append(source.detections(frame_index, camera, CONFIGS[planned[f, c]]).copy())
            elif f and rng.random() < 0.15:  # reused: the previous frame's on-car result
                row.append(source.detections(int(scenario.frame_indices[f - 1]), camera, FALLBACK))
            elif rng.random() < 0.05:
                row.append(np.zeros((0, 6), np.float32))
            else:
                row.append(source.detections(frame_index, camera, FALLBACK))
        published.append(row)
    return PolicyRun(policy="random", planned_config=planned, outcome=outcome,
                     result_ms=np.full(planned.shape, np.nan), budget_mbps=np.zeros(FRAMES),
                     estimate_mbps=np.zeros(FRAMES), allocated_mbps=np.zeros(FRAMES), solve_us=np.zeros(FRAMES),
                     sent_bytes=0, sent_until_ms=0.0, transfers=[], samples=[], wall_s=0.0, published=published)


@pytest.mark.parametrize("seed", range(4))
def test_fast_scoring_equals_the_replays_metric(seed):
    source = RandomSource(seed)
    scorer = SceneScorer(source, FALLBACK)
    for offset in (0, 7):  # vehicles at different offsets share the scorer's memo
        scenario = scenario_for(offset)
        truths = {camera: [source.truths[(int(index), camera)] for index in scenario.frame_indices] for camera in CAMERAS}
        run = random_run(source, scenario, seed * 10 + offset)
        expected = map_per_camera(run, PublishedDetections(scenario, source), scenario, truths, datasets_map)
        assert scorer.map_per_camera(run, scenario, truths) == expected
    assert scorer.matched_on_the_spot > 0  # the reused and empty results took the slow path


def test_on_car_map_is_the_fallbacks_on_every_frame():
    source = RandomSource(5)
    scenario = scenario_for(3)
    truths = {camera: [source.truths[(int(index), camera)] for index in scenario.frame_indices] for camera in CAMERAS}
    expected = np.mean([datasets_map([source.detections(int(index), camera, FALLBACK) for index in scenario.frame_indices],
                                     truths[camera]) for camera in CAMERAS])
    assert SceneScorer(source, FALLBACK).onboard_map(scenario, truths) == expected
