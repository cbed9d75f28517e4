"""`avcloud play SCENE`: publish a scene's camera frames on the camera topics in real time (a bag player).

Each camera image is one PUB message `[topic, header JSON, JPEG bytes]` (format in
onboard/topics.py and docs/PROTOCOL.md, "Onboard topics"), stamped with `capture_ms` (this
host's monotonic clock) as a camera driver would. Frame k of the scene is published at
start + k / rate; all its cameras go back to back. The player binds, prints a READY line,
waits `--start-delay-s` so subscribers can join (PUB/SUB drops messages sent before a
subscriber connects), then plays.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from avcloud.errors import UserError
from avcloud.types import ALL_CAMERAS

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5600"
DEFAULT_TOPIC = "/camera/{camera}/image"


class CameraPlayer:
    """Publishes frames (objects shaped like `datasets.scene.SceneFrame`) at a fixed rate."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, topic_pattern: str = DEFAULT_TOPIC,
                 rate_hz: float = 10.0, cameras: Sequence[str] | None = None,
                 context: zmq.Context | None = None) -> None:
        if rate_hz <= 0:
            raise UserError(f"--rate must be positive, got {rate_hz}")
        self.endpoint = endpoint
        self.topic_pattern = topic_pattern
        self.rate_hz = rate_hz
        self.cameras = tuple(cameras) if cameras else None
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as error:
            self.socket.close()
            raise UserError(f"--bind: cannot bind {endpoint} ({error})") from None
        self.stop_requested = threading.Event()
        self.frames_published = 0
        self.messages_published = 0
        self.max_lag_ms = 0.0

    @property
    def bound_endpoint(self) -> str:
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def play(self, frames: Iterable[Any], max_frames: int | None = None) -> None:
        from onboard.topics import CameraFrame, encode_camera_frame, topic_name

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

    def close(self) -> None:
        self.socket.close(linger=0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "play", help="publish a scene's camera frames on the camera topics in real time",
        description="Publish a scene's frames (Waymo v1/v2 or synthetic) on ZeroMQ camera topics at --rate Hz, "
                    "like a bag player. Prints READY when bound.")
    parser.add_argument("scene", metavar="SCENE", help="scene path (Waymo v1 .tfrecord, v2 directory, synthetic)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--bind", default=DEFAULT_ENDPOINT, help=f"PUB endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help=f"topic pattern (default {DEFAULT_TOPIC})")
    parser.add_argument("--cameras", nargs="+", default=None, choices=ALL_CAMERAS, help="cameras to publish")
    parser.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--loop", action="store_true", help="start over at the end of the scene")
    parser.add_argument("--start-delay-s", type=float, default=1.0,
                        help="wait after READY so subscribers can connect (default 1)")
    parser.add_argument("--start-at-unix", type=float, default=None, metavar="SECONDS",
                        help="publish the first frame at this wall-clock time (Unix seconds) instead of after "
                             "--start-delay-s, e.g. the link emulator's --trace-start-unix")
    parser.set_defaults(handler=run_play)


def run_play(args: argparse.Namespace) -> int:
    from datasets.scene import open_scene

    scene = open_scene(args.scene)
    player = CameraPlayer(args.bind, args.topic, args.rate, args.cameras)

    def request_stop(signum: int, frame: object) -> None:
        player.stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"READY play {player.bound_endpoint} scene={scene.name} frames={len(scene)} rate={args.rate}",
              flush=True)
        wait_s = args.start_delay_s if args.start_at_unix is None else args.start_at_unix - time.time()
        if wait_s < 0 and args.start_at_unix is not None:
            print(f"play: started {-wait_s:.2f} s after --start-at-unix", file=sys.stderr, flush=True)
        if player.stop_requested.wait(max(0.0, wait_s)):
            return 0

        def frames():
            while True:
                yield from scene.frames(args.cameras)
                if not args.loop:
                    return

        player.play(frames(), args.frames)
        print(f"played {player.frames_published} frames ({player.messages_published} messages), "
              f"max lag {player.max_lag_ms:.1f} ms", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        player.close()
    return 0
