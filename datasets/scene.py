"""One scene API over Waymo v1 tfrecords, Waymo v2 parquet directories and synthetic scenes.

A scene is a time-ordered sequence of frames; each frame holds, per camera, the JPEG bytes
(decoded only when asked), the image size and the ground-truth 2D boxes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avcloud.errors import DataError
from avcloud.types import GroundTruth
from datasets import waymo_v1
from datasets.tfrecord import HEADER_BYTES, TFRecordReader

DEFAULT_FRAME_RATE_HZ = 10.0
# Enough of a record to hold Frame.context (calibrations) and the timestamp after it.
_TIMESTAMP_PEEK_BYTES = 64 * 1024


@dataclass(frozen=True)
class CameraImage:
    """One camera's image in one frame."""

    camera: str
    width: int
    height: int
    jpeg_bytes: bytes
    ground_truth: GroundTruth

    def image_bgr(self) -> np.ndarray:
        """The decoded image (BGR uint8); DataError if the bytes are not a decodable image."""
        image = cv2.imdecode(np.frombuffer(self.jpeg_bytes, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"camera {self.camera}: image bytes ({len(self.jpeg_bytes)} bytes) are not a decodable JPEG")
        return image


@dataclass(frozen=True)
class SceneFrame:
    index: int
    timestamp_micros: int
    cameras: dict[str, CameraImage]


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker, without decoding; (0, 0) if absent."""
    position = 2
    size = len(data)
    if data[:2] != b"\xff\xd8":
        return 0, 0
    while position + 4 <= size:
        if data[position] != 0xFF:
            position += 1
            continue
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if position + 9 > size:
                return 0, 0
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return int(width), int(height)
        position += 2 + length
    return 0, 0


class Scene:
    """A driving segment: frames in time order, each with per-camera images and labels."""

    name: str
    format: str
    cameras: tuple[str, ...]
    frame_rate_hz: float
    num_frames: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.frame_rate_hz if self.frame_rate_hz > 0 else 0.0

    def frames(self, cameras: Sequence[str] | None = None) -> Iterator[SceneFrame]:
        raise NotImplementedError

    def frame(self, index: int) -> SceneFrame:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_frames

    def _check_cameras(self, cameras: Sequence[str] | None) -> set[str] | None:
        if cameras is None:
            return None
        unknown = [camera for camera in cameras if camera not in self.cameras]
        if unknown:
            raise DataError(
                f"{self.name}: no camera {', '.join(unknown)} in this scene (it has {', '.join(self.cameras)})"
            )
        return set(cameras)

    def _check_index(self, index: int) -> int:
        if not -self.num_frames <= index < self.num_frames:
            raise IndexError(f"{self.name}: frame {index} out of range (scene has {self.num_frames} frames)")
        return index % self.num_frames


def frame_rate_from_timestamps(timestamps_micros: Sequence[int]) -> float:
    """Frame rate from the median spacing of timestamps; 10 Hz (Waymo's rate) for a single frame."""
    if len(timestamps_micros) < 2:
        return DEFAULT_FRAME_RATE_HZ
    spacing = float(np.median(np.diff(np.asarray(sorted(timestamps_micros), dtype=np.int64))))
    return 1e6 / spacing if spacing > 0 else DEFAULT_FRAME_RATE_HZ


class WaymoV1Scene(Scene):
    """A Waymo v1 segment: one .tfrecord of Frame records, read one record at a time."""

    format = "waymo-v1"

    def __init__(self, path: str | Path, verify_crc: bool = True) -> None:
        self.path = Path(path)
        self._reader = TFRecordReader(self.path, verify_crc=verify_crc)
        offsets = self._reader.index
        if not offsets:
            raise DataError(f"{self.path}: no records (empty file)")
        # Time order: read each record's timestamp from its first bytes (cheap), sort by it.
        timestamps = []
        with open(self.path, "rb") as handle:
            for record_index, offset in enumerate(offsets):
                handle.seek(offset + HEADER_BYTES)
                timestamp = waymo_v1.peek_timestamp_micros(handle.read(_TIMESTAMP_PEEK_BYTES))
                if timestamp is None:
                    timestamp = waymo_v1.decode_frame(self._reader.read(record_index), str(self.path),
                                                      record_index).timestamp_micros
                timestamps.append(timestamp)
        self._order = sorted(range(len(offsets)), key=lambda i: (timestamps[i], i))
        self._timestamps = [timestamps[i] for i in self._order]
        first = waymo_v1.decode_frame(self._reader.read(self._order[0]), str(self.path), self._order[0])
        self.name = first.context.name or self.path.stem
        self.cameras = tuple(waymo_v1.frame_cameras(first).keys())
        self.num_frames = len(offsets)
        self.frame_rate_hz = frame_rate_from_timestamps(self._timestamps)

    def _scene_frame(self, index: int, data: bytes, record_index: int, cameras: set[str] | None) -> SceneFrame:
        frame = waymo_v1.decode_frame(data, str(self.path), record_index)
        records = waymo_v1.frame_cameras(frame, cameras)
        images = {}
        for name, record in records.items():
            width, height = record.width, record.height
            if not width or not height:
                width, height = jpeg_size(record.jpeg_bytes)
            images[name] = CameraImage(name, width, height, record.jpeg_bytes, record.ground_truth)
        return SceneFrame(index=index, timestamp_micros=int(frame.timestamp_micros), cameras=images)

    def frames(self, cameras: Sequence[str] | None = None) -> Iterator[SceneFrame]:
        wanted = self._check_cameras(cameras)
        if self._order == sorted(self._order):
            # File order is time order (always so for Waymo segments): one sequential pass.
            for index, (record_index, data) in enumerate(self._reader.records()):
                yield self._scene_frame(index, data, record_index, wanted)
        else:
            for index, record_index in enumerate(self._order):
                yield self._scene_frame(index, self._reader.read(record_index), record_index, wanted)

    def frame(self, index: int) -> SceneFrame:
        index = self._check_index(index)
        record_index = self._order[index]
        return self._scene_frame(index, self._reader.read(record_index), record_index, None)


def open_scene(path: str | Path, verify_crc: bool = True) -> Scene:
    """Open a Waymo v1 .tfrecord file or a Waymo v2 directory (camera_image/, camera_box/)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        from datasets.waymo_v2 import WaymoV2Scene  # waymo_v2 builds on this module

        return WaymoV2Scene(path)
    with open(path, "rb") as handle:
        head = handle.read(12)
    if len(head) < 12:
        raise DataError(f"{path}: not a Waymo scene (too short for a TFRecord: {len(head)} bytes)")
    if head[:4] == b"PAR1":
        raise DataError(f"{path}: a single parquet file; open the Waymo v2 directory that holds camera_image/")
    return WaymoV1Scene(path, verify_crc=verify_crc)
