"""Recording formats (avcloud.recording): JSONL and MCAP, written the same way, read back
message by message; a full disk leaves a readable file and says how many results it holds."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest

from avcloud.errors import DataError, UserError
from avcloud.recording import (
    JsonlRecording,
    McapRecording,
    RecordingWriteError,
    format_of,
    open_recording,
    read_mcap,
    read_recording,
)

CAMERAS = ("FRONT", "SIDE_LEFT")
T0_NS = 1_700_000_000_000_000_000


class FillingDisk(io.FileIO):
    """A file on a disk that fills up after `capacity` bytes (ENOSPC, like a real full disk:
    what fits is written, then the write fails)."""

    def __init__(self, path, capacity: int) -> None:
        super().__init__(path, "w+")
        self.capacity = capacity

    def write(self, data) -> int:
        room = self.capacity - self.tell()
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(bytes(data)[:room])


def image_bytes(frame: int, camera: str) -> bytes:
    return np.random.default_rng([frame, CAMERAS.index(camera)]).bytes(3000)  # incompressible, like a JPEG


def write_drive(recording, frames: int, flush_every: int = 1) -> int:
    """A small drive: per frame, images, the allocation, one result per camera, the estimate."""
    written = 0
    for frame in range(frames):
        stamp_ns = T0_NS + frame * 100_000_000
        choices = {camera: ("avd-cloud-m-imgcompNone-inpcomp75" if frame % 2 else None) for camera in CAMERAS}
        recording.write_allocation(frame_index=frame, timestamp_ns=stamp_ns, choices=choices, budget_mbps=4.0 + frame,
                                   critical_bandwidth_mbps={camera: 1.5 for camera in CAMERAS})
        for camera in CAMERAS:
            recording.write_camera_image(frame_index=frame, camera=camera, timestamp_ns=stamp_ns,
                                         data=image_bytes(frame, camera))
            detections = np.array([[1, 2, 30 + frame, 40, 0.5, 1 + frame % 4]], np.float32)
            recording.write_result(frame_index=frame, camera=camera, timestamp_ns=stamp_ns,
                                   source="cloud" if choices[camera] else "onboard",
                                   config=choices[camera] or "avd-onboard", latency_ms=50.0 + frame,
                                   deadline_met=frame != 3, detections=detections)
            written += 1
        recording.write_bandwidth(timestamp_ns=stamp_ns, estimate_mbps=4.5 + frame, planning_mbps=4.0 + frame,
                                  rtt_ms=20.0)
        if (frame + 1) % flush_every == 0:
            recording.flush()
    return written


def check_mcap_drive(path, frames: int) -> None:
    messages = list(read_mcap(path))
    by_schema: dict[str, list] = {}
    for message in messages:
        by_schema.setdefault(message.schema, []).append(message)
    assert {name: len(found) for name, found in by_schema.items()} == {
        "avcloud_msgs/msg/Allocation": frames, "sensor_msgs/msg/CompressedImage": frames * 2,
        "avcloud_msgs/msg/PerceptionResult": frames * 2, "foxglove_msgs/msg/ImageAnnotations": frames * 2,
        "avcloud_msgs/msg/BandwidthEstimate": frames}
    for message in messages:
        body = message.message
        frame = (message.log_time_ns - T0_NS) // 100_000_000
        if message.schema == "sensor_msgs/msg/CompressedImage":
            assert message.topic == f"/camera/{body.header.frame_id}/image/compressed"
            assert body.format == "jpeg" and body.data == image_bytes(frame, body.header.frame_id)
            assert (body.header.stamp.sec, body.header.stamp.nanosec) == divmod(message.log_time_ns, 10**9)
        elif message.schema == "avcloud_msgs/msg/PerceptionResult":
            assert message.topic == f"/perception/{body.camera}/result" and body.frame_index == frame
            assert body.source == ("cloud" if frame % 2 else "onboard")
            assert body.config == ("avd-cloud-m-imgcompNone-inpcomp75" if frame % 2 else "avd-onboard")
            assert body.latency_ms == 50.0 + frame and body.deadline_met == (frame != 3)
            (detection,) = body.detections
            assert (detection.x1, detection.x2, detection.label) == (1.0, 30.0 + frame, 1 + frame % 4)
            assert detection.score == pytest.approx(0.5)
        elif message.schema == "foxglove_msgs/msg/ImageAnnotations":
            (box,) = body.points
            assert box.type == 2 and [(p.x, p.y) for p in box.points] == [
                (1.0, 2.0), (30.0 + frame, 2.0), (30.0 + frame, 40.0), (1.0, 40.0)]
            assert (box.timestamp.sec, box.timestamp.nanosec) == divmod(message.log_time_ns, 10**9)
            assert body.texts[0].text.endswith("(cloud)" if frame % 2 else "(onboard)")
        elif message.schema == "avcloud_msgs/msg/Allocation":
            assert body.frame_index == frame and body.budget_mbps == 4.0 + frame
            assert [(c.camera, c.config, c.critical_bandwidth_mbps) for c in body.cameras] == [
                (camera, "avd-cloud-m-imgcompNone-inpcomp75" if frame % 2 else "", 1.5) for camera in CAMERAS]
        else:
            assert (body.estimate_mbps, body.planning_mbps, body.rtt_ms) == (4.5 + frame, 4.0 + frame, 20.0)


def test_mcap_recording_reads_back_every_message(tmp_path):
    path = tmp_path / "drive.mcap"
    with open_recording(path) as recording:
        assert isinstance(recording, McapRecording)
        assert write_drive(recording, frames=6) == 12
    check_mcap_drive(path, frames=6)


def test_mcap_file_has_an_index_and_ros2_profile(tmp_path):
    from mcap.reader import make_reader

    path = tmp_path / "drive.mcap"
    with open_recording(path) as recording:
        write_drive(recording, frames=2)
    with path.open("rb") as stream:
        reader = make_reader(stream)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        assert summary is not None and summary.statistics.message_count == 2 * (1 + 2 * 3 + 1)
        assert {schema.encoding for schema in summary.schemas.values()} == {"ros2msg"}
        assert {channel.message_encoding for channel in summary.channels.values()} == {"cdr"}


def test_jsonl_keeps_the_simple_rows(tmp_path):
    path = tmp_path / "drive.jsonl"
    with open_recording(path) as recording:
        assert isinstance(recording, JsonlRecording)
        write_drive(recording, frames=3)
    rows = read_recording(path)
    assert [(row["frame_index"], row["camera"], row["source"]) for row in rows] == [
        (frame, camera, "cloud" if frame % 2 else "onboard") for frame in range(3) for camera in CAMERAS]
    assert rows[0]["detections"] == [[1.0, 2.0, 30.0, 40.0, 0.5, 1.0]]


@pytest.mark.parametrize("kind", ["jsonl", "mcap"])
def test_a_full_disk_keeps_what_was_flushed_readable_and_says_how_many(tmp_path, kind):
    path = tmp_path / f"drive.{kind}"
    writer_class = JsonlRecording if kind == "jsonl" else McapRecording
    capacity = 600 if kind == "jsonl" else 60_000  # the disk fills during the drive
    recording = writer_class(FillingDisk(path, capacity), str(path))
    with pytest.raises(RecordingWriteError) as failed:
        write_drive(recording, frames=40)
    kept = failed.value.results
    assert 0 < kept < 80 and kept % 2 == 0  # whole frames, flushed one at a time
    assert f"after {kept} result(s); the file keeps those {kept}, readable" in str(failed.value)
    assert "No space left on device" in str(failed.value) and "\n" not in str(failed.value)
    recording.close()  # after the error: only closes
    if kind == "jsonl":
        assert len(read_recording(path)) == kept
    else:
        results = [m for m in read_mcap(path) if m.schema == "avcloud_msgs/msg/PerceptionResult"]
        assert len(results) == kept
        check_mcap_drive_prefix(path, kept // 2)


def check_mcap_drive_prefix(path, frames: int) -> None:
    frames_seen = {m.message.frame_index for m in read_mcap(path) if m.schema == "avcloud_msgs/msg/PerceptionResult"}
    assert frames_seen == set(range(frames))


@pytest.mark.parametrize("kind", ["jsonl", "mcap"])
def test_dev_full_is_a_one_line_error(kind):
    with pytest.raises(UserError) as failed:
        recording = open_recording("/dev/full", kind)
        write_drive(recording, frames=2)
        recording.close()
    assert "/dev/full: cannot write (No space left on device) after 0 result(s)" in str(failed.value)


def test_format_follows_the_suffix_unless_asked():
    assert format_of("a.mcap") == "mcap" and format_of("a.jsonl") == "jsonl" and format_of("a.txt") == "jsonl"
    assert format_of("a.jsonl", "mcap") == "mcap"
    with pytest.raises(UserError, match="--format must be one of jsonl, mcap"):
        format_of("a", "bag")


def test_reading_what_is_not_a_recording_is_a_data_error(tmp_path):
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"not an mcap file at all")
    with pytest.raises(DataError, match="junk.mcap: not a readable MCAP file"):
        list(read_mcap(junk))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="binary.jsonl: cannot read"):
        read_recording(binary)
