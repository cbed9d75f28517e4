"""`avcloud play SCENE`: publish a scene's camera frames on the camera topics in real time (a bag player).

The player itself is `onboard.player.CameraPlayer`. It binds, prints a READY line, waits
`--start-delay-s` so subscribers can join (PUB/SUB drops messages sent before a subscriber
connects), plays, delivers what it published, and only then reports what it played.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from avcloud.config import check_number
from avcloud.errors import UserError
from avcloud.types import ALL_CAMERAS
from onboard.player import DEFAULT_ENDPOINT, DEFAULT_FLUSH_TIMEOUT_S, DEFAULT_TOPIC, CameraPlayer

__all__ = ["CameraPlayer", "register", "run_play"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "play", help="publish a scene's camera frames on the camera topics in real time",
        description="Publish a scene's frames (Waymo v1/v2 or synthetic) on ZeroMQ camera topics at --rate Hz, "
                    "like a bag player. Prints READY when bound; reports what it played once delivered.")
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
    parser.add_argument("--flush-timeout-s", type=float, default=DEFAULT_FLUSH_TIMEOUT_S,
                        help=f"at the end, wait this long at most for subscribers to take what was published "
                             f"(default {DEFAULT_FLUSH_TIMEOUT_S:g})")
    parser.set_defaults(handler=run_play)


def run_play(args: argparse.Namespace) -> int:
    from datasets.scene import open_scene

    check_number("--rate", args.rate, above=0)
    check_number("--start-delay-s", args.start_delay_s, at_least=0)
    check_number("--flush-timeout-s", args.flush_timeout_s, at_least=0)
    if args.start_at_unix is not None:
        check_number("--start-at-unix", args.start_at_unix)
    if args.frames is not None and args.frames < 1:
        raise UserError(f"--frames must be at least 1, got {args.frames}")
    scene = open_scene(args.scene)
    player = CameraPlayer(args.bind, args.topic, args.rate, args.cameras)

    def request_stop(signum: int, frame: object) -> None:
        player.stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    delivered = True
    try:
        print(f"READY play {player.bound_endpoint} scene={scene.name} frames={len(scene)} rate={args.rate}",
              flush=True)
        wait_s = args.start_delay_s if args.start_at_unix is None else args.start_at_unix - time.time()
        if wait_s < 0 and args.start_at_unix is not None:
            print(f"play: started {-wait_s:.2f} s after --start-at-unix", file=sys.stderr, flush=True)
        if not player.stop_requested.wait(max(0.0, wait_s)):

            def frames():
                while True:
                    yield from scene.frames(args.cameras)
                    if not args.loop:
                        return

            player.play(frames(), args.frames)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        delivered = player.close(args.flush_timeout_s)
    if not delivered:
        raise UserError(f"played {player.frames_published} frames ({player.messages_published} messages), but "
                        f"subscribers did not take them all within --flush-timeout-s {args.flush_timeout_s:g}")
    print(f"played {player.frames_published} frames ({player.messages_published} messages), "
          f"max lag {player.max_lag_ms:.1f} ms", flush=True)
    return 0
