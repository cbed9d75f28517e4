"""Wire protocol: round trips, every malformed-input class, and fuzzing of the decoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avcloud import protocol
from avcloud.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    ReplyHeader,
    RequestHeader,
    ServerTimings,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)


def infer_header(**changes) -> RequestHeader:
    fields = dict(vehicle="car-1", request_id=7, task="FRONT", frame=3, model="centernet-m", codec="jpeg",
                  shape=(64, 96, 3), budget_ms=80.5)
    fields.update(changes)
    return RequestHeader(**fields)


def raw_header_bytes(**changes) -> bytes:
    data = infer_header().to_json_dict()
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


_DELETE = object()


def test_request_round_trip_keeps_every_field_and_payload_is_not_copied():
    header = infer_header(frame_shape=(1280, 1920))
    payload = bytearray(b"\xff\xd8jpeg-bytes")
    frames = encode_request(header, memoryview(payload))
    assert frames[1].obj is payload  # passed through, so send_multipart(copy=False) is zero-copy
    decoded, view = decode_request([frames[0], payload])
    assert decoded == header
    assert bytes(view) == bytes(payload)
    payload[0] = 0  # the returned view aliases the received buffer
    assert view[0] == 0


def test_request_header_is_plain_json_with_documented_names():
    data = json.loads(encode_request(infer_header(), b"x")[0])
    assert data == {"v": PROTOCOL_VERSION, "type": "infer", "vehicle": "car-1", "request_id": 7,
                    "task": "FRONT", "frame": 3, "model": "centernet-m", "codec": "jpeg",
                    "shape": [64, 96, 3], "budget_ms": 80.5}


def test_ping_round_trip_accepts_one_or_two_frames():
    frames = protocol.ping_request("car-2", "p1")
    for received in (frames, frames[:1]):
        header, payload = decode_request(received)
        assert header.kind == protocol.PING
        assert (header.vehicle, header.request_id) == ("car-2", "p1")
        assert payload.nbytes == 0


def test_reply_round_trip_with_detections():
    detections = np.array([[1, 2, 30, 40, 0.9, 1], [5, 6, 7, 8, 0.25, 2]], dtype=np.float32)
    request = infer_header()
    timings = ServerTimings(queue_ms=1.5, decode_ms=2.0, inference_ms=30.0, total_ms=34.0)
    frames = encode_reply(protocol.reply_to(request, protocol.OK, timings=timings), detections)
    assert len(frames[1]) == 2 * 6 * 4
    header, decoded = decode_reply(frames)
    assert header.ok and header.count == 2 and header.reason is None and not header.late
    assert (header.request_id, header.vehicle, header.task, header.frame, header.model) == (
        7, "car-1", "FRONT", 3, "centernet-m")
    assert header.timings == timings
    np.testing.assert_array_equal(decoded, detections)
    assert decoded.dtype == np.float32


def test_reply_detections_are_little_endian_float32():
    detections = np.array([[1.5, 2, 3, 4, 0.5, 4]], dtype=np.float32)
    body = encode_reply(ReplyHeader(status=protocol.OK), detections.astype(">f4"))[1]
    assert body == detections.astype("<f4").tobytes()


def test_error_reply_without_identity_round_trips():
    header, detections = decode_reply(encode_reply(ReplyHeader(status=protocol.ERROR, reason="bad")))
    assert header.status == "error" and header.reason == "bad" and header.request_id is None
    assert detections.shape == (0, 6)


def test_pong_reply_kind():
    ping, _ = decode_request(protocol.ping_request("car", 1))
    header, _ = decode_reply(encode_reply(protocol.reply_to(ping, protocol.OK)))
    assert header.kind == protocol.PONG and header.task is None


def test_encode_reply_rejects_wrong_detection_shape():
    with pytest.raises(ValueError):
        encode_reply(ReplyHeader(status="ok"), np.zeros((3, 5), np.float32))


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([], "2 frames"),
        ([b"{}", b"x", b"y"], "2 frames"),
        ([b"\xff\xfe", b"x"], "not UTF-8 JSON"),
        ([b"[1, 2]", b"x"], "JSON object"),
        ([b"{\"v\": NaN}", b"x"], "not JSON"),
        ([b" " * 5000, b"x"], "more than 4096"),
        ([raw_header_bytes(v=2), b"x"], "unsupported protocol version 2"),
        ([raw_header_bytes(v=True), b"x"], "unsupported protocol version"),
        ([raw_header_bytes(v=_DELETE), b"x"], "unsupported protocol version None"),
        ([raw_header_bytes(type="infer!"), b"x"], "'type'"),
        ([raw_header_bytes(vehicle=""), b"x"], "'vehicle' must not be empty"),
        ([raw_header_bytes(vehicle=5), b"x"], "'vehicle' must be a string"),
        ([raw_header_bytes(request_id=-1), b"x"], "'request_id'"),
        ([raw_header_bytes(request_id=[1]), b"x"], "'request_id'"),
        ([raw_header_bytes(task=_DELETE), b"x"], "missing field 'task'"),
        ([raw_header_bytes(frame=1.5), b"x"], "'frame' must be an integer"),
        ([raw_header_bytes(frame=True), b"x"], "'frame' must be an integer"),
        ([raw_header_bytes(model="m" * 200), b"x"], "longer than 128"),
        ([raw_header_bytes(codec="webp"), b"x"], "'codec'"),
        ([raw_header_bytes(shape=[64, 96]), b"x"], "'shape'"),
        ([raw_header_bytes(shape=[64, 96, 1]), b"x"], "'shape'"),
        ([raw_header_bytes(shape=[0, 96, 3]), b"x"], "'shape'"),
        ([raw_header_bytes(budget_ms=-1), b"x"], "'budget_ms'"),
        ([raw_header_bytes(budget_ms="80"), b"x"], "'budget_ms' must be a number"),
        ([raw_header_bytes(frame_shape=[10]), b"x"], "'frame_shape'"),
        ([raw_header_bytes(), b""], "payload is empty"),
        ([raw_header_bytes()], "2 frames"),
        ([raw_header_bytes(codec="raw"), b"x" * 10], "raw payload is 10 bytes"),
        ([raw_header_bytes(), "text frame"], "not a byte buffer"),
    ],
)
def test_every_malformed_request_class_raises_protocol_error(frames, fragment):
    with pytest.raises(ProtocolError) as caught:
        decode_request(frames)
    assert fragment in caught.value.reason


def test_protocol_error_carries_identity_when_readable():
    with pytest.raises(ProtocolError) as caught:
        decode_request([raw_header_bytes(v=9), b"x"])
    assert caught.value.request_id == 7 and caught.value.vehicle == "car-1"


def test_payload_limit():
    frames = encode_request(infer_header(), b"x" * 100)
    decode_request(frames, max_payload_bytes=100)
    with pytest.raises(ProtocolError, match="more than the limit 99"):
        decode_request(frames, max_payload_bytes=99)


def test_raw_payload_of_exact_size_is_accepted():
    header = infer_header(codec="raw", shape=(2, 3, 3))
    decoded, payload = decode_request(encode_request(header, bytes(18)))
    assert decoded.codec == "raw" and payload.nbytes == 18


@pytest.mark.parametrize(
    "frames",
    [
        [b"{}"],
        [b"{}", b""],
        [json.dumps({"v": 1, "type": "result", "status": "ok", "count": 1}).encode(), b"\0" * 23],
        [json.dumps({"v": 1, "type": "result", "status": "fine", "count": 0}).encode(), b""],
        [json.dumps({"v": 1, "type": "result", "status": "ok", "count": -1}).encode(), b""],
        [json.dumps({"v": 1, "type": "result", "status": "ok", "count": 0, "late": 1}).encode(), b""],
        [json.dumps({"v": 1, "type": "result", "status": "ok", "count": 0,
                     "timings_ms": {"queue": -1}}).encode(), b""],
    ],
)
def test_malformed_replies_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode_reply(frames)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["v", "type", "vehicle", "request_id", "task", "frame", "model", "codec",
                               "shape", "budget_ms", "frame_shape", "status", "count", "timings_ms",
                               "late", "reason"])


@st.composite
def mutated_headers(draw) -> bytes:
    """A valid header with some fields replaced by arbitrary JSON values or removed."""
    data = infer_header().to_json_dict()
    for name in draw(st.lists(field_names, max_size=4)):
        if draw(st.booleans()):
            data[name] = draw(json_values)
        else:
            data.pop(name, None)
    return json.dumps(data).encode()


frame_lists = st.lists(st.binary(max_size=300) | mutated_headers(), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_lists, limit=st.none() | st.integers(0, 400))
def test_decode_request_fuzz_raises_only_protocol_error(frames, limit):
    try:
        header, payload = decode_request(frames, max_payload_bytes=limit)
    except ProtocolError as error:
        assert error.reason and "\n" not in error.reason
        return
    # Whatever was accepted satisfies the documented invariants.
    assert header.kind in ("infer", "ping")
    if header.kind == "infer":
        assert header.budget_ms >= 0 and header.codec in protocol.CODECS and payload.nbytes > 0
        assert limit is None or payload.nbytes <= limit


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=200) | mutated_headers(), max_size=3))
def test_decode_reply_fuzz_raises_only_protocol_error(frames):
    try:
        header, detections = decode_reply(frames)
    except ProtocolError:
        return
    assert detections.shape == (header.count, 6)


@settings(max_examples=100, deadline=None)
@given(
    vehicle=st.text(min_size=1, max_size=128),
    request_id=st.integers(0, 2**63 - 1) | st.text(max_size=128),
    budget_ms=st.floats(0, 600_000),
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
)
def test_any_valid_request_round_trips(vehicle, request_id, budget_ms, height, width):
    header = infer_header(vehicle=vehicle, request_id=request_id, budget_ms=budget_ms, shape=(height, width, 3))
    decoded, _ = decode_request(encode_request(header, b"p"))
    assert decoded == header
