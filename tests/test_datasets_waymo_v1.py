"""Waymo v1 Frame decoding: field numbers of the public schema, the .proto source of truth, roundtrips."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from avcloud.errors import DataError
from avcloud.types import GroundTruth, ObjectType
from datasets import waymo_v1

PROTO_PATH = Path(waymo_v1.__file__).with_name("waymo_frame.proto")


# -- a minimal protobuf wire encoder, independent of the protobuf library
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _tag(field, 0) + _varint(value)


def _double(field: int, value: float) -> bytes:
    return _tag(field, 1) + struct.pack("<d", value)


def _bytes(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(payload)) + payload


def _official_layout_frame() -> bytes:
    """A Frame laid out with the field numbers of waymo_open_dataset/dataset.proto and label.proto,
    including fields we do not model (pose, lasers, metadata), which must be ignored."""
    calibration = _int(1, 1) + _double(2, 2055.0) + _double(2, 2055.0) + _int(4, 1920) + _int(5, 1280) + _int(6, 1)
    context = _bytes(1, b"segment-123") + _bytes(2, calibration) + _bytes(4, b"\x08\x01")  # 4 = Context.stats
    box = _double(1, 500.0) + _double(2, 300.0) + _double(4, 40.0) + _double(5, 100.0)
    label = _bytes(1, box) + _bytes(2, b"\x08\x02") + _int(3, 1) + _bytes(4, b"obj-1")  # 2 = metadata
    box2 = _double(1, 10.0) + _double(2, 20.0) + _double(4, 8.0) + _double(5, 6.0)
    label2 = _bytes(1, box2) + _int(3, 2) + _bytes(4, b"obj-2")
    camera_labels = _int(1, 1) + _bytes(2, label) + _bytes(2, label2)
    image = _int(1, 1) + _bytes(2, b"\xff\xd8jpeg-bytes") + _double(5, 12.5)  # 5 = pose_timestamp
    return (
        _bytes(1, context)
        + _int(2, 1_557_000_000_123_456)
        + _bytes(3, b"\x0a\x00")  # Frame.pose
        + _bytes(4, image)
        + _bytes(5, b"\x08\x01")  # Frame.lasers
        + _bytes(8, camera_labels)
    )


def test_decodes_a_frame_laid_out_with_the_public_schema():
    frame = waymo_v1.decode_frame(_official_layout_frame())
    assert frame.context.name == "segment-123"
    assert frame.timestamp_micros == 1_557_000_000_123_456
    calibration = frame.context.camera_calibrations[0]
    assert (calibration.name, calibration.width, calibration.height) == (1, 1920, 1280)
    assert list(calibration.intrinsic) == [2055.0, 2055.0]
    cameras = waymo_v1.frame_cameras(frame)
    assert list(cameras) == ["FRONT"]
    front = cameras["FRONT"]
    assert front.jpeg_bytes == b"\xff\xd8jpeg-bytes"
    assert (front.width, front.height) == (1920, 1280)
    # length is the extent along x, width along y.
    np.testing.assert_allclose(front.ground_truth.boxes_xyxy, [[450, 280, 550, 320], [7, 16, 13, 24]])
    assert front.ground_truth.classes.tolist() == [ObjectType.VEHICLE, ObjectType.PEDESTRIAN]
    assert frame.camera_labels[0].labels[0].id == "obj-1"
    # Unknown fields survive a re-serialisation, so nothing of an official frame is lost.
    assert len(frame.SerializeToString()) == len(_official_layout_frame())


def test_peek_timestamp_reads_it_without_parsing_images():
    data = _official_layout_frame()
    assert waymo_v1.peek_timestamp_micros(data[:200]) == 1_557_000_000_123_456
    assert waymo_v1.peek_timestamp_micros(data[:10]) is None


def _proto_fields(text: str) -> dict[str, set[tuple[str, int, str, str]]]:
    """message name (nested as Outer.Inner) -> {(field name, number, label, type)} parsed from .proto text."""
    text = re.sub(r"//[^\n]*", "", text)
    fields: dict[str, set] = {}
    stack: list[str] = []
    for token in re.finditer(r"message\s+(\w+)\s*\{|\}|(optional|repeated)\s+([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", text):
        if token.group(1):
            stack.append(token.group(1))
            fields.setdefault(".".join(stack), set())
        elif token.group(0) == "}":
            stack.pop()
        else:
            label, type_name, name, number = token.group(2, 3, 4, 5)
            if type_name == "Box" and stack[-1] == "Label":
                type_name = "Label.Box"
            fields[".".join(stack)].add((name, int(number), label, type_name))
    return fields


def test_python_descriptor_agrees_with_the_proto_file():
    from_proto = _proto_fields(PROTO_PATH.read_text())
    from_python = {name: set(fields) for name, fields in waymo_v1.MESSAGE_FIELDS.items()}
    assert from_proto == from_python
    # And the generated classes carry exactly those numbers.
    assert {f.name: f.number for f in waymo_v1.Frame.DESCRIPTOR.fields} == {
        "context": 1, "timestamp_micros": 2, "images": 4, "camera_labels": 8
    }


def test_encode_decode_roundtrip():
    truth = GroundTruth(np.array([[10.5, 20.25, 110.5, 70.25], [0, 0, 4, 9]], np.float32),
                        np.array([ObjectType.CYCLIST, ObjectType.SIGN], np.int32))
    empty = GroundTruth(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    data = waymo_v1.encode_frame("seg", 42, {
        "SIDE_LEFT": waymo_v1.CameraRecord(b"left", 1920, 886, truth),
        "FRONT": waymo_v1.CameraRecord(b"front", 1920, 1280, empty),
    })
    frame = waymo_v1.decode_frame(data)
    cameras = waymo_v1.frame_cameras(frame)
    assert list(cameras) == ["FRONT", "SIDE_LEFT"]  # camera-number order
    assert cameras["SIDE_LEFT"].jpeg_bytes == b"left" and cameras["SIDE_LEFT"].height == 886
    np.testing.assert_allclose(cameras["SIDE_LEFT"].ground_truth.boxes_xyxy, truth.boxes_xyxy, atol=1e-4)
    assert cameras["SIDE_LEFT"].ground_truth.classes.tolist() == truth.classes.tolist()
    assert len(cameras["FRONT"].ground_truth) == 0
    assert list(waymo_v1.frame_cameras(frame, {"FRONT"})) == ["FRONT"]


def test_non_frame_records_are_reported():
    with pytest.raises(DataError, match=r"src: record 7: not a Frame"):
        waymo_v1.decode_frame(b"\xff\xff\xff\xff", "src", 7)
    with pytest.raises(DataError, match=r"record 0: not a Frame"):
        waymo_v1.decode_frame(b"")


def test_official_waymo_classes_decode_identically():
    dataset_pb2 = pytest.importorskip("waymo_open_dataset.dataset_pb2")
    official = dataset_pb2.Frame()
    official.ParseFromString(_official_layout_frame())
    ours = waymo_v1.decode_frame(official.SerializeToString())
    assert ours.timestamp_micros == official.timestamp_micros
    assert ours.context.name == official.context.name
    assert ours.context.camera_calibrations[0].width == official.context.camera_calibrations[0].width
    assert ours.camera_labels[0].labels[0].box.length == official.camera_labels[0].labels[0].box.length
    assert ours.camera_labels[0].labels[0].box.width == official.camera_labels[0].labels[0].box.width
    # And frames we write parse with the official classes.
    back = dataset_pb2.Frame()
    back.ParseFromString(ours.SerializeToString())
    assert back.images[0].image == official.images[0].image
