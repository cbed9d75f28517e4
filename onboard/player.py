"""The camera player: publishes a scene's camera frames on the camera topics in real time, as a
car's camera drivers would (a bag player). `avcloud play` is its command line.

Each camera image is one PUB message `[topic, header JSON, JPEG bytes]` (format in
onboard/topics.py and docs/PROTOCOL.md, "Onboard topics"), stamped with `capture_ms` (this
host's monotonic clock). Frame k is published at start + k / rate; all its cameras go back to
back. `close()` delivers what was published before it releases the socket, so a subscriber that
was there gets every message, the last one included.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from avcloud.errors import UserError
from onboard.topics import CameraFrame, encode_camera_frame, topic_name

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5600"
DEFAULT_TOPIC = "/camera/{camera}/image"
DEFAULT_FLUSH_TIMEOUT_S = 5.0


class CameraPlayer:
    """Publishes frames (objects shaped like `datasets.scene.SceneFrame`) at a fixed rate."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, topic_pattern: str = DEFAULT_TOPIC,
                 rate_hz: float = 10.0, cameras: Sequence[str] | None = None,
                 context: zmq.Context | None = None) -> None:
        if not (isinstance(rate_hz, int | float) and math.isfinite(rate_hz) and rate_hz > 0):
            raise UserError(f"--rate must be a positive number of frames per second, got {rate_hz}")
        self.endpoint = endpoint
        self.topic_pattern = topic_pattern
        self.rate_hz = float(rate_hz)
        self.cameras = tuple(cameras) if cameras else None
        # An own context: closing the player waits for its queued messages, and nobody else's.
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as error:
            self.socket.close(linger=0)
            if self._own_context:
                self.context.term()
            raise UserError(f"--bind: cannot bind {endpoint} ({error})") from None
        self.stop_requested = threading.Event()
        self.frames_published = 0
        self.messages_published = 0
        self.max_lag_ms = 0.0
        self._closed = False

    @property
    def bound_endpoint(self) -> str:
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def play(self, frames: Iterable[Any], max_frames: int | None = None) -> None:
        period_s = 1.0 / self.rate_hz
        start_s = time.monotonic()
        for position, frame in enumerate(frames):
            if self.stop_requested.is_set() or (max_frames is not None and position >= max_frames):
                break
            due_s = start_s + position * period_s
            # Sleep to the frame's slot; a late player publishes at once and reports its lag.
            if self.stop_requested.wait(max(0.0, due_s - time.monotonic())):
                break
            self.max_lag_ms = max(self.max_lag_ms, (time.monotonic() - due_s) * 1000.0)
            for camera, image in frame.cameras.items():
                if self.cameras is not None and camera not in self.cameras:
                    continue
                message = CameraFrame(frame_index=frame.index, camera=camera,
                                      timestamp_micros=frame.timestamp_micros, width=image.width,
                                      height=image.height, jpeg=image.jpeg_bytes,
                                      capture_ms=time.monotonic() * 1000.0)
                self.socket.send_multipart(encode_camera_frame(topic_name(self.topic_pattern, camera), message),
                                           copy=False)
                self.messages_published += 1
            self.frames_published += 1

    def close(self, flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Deliver what was published (waiting at most flush_timeout_s), then release the socket.

        True when everything queued went out (or nobody was subscribed to receive it); False when
        the timeout cut delivery short, e.g. a subscriber that stopped reading.
        """
        if self._closed:
            return True
        self._closed = True
        self.socket.close(linger=int(max(0.0, flush_timeout_s) * 1000))
        if not self._own_context:
            return True
        started_s = time.monotonic()
        self.context.term()  # returns once the queued messages are out, or linger has expired
        return time.monotonic() - started_s < max(0.0, flush_timeout_s) * 0.95 or flush_timeout_s == 0
