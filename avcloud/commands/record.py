"""`avcloud record --out FILE.jsonl`: subscribe to the onboard node's detections and write them down.

One JSON object per line, one line per published result, in arrival order:
    {"frame_index": 17, "camera": "FRONT", "source": "cloud", "latency_ms": 83.2,
     "config": "avd-cloud-m-imgcompNone-inpcomp75", "deadline_met": true,
     "detections": [[x1, y1, x2, y2, score, class], ...], "received_ms": 123456.7}
`received_ms` is the recorder's monotonic clock when the message arrived. Read the file back
with `read_recording(path)`.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import zmq

from avcloud.errors import DataError, UserError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5601"
DEFAULT_TOPIC = "/perception/{camera}/detections"


def topic_matcher(pattern: str) -> re.Pattern[str]:
    """A regex matching the topic names of a `{camera}` pattern."""
    before, found, after = pattern.partition("{camera}")
    if not found:
        return re.compile(re.escape(pattern) + "$")
    return re.compile(re.escape(before) + r"(?P<camera>[^/]+)" + re.escape(after) + "$")


def result_row(result: Any, received_ms: float) -> dict[str, Any]:
    return {**result.header(), "detections": result.detections.round(2).tolist(),
            "received_ms": round(received_ms, 3)}


class ResultRecorder:
    """SUB socket on the node's outputs, writing one JSONL row per detections message."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, topic_pattern: str = DEFAULT_TOPIC,
                 context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 10000)
        prefix = topic_pattern.partition("{camera}")[0]
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.socket.connect(endpoint)
        self.matcher = topic_matcher(topic_pattern)
        self.stop_requested = threading.Event()
        self.rows = 0
        self.bad_messages = 0
        self.last_received_s: float | None = None

    def record(self, out: TextIO, duration_s: float | None = None, max_rows: int | None = None,
               idle_exit_s: float | None = None) -> int:
        """Write rows until stopped, `duration_s` passes, `max_rows` are written, or nothing arrived
        for `idle_exit_s` after the first row. Returns the rows written."""
        from onboard.topics import TopicMessageError, decode_detection_result

        started_s = time.monotonic()
        while not self.stop_requested.is_set():
            now_s = time.monotonic()
            if duration_s is not None and now_s - started_s >= duration_s:
                break
            if max_rows is not None and self.rows >= max_rows:
                break
            if idle_exit_s is not None and self.last_received_s is not None \
                    and now_s - self.last_received_s >= idle_exit_s:
                break
            if not self.socket.poll(50):
                continue
            while True:
                try:
                    frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                received_ms = time.monotonic() * 1000.0
                self.last_received_s = received_ms / 1000.0
                if not frames or not self.matcher.match(frames[0].decode(errors="replace")):
                    continue
                try:
                    result = decode_detection_result(frames)
                except TopicMessageError:
                    self.bad_messages += 1
                    continue
                out.write(json.dumps(result_row(result, received_ms)) + "\n")
                self.rows += 1
            out.flush()
        return self.rows

    def close(self) -> None:
        self.socket.close(linger=0)


def read_recording(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a recording; DataError naming the line of a malformed one."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    required = ("frame_index", "camera", "source", "latency_ms", "config", "deadline_met", "detections")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {number}: not JSON") from None
        missing = [name for name in required if not isinstance(row, dict) or name not in row]
        if missing:
            raise DataError(f"{path} line {number}: missing field '{missing[0]}'")
        rows.append(row)
    return rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "record", help="write the onboard node's published results to a JSONL file",
        description="Subscribe to the onboard node's detections topics and write one JSON row per result. "
                    "Prints READY when connected; stops on SIGINT/SIGTERM, --duration-s, --rows or --idle-exit-s.")
    parser.add_argument("--out", type=Path, required=True, help="output file (.jsonl)")
    parser.add_argument("--connect", default=DEFAULT_ENDPOINT, help=f"node outputs endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help=f"detections topic pattern (default {DEFAULT_TOPIC})")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many results")
    parser.add_argument("--idle-exit-s", type=float, default=None,
                        help="stop when nothing arrived for this long after the first result")
    parser.set_defaults(handler=run_record)


def run_record(args: argparse.Namespace) -> int:
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = args.out.open("w")
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot write ({error.strerror or error})") from None
    recorder = ResultRecorder(args.connect, args.topic)

    def request_stop(signum: int, frame: object) -> None:
        recorder.stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"READY record {args.connect} -> {args.out}", flush=True)
        rows = recorder.record(out, args.duration_s, args.rows, args.idle_exit_s)
        print(f"recorded {rows} results to {args.out}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        recorder.close()
        out.close()
    return 0
