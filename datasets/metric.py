"""Waymo-style 2D detection metric: AP per class, mAP over classes, per window of frames.

As in TURBO's evaluation: per class, detections over all images are ranked by score and
greedily matched (highest score first) to the unmatched ground-truth box of that class with
the highest IoU, if that IoU reaches the class threshold (0.7 for VEHICLE, 0.5 otherwise).
Precision is made monotone and sampled at 101 recall points (COCO interpolation); AP is their
mean. mAP is the mean AP over the classes that have ground truth; with no ground truth at all
it is NaN (there is nothing to measure, and 0 or 1 would both be misleading when averaged).
Detections of a class absent from the ground truth do not count, as in COCO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from avcloud.types import GroundTruth, ObjectType

IOU_THRESHOLDS: dict[ObjectType, float] = {
    ObjectType.VEHICLE: 0.7,
    ObjectType.PEDESTRIAN: 0.5,
    ObjectType.CYCLIST: 0.5,
    ObjectType.SIGN: 0.5,
}
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
EVALUATED_CLASSES: tuple[ObjectType, ...] = (
    ObjectType.VEHICLE, ObjectType.PEDESTRIAN, ObjectType.SIGN, ObjectType.CYCLIST
)


@dataclass(frozen=True)
class MapResult:
    """mAP (NaN with no ground truth), AP and ground-truth count per class name (classes with ground truth)."""

    map: float
    ap_per_class: dict[str, float]
    num_ground_truth: dict[str, int]
    num_detections: int = 0


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (areas as width * height, as COCO computes them)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    inter_w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    inter_h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    intersection = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, 0.0)
    return iou


def _match_image(det_boxes: np.ndarray, gt_boxes: np.ndarray, threshold: float) -> np.ndarray:
    """True-positive flags of detections (already in descending score order) against one image's boxes."""
    matched = np.zeros(len(det_boxes), dtype=bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return matched
    iou = pairwise_iou(det_boxes, gt_boxes)
    # Pairs below the threshold can never match; mark them so argmax skips them.
    iou[iou < min(threshold, 1 - 1e-10)] = -1.0
    best = iou.argmax(axis=1)
    candidates = np.flatnonzero(iou[np.arange(len(det_boxes)), best] >= 0)
    if np.unique(best[candidates]).size == candidates.size:
        # No two detections want the same box: greedy matching gives each its best one.
        matched[candidates] = True
        return matched
    gt_taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in candidates:
        row = np.where(gt_taken, -1.0, iou[d])
        g = int(row.argmax())
        if row[g] >= 0:
            gt_taken[g] = True
            matched[d] = True
    return matched


def average_precision(scores: np.ndarray, true_positive: np.ndarray, num_ground_truth: int) -> float:
    """101-point interpolated AP of ranked detections (COCO interpolation)."""
    if num_ground_truth == 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    hits = true_positive[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / num_ground_truth
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    # Monotone envelope from the right, then precision at the first rank reaching each recall point.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    ranks = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(ranks < len(precision), precision[np.minimum(ranks, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def evaluate(
    detections: Sequence[np.ndarray],
    ground_truths: Sequence[GroundTruth],
    iou_thresholds: dict[ObjectType, float] | None = None,
) -> MapResult:
    """AP per class and mAP over a sequence of images (detections[i] belongs to ground_truths[i])."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection arrays for {len(ground_truths)} ground truths")
    thresholds = IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds
    scores: dict[int, list[np.ndarray]] = {int(c): [] for c in thresholds}
    hits: dict[int, list[np.ndarray]] = {int(c): [] for c in thresholds}
    gt_counts: dict[int, int] = {int(c): 0 for c in thresholds}
    total_detections = 0
    for image_detections, truth in zip(detections, ground_truths, strict=True):
        dets = np.asarray(image_detections, dtype=np.float32).reshape(-1, 6)
        total_detections += len(dets)
        gt_classes = np.asarray(truth.classes)
        gt_boxes = np.asarray(truth.boxes_xyxy).reshape(-1, 4)
        det_classes = dets[:, 5].astype(np.int64)
        for object_class, threshold in thresholds.items():
            object_class = int(object_class)
            gt_of_class = gt_boxes[gt_classes == object_class]
            gt_counts[object_class] += len(gt_of_class)
            dets_of_class = dets[det_classes == object_class]
            if len(dets_of_class) == 0:
                continue
            order = np.argsort(-dets_of_class[:, 4], kind="mergesort")
            dets_of_class = dets_of_class[order]
            scores[object_class].append(dets_of_class[:, 4].astype(np.float64))
            hits[object_class].append(_match_image(dets_of_class[:, :4], gt_of_class, threshold))
    ap_per_class: dict[str, float] = {}
    num_ground_truth: dict[str, int] = {}
    for object_class in thresholds:
        count = gt_counts[int(object_class)]
        if count == 0:
            continue
        name = ObjectType(object_class).name
        class_scores = np.concatenate(scores[int(object_class)]) if scores[int(object_class)] else np.zeros(0)
        class_hits = np.concatenate(hits[int(object_class)]) if hits[int(object_class)] else np.zeros(0, bool)
        ap_per_class[name] = average_precision(class_scores, class_hits, count)
        num_ground_truth[name] = count
    mean_ap = float(np.mean(list(ap_per_class.values()))) if ap_per_class else math.nan
    return MapResult(map=mean_ap, ap_per_class=ap_per_class, num_ground_truth=num_ground_truth,
                     num_detections=total_detections)


def windowed_map(
    detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth], window_frames: int
) -> list[float]:
    """mAP of each consecutive window of `window_frames` images (the last window may be shorter)."""
    if window_frames < 1:
        raise ValueError(f"window_frames must be >= 1 (got {window_frames})")
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection arrays for {len(ground_truths)} ground truths")
    return [
        evaluate(detections[start:start + window_frames], ground_truths[start:start + window_frames]).map
        for start in range(0, len(detections), window_frames)
    ]


def evaluate_per_camera(
    detections: Mapping[str, Sequence[np.ndarray]], ground_truths: Mapping[str, Sequence[GroundTruth]]
) -> dict[str, MapResult]:
    """evaluate() separately for each camera (TURBO scores every camera's stream on its own)."""
    missing = sorted(set(ground_truths) - set(detections))
    if missing:
        raise ValueError(f"no detections for camera(s) {', '.join(missing)}")
    return {camera: evaluate(detections[camera], truths) for camera, truths in ground_truths.items()}
