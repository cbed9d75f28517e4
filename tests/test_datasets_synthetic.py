"""Synthetic driving scenes: determinism, resolutions, label validity, motion, the cached default."""

from __future__ import annotations

import numpy as np
import pytest

from avcloud.errors import UserError
from avcloud.types import ObjectType
from datasets import synthetic
from datasets.synthetic import CAMERA_SIZES, MIN_BOX_PX, render_camera


def test_render_is_deterministic_for_a_seed():
    image_a, truth_a = render_camera(11, 5, "FRONT")
    image_b, truth_b = render_camera(11, 5, "FRONT")
    assert np.array_equal(image_a, image_b)
    assert np.array_equal(truth_a.boxes_xyxy, truth_b.boxes_xyxy)
    other, _ = render_camera(12, 5, "FRONT")
    assert not np.array_equal(image_a, other)


@pytest.mark.parametrize("camera", sorted(CAMERA_SIZES))
def test_each_camera_has_its_waymo_resolution_and_valid_labels(camera):
    image, truth = render_camera(2, 30, camera)
    width, height = CAMERA_SIZES[camera]
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    boxes = truth.boxes_xyxy
    assert boxes.dtype == np.float32 and truth.classes.dtype == np.int32
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
    assert np.all(boxes[:, 2] - boxes[:, 0] >= MIN_BOX_PX) and np.all(boxes[:, 3] - boxes[:, 1] >= MIN_BOX_PX)


def test_front_camera_sees_all_classes_and_many_small_objects():
    classes, heights = [], []
    for seed in (0, 1):
        for frame_index in (0, 60, 120):
            _, truth = render_camera(seed, frame_index, "FRONT")
            classes.extend(truth.classes.tolist())
            heights.extend((truth.boxes_xyxy[:, 3] - truth.boxes_xyxy[:, 1]).tolist())
    assert {ObjectType.VEHICLE, ObjectType.PEDESTRIAN, ObjectType.SIGN, ObjectType.CYCLIST} <= set(classes)
    heights = np.array(heights)
    assert np.mean(heights < 30) > 0.4  # distant objects dominate
    assert np.any(heights > 150)  # and some are close


def test_labelled_objects_differ_from_background():
    """A labelled region is not just background: boxes sit on drawn objects."""
    image, truth = render_camera(4, 10, "FRONT")
    large = [box for box in truth.boxes_xyxy.astype(int) if (box[2] - box[0]) * (box[3] - box[1]) > 2000]
    assert large
    background = image[image.shape[0] - 40:, :, :].reshape(-1, 3).mean(axis=0)  # road surface near the car
    contrasts = [np.abs(image[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0) - background).max()
                 for x1, y1, x2, y2 in large]
    assert max(contrasts) > 15


def test_objects_move_consistently_between_frames():
    _, truth_a = render_camera(5, 40, "FRONT")
    _, truth_b = render_camera(5, 41, "FRONT")
    _, truth_far = render_camera(5, 90, "FRONT")
    assert not np.array_equal(truth_a.boxes_xyxy, truth_b.boxes_xyxy)
    # Consecutive frames share most objects at nearby positions; five seconds later they do not.
    def matched_fraction(a, b, tolerance_px=25.0):
        if len(a) == 0:
            return 0.0
        centres_a = (a.boxes_xyxy[:, :2] + a.boxes_xyxy[:, 2:]) / 2
        centres_b = (b.boxes_xyxy[:, :2] + b.boxes_xyxy[:, 2:]) / 2
        distances = np.linalg.norm(centres_a[:, None] - centres_b[None], axis=2)
        return float(np.mean(distances.min(axis=1) < tolerance_px))
    assert matched_fraction(truth_a, truth_b) > 0.8
    assert matched_fraction(truth_a, truth_far) < matched_fraction(truth_a, truth_b)


def test_unknown_camera_is_a_user_error():
    with pytest.raises(UserError, match="unknown camera 'REAR'"):
        render_camera(0, 0, "REAR")


def test_default_scene_is_generated_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_FRAMES", 2)
    calls = []
    original = synthetic.write_synthetic_scene

    def counting_write(*args, **kwargs):
        calls.append(kwargs.get("frames"))
        kwargs["workers"] = 1
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic_scene", counting_write)
    path = synthetic.default_scene_path(progress=False)
    assert path.parent == tmp_path / "scenes" and path.exists()
    assert synthetic.default_scene_path(progress=False) == path
    assert calls == [2]
    assert not list(path.parent.glob("*.partial"))


def test_interrupted_generation_leaves_no_file(tmp_path, monkeypatch):
    def failing_render(seed, frame_index, camera):
        if frame_index == 1:
            raise KeyboardInterrupt
        return original(seed, frame_index, camera)

    original = synthetic.render_camera
    monkeypatch.setattr(synthetic, "render_camera", failing_render)
    out = tmp_path / "scene.tfrecord"
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_scene(out, frames=3, cameras=("SIDE_LEFT",), progress=False, workers=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="frames"):
        synthetic.write_synthetic_scene(tmp_path / "x.tfrecord", frames=0, progress=False)
    with pytest.raises(UserError, match="unknown camera"):
        synthetic.write_synthetic_scene(tmp_path / "x.tfrecord", cameras=("BACK",), progress=False)


@pytest.mark.slow
def test_render_speed_is_interactive():
    import time

    render_camera(0, 0, "FRONT")
    start = time.perf_counter()
    for frame_index in range(10):
        render_camera(0, frame_index, "FRONT")
    assert (time.perf_counter() - start) / 10 < 0.25


def test_labels_drop_objects_hidden_behind_nearer_ones():
    owner = np.zeros((100, 100), dtype=np.uint16)  # half resolution of a 200 x 200 image
    owner[10:20, 10:20] = 2  # object 1 was drawn here first, then object 2 covered all of it
    owner[50:60, 50:60] = 3  # object 3: 100 pixels drawn, 40 still its own after object 4
    owner[50:60, 50:56] = 4
    labelled = [
        (np.array([20.0, 20.0, 40.0, 40.0]), int(ObjectType.PEDESTRIAN), 1, 100),
        (np.array([18.0, 18.0, 42.0, 42.0]), int(ObjectType.VEHICLE), 2, 150),
        (np.array([100.0, 100.0, 120.0, 120.0]), int(ObjectType.SIGN), 3, 100),
        (np.array([-10.0, 100.0, 112.0, 120.0]), int(ObjectType.VEHICLE), 4, 60),
        (np.array([150.0, 150.0, 153.0, 160.0]), int(ObjectType.SIGN), 5, 2),  # narrower than MIN_BOX_PX
    ]
    truth = synthetic._labels(labelled, owner, 6, 200, 200)
    assert truth.classes.tolist() == [ObjectType.VEHICLE, ObjectType.SIGN, ObjectType.VEHICLE]
    np.testing.assert_allclose(truth.boxes_xyxy[2], [0, 100, 112, 120])  # clipped to the image


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    serial = synthetic.write_synthetic_scene(tmp_path / "serial.tfrecord", seed=8, frames=2, cameras=("SIDE_RIGHT",),
                                             progress=False, workers=1)
    parallel = synthetic.write_synthetic_scene(tmp_path / "parallel.tfrecord", seed=8, frames=2,
                                               cameras=("SIDE_RIGHT",), progress=False, workers=2)
    assert serial.read_bytes() == parallel.read_bytes()
