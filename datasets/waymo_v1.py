"""Waymo Open Dataset v1 `Frame` records without the official package.

The message classes are built at import time from a FileDescriptorProto constructed here, the
same messages as datasets/waymo_frame.proto (a test keeps the two in agreement). They live in
their own descriptor pool so that the official `waymo_open_dataset` classes, when installed,
do not clash with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from avcloud.errors import DataError
from avcloud.types import GroundTruth, WaymoCamera

PROTO_PACKAGE = "avcloud.waymo_open_dataset"

_FieldSpec = tuple[str, int, str, str]  # name, number, label ("optional"/"repeated"), type
# Message name -> fields, exactly as in waymo_frame.proto.
MESSAGE_FIELDS: dict[str, tuple[_FieldSpec, ...]] = {
    "Frame": (
        ("context", 1, "optional", "Context"),
        ("timestamp_micros", 2, "optional", "int64"),
        ("images", 4, "repeated", "CameraImage"),
        ("camera_labels", 8, "repeated", "CameraLabels"),
    ),
    "Context": (
        ("name", 1, "optional", "string"),
        ("camera_calibrations", 2, "repeated", "CameraCalibration"),
    ),
    "CameraCalibration": (
        ("name", 1, "optional", "int32"),
        ("intrinsic", 2, "repeated", "double"),
        ("width", 4, "optional", "int32"),
        ("height", 5, "optional", "int32"),
    ),
    "CameraImage": (
        ("name", 1, "optional", "int32"),
        ("image", 2, "optional", "bytes"),
    ),
    "CameraLabels": (
        ("name", 1, "optional", "int32"),
        ("labels", 2, "repeated", "Label"),
    ),
    "Label": (
        ("box", 1, "optional", "Label.Box"),
        ("type", 3, "optional", "int32"),
        ("id", 4, "optional", "string"),
    ),
    "Label.Box": (
        ("center_x", 1, "optional", "double"),
        ("center_y", 2, "optional", "double"),
        ("center_z", 3, "optional", "double"),
        ("width", 4, "optional", "double"),
        ("length", 5, "optional", "double"),
        ("height", 6, "optional", "double"),
        ("heading", 7, "optional", "double"),
    ),
}

_SCALAR_TYPES = {
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
}


def _add_fields(message: descriptor_pb2.DescriptorProto, fields: tuple[_FieldSpec, ...]) -> None:
    for name, number, label, type_name in fields:
        field = message.field.add(name=name, number=number)
        field.label = (
            descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            if label == "repeated"
            else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        )
        if type_name in _SCALAR_TYPES:
            field.type = _SCALAR_TYPES[type_name]
        else:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
            field.type_name = f".{PROTO_PACKAGE}.{type_name}"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="avcloud/waymo_frame.proto", package=PROTO_PACKAGE, syntax="proto2"
    )
    for message_name, fields in MESSAGE_FIELDS.items():
        if "." in message_name:
            continue
        message = file_proto.message_type.add(name=message_name)
        _add_fields(message, fields)
        for nested_name, nested_fields in MESSAGE_FIELDS.items():
            if nested_name.startswith(message_name + "."):
                nested = message.nested_type.add(name=nested_name.split(".", 1)[1])
                _add_fields(nested, nested_fields)
    return file_proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def _message_class(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PROTO_PACKAGE}.{name}"))


Frame = _message_class("Frame")
Context = _message_class("Context")
CameraCalibration = _message_class("CameraCalibration")
CameraImage = _message_class("CameraImage")
CameraLabels = _message_class("CameraLabels")
Label = _message_class("Label")


@dataclass(frozen=True)
class CameraRecord:
    """One camera of a frame, as stored: JPEG bytes, image size (0 if unknown) and labels."""

    jpeg_bytes: bytes
    width: int
    height: int
    ground_truth: GroundTruth


def camera_name(number: int) -> str:
    try:
        return WaymoCamera(number).name
    except ValueError:
        return f"CAMERA_{number}"


def camera_number(name: str) -> int:
    try:
        return int(WaymoCamera[name])
    except KeyError:
        if name.startswith("CAMERA_") and name[7:].isdigit():
            return int(name[7:])
        raise DataError(f"unknown camera name '{name}'") from None


def decode_frame(data: bytes, source: str = "<bytes>", record_index: int = 0):
    """Parse one record as a Frame; DataError (one line) when it is not one."""
    frame = Frame()
    try:
        frame.ParseFromString(data)
    except DecodeError as error:
        raise DataError(f"{source}: record {record_index}: not a Frame ({error})") from None
    if not frame.HasField("context") and not frame.images and not frame.HasField("timestamp_micros"):
        raise DataError(f"{source}: record {record_index}: not a Frame (no context, timestamp or images)")
    return frame


def ground_truth_from_labels(labels) -> GroundTruth:
    """Waymo camera labels (centre, length along x, width along y, pixels) -> xyxy boxes."""
    count = len(labels)
    boxes = np.empty((count, 4), dtype=np.float32)
    classes = np.empty(count, dtype=np.int32)
    for i, label in enumerate(labels):
        box = label.box
        boxes[i] = (
            box.center_x - box.length / 2,
            box.center_y - box.width / 2,
            box.center_x + box.length / 2,
            box.center_y + box.width / 2,
        )
        classes[i] = label.type
    return GroundTruth(boxes_xyxy=boxes, classes=classes)


def frame_cameras(frame, cameras: set[str] | None = None) -> dict[str, CameraRecord]:
    """Per-camera JPEG bytes, size and ground truth of a decoded Frame, in camera-number order."""
    sizes = {
        calibration.name: (calibration.width, calibration.height)
        for calibration in frame.context.camera_calibrations
    }
    labels = {camera_labels.name: camera_labels.labels for camera_labels in frame.camera_labels}
    records: dict[str, CameraRecord] = {}
    for image in sorted(frame.images, key=lambda item: item.name):
        name = camera_name(image.name)
        if cameras is not None and name not in cameras:
            continue
        width, height = sizes.get(image.name, (0, 0))
        records[name] = CameraRecord(
            jpeg_bytes=image.image,
            width=width,
            height=height,
            ground_truth=ground_truth_from_labels(labels.get(image.name, ())),
        )
    return records


def encode_frame(
    context_name: str,
    timestamp_micros: int,
    cameras: Mapping[str, CameraRecord],
    intrinsics: Mapping[str, tuple[float, ...]] | None = None,
    label_id_prefix: str = "",
) -> bytes:
    """Serialise one Frame with the given cameras (images, calibrations and 2D labels)."""
    frame = Frame()
    frame.context.name = context_name
    frame.timestamp_micros = int(timestamp_micros)
    for name, record in cameras.items():
        number = camera_number(name)
        calibration = frame.context.camera_calibrations.add(name=number, width=record.width, height=record.height)
        if intrinsics and name in intrinsics:
            calibration.intrinsic.extend(intrinsics[name])
        frame.images.add(name=number, image=record.jpeg_bytes)
        camera_labels = frame.camera_labels.add(name=number)
        boxes = record.ground_truth.boxes_xyxy.astype(np.float64)
        for k, (box, object_type) in enumerate(zip(boxes, record.ground_truth.classes, strict=True)):
            label = camera_labels.labels.add(type=int(object_type), id=f"{label_id_prefix}{name}-{k}")
            label.box.center_x = (box[0] + box[2]) / 2
            label.box.center_y = (box[1] + box[3]) / 2
            label.box.length = box[2] - box[0]
            label.box.width = box[3] - box[1]
    return frame.SerializeToString()


def peek_timestamp_micros(prefix: bytes) -> int | None:
    """Frame.timestamp_micros from the first bytes of a serialised Frame, without parsing the rest.

    Walks the wire format (tag, then varint / fixed / length-delimited payload) until field 2
    appears; None if it is not within `prefix`. Serialisers write fields in number order, so
    the timestamp follows the small context message.
    """
    position = 0
    size = len(prefix)

    def varint(at: int) -> tuple[int, int] | None:
        value = 0
        shift = 0
        while at < size:
            byte = prefix[at]
            value |= (byte & 0x7F) << shift
            at += 1
            if not byte & 0x80:
                return value, at
            shift += 7
            if shift > 63:
                return None
        return None

    while position < size:
        decoded = varint(position)
        if decoded is None:
            return None
        tag, position = decoded
        field_number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            decoded = varint(position)
            if decoded is None:
                return None
            value, position = decoded
            if field_number == 2:
                return value - (1 << 64) if value >= 1 << 63 else value
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            decoded = varint(position)
            if decoded is None:
                return None
            length, position = decoded
            position += length
        else:
            return None
    return None
