"""The scene API over Waymo v1 tfrecords and v2 parquet directories, on synthetic scenes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from avcloud.errors import DataError
from avcloud.types import ALL_CAMERAS, GroundTruth, ObjectType
from datasets import waymo_v1
from datasets.scene import jpeg_size, open_scene
from datasets.synthetic import CAMERA_SIZES, render_camera, write_synthetic_scene
from datasets.tfrecord import TFRecordWriter
from datasets.waymo_v2 import WaymoV2Scene, write_v2_scene

FRAMES = 4


@pytest.fixture(scope="module")
def v1_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "synthetic.tfrecord"
    return write_synthetic_scene(path, seed=3, frames=FRAMES, progress=False, workers=1)


@pytest.fixture(scope="module")
def v2_dir(v1_path, tmp_path_factory):
    return write_v2_scene(open_scene(v1_path), tmp_path_factory.mktemp("v2") / "waymo_v2", frames_per_row_group=3)


def test_v1_scene_reports_cameras_rate_and_duration(v1_path):
    scene = open_scene(v1_path)
    assert scene.format == "waymo-v1"
    assert scene.cameras == ALL_CAMERAS
    assert scene.num_frames == FRAMES
    assert scene.frame_rate_hz == pytest.approx(10.0)
    assert scene.duration_s == pytest.approx(FRAMES / 10.0)
    assert "seed3" in scene.name


def test_v1_frames_hold_the_rendered_images_and_exact_labels(v1_path):
    scene = open_scene(v1_path)
    frames = list(scene.frames())
    assert [frame.index for frame in frames] == list(range(FRAMES))
    timestamps = [frame.timestamp_micros for frame in frames]
    assert np.all(np.diff(timestamps) == 100_000)
    frame = frames[2]
    for camera in ALL_CAMERAS:
        image = frame.cameras[camera]
        assert (image.width, image.height) == CAMERA_SIZES[camera]
        rendered, truth = render_camera(3, 2, camera)
        decoded = image.image_bgr()
        assert decoded.shape == rendered.shape
        # JPEG at quality 95: close to the rendered pixels, not identical.
        assert np.abs(decoded.astype(int) - rendered.astype(int)).mean() < 4.0
        np.testing.assert_allclose(image.ground_truth.boxes_xyxy, truth.boxes_xyxy, atol=1e-3)
        assert image.ground_truth.classes.tolist() == truth.classes.tolist()


def test_random_access_and_camera_filter(v1_path):
    scene = open_scene(v1_path)
    streamed = list(scene.frames(["FRONT", "SIDE_RIGHT"]))
    assert all(list(frame.cameras) == ["FRONT", "SIDE_RIGHT"] for frame in streamed)
    direct = scene.frame(3)
    assert direct.timestamp_micros == streamed[3].timestamp_micros
    assert direct.cameras["FRONT"].jpeg_bytes == streamed[3].cameras["FRONT"].jpeg_bytes
    assert scene.frame(-1).index == FRAMES - 1
    with pytest.raises(IndexError):
        scene.frame(FRAMES)
    with pytest.raises(DataError, match="no camera REAR"):
        list(scene.frames(["REAR"]))


def test_v2_directory_reads_the_same_scene(v1_path, v2_dir):
    v1, v2 = open_scene(v1_path), open_scene(v2_dir)
    assert v2.format == "waymo-v2"
    assert (v2.name, v2.cameras, v2.num_frames) == (v1.name, v1.cameras, v1.num_frames)
    assert v2.frame_rate_hz == pytest.approx(v1.frame_rate_hz)
    for a, b in zip(v1.frames(), v2.frames(), strict=True):
        assert a.timestamp_micros == b.timestamp_micros
        assert list(a.cameras) == list(b.cameras)
        for camera in a.cameras:
            x, y = a.cameras[camera], b.cameras[camera]
            assert x.jpeg_bytes == y.jpeg_bytes
            assert (x.width, x.height) == (y.width, y.height)
            np.testing.assert_allclose(x.ground_truth.boxes_xyxy, y.ground_truth.boxes_xyxy, atol=1e-3)
            assert x.ground_truth.classes.tolist() == y.ground_truth.classes.tolist()
    only_side = list(v2.frames(["SIDE_LEFT"]))
    assert all(list(frame.cameras) == ["SIDE_LEFT"] for frame in only_side)
    assert v2.frame(2).cameras["FRONT"].jpeg_bytes == v1.frame(2).cameras["FRONT"].jpeg_bytes


def test_v2_without_calibration_takes_sizes_from_the_jpeg(v2_dir, tmp_path):
    import shutil

    copy = tmp_path / "no_calibration"
    shutil.copytree(v2_dir, copy)
    shutil.rmtree(copy / "camera_calibration")
    frame = WaymoV2Scene(copy).frame(0)
    assert (frame.cameras["SIDE_LEFT"].width, frame.cameras["SIDE_LEFT"].height) == (1920, 886)


def test_frames_come_in_time_order_whatever_the_file_order(tmp_path):
    path = tmp_path / "shuffled.tfrecord"
    empty = GroundTruth(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    timestamps = [300_000, 100_000, 200_000, 0]
    with TFRecordWriter(path) as writer:
        for timestamp in timestamps:
            writer.write(waymo_v1.encode_frame("seg", timestamp, {"FRONT": waymo_v1.CameraRecord(jpeg, 8, 8, empty)}))
    scene = open_scene(path)
    assert [frame.timestamp_micros for frame in scene.frames()] == sorted(timestamps)
    assert scene.frame(1).timestamp_micros == 100_000


def test_jpeg_size_reads_the_header():
    jpeg = cv2.imencode(".jpg", np.zeros((37, 53, 3), np.uint8))[1].tobytes()
    assert jpeg_size(jpeg) == (53, 37)
    assert jpeg_size(b"not a jpeg") == (0, 0)


def test_open_scene_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_scene(tmp_path / "absent.tfrecord")
    with pytest.raises(DataError, match="not a Waymo v2 directory"):
        open_scene(tmp_path)
    short = tmp_path / "short.tfrecord"
    short.write_bytes(b"abc")
    with pytest.raises(DataError, match="too short"):
        open_scene(short)
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="garbage.tfrecord: record 0"):
        open_scene(garbage)


def test_label_classes_are_object_types(v1_path):
    classes = np.concatenate([image.ground_truth.classes for frame in open_scene(v1_path).frames()
                              for image in frame.cameras.values()])
    assert set(classes.tolist()) <= {int(t) for t in ObjectType if t != ObjectType.UNKNOWN}


def test_v2_missing_columns_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "camera_image").mkdir()
    pq.write_table(pa.table({"key.frame_timestamp_micros": [1]}), tmp_path / "camera_image" / "seg.parquet")
    with pytest.raises(DataError, match=r"seg.parquet: missing column\(s\) key.camera_name, \[CameraImageComponent\].image"):
        open_scene(tmp_path)
    (tmp_path / "camera_image" / "seg.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        open_scene(tmp_path)
