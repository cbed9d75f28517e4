"""The camera player and the result recorder (onboard.player, onboard.recorder) on loopback:
nothing published is lost at the end, and recordings hold what was published."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import zmq

from avcloud.recording import McapRecording, open_recording, read_mcap, read_recording
from onboard.player import CameraPlayer
from onboard.recorder import ResultRecorder
from onboard.topics import DetectionResult, decode_camera_frame, encode_detection_result, encode_heartbeat

cv2 = pytest.importorskip("cv2")


@dataclass
class FakeImage:
    jpeg_bytes: bytes
    width: int = 64
    height: int = 48


@dataclass
class FakeFrame:
    index: int
    cameras: dict = field(default_factory=dict)
    timestamp_micros: int = 0


def frames(count: int, payload_bytes: int, start: int = 0, cameras=("FRONT", "SIDE_LEFT")) -> list[FakeFrame]:
    return [FakeFrame(index, {camera: FakeImage(bytes([index % 256]) * payload_bytes) for camera in cameras},
                      index * 100_000) for index in range(start, start + count)]


def subscribe(context: zmq.Context, endpoint: str) -> zmq.Socket:
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.linger = 0
    socket.connect(endpoint)
    return socket


def wait_until_subscribed(player: CameraPlayer, subscriber: zmq.Socket) -> None:
    """PUB drops what it sends before a subscriber has joined: play warm-up frames until one arrives."""
    give_up_at = time.monotonic() + 10
    while time.monotonic() < give_up_at:
        player.play(frames(1, 10, start=0, cameras=("FRONT",)))
        if subscriber.poll(50):
            while subscriber.poll(50):
                subscriber.recv_multipart()
            return
    pytest.fail("subscriber never joined")


def test_player_delivers_every_message_it_reports_before_closing():
    # Issue 12: `avcloud play` lost its last message in 3 of 7 runs (close with linger 0).
    context = zmq.Context()
    player = CameraPlayer("tcp://127.0.0.1:*", rate_hz=1000.0)
    subscriber = subscribe(context, player.bound_endpoint)
    try:
        wait_until_subscribed(player, subscriber)
        before = player.messages_published
        player.play(frames(40, 500_000, start=1))  # 40 MB: most of it still queued when play returns
        published = player.messages_published - before
        assert player.close(flush_timeout_s=10.0)
        received = 0
        while subscriber.poll(2000):
            message = decode_camera_frame(subscriber.recv_multipart())
            received += message.frame_index >= 1
        assert received == published == 80
    finally:
        player.close()
        subscriber.close()
        context.term()


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_player_refuses_a_rate_that_is_not_a_positive_number(rate):
    from avcloud.errors import UserError

    with pytest.raises(UserError, match="--rate must be a positive number"):
        CameraPlayer("tcp://127.0.0.1:*", rate_hz=rate)


def publish_results(endpoint_holder: list, ready: threading.Event, done: threading.Event, results: int,
                    cameras=("FRONT", "SIDE_LEFT")) -> None:
    context = zmq.Context.instance()
    publisher = context.socket(zmq.XPUB)  # sees subscriptions: publish once the recorder has joined
    publisher.linger = 2000
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    endpoint_holder.append(f"tcp://127.0.0.1:{port}")
    ready.set()
    subscriptions = set()
    while len(subscriptions) < 2:  # the detections prefix and the heartbeat topic
        if publisher.poll(10_000):
            subscriptions.add(publisher.recv())
        else:
            return
    sent = 0
    frame = 0
    while sent < results:
        for camera in cameras:
            source = "cloud" if frame % 2 else "onboard"
            detections = np.array([[10, 20, 110, 220, 0.9, 1], [5, 5, 50, 50, 0.4, 2]], np.float32)[: 1 + frame % 2]
            result = DetectionResult(frame, camera, source, 80.0 + frame, f"cfg-{source}", True, detections)
            publisher.send_multipart(encode_detection_result(f"/perception/{camera}/detections", result))
            sent += 1
        publisher.send_multipart(encode_heartbeat("/onboard/heartbeat", {"bandwidth_mbps": 5.0 + frame,
                                                                       "rtt_ms": 20.0}))
        frame += 1
        time.sleep(0.01)
    done.wait(10)
    publisher.close()


def run_recorder(writer_or_stream, results: int) -> ResultRecorder:
    endpoint: list = []
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=publish_results, args=(endpoint, ready, done, results), daemon=True)
    thread.start()
    ready.wait(5)
    recorder = ResultRecorder(endpoint[0])
    try:
        recorder.record(writer_or_stream, duration_s=20, max_rows=results)
    finally:
        done.set()
        recorder.close()
        thread.join(10)
    return recorder


def test_recorder_writes_jsonl_rows(tmp_path):
    with open_recording(tmp_path / "drive.jsonl") as writer:
        assert run_recorder(writer, 10).rows == 10
    rows = read_recording(tmp_path / "drive.jsonl")
    assert len(rows) == 10 and {row["source"] for row in rows} == {"cloud", "onboard"}
    assert rows[0]["detections"] == [[10.0, 20.0, 110.0, 220.0, 0.9, 1.0]]


def test_recorder_writes_an_mcap_file_every_message_of_which_reads_back(tmp_path):
    path = tmp_path / "drive.mcap"
    with open_recording(path, "mcap") as writer:
        assert isinstance(writer, McapRecording)
        run_recorder(writer, 10)
    messages = list(read_mcap(path))
    results = [m for m in messages if m.schema == "avcloud_msgs/msg/PerceptionResult"]
    annotations = [m for m in messages if m.schema == "foxglove_msgs/msg/ImageAnnotations"]
    allocations = [m for m in messages if m.schema == "avcloud_msgs/msg/Allocation"]
    bandwidth = [m for m in messages if m.schema == "avcloud_msgs/msg/BandwidthEstimate"]
    assert len(results) == len(annotations) == 10
    for result, annotation in zip(results, annotations, strict=True):
        assert result.topic == f"/perception/{result.message.camera}/result"
        assert annotation.topic == f"/perception/{result.message.camera}/annotations"
        assert len(annotation.message.points) == len(result.message.detections) == 1 + result.message.frame_index % 2
        assert result.message.source == ("cloud" if result.message.frame_index % 2 else "onboard")
    assert [a.message.frame_index for a in allocations] == list(range(5))
    for allocation in allocations:
        configs = {entry.camera: entry.config for entry in allocation.message.cameras}
        assert configs == {camera: "cfg-cloud" if allocation.message.frame_index % 2 else ""
                           for camera in ("FRONT", "SIDE_LEFT")}
    assert bandwidth and bandwidth[0].message.estimate_mbps == 5.0 and bandwidth[0].message.rtt_ms == 20.0


def test_mcap_recording_pairs_each_result_with_its_camera_image(tmp_path):
    """Images from the player's topics and results from the node's: a result carries its frame's
    image stamp, so Foxglove draws the detections over the right image."""
    player = CameraPlayer("tcp://127.0.0.1:*", rate_hz=1000.0)
    context = zmq.Context.instance()
    outputs = context.socket(zmq.XPUB)
    outputs.linger = 1000
    port = outputs.bind_to_random_port("tcp://127.0.0.1")
    path = tmp_path / "drive.mcap"
    writer = open_recording(path, "mcap")
    recorder = ResultRecorder(f"tcp://127.0.0.1:{port}", images_endpoint=player.bound_endpoint)
    thread = threading.Thread(target=recorder.record, args=(writer,), kwargs={"duration_s": 30, "max_rows": 6},
                              daemon=True)
    thread.start()
    try:
        assert outputs.poll(10_000)  # the recorder has subscribed to the node's outputs
        give_up_at = time.monotonic() + 10
        while recorder.images == 0 and time.monotonic() < give_up_at:  # ... and to the camera topics
            player.play(frames(1, 100, start=0, cameras=("FRONT",)))
            time.sleep(0.02)
        player.play(frames(3, 2000, start=1))
        time.sleep(0.2)
        for frame in range(1, 4):
            for camera in ("FRONT", "SIDE_LEFT"):
                result = DetectionResult(frame, camera, "cloud", 50.0, "cfg", True,
                                         np.array([[1, 2, 3, 4, 0.5, 1]], np.float32))
                outputs.send_multipart(encode_detection_result(f"/perception/{camera}/detections", result))
        thread.join(30)
    finally:
        recorder.stop_requested.set()
        thread.join(5)
        recorder.close()
        writer.close()
        player.close()
        outputs.close()
    messages = list(read_mcap(path))
    stamps = {(m.message.header.frame_id, m.message.data[0]): (m.message.header.stamp.sec, m.message.header.stamp.nanosec)
              for m in messages if m.schema == "sensor_msgs/msg/CompressedImage"}
    results = [m.message for m in messages if m.schema == "avcloud_msgs/msg/PerceptionResult"]
    assert len(results) == 6
    for result in results:
        image_stamp = stamps[(result.camera, result.frame_index)]  # the image of that camera and frame
        assert (result.header.stamp.sec, result.header.stamp.nanosec) == image_stamp
    allocations = [m.message for m in messages if m.schema == "avcloud_msgs/msg/Allocation"]
    assert [a.frame_index for a in allocations] == [1, 2, 3]
