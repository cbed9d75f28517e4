"""The onboard node: params, topic messages, liveness, lifecycle, and the node on real sockets."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from avcloud.errors import ConfigError
from avcloud.types import Option, Service
from onboard.node import ACTIVE, FINALIZED, INACTIVE, UNCONFIGURED, OnboardNode
from onboard.params import OnboardParams, load_params
from onboard.topics import (
    CameraFrame,
    DetectionResult,
    TopicMessageError,
    TopicMonitor,
    decode_camera_frame,
    decode_detection_result,
    encode_camera_frame,
    encode_detection_result,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "onboard.yaml"


def test_example_params_load_and_overrides_apply():
    params = load_params(EXAMPLE, ["slo_ms:=150", "endpoints.cloud:=tcp://10.0.0.2:7000", "method:=quantile"])
    assert params.slo_ms == 150.0
    assert params.endpoints.cloud == "tcp://10.0.0.2:7000"
    assert params.method == "quantile"
    assert params.cameras == ["FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT"]
    # Key paths in a file are relative to the file.
    assert params.security.client_secret_key == EXAMPLE.parent / "keys" / "car-0.key_secret"
    assert params.policy_spec().success_horizon  # turbo-q's default
    assert not load_params(EXAMPLE, ["success_horizon:=false"]).policy_spec().success_horizon


@pytest.mark.parametrize(("override", "named"), [
    ("slo_ms:=-5", "slo_ms"),
    ("method:=fastest", "method"),
    ("no_such_field:=1", "no_such_field"),
    ("cameras:=[FRONT, FRONT]", "cameras"),
    ("success_horizon:=maybe", "success_horizon"),
])
def test_bad_params_are_one_line_errors_naming_the_field(override, named):
    with pytest.raises(ConfigError) as error:
        load_params(EXAMPLE, [override])
    message = str(error.value)
    assert named in message and "\n" not in message


def test_keys_are_required_unless_insecure():
    with pytest.raises(ConfigError, match="insecure"):
        load_params(None, [])
    assert load_params(None, ["security.insecure:=true"]).security.insecure


def test_topic_messages_round_trip_and_reject_malformed_input():
    frame = CameraFrame(7, "FRONT", 123, 1920, 1280, b"\xff\xd8jpeg")
    decoded = decode_camera_frame(encode_camera_frame("/camera/FRONT/image", frame))
    assert (decoded.frame_index, decoded.camera, decoded.width, bytes(decoded.jpeg)) == (7, "FRONT", 1920, b"\xff\xd8jpeg")
    detections = np.array([[1, 2, 3, 4, 0.5, 2]], dtype=np.float32)
    result = DetectionResult(7, "FRONT", "cloud", 80.5, "m-imgcompNone-inpcomp75", True, detections)
    back = decode_detection_result(encode_detection_result("/perception/FRONT/detections", result))
    assert back.header() == result.header()
    np.testing.assert_array_equal(back.detections, detections)
    for frames in ([b"t", b"{}"], [b"t", b"not json", b"x"], [b"t", b'{"frame_index": -1}', b"x"],
                   [b"t", b'{"frame_index": 1, "camera": "F", "timestamp_micros": 0, "width": 0, "height": 1}', b"x"]):
        with pytest.raises(TopicMessageError):
            decode_camera_frame(frames)
    with pytest.raises(TopicMessageError, match="source"):
        decode_detection_result([b"t", b'{"source": "psychic"}', b""])


def test_topic_monitor_marks_a_topic_dead_after_missed_periods():
    monitor = TopicMonitor({"/camera/FRONT/image": 10.0, "/camera/SIDE_LEFT/image": 10.0}, dead_after_periods=3)
    monitor.update("/camera/FRONT/image", 1000.0)
    assert monitor.alive("/camera/FRONT/image", 1250.0)
    assert not monitor.alive("/camera/FRONT/image", 1350.0)
    assert monitor.dead_topics(1100.0) == ["/camera/SIDE_LEFT/image"]


def fixed_detections(image: np.ndarray, full_size_wh: tuple[int, int]) -> np.ndarray:
    return np.array([[0, 0, 10, 10, 0.7, 1]], dtype=np.float32)


def make_node(camera_endpoint: str, cloud_endpoint: str) -> OnboardNode:
    params = OnboardParams.model_validate(dict(
        cameras=["FRONT"], slo_ms=100.0, heartbeat_period_ms=100.0, security={"insecure": True},
        endpoints={"cameras": camera_endpoint, "outputs": "tcp://127.0.0.1:*", "cloud": cloud_endpoint}))
    services = (Service("FRONT", (Option("avd-onboard", 0.0, 0.0, 0.3),)),)

    class OnboardOnly:
        def plan(self, bandwidth_mbps, rtt_ms, slo_ms, samples):
            from avcloud.types import Allocation

            return Allocation({"FRONT": "avd-onboard"}, 0.3, {"FRONT": 0.0})

    return OnboardNode(params, services=services, planner=OnboardOnly(), fallback=fixed_detections,
                       encoder=lambda image, name, full_size_wh: None, log_stream=io.StringIO())


def test_node_lifecycle_and_publishing_on_real_sockets():
    context = zmq.Context.instance()
    cameras = context.socket(zmq.PUB)
    cameras.bind("tcp://127.0.0.1:*")
    node = make_node(cameras.getsockopt_string(zmq.LAST_ENDPOINT), "tcp://127.0.0.1:1")
    assert node.state == UNCONFIGURED
    with pytest.raises(RuntimeError):
        node.activate()
    node.configure()
    assert node.state == INACTIVE
    outputs = context.socket(zmq.SUB)
    outputs.setsockopt(zmq.SUBSCRIBE, b"")
    outputs.connect(node.outputs_endpoint)
    node.start()
    assert node.state == ACTIVE
    try:
        time.sleep(0.3)
        jpeg = cv2.imencode(".jpg", np.full((40, 60, 3), 128, np.uint8))[1].tobytes()
        cameras.send_multipart([b"/camera/FRONT/image", b"garbage", b"x"])  # counted, not fatal
        for index in range(3):
            cameras.send_multipart(encode_camera_frame("/camera/FRONT/image", CameraFrame(index, "FRONT", 0, 60, 40, jpeg)))
            time.sleep(0.02)
        results, heartbeats = [], []
        deadline = time.monotonic() + 5.0
        while (len(results) < 3 or not heartbeats) and time.monotonic() < deadline:
            if outputs.poll(100):
                frames = outputs.recv_multipart()
                if frames[0] == b"/onboard/heartbeat":
                    heartbeats.append(json.loads(frames[1]))
                else:
                    results.append(decode_detection_result(frames))
        assert [(r.frame_index, r.source, r.config) for r in results] == [
            (0, "onboard", "avd-onboard"), (1, "onboard", "avd-onboard"), (2, "onboard", "avd-onboard")]
        assert all(r.deadline_met and r.latency_ms < 100.0 for r in results)
        assert heartbeats[-1]["state"] == ACTIVE
        assert node.bad_camera_messages == 1
        node.deactivate()
        assert node.state == INACTIVE
    finally:
        node.shutdown()
        cameras.close(0)
        outputs.close(0)
    assert node.state == FINALIZED


def test_decoder_decodes_only_as_finely_as_the_allocated_configuration_needs():
    from onboard.inference import CameraDecoder, ModelInputs

    decoder = CameraDecoder("onboard-s", ModelInputs({"onboard-s": (384, 256), "cloud-m": (768, 512)}))
    full = np.zeros((1280, 1920, 3), np.uint8)
    full[::7, ::5] = 255
    jpeg = cv2.imencode(".jpg", full)[1].tobytes()
    shapes = {choice: decoder.decode(jpeg, (1920, 1280), choice).shape[:2] for choice in (
        "onboard-s", "cloud-m-imgcompNone-inpcomp75", "cloud-m-imgcomp90-inpcompNone", "other-imgcompNone-inpcomp75")}
    assert shapes == {
        "onboard-s": (320, 480),  # 1/4 still covers the 384x256 fallback input
        "cloud-m-imgcompNone-inpcomp75": (640, 960),  # 1/2 covers the 768x512 cloud input
        "cloud-m-imgcomp90-inpcompNone": (1280, 1920),  # the full frame is sent
        "other-imgcompNone-inpcomp75": (1280, 1920),  # unknown model: no guess
    }


def test_quantile_mode_plans_from_the_bandwidth_samples():
    from onboard.planning import build_planner
    from optimizer.policies import get_policy

    options = (Option("avd-onboard", 0.0, 0.0, 0.3), Option("m-imgcompNone-inpcomp75", 0.5, 20.0, 0.6))  # needs 8.3 Mbps
    services = tuple(Service(camera, options) for camera in ("FRONT", "SIDE_LEFT"))
    planner = build_planner(services, get_policy("turbo-q"))
    # Too few samples to forecast: the point estimate decides (25 Mbps carries both cameras).
    early = planner.plan(25.0, 20.0, 100.0, [25.0])
    assert set(early.choices.values()) == {"m-imgcompNone-inpcomp75"}
    # Samples mostly at 10 Mbps: planning at the point estimate (25) would miss most deadlines;
    # the quantile planner sends only what the likely bandwidth carries: one camera.
    samples = [10.0] * 45 + [60.0] * 5
    planned = planner.plan(25.0, 20.0, 100.0, samples)
    assert "planning_quantile" in planned.extra
    assert sorted(planned.choices.values()) == ["avd-onboard", "m-imgcompNone-inpcomp75"]


_frames = st.lists(st.one_of(st.binary(max_size=64), st.dictionaries(
    st.sampled_from(["frame_index", "camera", "timestamp_micros", "width", "height", "capture_ms", "source",
                     "latency_ms", "config", "deadline_met"]),
    st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none()),
).map(lambda header: json.dumps(header).encode())), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_frames)
def test_malformed_topic_messages_only_raise_topic_message_errors(frames):
    # Anything else escaping (KeyError, TypeError, ...) would take the node's event loop down.
    for decode in (decode_camera_frame, decode_detection_result):
        with contextlib.suppress(TopicMessageError):
            decode(frames)
