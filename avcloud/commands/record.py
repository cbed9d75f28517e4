"""`avcloud record --out FILE`: subscribe to the onboard node's detections and write them down.

The recorder itself is `onboard.recorder.ResultRecorder`; the formats are `avcloud.recording`.
JSONL (the default, simple format): one JSON object per line, one line per published result,
in arrival order:
    {"frame_index": 17, "camera": "FRONT", "source": "cloud", "latency_ms": 83.2,
     "config": "avd-cloud-m-imgcompNone-inpcomp75", "deadline_met": true,
     "detections": [[x1, y1, x2, y2, score, class], ...], "received_ms": 123456.7}
`received_ms` is the recorder's monotonic clock when the message arrived; read the file back
with `read_recording(path)`. MCAP (`--format mcap`, or an `.mcap` file name) opens in Foxglove:
camera images with the detections drawn on them, results, the allocation per frame and the
bandwidth estimate (topics in avcloud/recording.py and docs/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from avcloud.config import check_number
from avcloud.errors import UserError
from avcloud.recording import FORMATS, RecordingWriteError, format_of, open_recording, read_recording
from onboard.player import DEFAULT_ENDPOINT as PLAYER_ENDPOINT
from onboard.player import DEFAULT_TOPIC as CAMERA_TOPIC
from onboard.recorder import (
    DEFAULT_ENDPOINT,
    DEFAULT_HEARTBEAT_TOPIC,
    DEFAULT_TOPIC,
    ResultRecorder,
    result_row,
    topic_matcher,
)

__all__ = ["ResultRecorder", "read_recording", "register", "result_row", "run_record", "topic_matcher"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "record", help="write the onboard node's published results to a JSONL or MCAP file",
        description="Subscribe to the onboard node's detections topics and write one record per result (JSONL), "
                    "or an MCAP file that Foxglove opens (--format mcap: also camera images, the allocation per "
                    "frame and the bandwidth estimate). Prints READY when connected; stops on SIGINT/SIGTERM, "
                    "--duration-s, --rows or --idle-exit-s.")
    parser.add_argument("--out", type=Path, required=True, help="output file (.jsonl, or .mcap)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="jsonl (default) or mcap (default for an .mcap --out)")
    parser.add_argument("--connect", default=DEFAULT_ENDPOINT, help=f"node outputs endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help=f"detections topic pattern (default {DEFAULT_TOPIC})")
    parser.add_argument("--heartbeat-topic", default=DEFAULT_HEARTBEAT_TOPIC,
                        help=f"node heartbeat topic, recorded as the bandwidth estimate (mcap; default {DEFAULT_HEARTBEAT_TOPIC})")
    parser.add_argument("--images", default=PLAYER_ENDPOINT, metavar="ENDPOINT",
                        help=f"camera topics to record images from (mcap; default {PLAYER_ENDPOINT}, "
                             "the player's); 'none' records no images")
    parser.add_argument("--image-topic", default=CAMERA_TOPIC, help=f"camera topic pattern (default {CAMERA_TOPIC})")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many results")
    parser.add_argument("--idle-exit-s", type=float, default=None,
                        help="stop when nothing arrived for this long after the first result")
    parser.set_defaults(handler=run_record)


def run_record(args: argparse.Namespace) -> int:
    for flag, value in (("--duration-s", args.duration_s), ("--idle-exit-s", args.idle_exit_s)):
        if value is not None:
            check_number(flag, value, above=0)
    if args.rows is not None and args.rows < 1:
        raise UserError(f"--rows must be at least 1, got {args.rows}")
    kind = format_of(args.out, args.format)
    images = None if kind != "mcap" or args.images.lower() == "none" else args.images
    writer = open_recording(args.out, kind)
    recorder = ResultRecorder(args.connect, args.topic, heartbeat_topic=args.heartbeat_topic if kind == "mcap" else None,
                              images_endpoint=images, image_topic_pattern=args.image_topic)

    def request_stop(signum: int, frame: object) -> None:
        recorder.stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    failure: RecordingWriteError | None = None
    try:
        print(f"READY record {args.connect} -> {args.out} ({kind})", flush=True)
        try:
            recorder.record(writer, args.duration_s, args.rows, args.idle_exit_s)
        except RecordingWriteError as error:
            failure = error
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        recorder.close()
        try:
            writer.close()  # MCAP: the summary; a failed recording is left cut at its last good flush
        except RecordingWriteError as error:
            failure = failure or error
    if failure is not None:
        raise UserError(f"--out {failure}")
    print(f"recorded {writer.committed_results} results to {args.out}", flush=True)
    return 0
