"""The cloud service against an authorised but hostile vehicle (issue 12): decompression bombs,
impersonation, image headers that lie. On loopback, a few requests each; no wall-clock bounds."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avcloud import keys
from avcloud.protocol import RequestHeader
from cloudside.client import CloudClient
from cloudside.config import CloudConfig
from cloudside.image_header import MAX_JPEG_SCANS, UnsafeImage, read_image_header
from cloudside.service import CloudService

cv2 = pytest.importorskip("cv2")

REPLY_TIMEOUT_MS = 5000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, complete: bool = True) -> bytes:
    """A valid grey PNG of zeros: tiny on the wire, width x height once decoded. Without
    `complete` only the first rows' data (the header is all that matters before decoding)."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    rows = height if complete else min(height, 4)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose frame header claims width x height (a decoder allocates that much)."""
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def make_config(**changes) -> CloudConfig:
    fields = dict(bind="tcp://127.0.0.1:0", http_port=0, max_batch_size=1,
                  models=[{"name": "decoding", "simulated_runtime_ms": 1.0, "simulated_decode": True}])
    fields.update(changes)
    return CloudConfig.model_validate(fields)


def infer(client: CloudClient, payload: bytes, codec: str, shape: tuple[int, int, int], budget_ms: float = 60_000):
    reply = client.infer(payload, task="FRONT", model="decoding", codec=codec, shape=shape, budget_ms=budget_ms,
                         timeout_ms=REPLY_TIMEOUT_MS)
    assert reply is not None, "no reply"
    return reply[0]


def metric(service: CloudService, name: str, **labels) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------- image headers, before decoding


@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_image_header_names_the_size_of_real_images(codec):
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg" if codec == "jpeg" else ".png", image)
    header = read_image_header(memoryview(encoded.tobytes()), codec)
    assert (header.width, header.height, header.channels) == (64, 48, 3)


def test_image_header_reads_bombs_without_decoding_them():
    assert read_image_header(png_bomb(16384, 16384, complete=False), "png").pixels == 16384 ** 2
    assert read_image_header(jpeg_bomb(16384, 16384), "jpeg").pixels == 16384 ** 2


def test_a_jpeg_with_too_many_scans_is_refused():
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = encoded.tobytes()
    scan = data.index(b"\xff\xda")
    many_scans = data[:scan] + data[scan:-2] * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(UnsafeImage, match="more than 64 scans"):
        read_image_header(many_scans, "jpeg")


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=80), codec=st.sampled_from(["jpeg", "png"]),
       prefix=st.sampled_from([b"", b"\xff\xd8", b"\xff\xd8\xff\xc0", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"]))
def test_image_header_raises_only_unsafe_image_on_any_bytes(data, codec, prefix):
    try:
        header = read_image_header(prefix + data, codec)
    except UnsafeImage:
        return
    assert header.width > 0 and header.height > 0


# ---------------------------------------------------------------- decompression bombs at the service


@pytest.fixture()
def service():
    with CloudService(make_config(), insecure=True, announce=lambda line: None) as running:
        yield running


@pytest.mark.parametrize("bomb", ["png", "jpeg"])
def test_a_bomb_matching_its_request_shape_is_refused_before_decoding(service, bomb):
    # Issue 12: a 783 KB PNG of 16384x16384 with a matching shape was decoded (RSS +1.5 GB,
    # 4.8-27 s of worker time). A 4096x4096 one (64 KB, 16.8 Mpx) is over the default limit.
    payload = png_bomb(4096, 4096) if bomb == "png" else jpeg_bomb(4096, 4096)
    with CloudClient(service.address, vehicle="car-1") as client:
        reply = infer(client, payload, bomb, (4096, 4096, 3))
        assert reply.status == "rejected" and "over decoding's limit of 2.5 Mpx" in reply.reason
        assert reply.timings.decode_ms == 0.0
        good = np.full((64, 64, 3), 100, np.uint8)
        ok, encoded = cv2.imencode(".png" if bomb == "png" else ".jpg", good)
        assert infer(client, encoded.tobytes(), bomb, (64, 64, 3)).status == "ok"
    assert metric(service, "avcloud_cloud_unsafe_images_total", vehicle="car-1", model="decoding") == 1
    assert metric(service, "avcloud_cloud_decode_time_seconds_count", model="decoding") == 1  # only the good one


@pytest.mark.parametrize("bomb", ["png", "jpeg"])
def test_an_image_whose_header_disagrees_with_the_request_is_an_error_not_a_decode(service, bomb):
    payload = png_bomb(16384, 16384, complete=False) if bomb == "png" else jpeg_bomb(16384, 16384)
    with CloudClient(service.address, vehicle="car-1") as client:
        reply = infer(client, payload, bomb, (480, 640, 3))
    assert reply.status == "error"
    assert reply.reason == f"undecodable image: its {bomb} header says 16384x16384, the request's shape 640x480"
    assert metric(service, "avcloud_cloud_decode_time_seconds_count", model="decoding") == 0


def test_the_pixel_limit_is_configurable_per_model():
    config = make_config(max_image_pixels=100, models=[
        {"name": "decoding", "simulated_runtime_ms": 1.0, "max_image_pixels": 64 * 64}])
    image = np.zeros((64, 64, 3), np.uint8)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        assert infer(client, image.tobytes(), "raw", (64, 64, 3)).status == "ok"
        too_big = infer(client, bytes(65 * 64 * 3), "raw", (65, 64, 3))
    assert too_big.status == "rejected" and "(max_image_pixels)" in too_big.reason


# ---------------------------------------------------------------- identity from the key


@pytest.fixture()
def secure_service(tmp_path):
    allow = tmp_path / "allowed"
    keys.generate_keypair("cloud", tmp_path / "server")
    for car in ("car-1", "car-2"):
        keys.generate_keypair(car, tmp_path / car, allowlist_dir=allow)
    config = make_config(security={"server_secret_key": str(tmp_path / "server" / "cloud.key_secret"),
                                   "allowlist_dir": str(allow)},
                         models=[{"name": "decoding", "simulated_runtime_ms": 1.0, "simulated_decode": False}])
    with CloudService(config, announce=lambda line: None) as running:

        def connect(key_name: str, vehicle: str) -> CloudClient:
            return CloudClient(running.address, vehicle, tmp_path / key_name / f"{key_name}.key_secret",
                               tmp_path / "server" / "cloud.key")

        yield running, connect


def test_a_vehicle_claiming_another_vehicles_name_is_rejected_and_counted(secure_service):
    # Issue 12: car-2 writing `vehicle: car-1` got 31/40 of car-1's own requests rejected.
    running, connect = secure_service
    with connect("car-2", "car-1") as impostor, connect("car-1", "car-1") as honest:
        reply = infer(impostor, bytes(12), "raw", (2, 2, 3))
        assert reply.status == "rejected"
        assert reply.reason == "vehicle 'car-1' is not this connection's vehicle ('car-2', from its key)"
        pong = impostor.ping(timeout_ms=REPLY_TIMEOUT_MS)
        assert pong is not None and pong.status == "rejected"
        assert infer(honest, bytes(12), "raw", (2, 2, 3)).status == "ok"
    assert metric(running, "avcloud_cloud_identity_mismatches_total", vehicle="car-2") == 2
    assert metric(running, "avcloud_cloud_identity_mismatches_total", vehicle="car-1") == 0
    # Counted against the key's vehicle, never the name it claimed.
    assert metric(running, "avcloud_cloud_requests_total", vehicle="car-2", model="decoding", status="rejected") == 1
    assert metric(running, "avcloud_cloud_requests_total", vehicle="car-1", model="decoding", status="ok") == 1


def test_rotating_names_cannot_escape_the_per_vehicle_share(secure_service):
    running, connect = secure_service
    with connect("car-2", "car-2") as flooder:
        for index in range(5):
            flooder.vehicle = f"car-2-{index}"
            assert infer(flooder, bytes(12), "raw", (2, 2, 3)).status == "rejected"
        flooder.vehicle = "car-2"
        assert infer(flooder, bytes(12), "raw", (2, 2, 3)).status == "ok"
    assert metric(running, "avcloud_cloud_identity_mismatches_total", vehicle="car-2") == 5
    assert metric(running, "avcloud_cloud_worker_seconds_total", vehicle="car-2") > 0


def test_requests_are_queued_under_the_keys_vehicle(secure_service):
    running, connect = secure_service
    seen = []
    original_push = running.queue.push

    def spy(request):
        seen.append((request.vehicle, request.header.vehicle))
        return original_push(request)

    running.queue.push = spy
    with connect("car-1", "car-1") as client:
        client.send(RequestHeader(vehicle="car-1", request_id=1, task="FRONT", model="decoding", codec="raw",
                                  shape=(2, 2, 3), budget_ms=5000), bytes(12))
        assert client.receive(REPLY_TIMEOUT_MS)[0].status == "ok"
    assert seen == [("car-1", "car-1")]
