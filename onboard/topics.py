"""The onboard node's topics, their messages and their expected rates, in one table.

Every topic is a ZeroMQ PUB/SUB multipart message `[topic, header JSON, body]`:
- camera (player -> node): header {frame_index, camera, timestamp_micros, width, height} and
  optionally capture_ms (when the frame was taken, in ms of the host's monotonic clock, the one
  `avcloud.clock.WallClock` reads; the node's latency budget starts there), body = JPEG bytes
  of the full camera image;
- detections (node -> recorder): header {frame_index, camera, source: "cloud"|"onboard",
  latency_ms, config, deadline_met}, body = float32 little-endian [N, 6] detections
  (x1, y1, x2, y2, score, class) in full-image pixels;
- heartbeat (node -> anyone): header {node, state, time_ms, frames, published, ...}, empty body.

Decoding is strict: a malformed message raises `TopicMessageError` naming the field, so a
subscriber can count and skip it instead of crashing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from avcloud.errors import DataError
from avcloud.types import DETECTION_COLUMNS

DETECTION_DTYPE = np.dtype("<f4")
SOURCES = ("cloud", "onboard")


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the node: its role, its name pattern, who publishes it and how often."""

    role: str
    direction: str  # "subscribe" or "publish", seen from the onboard node
    rate_hz: float  # expected message rate per topic instance (per camera for per-camera topics)
    per_camera: bool
    description: str


# The whole node on one screen. Names come from params.topics (`{camera}` expanded); rates of
# camera topics follow params.camera_rate_hz, listed here at the Waymo 10 Hz default.
TOPIC_TABLE: tuple[TopicSpec, ...] = (
    TopicSpec("camera", "subscribe", 10.0, True, "JPEG camera frames from the player / camera driver"),
    TopicSpec("detections", "publish", 10.0, True, "one result per camera per frame: cloud or onboard"),
    TopicSpec("heartbeat", "publish", 1.0, False, "node liveness, lifecycle state and counters"),
)


class TopicMessageError(DataError):
    """A topic message that does not follow the format above."""


def topic_name(pattern: str, camera: str | None = None) -> str:
    return pattern.replace("{camera}", camera) if camera is not None else pattern


@dataclass(frozen=True)
class CameraFrame:
    frame_index: int
    camera: str
    timestamp_micros: int
    width: int
    height: int
    jpeg: bytes | memoryview
    capture_ms: float | None = None  # host monotonic clock, ms; None: the node uses arrival time


@dataclass(frozen=True)
class DetectionResult:
    frame_index: int
    camera: str
    source: str  # "cloud" | "onboard"
    latency_ms: float  # publish time minus the frame's arrival at the node
    config: str  # configuration name that produced the detections
    deadline_met: bool
    detections: np.ndarray  # float32 [N, 6]

    def header(self) -> dict[str, Any]:
        return {"frame_index": self.frame_index, "camera": self.camera, "source": self.source,
                "latency_ms": round(float(self.latency_ms), 3), "config": self.config,
                "deadline_met": bool(self.deadline_met)}


def _header(frame: Any, what: str) -> dict[str, Any]:
    try:
        data = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError):
        raise TopicMessageError(f"{what}: header is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise TopicMessageError(f"{what}: header must be a JSON object")
    return data


def _int_field(data: dict[str, Any], name: str, what: str, minimum: int = 0) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TopicMessageError(f"{what}: field '{name}' must be an integer >= {minimum}")
    return value


def _str_field(data: dict[str, Any], name: str, what: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise TopicMessageError(f"{what}: field '{name}' must be a non-empty string")
    return value


def encode_camera_frame(topic: str, frame: CameraFrame) -> list[bytes | memoryview]:
    header = {"frame_index": frame.frame_index, "camera": frame.camera,
              "timestamp_micros": frame.timestamp_micros, "width": frame.width, "height": frame.height}
    if frame.capture_ms is not None:
        header["capture_ms"] = round(frame.capture_ms, 3)
    return [topic.encode(), json.dumps(header).encode(), frame.jpeg]


def decode_camera_frame(frames: list[Any]) -> CameraFrame:
    if len(frames) != 3:
        raise TopicMessageError(f"camera message: expected 3 frames [topic, header, jpeg], got {len(frames)}")
    what = "camera message"
    data = _header(frames[1], what)
    jpeg = frames[2]
    if len(jpeg) == 0:
        raise TopicMessageError(f"{what}: empty image")
    capture_ms = data.get("capture_ms")
    if capture_ms is not None and (isinstance(capture_ms, bool) or not isinstance(capture_ms, int | float)
                                   or not math.isfinite(capture_ms)):
        raise TopicMessageError(f"{what}: field 'capture_ms' must be a number")
    return CameraFrame(
        frame_index=_int_field(data, "frame_index", what),
        camera=_str_field(data, "camera", what),
        timestamp_micros=_int_field(data, "timestamp_micros", what),
        width=_int_field(data, "width", what, 1),
        height=_int_field(data, "height", what, 1),
        jpeg=jpeg,
        capture_ms=None if capture_ms is None else float(capture_ms),
    )


def encode_detection_result(topic: str, result: DetectionResult) -> list[bytes]:
    detections = np.ascontiguousarray(result.detections, dtype=DETECTION_DTYPE).reshape(-1, DETECTION_COLUMNS)
    return [topic.encode(), json.dumps(result.header()).encode(), detections.tobytes()]


def decode_detection_result(frames: list[Any]) -> DetectionResult:
    what = "detections message"
    if len(frames) != 3:
        raise TopicMessageError(f"{what}: expected 3 frames [topic, header, detections], got {len(frames)}")
    data = _header(frames[1], what)
    source = data.get("source")
    if source not in SOURCES:
        raise TopicMessageError(f"{what}: field 'source' must be one of {', '.join(SOURCES)}")
    latency_ms = data.get("latency_ms")
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, int | float) or not math.isfinite(latency_ms):
        raise TopicMessageError(f"{what}: field 'latency_ms' must be a number")
    deadline_met = data.get("deadline_met")
    if not isinstance(deadline_met, bool):
        raise TopicMessageError(f"{what}: field 'deadline_met' must be a boolean")
    body = bytes(frames[2])
    row_bytes = DETECTION_COLUMNS * DETECTION_DTYPE.itemsize
    if len(body) % row_bytes:
        raise TopicMessageError(f"{what}: detections are {len(body)} bytes, not a multiple of {row_bytes}")
    detections = np.frombuffer(body, dtype=DETECTION_DTYPE).reshape(-1, DETECTION_COLUMNS).astype(np.float32)
    return DetectionResult(
        frame_index=_int_field(data, "frame_index", what),
        camera=_str_field(data, "camera", what),
        source=source,
        latency_ms=float(latency_ms),
        config=_str_field(data, "config", what),
        deadline_met=deadline_met,
        detections=detections,
    )


def encode_heartbeat(topic: str, status: dict[str, Any]) -> list[bytes]:
    return [topic.encode(), json.dumps(status).encode(), b""]


class TopicMonitor:
    """Liveness from message age: a topic is alive while its last message is younger than
    `dead_after_periods` expected periods (openpilot's SubMaster idea)."""

    def __init__(self, rates_hz: dict[str, float], dead_after_periods: float = 3.0) -> None:
        self.rates_hz = dict(rates_hz)
        self.dead_after_periods = dead_after_periods
        self.last_ms: dict[str, float] = {}
        self.counts: dict[str, int] = dict.fromkeys(rates_hz, 0)

    def update(self, topic: str, now_ms: float) -> None:
        self.last_ms[topic] = now_ms
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def age_ms(self, topic: str, now_ms: float) -> float:
        last = self.last_ms.get(topic)
        return math.inf if last is None else now_ms - last

    def alive(self, topic: str, now_ms: float) -> bool:
        period_ms = 1000.0 / self.rates_hz[topic]
        return self.age_ms(topic, now_ms) <= self.dead_after_periods * period_ms

    def dead_topics(self, now_ms: float) -> list[str]:
        return [topic for topic in self.rates_hz if not self.alive(topic, now_ms)]
