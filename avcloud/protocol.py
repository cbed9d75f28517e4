"""The car <-> cloud wire protocol: pure encode/decode of request and reply frames, no sockets.

docs/PROTOCOL.md is the normative description; this module implements it. A car's DEALER
sends `[header, payload]` to the cloud's ROUTER; the cloud answers `[header, detections]`.
Headers are UTF-8 JSON objects. Payloads travel untouched (zero-copy on both ends).

Every way a received message can be malformed raises `ProtocolError` with a one-line reason;
nothing else escapes `decode_request` / `decode_reply` for any input bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avcloud.types import DETECTION_COLUMNS

PROTOCOL_VERSION = 1

# Request kinds ("type" field).
INFER = "infer"
PING = "ping"
# Reply kinds.
RESULT = "result"
PONG = "pong"

# Reply statuses.
OK = "ok"
EXPIRED = "expired"
REJECTED = "rejected"
ERROR = "error"
STATUSES: tuple[str, ...] = (OK, EXPIRED, REJECTED, ERROR)

# Image codecs of the payload. "raw" is uint8 BGR, row-major, exactly h*w*3 bytes.
CODECS: tuple[str, ...] = ("jpeg", "png", "raw")

MAX_HEADER_BYTES = 4096
MAX_NAME_CHARS = 128
MAX_IMAGE_SIDE_PX = 16384
MAX_BUDGET_MS = 600_000.0
MAX_REQUEST_ID = 2**63 - 1
MAX_DETECTIONS = 100_000

DETECTION_DTYPE = np.dtype("<f4")
DETECTION_ROW_BYTES = DETECTION_COLUMNS * DETECTION_DTYPE.itemsize

RequestId = int | str


class ProtocolError(ValueError):
    """A message that does not follow the protocol. `reason` is one line naming what is wrong.

    `request_id` and `vehicle` are filled in when they could be read from the header, so an
    error reply can still be matched by the sender.
    """

    def __init__(self, reason: str, request_id: RequestId | None = None, vehicle: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        self.vehicle = vehicle


@dataclass(frozen=True)
class RequestHeader:
    """Header of a request. For `kind == "ping"` only vehicle and request_id are meaningful."""

    vehicle: str
    request_id: RequestId
    task: str = ""
    frame: int = 0
    model: str = ""
    codec: str = "raw"
    shape: tuple[int, int, int] = (0, 0, 3)  # (height, width, 3) of the encoded image
    budget_ms: float = 0.0  # remaining latency budget at send time
    frame_shape: tuple[int, int] | None = None  # (height, width) to scale detections to
    kind: str = INFER

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.kind, "vehicle": self.vehicle,
                                "request_id": self.request_id}
        if self.kind == INFER:
            data.update(task=self.task, frame=self.frame, model=self.model, codec=self.codec,
                        shape=list(self.shape), budget_ms=float(self.budget_ms))
            if self.frame_shape is not None:
                data["frame_shape"] = list(self.frame_shape)
        return data


@dataclass(frozen=True)
class ServerTimings:
    """Where a request spent its time on the server, in milliseconds."""

    queue_ms: float = 0.0  # arrival -> taken by a worker
    decode_ms: float = 0.0  # image decode (and resize) time
    inference_ms: float = 0.0  # model time of the batch the request ran in
    total_ms: float = 0.0  # arrival -> reply handed to the socket

    def to_json_dict(self) -> dict[str, float]:
        return {"queue": self.queue_ms, "decode": self.decode_ms, "inference": self.inference_ms,
                "total": self.total_ms}


@dataclass(frozen=True)
class ReplyHeader:
    """Header of a reply; `count` is the number of detection rows in the second frame."""

    status: str
    request_id: RequestId | None = None
    vehicle: str | None = None
    task: str | None = None
    frame: int | None = None
    model: str | None = None
    reason: str | None = None
    timings: ServerTimings = field(default_factory=ServerTimings)
    count: int = 0
    late: bool = False  # the result was ready only after the request's server-side deadline
    kind: str = RESULT

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "type": self.kind, "status": self.status, "reason": self.reason,
                "request_id": self.request_id, "vehicle": self.vehicle, "task": self.task,
                "frame": self.frame, "model": self.model, "timings_ms": self.timings.to_json_dict(),
                "count": self.count, "late": self.late}


def reply_to(request: RequestHeader, status: str, reason: str | None = None,
             timings: ServerTimings | None = None, late: bool = False) -> ReplyHeader:
    """A reply header that echoes the identifying fields of a request."""
    return ReplyHeader(status=status, request_id=request.request_id, vehicle=request.vehicle,
                       task=request.task if request.kind == INFER else None,
                       frame=request.frame if request.kind == INFER else None,
                       model=request.model if request.kind == INFER else None,
                       reason=reason, timings=timings or ServerTimings(), late=late,
                       kind=PONG if request.kind == PING else RESULT)


# ---------------------------------------------------------------- encoding


def _dump_header(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_request(header: RequestHeader, payload: bytes | memoryview | Any = b"") -> list[Any]:
    """Frames of a request: [header JSON bytes, payload]. The payload object is passed through
    unchanged so `socket.send_multipart(frames, copy=False)` sends it without a copy."""
    return [_dump_header(header.to_json_dict()), payload]


def ping_request(vehicle: str, request_id: RequestId) -> list[Any]:
    """Frames of a liveness / RTT probe; the service answers with a `pong` reply at once."""
    return encode_request(RequestHeader(vehicle=vehicle, request_id=request_id, kind=PING), b"")


def encode_reply(header: ReplyHeader, detections: np.ndarray | None = None) -> list[bytes]:
    """Frames of a reply: [header JSON bytes, float32 little-endian row-major [N, 6] bytes]."""
    if detections is None:
        detections = np.zeros((0, DETECTION_COLUMNS), dtype=DETECTION_DTYPE)
    detections = np.ascontiguousarray(detections, dtype=DETECTION_DTYPE)
    if detections.ndim != 2 or detections.shape[1] != DETECTION_COLUMNS:
        raise ValueError(f"detections must have shape [N, {DETECTION_COLUMNS}], got {detections.shape}")
    data = header.to_json_dict()
    data["count"] = int(detections.shape[0])
    return [_dump_header(data), detections.tobytes()]


# ---------------------------------------------------------------- decoding


def _frame_buffer(frame: Any) -> memoryview:
    """A read-only view of one received frame: bytes, memoryview, bytearray or zmq.Frame."""
    buffer = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False
    try:
        view = memoryview(buffer if buffer is not None else frame)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        return view
    except (TypeError, ValueError):
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a byte buffer") from None


def _load_header(frame: Any) -> dict[str, Any]:
    view = _frame_buffer(frame)
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {view.nbytes} bytes, more than {MAX_HEADER_BYTES}")
    try:
        text = view.tobytes().decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("header is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(data).__name__}")
    return data


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"header contains {name}, which is not JSON")


class _Fields:
    """Typed access to header fields; every failure is a ProtocolError naming the field."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.request_id: RequestId | None = None
        self.vehicle: str | None = None

    def fail(self, reason: str) -> ProtocolError:
        return ProtocolError(f"{self.where}: {reason}", self.request_id, self.vehicle)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def int_(self, name: str, low: int, high: int) -> int:
        value = self.data.get(name)
        if value is None:
            raise self.fail(f"missing field '{name}'")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"field '{name}' must be an integer")
        if not low <= value <= high:
            raise self.fail(f"field '{name}' = {value} is outside [{low}, {high}]")
        return value

    def str_(self, name: str, choices: Sequence[str] | None = None, allow_empty: bool = False) -> str:
        value = self.data.get(name)
        if value is None:
            raise self.fail(f"missing field '{name}'")
        if not isinstance(value, str):
            raise self.fail(f"field '{name}' must be a string")
        if len(value) > MAX_NAME_CHARS:
            raise self.fail(f"field '{name}' is longer than {MAX_NAME_CHARS} characters")
        if not value and not allow_empty:
            raise self.fail(f"field '{name}' must not be empty")
        if choices is not None and value not in choices:
            raise self.fail(f"field '{name}' = {value!r} is not one of {', '.join(choices)}")
        return value

    def float_(self, name: str, low: float, high: float) -> float:
        value = self.data.get(name)
        if value is None:
            raise self.fail(f"missing field '{name}'")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"field '{name}' must be a number")
        value = float(value)
        if not math.isfinite(value) or not low <= value <= high:
            raise self.fail(f"field '{name}' = {value} is outside [{low:g}, {high:g}]")
        return value

    def ints(self, name: str, length: int, low: int, high: int) -> tuple[int, ...]:
        value = self.data.get(name)
        if value is None:
            raise self.fail(f"missing field '{name}'")
        if not isinstance(value, list) or len(value) != length:
            raise self.fail(f"field '{name}' must be a list of {length} integers")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                raise self.fail(f"field '{name}' must be a list of {length} integers in [{low}, {high}]")
        return tuple(value)

    def request_id_(self) -> RequestId:
        value = self.data.get("request_id")
        if value is None:
            raise self.fail("missing field 'request_id'")
        if isinstance(value, str):
            if len(value) > MAX_NAME_CHARS:
                raise self.fail(f"field 'request_id' is longer than {MAX_NAME_CHARS} characters")
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REQUEST_ID:
            raise self.fail("field 'request_id' must be a string or a non-negative 64-bit integer")
        return value


def _check_version(fields: _Fields) -> None:
    version = fields.data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise fields.fail(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")


def _best_effort_identity(fields: _Fields) -> None:
    """Remember request_id / vehicle if they are well-formed, so later errors can carry them."""
    request_id = fields.data.get("request_id")
    if (isinstance(request_id, str) and len(request_id) <= MAX_NAME_CHARS) or (
        isinstance(request_id, int) and not isinstance(request_id, bool) and 0 <= request_id <= MAX_REQUEST_ID
    ):
        fields.request_id = request_id
    vehicle = fields.data.get("vehicle")
    if isinstance(vehicle, str) and 0 < len(vehicle) <= MAX_NAME_CHARS:
        fields.vehicle = vehicle


def decode_request(frames: Sequence[Any], max_payload_bytes: int | None = None
                   ) -> tuple[RequestHeader, memoryview]:
    """Parse the frames of a request (without the ROUTER identity frame).

    Returns the header and a zero-copy view of the payload. Raises ProtocolError for a wrong
    frame count, a header that is not a JSON object, a wrong version, a missing or mistyped
    field, a value out of range, a payload over `max_payload_bytes`, or a raw payload whose
    length does not match its shape.
    """
    try:
        count = len(frames)
    except TypeError:
        raise ProtocolError("message is not a sequence of frames") from None
    if count not in (1, 2):
        raise ProtocolError(f"request must have 2 frames [header, payload], got {count}")
    fields = _Fields(_load_header(frames[0]), "request header")
    _best_effort_identity(fields)
    _check_version(fields)
    kind = fields.str_("type", (INFER, PING))
    vehicle = fields.str_("vehicle")
    request_id = fields.request_id_()
    payload = _frame_buffer(frames[1]) if count == 2 else memoryview(b"")
    if kind == PING:
        return RequestHeader(vehicle=vehicle, request_id=request_id, kind=PING), payload
    if count != 2:
        raise fields.fail("an infer request must have 2 frames [header, payload], got 1")
    task = fields.str_("task")
    frame = fields.int_("frame", 0, MAX_REQUEST_ID)
    model = fields.str_("model")
    codec = fields.str_("codec", CODECS)
    height, width, channels = fields.ints("shape", 3, 0, MAX_IMAGE_SIDE_PX)
    if height < 1 or width < 1 or channels != 3:
        raise fields.fail(f"field 'shape' must be [height>=1, width>=1, 3], got {[height, width, channels]}")
    budget_ms = fields.float_("budget_ms", 0.0, MAX_BUDGET_MS)
    frame_shape = None
    if fields.has("frame_shape"):
        frame_height, frame_width = fields.ints("frame_shape", 2, 1, MAX_IMAGE_SIDE_PX)
        frame_shape = (frame_height, frame_width)
    payload_bytes = payload.nbytes
    if payload_bytes == 0:
        raise fields.fail("payload is empty")
    if max_payload_bytes is not None and payload_bytes > max_payload_bytes:
        raise fields.fail(f"payload is {payload_bytes} bytes, more than the limit {max_payload_bytes}")
    if codec == "raw" and payload_bytes != height * width * 3:
        raise fields.fail(f"raw payload is {payload_bytes} bytes, shape needs {height * width * 3}")
    header = RequestHeader(vehicle=vehicle, request_id=request_id, task=task, frame=frame, model=model,
                           codec=codec, shape=(height, width, 3), budget_ms=budget_ms,
                           frame_shape=frame_shape, kind=INFER)
    return header, payload


def decode_reply(frames: Sequence[Any]) -> tuple[ReplyHeader, np.ndarray]:
    """Parse the frames of a reply. Returns the header and the detections float32 [N, 6]."""
    try:
        count = len(frames)
    except TypeError:
        raise ProtocolError("message is not a sequence of frames") from None
    if count != 2:
        raise ProtocolError(f"reply must have 2 frames [header, detections], got {count}")
    fields = _Fields(_load_header(frames[0]), "reply header")
    _best_effort_identity(fields)
    _check_version(fields)
    kind = fields.str_("type", (RESULT, PONG))
    status = fields.str_("status", STATUSES)
    data = fields.data
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise fields.fail("field 'reason' must be a string or null")
    request_id = fields.request_id_() if fields.has("request_id") else None
    vehicle = fields.str_("vehicle") if fields.has("vehicle") else None
    task = fields.str_("task", allow_empty=True) if fields.has("task") else None
    frame = fields.int_("frame", 0, MAX_REQUEST_ID) if fields.has("frame") else None
    model = fields.str_("model", allow_empty=True) if fields.has("model") else None
    rows = fields.int_("count", 0, MAX_DETECTIONS)
    late = data.get("late", False)
    if not isinstance(late, bool):
        raise fields.fail("field 'late' must be a boolean")
    timings_data = data.get("timings_ms") or {}
    if not isinstance(timings_data, dict):
        raise fields.fail("field 'timings_ms' must be an object")
    timings_fields = _Fields(timings_data, "reply header timings_ms")
    timings = ServerTimings(**{
        f"{name}_ms": timings_fields.float_(name, 0.0, math.inf) if timings_fields.has(name) else 0.0
        for name in ("queue", "decode", "inference", "total")
    })
    body = _frame_buffer(frames[1])
    if body.nbytes != rows * DETECTION_ROW_BYTES:
        raise fields.fail(f"detections frame is {body.nbytes} bytes, count {rows} needs "
                          f"{rows * DETECTION_ROW_BYTES}")
    detections = np.frombuffer(body, dtype=DETECTION_DTYPE).reshape(rows, DETECTION_COLUMNS)
    detections = detections.astype(np.float32, copy=True)  # own the memory, native byte order
    header = ReplyHeader(status=status, request_id=request_id, vehicle=vehicle, task=task, frame=frame,
                         model=model, reason=reason, timings=timings, count=rows, late=late, kind=kind)
    return header, detections
