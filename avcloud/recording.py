"""Recording formats of a drive: JSONL (one row per published result, the simple format) and
MCAP (what robotics tools open: Foxglove plays camera images with the detections drawn on them,
plots bandwidth, and lists every result with its source).

Both writers take the same calls, one per message, so the live recorder (`onboard.recorder`,
`avcloud record`) and the replay write the same files:

    with open_recording("drive.mcap", "mcap") as recording:
        recording.write_camera_image(frame_index=0, camera="FRONT", timestamp_ns=t, data=jpeg)
        recording.write_allocation(frame_index=0, timestamp_ns=t, choices={"FRONT": "avd-cloud-m-imgcompNone-inpcomp75"},
                                   budget_mbps=6.1)
        recording.write_result(frame_index=0, camera="FRONT", timestamp_ns=t, source="cloud",
                               config="avd-cloud-m-imgcompNone-inpcomp75", latency_ms=83.0, deadline_met=True,
                               detections=array_n_by_6)
        recording.write_bandwidth(timestamp_ns=t, estimate_mbps=6.4, rtt_ms=21.0)
        recording.flush()  # whatever was written before this call survives a later write error

`timestamp_ns` is the frame's time (scene time in a replay, capture time live) and stamps the
message headers, so Foxglove pairs each image with its detections; `log_time_ns` (default:
`timestamp_ns`) orders playback.

MCAP topics (ROS 2 message schemas, CDR-encoded, profile "ros2"):
- `/camera/{camera}/image/compressed`: sensor_msgs/msg/CompressedImage
- `/perception/{camera}/annotations`: foxglove_msgs/msg/ImageAnnotations (boxes + labels, with
  the image's stamp; Foxglove's Image panel draws them over the image)
- `/perception/{camera}/result`: avcloud_msgs/msg/PerceptionResult (source "cloud" or "onboard",
  configuration, latency, deadline met, detections)
- `/allocation`: avcloud_msgs/msg/Allocation (per frame: each camera's configuration, "" for on
  the car, the uplink budget planned with)
- `/uplink/bandwidth`: avcloud_msgs/msg/BandwidthEstimate

A write error (a full disk) raises `RecordingWriteError`, which says how many results the file
holds: it is cut back to the last successful `flush()`, so those stay readable (an MCAP cut
there has no summary; `read_mcap` and Foxglove read it from the start).
"""

from __future__ import annotations

import errno
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from avcloud.errors import DataError, UserError

FORMATS: tuple[str, ...] = ("jsonl", "mcap")
RESULT_FIELDS: tuple[str, ...] = ("frame_index", "camera", "source", "latency_ms", "config", "deadline_met",
                                  "detections")
# Waymo Label.Type values of the detections' class column.
CLASS_NAMES = {1: "vehicle", 2: "pedestrian", 3: "sign", 4: "cyclist"}


class RecordingWriteError(UserError):
    """The recording could not be written further; `results` of them are in the file."""

    def __init__(self, path: str, results: int, error: OSError) -> None:
        self.path = path
        self.results = results
        self.error = error
        super().__init__(f"{path}: cannot write ({error.strerror or error}) after {results} result(s); "
                         f"the file keeps those {results}, readable")


def format_of(path: str | Path, requested: str | None = None) -> str:
    """The recording format: as requested, else from the file suffix (.mcap), else JSONL."""
    if requested is not None:
        if requested not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{requested}'")
        return requested
    return "mcap" if Path(path).suffix.lower() == ".mcap" else "jsonl"


def open_recording(path: str | Path, format: str | None = None) -> JsonlRecording | McapRecording:  # noqa: A002
    """A writer for `path` (created with its parent directories); UserError when it cannot be."""
    path = Path(path)
    kind = format_of(path, format)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("wb", buffering=0)
    except OSError as error:
        raise UserError(f"{path}: cannot write ({error.strerror or error})") from None
    return JsonlRecording(stream, str(path)) if kind == "jsonl" else McapRecording(stream, str(path))


class _DurableFile:
    """What a writer writes, held in memory until `flush()` puts all of it in the file; a write
    error there leaves the file cut back to the end of the last complete flush (`cut`), so the
    file never ends in half a record. `raw` is an unbuffered binary file (or a text stream)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.text = isinstance(raw, io.TextIOBase)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        try:
            self._written = raw.tell() if not self.text else 0
        except (OSError, ValueError):
            self._written = 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written + self._pending_bytes

    def flush(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        if self.text:
            self.raw.write(data.decode())
            self._written += len(data)
            self.raw.flush()
            return
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                count = self.raw.write(view[done:])
                if not count:
                    raise OSError(errno.ENOSPC, "No space left on device")
                done += count
        finally:
            self._written += done
            if done < len(data):
                self._pending, self._pending_bytes = [data[done:]], len(data) - done

    def cut(self, size: int) -> None:
        """Drop what is pending and cut the file back to `size` bytes (where possible)."""
        self._pending, self._pending_bytes = [], 0
        if self.text:
            return
        try:
            self.raw.truncate(size)
            self.raw.seek(size)
            self._written = size
        except (OSError, ValueError):
            pass  # not a regular file (/dev/full, a pipe): nothing to cut back

    def close(self) -> None:
        if not self.text:
            self.raw.close()


class _Committing:
    """A writer whose file, after any write error, holds exactly what its last successful
    `flush()` committed."""

    def __init__(self, stream: Any, name: str) -> None:
        self.stream = _DurableFile(stream)
        self.name = name
        self.results = 0  # results handed to the writer
        self.committed_results = 0  # results in the file as of the last flush
        self._committed_bytes = self.stream.tell()
        self.failed: RecordingWriteError | None = None

    def fail(self, error: OSError) -> RecordingWriteError:
        if self.failed is None:
            self.stream.cut(self._committed_bytes)
            self.failed = RecordingWriteError(self.name, self.committed_results, error)
        return self.failed

    def committed(self) -> None:
        self._committed_bytes = self.stream.tell()
        self.committed_results = self.results

    def close_stream(self) -> None:
        try:
            self.stream.close()
        except OSError as error:
            if self.failed is None:
                raise self.fail(error) from None


class JsonlRecording(_Committing):
    """One JSON object per line per result; images, allocations and bandwidth are not kept."""

    format = "jsonl"

    def __init__(self, stream: IO[bytes] | IO[str], name: str = "recording") -> None:
        super().__init__(stream, name)

    def __enter__(self) -> JsonlRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_camera_image(self, **_: Any) -> None:
        pass

    def write_allocation(self, **_: Any) -> None:
        pass

    def write_bandwidth(self, **_: Any) -> None:
        pass

    def write_result(self, *, frame_index: int, camera: str, source: str, config: str, latency_ms: float,
                     deadline_met: bool, detections: np.ndarray, timestamp_ns: int | None = None,
                     received_ms: float | None = None, log_time_ns: int | None = None) -> None:
        if self.failed is not None:
            raise self.failed
        row = {"frame_index": int(frame_index), "camera": camera, "source": source,
               "latency_ms": round(float(latency_ms), 3), "config": config, "deadline_met": bool(deadline_met),
               "detections": np.asarray(detections, dtype=np.float64).reshape(-1, 6).round(2).tolist()}
        if received_ms is not None:
            row["received_ms"] = round(float(received_ms), 3)
        try:
            self.stream.write((json.dumps(row) + "\n").encode())
        except OSError as error:
            raise self.fail(error) from None
        self.results += 1

    def flush(self) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            self.stream.flush()
        except OSError as error:
            raise self.fail(error) from None
        self.committed()

    def close(self) -> None:
        """Flush and close. RecordingWriteError when that fails; after an earlier write error,
        only closes (the file stays cut at its last flush)."""
        try:
            if self.failed is None:
                self.flush()
        finally:
            self.close_stream()


def read_recording(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL recording; DataError naming the line of a malformed one."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {number}: not JSON") from None
        missing = [name for name in RESULT_FIELDS if not isinstance(row, dict) or name not in row]
        if missing:
            raise DataError(f"{path} line {number}: missing field '{missing[0]}'")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- MCAP

_SEPARATOR = "=" * 80 + "\n"
_TIME = "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n"
_HEADER = "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n"
_POINT2 = "MSG: foxglove_msgs/Point2\nfloat64 x\nfloat64 y\n"
_COLOR = "MSG: foxglove_msgs/Color\nfloat64 r\nfloat64 g\nfloat64 b\nfloat64 a\n"
_DETECTION = ("MSG: avcloud_msgs/Detection\n"
              "float32 x1\nfloat32 y1\nfloat32 x2\nfloat32 y2\nfloat32 score\nuint8 label\n")
_CAMERA_ALLOCATION = ("MSG: avcloud_msgs/CameraAllocation\n"
                      "string camera\nstring config\nfloat64 critical_bandwidth_mbps\n")


def _schema(main: str, *dependencies: str) -> str:
    return main + "".join(_SEPARATOR + dependency for dependency in dependencies)


ROS2_SCHEMAS: dict[str, str] = {
    "sensor_msgs/msg/CompressedImage": _schema(
        "std_msgs/Header header\nstring format\nuint8[] data\n", _HEADER, _TIME),
    "foxglove_msgs/msg/ImageAnnotations": _schema(
        "foxglove_msgs/CircleAnnotation[] circles\nfoxglove_msgs/PointsAnnotation[] points\n"
        "foxglove_msgs/TextAnnotation[] texts\n",
        "MSG: foxglove_msgs/CircleAnnotation\nbuiltin_interfaces/Time timestamp\nfoxglove_msgs/Point2 position\n"
        "float64 diameter\nfloat64 thickness\nfoxglove_msgs/Color fill_color\nfoxglove_msgs/Color outline_color\n",
        "MSG: foxglove_msgs/PointsAnnotation\nbuiltin_interfaces/Time timestamp\nuint8 UNKNOWN=0\nuint8 POINTS=1\n"
        "uint8 LINE_LOOP=2\nuint8 LINE_STRIP=3\nuint8 LINE_LIST=4\nuint8 type\nfoxglove_msgs/Point2[] points\n"
        "foxglove_msgs/Color outline_color\nfoxglove_msgs/Color[] outline_colors\nfoxglove_msgs/Color fill_color\n"
        "float64 thickness\n",
        "MSG: foxglove_msgs/TextAnnotation\nbuiltin_interfaces/Time timestamp\nfoxglove_msgs/Point2 position\n"
        "string text\nfloat64 font_size\nfoxglove_msgs/Color text_color\nfoxglove_msgs/Color background_color\n",
        _POINT2, _COLOR, _TIME),
    "avcloud_msgs/msg/PerceptionResult": _schema(
        "std_msgs/Header header\nuint64 frame_index\nstring camera\nstring source\nstring config\n"
        "float64 latency_ms\nbool deadline_met\navcloud_msgs/Detection[] detections\n",
        _DETECTION, _HEADER, _TIME),
    "avcloud_msgs/msg/Allocation": _schema(
        "std_msgs/Header header\nuint64 frame_index\nfloat64 budget_mbps\n"
        "avcloud_msgs/CameraAllocation[] cameras\n", _CAMERA_ALLOCATION, _HEADER, _TIME),
    "avcloud_msgs/msg/BandwidthEstimate": _schema(
        "std_msgs/Header header\nfloat64 estimate_mbps\nfloat64 planning_mbps\nfloat64 rtt_ms\n", _HEADER, _TIME),
}
_SOURCE_COLORS = {"cloud": {"r": 0.1, "g": 0.6, "b": 1.0, "a": 1.0}, "onboard": {"r": 1.0, "g": 0.6, "b": 0.1, "a": 1.0}}
_TRANSPARENT = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 0.0}
_LABEL_BACKGROUND = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 0.6}
_WHITE = {"r": 1.0, "g": 1.0, "b": 1.0, "a": 1.0}


def _stamp(timestamp_ns: int) -> dict[str, int]:
    seconds, nanoseconds = divmod(int(timestamp_ns), 1_000_000_000)
    return {"sec": seconds, "nanosec": nanoseconds}


def _header(timestamp_ns: int, frame_id: str) -> dict[str, Any]:
    return {"stamp": _stamp(timestamp_ns), "frame_id": frame_id}


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


class McapRecording(_Committing):
    """An MCAP file of ROS 2 messages (see the module docstring for topics and schemas)."""

    format = "mcap"

    def __init__(self, stream: IO[bytes], name: str = "recording", chunk_size: int = 4 * 1024 * 1024) -> None:
        from mcap_ros2.writer import Writer

        super().__init__(stream, name)
        try:
            self._writer = Writer(self.stream, chunk_size=chunk_size)
            self._schemas = {name: self._writer.register_msgdef(name, text) for name, text in ROS2_SCHEMAS.items()}
            self._writer._writer.flush()  # header and schemas on disk: an empty recording is a valid file
        except OSError as error:
            raise self.fail(error) from None
        self.committed()
        self._closed = False

    def __enter__(self) -> McapRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, topic: str, schema: str, message: dict[str, Any], timestamp_ns: int,
               log_time_ns: int | None) -> None:
        if self.failed is not None:
            raise self.failed
        log_time_ns = int(timestamp_ns if log_time_ns is None else log_time_ns)
        try:
            self._writer.write_message(topic, self._schemas[schema], message, log_time=log_time_ns,
                                       publish_time=log_time_ns)
        except OSError as error:
            raise self.fail(error) from None

    def write_camera_image(self, *, frame_index: int, camera: str, timestamp_ns: int, data: bytes | memoryview,
                           format: str = "jpeg", log_time_ns: int | None = None) -> None:  # noqa: A002
        """A camera's compressed image (JPEG or PNG bytes) of one frame."""
        self._write(f"/camera/{camera}/image/compressed", "sensor_msgs/msg/CompressedImage",
                    {"header": _header(timestamp_ns, camera), "format": format, "data": bytes(data)},
                    timestamp_ns, log_time_ns)

    def write_result(self, *, frame_index: int, camera: str, source: str, config: str, latency_ms: float,
                     deadline_met: bool, detections: np.ndarray, timestamp_ns: int | None = None,
                     received_ms: float | None = None, log_time_ns: int | None = None) -> None:
        """The result published for one camera and frame: detections [N, 6] (x1, y1, x2, y2, score,
        class) in full-image pixels, from `source` "cloud" or "onboard" and configuration `config`."""
        if timestamp_ns is None:
            raise ValueError("an MCAP result needs timestamp_ns")
        rows = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
        header = _header(timestamp_ns, camera)
        self._write(f"/perception/{camera}/result", "avcloud_msgs/msg/PerceptionResult", {
            "header": header, "frame_index": int(frame_index), "camera": camera, "source": source,
            "config": config, "latency_ms": _finite(latency_ms), "deadline_met": bool(deadline_met),
            "detections": [{"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2),
                            "score": float(score), "label": int(label) & 0xFF}
                           for x1, y1, x2, y2, score, label in rows.tolist()],
        }, timestamp_ns, log_time_ns)
        self._write(f"/perception/{camera}/annotations", "foxglove_msgs/msg/ImageAnnotations",
                    _annotations(rows, source, header["stamp"]), timestamp_ns, log_time_ns)
        self.results += 1

    def write_allocation(self, *, frame_index: int, timestamp_ns: int, choices: Mapping[str, str | None],
                         budget_mbps: float | None = None,
                         critical_bandwidth_mbps: Mapping[str, float] | None = None,
                         log_time_ns: int | None = None) -> None:
        """One frame's allocation: per camera the cloud configuration (None or "": on the car)."""
        critical = critical_bandwidth_mbps or {}
        self._write("/allocation", "avcloud_msgs/msg/Allocation", {
            "header": _header(timestamp_ns, ""), "frame_index": int(frame_index), "budget_mbps": _finite(budget_mbps),
            "cameras": [{"camera": camera, "config": config or "",
                         "critical_bandwidth_mbps": _finite(critical.get(camera, 0.0))}
                        for camera, config in choices.items()],
        }, timestamp_ns, log_time_ns)

    def write_bandwidth(self, *, timestamp_ns: int, estimate_mbps: float, planning_mbps: float | None = None,
                        rtt_ms: float | None = None, log_time_ns: int | None = None) -> None:
        """The uplink estimate (and the bandwidth planned with, e.g. a forecast quantile)."""
        self._write("/uplink/bandwidth", "avcloud_msgs/msg/BandwidthEstimate", {
            "header": _header(timestamp_ns, ""), "estimate_mbps": _finite(estimate_mbps),
            "planning_mbps": _finite(planning_mbps), "rtt_ms": _finite(rtt_ms)}, timestamp_ns, log_time_ns)

    def flush(self) -> None:
        """Finish the chunk in progress and write it out: what was written so far survives."""
        if self.failed is not None:
            raise self.failed
        try:
            self._writer._writer.flush()
        except OSError as error:
            raise self.fail(error) from None
        self.committed()

    def close(self) -> None:
        """Write the summary (index, statistics) and close the file. RecordingWriteError when that
        fails; after an earlier write error, only closes (the file stays cut at its last flush)."""
        if self._closed:
            return
        self._closed = True
        if self.failed is not None:
            self.close_stream()
            return
        try:
            self._writer.finish()
            self.stream.flush()
        except OSError as error:
            failure = self.fail(error)
            self.close_stream()
            raise failure from None
        self.committed()
        self.close_stream()


def _annotations(rows: np.ndarray, source: str, stamp: dict[str, int]) -> dict[str, Any]:
    color = _SOURCE_COLORS.get(source, _WHITE)
    points, texts = [], []
    for x1, y1, x2, y2, score, label in rows.tolist():
        corners = [{"x": x1, "y": y1}, {"x": x2, "y": y1}, {"x": x2, "y": y2}, {"x": x1, "y": y2}]
        points.append({"timestamp": stamp, "type": 2, "points": corners, "outline_color": color,
                       "outline_colors": [], "fill_color": _TRANSPARENT, "thickness": 2.0})
        texts.append({"timestamp": stamp, "position": {"x": x1, "y": max(0.0, y1 - 2.0)},
                      "text": f"{CLASS_NAMES.get(int(label), int(label))} {score:.2f} ({source})",
                      "font_size": 12.0, "text_color": _WHITE, "background_color": _LABEL_BACKGROUND})
    return {"circles": [], "points": points, "texts": texts}


@dataclass(frozen=True)
class RecordedMessage:
    topic: str
    schema: str
    log_time_ns: int
    message: Any  # the decoded ROS 2 message (attribute access, e.g. message.header.stamp.sec)


def read_mcap(path: str | Path) -> Iterator[RecordedMessage]:
    """Every message of an MCAP recording, decoded, in file order. A file cut short (a write
    error) yields what it holds; a file that is not MCAP is a DataError."""
    from mcap.exceptions import McapError
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        reader = make_reader(io.BytesIO(data), decoder_factories=[DecoderFactory()])
        reader.get_header()
        for schema, channel, message, decoded in _decoded_messages(reader, data):
            yield RecordedMessage(channel.topic, schema.name if schema else "", message.log_time, decoded)
    except (McapError, ValueError, EOFError) as error:
        raise DataError(f"{path}: not a readable MCAP file ({error})") from None


def _decoded_messages(reader: Any, data: bytes) -> Iterator[tuple[Any, Any, Any, Any]]:
    """Indexed reading when the summary is there; else a streaming pass that stops where the
    file was cut."""
    from mcap.exceptions import EndOfFile
    from mcap.reader import NonSeekingReader
    from mcap_ros2.decoder import DecoderFactory

    try:
        summary = reader.get_summary()
    except Exception:  # noqa: BLE001 - a cut file has no footer: read it as a stream
        summary = None
    if summary is not None:
        yield from reader.iter_decoded_messages(log_time_order=False)
        return
    streaming = NonSeekingReader(io.BytesIO(data), decoder_factories=[DecoderFactory()])
    try:
        yield from streaming.iter_decoded_messages(log_time_order=False)
    except EndOfFile:
        return
