"""The result recorder: subscribes to the onboard node's outputs and writes them down, as a car's
logger would. `avcloud record` is its command line.

It hands every published detections message to a recording writer (`avcloud.recording`: JSONL,
or MCAP for Foxglove) as one result, in arrival order. With MCAP it also records:
- the node's heartbeat as the uplink bandwidth estimate (and RTT),
- per frame, once every camera's result is in (or a later frame's is), the allocation as served:
  each camera's cloud configuration, or "" where the on-car result was published,
- the camera images, when `images_endpoint` (the player's or camera driver's PUB socket) is set;
  they stamp their frame's results, so Foxglove draws the detections over the right image.

A write error (a full disk) stops recording and raises `RecordingWriteError`, which says how many
results the file holds (they stay readable).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import zmq

from avcloud.recording import JsonlRecording, McapRecording
from onboard.topics import (
    TopicMessageError,
    decode_camera_frame,
    decode_detection_result,
)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5601"
DEFAULT_TOPIC = "/perception/{camera}/detections"
DEFAULT_HEARTBEAT_TOPIC = "/onboard/heartbeat"
DEFAULT_IMAGE_TOPIC = "/camera/{camera}/image"
# Writers are flushed (what is written so far made durable) at most this often.
FLUSH_PERIOD_S = 0.5
_FRAMES_REMEMBERED = 64


def topic_matcher(pattern: str) -> re.Pattern[str]:
    """A regex matching the topic names of a `{camera}` pattern."""
    before, found, after = pattern.partition("{camera}")
    if not found:
        return re.compile(re.escape(pattern) + "$")
    return re.compile(re.escape(before) + r"(?P<camera>[^/]+)" + re.escape(after) + "$")


def result_row(result: Any, received_ms: float) -> dict[str, Any]:
    """The JSONL row of a detections message (see avcloud.recording)."""
    return {**result.header(), "detections": result.detections.round(2).tolist(),
            "received_ms": round(received_ms, 3)}


class ResultRecorder:
    """SUB sockets on the node's outputs (and optionally the camera topics) feeding a writer."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, topic_pattern: str = DEFAULT_TOPIC,
                 context: zmq.Context | None = None, heartbeat_topic: str | None = DEFAULT_HEARTBEAT_TOPIC,
                 images_endpoint: str | None = None, image_topic_pattern: str = DEFAULT_IMAGE_TOPIC) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 10000)
        self.socket.setsockopt(zmq.SUBSCRIBE, topic_pattern.partition("{camera}")[0].encode())
        if heartbeat_topic:
            self.socket.setsockopt(zmq.SUBSCRIBE, heartbeat_topic.encode())
        self.socket.connect(endpoint)
        self.matcher = topic_matcher(topic_pattern)
        self.heartbeat_topic = heartbeat_topic
        self.image_socket: zmq.Socket | None = None
        self.image_matcher = topic_matcher(image_topic_pattern)
        if images_endpoint is not None:
            self.image_socket = self.context.socket(zmq.SUB)
            self.image_socket.setsockopt(zmq.LINGER, 0)
            self.image_socket.setsockopt(zmq.RCVHWM, 1000)
            self.image_socket.setsockopt(zmq.SUBSCRIBE, image_topic_pattern.partition("{camera}")[0].encode())
            self.image_socket.connect(images_endpoint)
        self.poller = zmq.Poller()
        for socket in (self.socket, self.image_socket):
            if socket is not None:
                self.poller.register(socket, zmq.POLLIN)
        self.stop_requested = threading.Event()
        self.rows = 0
        self.images = 0
        self.bad_messages = 0
        self.last_received_s: float | None = None
        self._frame_stamps_ns: dict[int, int] = {}  # frame index -> its images' capture time
        self._cameras_seen: set[str] = set()
        self._open_frames: dict[int, dict[str, str]] = {}  # frame -> camera -> config as served
        self._closed_frames: dict[int, None] = {}  # recently summarised frames, oldest first

    def record(self, out: Any, duration_s: float | None = None, max_rows: int | None = None,
               idle_exit_s: float | None = None) -> int:
        """Write until stopped, `duration_s` passes, `max_rows` results are written, or nothing
        arrived for `idle_exit_s` after the first result. `out` is a recording writer
        (avcloud.recording) or a text stream (JSONL rows). Returns the results written."""
        writer = out if hasattr(out, "write_result") else JsonlRecording(out)
        started_s = last_flush_s = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                now_s = time.monotonic()
                if duration_s is not None and now_s - started_s >= duration_s:
                    break
                if max_rows is not None and self.rows >= max_rows:
                    break
                if idle_exit_s is not None and self.last_received_s is not None \
                        and now_s - self.last_received_s >= idle_exit_s:
                    break
                ready = dict(self.poller.poll(50))
                if self.image_socket is not None and self.image_socket in ready:
                    self._drain_images(writer)
                if self.socket in ready:
                    self._drain_outputs(writer, max_rows)
                if time.monotonic() - last_flush_s >= FLUSH_PERIOD_S:
                    writer.flush()
                    last_flush_s = time.monotonic()
            self._close_frames(writer, keep=0)
        finally:
            if writer.failed is None:
                writer.flush()
        return self.rows

    def _drain_outputs(self, writer: Any, max_rows: int | None) -> None:
        while max_rows is None or self.rows < max_rows:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            received_ms = time.monotonic() * 1000.0
            topic = frames[0].decode(errors="replace") if frames else ""
            if topic == self.heartbeat_topic:
                self._write_heartbeat(writer, frames)
                continue
            if not self.matcher.match(topic):
                continue
            try:
                result = decode_detection_result(frames)
            except TopicMessageError:
                self.bad_messages += 1
                continue
            self.last_received_s = received_ms / 1000.0
            stamp_ns = self._frame_stamps_ns.get(result.frame_index, time.time_ns())
            writer.write_result(frame_index=result.frame_index, camera=result.camera, source=result.source,
                                config=result.config, latency_ms=result.latency_ms,
                                deadline_met=result.deadline_met, detections=result.detections,
                                timestamp_ns=stamp_ns, received_ms=received_ms, log_time_ns=time.time_ns())
            self.rows += 1
            if isinstance(writer, McapRecording):
                self._cameras_seen.add(result.camera)
                if result.frame_index in self._closed_frames:
                    continue  # a straggler of a frame already summarised
                served = self._open_frames.setdefault(result.frame_index, {})
                served[result.camera] = result.config if result.source == "cloud" else ""
                self._close_frames(writer, keep=_FRAMES_REMEMBERED)

    def _close_frames(self, writer: Any, keep: int) -> None:
        """Write the allocation as served of frames every camera answered, or that are older
        than `keep` frames behind the newest."""
        if not self._open_frames or not isinstance(writer, McapRecording):
            return
        newest = max(self._open_frames)
        for frame_index in sorted(self._open_frames):
            served = self._open_frames[frame_index]
            complete = len(served) >= len(self._cameras_seen) and frame_index < newest
            if keep and not complete and frame_index > newest - keep:
                continue
            del self._open_frames[frame_index]
            self._closed_frames[frame_index] = None
            if len(self._closed_frames) > _FRAMES_REMEMBERED:
                del self._closed_frames[next(iter(self._closed_frames))]
            stamp_ns = self._frame_stamps_ns.get(frame_index, time.time_ns())
            writer.write_allocation(frame_index=frame_index, timestamp_ns=stamp_ns,
                                    choices=dict(sorted(served.items())), log_time_ns=time.time_ns())

    def _write_heartbeat(self, writer: Any, frames: list[bytes]) -> None:
        import json

        try:
            status = json.loads(frames[1])
            estimate_mbps = float(status["bandwidth_mbps"])
            rtt_ms = float(status.get("rtt_ms", float("nan")))
        except (IndexError, ValueError, TypeError, KeyError):
            self.bad_messages += 1
            return
        now_ns = time.time_ns()
        writer.write_bandwidth(timestamp_ns=now_ns, estimate_mbps=estimate_mbps, rtt_ms=rtt_ms)

    def _drain_images(self, writer: Any) -> None:
        assert self.image_socket is not None
        while True:
            try:
                frames = self.image_socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if not frames or not self.image_matcher.match(frames[0].decode(errors="replace")):
                continue
            try:
                image = decode_camera_frame(frames)
            except TopicMessageError:
                self.bad_messages += 1
                continue
            stamp_ns = self._frame_stamps_ns.setdefault(image.frame_index, time.time_ns())
            if len(self._frame_stamps_ns) > 4 * _FRAMES_REMEMBERED:
                for old in sorted(self._frame_stamps_ns)[:_FRAMES_REMEMBERED]:
                    del self._frame_stamps_ns[old]
            writer.write_camera_image(frame_index=image.frame_index, camera=image.camera, timestamp_ns=stamp_ns,
                                      data=bytes(image.jpeg), format="jpeg")
            self.images += 1

    def close(self) -> None:
        for socket in (self.socket, self.image_socket):
            if socket is not None:
                socket.close(linger=0)
