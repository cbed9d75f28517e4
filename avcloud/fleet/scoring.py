"""mAP of what each vehicle published, exactly as `datasets.metric.evaluate` computes it, fast.

`evaluate` matches every image's detections to its ground truth, then ranks each class's
detections over all images. The matching of one image depends only on that image's detections
and labels, and a fleet publishes the same few arrays over and over (the cached detections of a
(frame, camera, configuration)), so `SceneScorer` matches each such image once and keeps the
per-class scores and true-positive flags; scoring a vehicle is then the ranking alone. Arrays it
cannot name (an on-car result reused for a later frame, anything else) are matched on the spot.
The ranking is `datasets.metric.average_precision` on the images' flags in the vehicle's frame
order, as `evaluate` concatenates them, so the figures are identical (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from avcloud.replay.inputs import DetectionSource
from avcloud.replay.simulator import PolicyRun, ReplayScenario, RequestOutcome
from avcloud.types import GroundTruth

# Per class: (scores in descending order, true-positive flags) of one image, or None if it has no
# detection of that class; and the image's ground-truth count per class.
_ImageMatch = tuple[tuple[tuple[np.ndarray, np.ndarray] | None, ...], tuple[int, ...]]


def _match(detections: np.ndarray, truth: GroundTruth) -> _ImageMatch:
    from datasets.metric import IOU_THRESHOLDS, _match_image

    dets = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    gt_classes = np.asarray(truth.classes)
    gt_boxes = np.asarray(truth.boxes_xyxy).reshape(-1, 4)
    det_classes = dets[:, 5].astype(np.int64)
    per_class = []
    counts = []
    for object_class, threshold in IOU_THRESHOLDS.items():
        object_class = int(object_class)
        gt_of_class = gt_boxes[gt_classes == object_class]
        counts.append(len(gt_of_class))
        dets_of_class = dets[det_classes == object_class]
        if len(dets_of_class) == 0:
            per_class.append(None)
            continue
        order = np.argsort(-dets_of_class[:, 4], kind="mergesort")
        dets_of_class = dets_of_class[order]
        per_class.append((dets_of_class[:, 4].astype(np.float64), _match_image(dets_of_class[:, :4], gt_of_class, threshold)))
    return tuple(per_class), tuple(counts)


def map_of_matches(matches: Sequence[_ImageMatch]) -> float:
    """mAP over a sequence of matched images (NaN with no ground truth), as `evaluate`."""
    from datasets.metric import IOU_THRESHOLDS, average_precision

    aps = []
    for position in range(len(IOU_THRESHOLDS)):
        count = sum(match[1][position] for match in matches)
        if count == 0:
            continue
        found = [match[0][position] for match in matches if match[0][position] is not None]
        scores = np.concatenate([item[0] for item in found]) if found else np.zeros(0)
        hits = np.concatenate([item[1] for item in found]) if found else np.zeros(0, bool)
        aps.append(average_precision(scores, hits, count))
    return float(np.mean(aps)) if aps else math.nan


class SceneScorer:
    """Scores runs on one scene's detection cache and labels (by scene frame index and camera)."""

    def __init__(self, source: DetectionSource, fallback_config: str) -> None:
        self.source = source
        self.fallback_config = fallback_config
        self._memo: dict[tuple[int, str, str], _ImageMatch] = {}
        self.matched_on_the_spot = 0

    def cached_match(self, frame_index: int, camera: str, config: str, truth: GroundTruth) -> _ImageMatch:
        key = (frame_index, camera, config)
        found = self._memo.get(key)
        if found is None:
            found = _match(self.source.detections(frame_index, camera, config), truth)
            self._memo[key] = found
        return found

    def published_match(self, published: np.ndarray | None, served_config: str, frame_index: int, camera: str,
                        truth: GroundTruth) -> _ImageMatch:
        """The match of what was published for one image; `served_config` names the cache entry it
        should be (the fallback's for an on-car result)."""
        cached = self.source.detections(frame_index, camera, served_config)
        if published is None or published is cached or (
                published.shape == cached.shape and np.array_equal(published, cached)):
            return self.cached_match(frame_index, camera, served_config, truth)
        self.matched_on_the_spot += 1
        return _match(published, truth)

    def map_per_camera(self, run: PolicyRun, scenario: ReplayScenario,
                       ground_truths: dict[str, Sequence[GroundTruth]]) -> dict[str, float]:
        """mAP per camera of what a simulated run published (its own results, as the replay scores)."""
        figures = {}
        for c, camera in enumerate(scenario.cameras):
            truths = ground_truths[camera]
            matches = []
            for f in range(scenario.num_frames):
                frame_index = int(scenario.frame_indices[f])
                if run.outcome[f, c] == RequestOutcome.ON_TIME:
                    served = scenario.config_names[int(run.planned_config[f, c])]
                else:
                    served = scenario.fallback_config
                published = run.published[f][c] if run.published is not None else None
                matches.append(self.published_match(published, served, frame_index, camera, truths[f]))
            figures[camera] = map_of_matches(matches)
        return figures

    def onboard_map(self, scenario: ReplayScenario, ground_truths: dict[str, Sequence[GroundTruth]]) -> float:
        """Mean over cameras of the on-car model's mAP on every frame (what never offloading publishes
        when the on-car model keeps up)."""
        return float(np.mean([
            map_of_matches([self.cached_match(int(scenario.frame_indices[f]), camera, scenario.fallback_config,
                                              ground_truths[camera][f]) for f in range(scenario.num_frames)])
            for camera in scenario.cameras]))
