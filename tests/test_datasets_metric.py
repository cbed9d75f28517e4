"""Waymo-style 2D AP: behaviour on clear cases and agreement with pycocotools at one IoU threshold."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from avcloud.types import GroundTruth, ObjectType
from datasets.metric import IOU_THRESHOLDS, evaluate, evaluate_per_camera, pairwise_iou, windowed_map

V, P, S, C = (int(ObjectType.VEHICLE), int(ObjectType.PEDESTRIAN), int(ObjectType.SIGN), int(ObjectType.CYCLIST))


def _truth(boxes, classes):
    return GroundTruth(np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int32))


def _dets(rows):
    return np.array(rows, np.float32).reshape(-1, 6)


def test_thresholds_are_the_waymo_ones():
    assert IOU_THRESHOLDS == {ObjectType.VEHICLE: 0.7, ObjectType.PEDESTRIAN: 0.5,
                              ObjectType.CYCLIST: 0.5, ObjectType.SIGN: 0.5}


def test_iou():
    iou = pairwise_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])


def test_perfect_detections_score_one_and_none_score_zero():
    truth = _truth([[0, 0, 50, 30], [100, 100, 110, 130]], [V, P])
    perfect = _dets([[0, 0, 50, 30, 0.9, V], [100, 100, 110, 130, 0.8, P]])
    result = evaluate([perfect], [truth])
    assert result.map == 1.0
    assert result.ap_per_class == {"VEHICLE": 1.0, "PEDESTRIAN": 1.0}
    assert result.num_ground_truth == {"VEHICLE": 1, "PEDESTRIAN": 1}
    assert evaluate([_dets([])], [truth]).map == 0.0


def test_vehicle_needs_iou_07_pedestrian_05():
    # A box shifted so IoU = 0.6 with its ground truth.
    truth = _truth([[0, 0, 100, 100], [0, 0, 100, 100]], [V, P])
    shift = 25.0  # IoU = 75*100 / (2*100*100 - 7500) = 0.6
    dets = _dets([[shift, 0, 100 + shift, 100, 0.9, V], [shift, 0, 100 + shift, 100, 0.9, P]])
    result = evaluate([dets], [truth])
    assert result.ap_per_class["VEHICLE"] == 0.0
    assert result.ap_per_class["PEDESTRIAN"] == 1.0
    assert result.map == 0.5


def test_one_detection_matches_one_ground_truth():
    truth = _truth([[0, 0, 10, 10]], [S])
    duplicate = _dets([[0, 0, 10, 10, 0.9, S], [0, 0, 10, 10, 0.8, S]])
    # Recall 1 at rank 1 with precision 1; the duplicate is a false positive after it.
    assert evaluate([duplicate], [truth]).map == 1.0
    ranked_wrong = _dets([[0, 0, 10, 10, 0.5, S], [50, 50, 60, 60, 0.9, S]])
    assert evaluate([ranked_wrong], [truth]).map == pytest.approx(0.5)


def test_classes_without_ground_truth_do_not_count_and_no_truth_is_nan():
    truth = _truth([[0, 0, 10, 10]], [C])
    dets = _dets([[0, 0, 10, 10, 0.9, C], [30, 30, 40, 40, 0.9, V]])
    result = evaluate([dets], [truth])
    assert result.ap_per_class == {"CYCLIST": 1.0}
    assert math.isnan(evaluate([dets], [_truth([], [])]).map)


def test_windowed_map():
    truth = _truth([[0, 0, 10, 10]], [P])
    hit, miss = _dets([[0, 0, 10, 10, 0.9, P]]), _dets([])
    values = windowed_map([hit, hit, miss, miss, hit], [truth] * 5, window_frames=2)
    assert values == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        windowed_map([hit], [truth], 0)


def test_per_camera_results_are_independent():
    truth = _truth([[0, 0, 10, 10]], [P])
    hit, miss = _dets([[0, 0, 10, 10, 0.9, P]]), _dets([])
    results = evaluate_per_camera({"FRONT": [hit, hit], "SIDE_LEFT": [miss, hit]},
                                  {"FRONT": [truth, truth], "SIDE_LEFT": [truth, truth]})
    assert results["FRONT"].map == 1.0
    assert results["SIDE_LEFT"].map == pytest.approx(51 / 101)  # recall 0.5 at precision 1: points 0..0.5
    with pytest.raises(ValueError, match="SIDE_RIGHT"):
        evaluate_per_camera({}, {"SIDE_RIGHT": [truth]})


def _random_case(seed, images=40):
    rng = np.random.default_rng(seed)
    detections, truths = [], []
    for _ in range(images):
        count = int(rng.integers(0, 12))
        corner = rng.uniform(0, 800, (count, 2))
        size = rng.uniform(6, 120, (count, 2))
        boxes = np.hstack([corner, corner + size])
        classes = rng.choice([V, P, S, C], count)
        truths.append(_truth(boxes, classes))
        keep = rng.random(count) < 0.85
        jitter = rng.normal(0, 0.12, (count, 4)) * np.hstack([size, size])
        moved = boxes + jitter
        moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1.0)
        found = np.column_stack([moved[keep], rng.random(keep.sum()), classes[keep]])
        extra = int(rng.integers(0, 5))
        corner = rng.uniform(0, 800, (extra, 2))
        spurious = np.column_stack([corner, corner + rng.uniform(6, 120, (extra, 2)), rng.random(extra),
                                    rng.choice([V, P, S, C], extra)])
        detections.append(_dets(np.vstack([found, spurious])))
    return detections, truths


def _coco_ap(detections, truths, threshold):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image_id, (dets, truth) in enumerate(zip(detections, truths, strict=True)):
        for box, object_class in zip(truth.boxes_xyxy.astype(float), truth.classes, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(object_class),
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for row in dets.astype(float):
            results.append({"image_id": image_id, "category_id": int(row[5]), "score": row[4],
                            "bbox": [row[0], row[1], row[2] - row[0], row[3] - row[1]]})
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in range(len(truths))], "annotations": annotations,
                    "categories": [{"id": c} for c in (V, P, S, C)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.params.iouThrs = np.array([threshold])
        evaluation.params.maxDets = [10_000]
        evaluation.params.areaRng = [[0, 1e12]]
        evaluation.params.areaRngLbl = ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, :, 0, 0]  # [recall point, class]
    return {ObjectType(c).name: float(precision[:, k].mean()) for k, c in enumerate(evaluation.params.catIds)
            if (precision[:, k] > -1).all()}


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.5), (1, 0.7), (2, 0.6)])
def test_agrees_with_pycocotools_at_one_threshold(seed, threshold):
    pytest.importorskip("pycocotools")
    detections, truths = _random_case(seed)
    ours = evaluate(detections, truths, {object_type: threshold for object_type in IOU_THRESHOLDS})
    theirs = _coco_ap(detections, truths, threshold)
    assert set(ours.ap_per_class) == set(theirs)
    for name, value in theirs.items():
        assert ours.ap_per_class[name] == pytest.approx(value, abs=1e-6)
    assert 0.0 < ours.map < 1.0
