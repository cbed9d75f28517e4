"""The cloud service end to end over loopback ZeroMQ: statuses, malformed input, CurveZMQ auth,
metrics and graceful shutdown. Models are emulated (SimulatedRunner) except in the zoo test."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from avcloud import keys
from avcloud.errors import ConfigError, UserError
from avcloud.protocol import RequestHeader, encode_request
from cloudside.client import CloudClient
from cloudside.config import CloudConfig
from cloudside.service import CloudService

REPLY_TIMEOUT_MS = 3000


def make_config(**changes) -> CloudConfig:
    fields = dict(bind="tcp://127.0.0.1:0", http_port=0, shutdown_grace_ms=1000, max_batch_size=1,
                  models=[{"name": "fast", "simulated_runtime_ms": 2.0, "simulated_decode": False},
                          {"name": "slow", "simulated_runtime_ms": 60.0, "simulated_decode": False}])
    fields.update(changes)
    return CloudConfig.model_validate(fields)


@pytest.fixture()
def service():
    with CloudService(make_config(), insecure=True, announce=lambda line: None) as running:
        yield running


@pytest.fixture()
def client(service):
    with CloudClient(service.address, vehicle="car-1") as connected:
        yield connected


def infer(client: CloudClient, model: str = "fast", budget_ms: float = 1000.0, payload: bytes = b"\x01" * 12,
          codec: str = "raw", shape=(2, 2, 3), **kwargs):
    reply = client.infer(payload, task="FRONT", model=model, codec=codec, shape=shape, budget_ms=budget_ms,
                         timeout_ms=REPLY_TIMEOUT_MS, **kwargs)
    assert reply is not None, "no reply"
    return reply


def send_async(client: CloudClient, request_id: int, model: str, budget_ms: float) -> None:
    client.send(RequestHeader(vehicle=client.vehicle, request_id=request_id, task="FRONT", frame=request_id,
                              model=model, codec="raw", shape=(2, 2, 3), budget_ms=budget_ms), b"\x01" * 12)


def collect(client: CloudClient, count: int) -> dict:
    replies = {}
    while len(replies) < count:
        reply = client.receive(REPLY_TIMEOUT_MS)
        assert reply is not None, f"only {len(replies)} of {count} replies"
        replies[reply[0].request_id] = reply[0]
    return replies


def scrape(service: CloudService, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric_samples(service: CloudService) -> dict:
    _, text = scrape(service, "/metrics")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_ok_reply_echoes_request_and_reports_timings(client):
    header, detections = infer(client, frame=41)
    assert header.status == "ok" and header.reason is None and not header.late
    assert (header.vehicle, header.task, header.frame, header.model) == ("car-1", "FRONT", 41, "fast")
    assert detections.shape == (0, 6)
    assert header.timings.inference_ms >= 2.0
    assert header.timings.total_ms >= header.timings.inference_ms


def test_ping_gets_pong(client):
    reply = client.ping(timeout_ms=REPLY_TIMEOUT_MS)
    assert reply is not None and reply.kind == "pong" and reply.status == "ok"


def test_request_without_enough_budget_expires_without_running(client):
    header, _ = infer(client, model="slow", budget_ms=10.0)
    assert header.status == "expired"
    assert "slow needs" in header.reason
    assert header.timings.inference_ms == 0.0


def wait_until_running(service: CloudService) -> None:
    give_up_at = time.monotonic() + 2
    while not service.busy_workers and time.monotonic() < give_up_at:
        time.sleep(0.001)


def test_queued_request_expires_when_its_deadline_becomes_unreachable(service, client):
    # slow takes 60 ms: the first runs; the second (budget 80 ms, enough on arrival) could only
    # start when the first is done, with less than 60 ms left.
    send_async(client, 1, "slow", budget_ms=1000)
    wait_until_running(service)
    send_async(client, 2, "slow", budget_ms=80)
    replies = collect(client, 2)
    assert replies[1].status == "ok"
    assert replies[2].status == "expired" and replies[2].timings.queue_ms > 30


def test_edf_runs_the_urgent_request_before_earlier_arrivals(service, client):
    send_async(client, 1, "slow", budget_ms=5000)  # occupies the worker
    wait_until_running(service)
    send_async(client, 2, "slow", budget_ms=5000)
    send_async(client, 3, "slow", budget_ms=400)  # arrives last, most urgent
    replies = collect(client, 3)
    assert all(reply.status == "ok" for reply in replies.values())
    assert replies[3].timings.queue_ms < replies[2].timings.queue_ms


def test_full_queue_rejects_with_a_reason():
    config = make_config(queue_limit=2)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        for request_id in range(6):
            send_async(client, request_id, "slow", budget_ms=10_000)
        replies = collect(client, 6)
    statuses = [replies[i].status for i in range(6)]
    assert statuses.count("rejected") >= 3
    assert statuses.count("ok") >= 2
    assert all(replies[i].reason == "queue full (2 requests)" for i in range(6) if statuses[i] == "rejected")


def test_same_model_requests_are_batched():
    config = make_config(models=[{"name": "batchy", "simulated_runtime_ms": 1.0, "simulated_batch_overhead_ms": 40.0,
                                  "simulated_decode": False}], max_batch_size=4)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        for request_id in range(9):
            send_async(client, request_id, "batchy", budget_ms=5000)
        replies = collect(client, 9)
        samples = metric_samples(running)
    assert all(reply.status == "ok" for reply in replies.values())
    batches = samples[("avcloud_cloud_batch_size_count", (("model", "batchy"),))]
    assert batches < 9  # at least one batch held several requests
    assert samples[("avcloud_cloud_batch_size_sum", (("model", "batchy"),))] == 9


def valid_header(**changes) -> dict:
    data = json.loads(encode_request(RequestHeader(vehicle="car-1", request_id=5, task="FRONT", model="fast",
                                                   codec="raw", shape=(2, 2, 3), budget_ms=500), b"")[0])
    data.update(changes)
    return data


MALFORMED = {
    "not json": [b"\x00garbage", b"x"],
    "json array": [b"[1,2,3]", b"x"],
    "wrong version": [json.dumps(valid_header(v=99)).encode(), b"\x01" * 12],
    "missing field": [json.dumps({k: v for k, v in valid_header().items() if k != "shape"}).encode(), b"\x01" * 12],
    "negative budget": [json.dumps(valid_header(budget_ms=-5)).encode(), b"\x01" * 12],
    "wrong raw size": [json.dumps(valid_header()).encode(), b"\x01" * 5],
    "three frames": [json.dumps(valid_header()).encode(), b"\x01" * 12, b"extra"],
    "empty payload": [json.dumps(valid_header()).encode(), b""],
    "huge header": [b" " * 10_000, b"x"],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_error_and_service_keeps_serving(client, case):
    client.send_frames(MALFORMED[case])
    reply = client.receive(REPLY_TIMEOUT_MS)
    assert reply is not None
    header, detections = reply
    assert header.status == "error" and header.reason and detections.shape == (0, 6)
    assert infer(client)[0].status == "ok"


def test_malformed_request_reply_carries_its_id_when_readable(client):
    client.send_frames(MALFORMED["wrong version"])
    header, _ = client.receive(REPLY_TIMEOUT_MS)
    assert header.request_id == 5 and "version 99" in header.reason


def test_unknown_model_and_oversized_payload_are_rejected():
    config = make_config(max_payload_bytes=100)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        unknown, _ = infer(client, model="yolo-huge")
        assert unknown.status == "rejected" and "unknown model 'yolo-huge'" in unknown.reason
        big, _ = infer(client, payload=b"\x01" * 300, shape=(10, 10, 3))
        assert big.status == "rejected" and "over the limit of 100" in big.reason
        assert infer(client)[0].status == "ok"


def test_undecodable_image_gets_error_reply():
    compression = pytest.importorskip("avcloud.compression")
    config = make_config(models=[{"name": "decoding", "simulated_runtime_ms": 1.0}])
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        bad, _ = infer(client, model="decoding", codec="jpeg", payload=b"not a jpeg at all", shape=(8, 8, 3))
        assert bad.status == "error" and bad.reason.startswith("undecodable image")
        image = np.full((8, 8, 3), 128, np.uint8)
        payload, _ = compression.encode_image(image, "90")
        good, _ = infer(client, model="decoding", codec="jpeg", payload=payload, shape=(8, 8, 3))
        assert good.status == "ok" and good.timings.decode_ms > 0


def test_real_zoo_model_returns_detections_in_full_frame_pixels():
    compression = pytest.importorskip("avcloud.compression")
    models = pytest.importorskip("avcloud.models")
    cloud_cards = [card for card in models.list_cards() if card.place == "cloud" and card.onnx_path.is_file()]
    if not cloud_cards:
        pytest.skip("no cloud model in the zoo yet")
    card = min(cloud_cards, key=lambda c: c.input_width * c.input_height)
    config = make_config(models=[{"name": card.name, "backend": "onnxruntime"}], warmup_iterations=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (card.input_height, card.input_width, 3), dtype=np.uint8)
    payload, _ = compression.encode_image(image, "PNG")
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        header, detections = infer(client, model=card.name, codec="png", payload=payload,
                                   shape=image.shape, frame_shape=(card.input_height * 2, card.input_width * 2),
                                   budget_ms=60_000)
    assert header.status == "ok", header.reason
    assert header.timings.inference_ms > 0
    assert detections.dtype == np.float32 and detections.shape[1] == 6
    expected = models.Detector.load(card.name, backend="onnxruntime").detect(
        image, output_size_wh=(card.input_width * 2, card.input_height * 2))
    np.testing.assert_allclose(detections, expected, rtol=1e-4, atol=1e-2)


def test_health_readiness_and_metrics(service, client):
    assert scrape(service, "/healthz") == (200, "ok\n")
    assert scrape(service, "/readyz") == (200, "ready\n")
    assert scrape(service, "/nope")[0] == 404
    infer(client)
    infer(client, model="slow", budget_ms=5)
    client.send_frames([b"junk"])
    client.receive(REPLY_TIMEOUT_MS)
    samples = metric_samples(service)
    labels = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
    assert samples[("avcloud_cloud_requests_total", labels(vehicle="car-1", model="fast", status="ok"))] == 1
    assert samples[("avcloud_cloud_requests_total", labels(vehicle="car-1", model="slow", status="expired"))] == 1
    assert samples[("avcloud_cloud_requests_total",
                    labels(vehicle="(unknown)", model="(unknown)", status="error"))] == 1
    assert samples[("avcloud_cloud_deadline_misses_total", labels(vehicle="car-1", model="slow"))] == 1
    assert samples[("avcloud_cloud_inference_time_seconds_count", labels(model="fast"))] == 1
    assert samples[("avcloud_cloud_queue_time_seconds_count", labels(model="fast"))] == 1
    assert samples[("avcloud_cloud_ready", ())] == 1


def test_graceful_shutdown_answers_everything_it_holds_and_then_stops():
    config = make_config(shutdown_grace_ms=150)
    running = CloudService(config, insecure=True, announce=lambda line: None).start()
    port = running.http_port
    with CloudClient(running.address) as client:
        for request_id in range(8):
            send_async(client, request_id, "slow", budget_ms=60_000)
        time.sleep(0.1)  # all queued, one running
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 3
        replies = collect(client, 8)
        statuses = sorted(reply.status for reply in replies.values())
        assert statuses.count("ok") >= 2 and statuses.count("expired") >= 2
        assert set(statuses) == {"ok", "expired"}
        assert all("shutting down" in reply.reason for reply in replies.values() if reply.status == "expired")
        send_async(client, 99, "fast", budget_ms=1000)
        assert client.receive(300) is None  # stopped: nothing answers any more
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_refuses_to_start_without_keys_unless_insecure():
    with pytest.raises(ConfigError, match="refusing to start.*--insecure"):
        CloudService(make_config(), announce=lambda line: None).start()


@pytest.fixture()
def key_dirs(tmp_path):
    """The service's pair, the allow-list (public keys only), the cars' own pairs, a stranger's."""
    server_dir, allow_dir, stranger_dir = tmp_path / "server", tmp_path / "allow", tmp_path / "stranger"
    keys.generate_keypair("cloud", server_dir)
    for car in ("car-ok", "car-2"):
        keys.generate_keypair(car, tmp_path / "cars", allowlist_dir=allow_dir)
    keys.generate_keypair("car-unknown", stranger_dir)
    return server_dir, allow_dir, stranger_dir


def test_only_allowlisted_vehicles_get_replies(key_dirs):
    server_dir, allow_dir, stranger_dir = key_dirs
    config = make_config(security={"server_secret_key": str(server_dir / "cloud.key_secret"),
                                   "allowlist_dir": str(allow_dir)})
    with CloudService(config, announce=lambda line: None) as running:
        allowed = CloudClient(running.address, "car-ok", allow_dir.parent / "cars" / "car-ok.key_secret",
                              server_dir / "cloud.key")
        stranger = CloudClient(running.address, "car-x", stranger_dir / "car-unknown.key_secret",
                               server_dir / "cloud.key")
        plaintext = CloudClient(running.address, "car-y")
        try:
            for intruder in (stranger, plaintext):
                send_async(intruder, 1, "fast", budget_ms=1000)
                intruder.send_frames([b"garbage"])
            assert infer(allowed)[0].status == "ok"
            for intruder in (stranger, plaintext):
                assert intruder.receive(500) is None
            samples = metric_samples(running)
            answered = sum(value for (name, _), value in samples.items() if name == "avcloud_cloud_requests_total")
            assert answered == 1
        finally:
            for client in (allowed, stranger, plaintext):
                client.close()


def test_bad_key_configuration_is_a_one_line_user_error(tmp_path, key_dirs):
    server_dir, allow_dir, _ = key_dirs
    empty = tmp_path / "empty"
    empty.mkdir()
    config = make_config(security={"server_secret_key": str(server_dir / "cloud.key_secret"),
                                   "allowlist_dir": str(empty)})
    with pytest.raises(UserError, match="holds no \\*.key"):
        CloudService(config, announce=lambda line: None).start()


fuzz_frames = st.lists(
    st.binary(max_size=64)
    | st.builds(lambda data: json.dumps(data).encode(),
                st.dictionaries(st.sampled_from(sorted(valid_header())),
                                st.none() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False)
                                | st.lists(st.integers(-2, 5), max_size=4), max_size=10))
    | st.builds(lambda changes: json.dumps(valid_header(**changes)).encode(),
                st.dictionaries(st.sampled_from(sorted(valid_header())),
                                st.none() | st.integers(-3, 3) | st.text(max_size=4), max_size=2)),
    min_size=1, max_size=4,
)
# Well-formed headers for a model that decodes, with arbitrary image bytes and shapes.
fuzz_images = st.builds(
    lambda codec, height, width, payload: [json.dumps(valid_header(model="decoding", codec=codec,
                                                                   shape=[height, width, 3])).encode(), payload],
    st.sampled_from(["jpeg", "png", "raw"]), st.integers(1, 8), st.integers(1, 8),
    st.binary(min_size=1, max_size=200) | st.sampled_from([b"\xff\xd8\xff\xe0" + bytes(50), b"\x89PNG\r\n\x1a\n" + bytes(40)]),
)


def test_fuzzed_messages_always_get_one_reply_and_never_stop_the_service():
    models = [{"name": "fast", "simulated_runtime_ms": 1.0, "simulated_decode": False},
              {"name": "decoding", "simulated_runtime_ms": 1.0, "simulated_decode": True}]
    with CloudService(make_config(queue_limit=1000, models=models), insecure=True,
                      announce=lambda line: None) as running, CloudClient(running.address) as client:

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames=fuzz_frames | fuzz_images)
        def send_one(frames):
            client.send_frames(frames)
            reply = client.receive(REPLY_TIMEOUT_MS)
            assert reply is not None, f"no reply to {frames!r}"
            assert reply[0].status in ("ok", "expired", "rejected", "error")

        send_one()
        assert infer(client)[0].status == "ok"
        assert running.ready
        decode_errors = sum(value for (name, labels), value in metric_samples(running).items()
                            if name == "avcloud_cloud_requests_total"
                            and ("model", "decoding") in labels and ("status", "error") in labels)
        assert decode_errors > 0  # the decode path was exercised


class EchoRunner:
    """Reports the first pixel of each decoded image as a detection's score."""

    name = "echo"
    backend_name = "test"
    decodes_images = True
    expected_runtime_ms = 0.5

    def warmup(self) -> None:
        pass

    def run_batch(self, images, output_sizes_wh=None):
        time.sleep(0.002)
        return [np.array([[0, 0, 1, 1, float(image[0, 0, 0]), 1]], np.float32) for image in images]


def test_each_request_is_processed_from_its_own_received_bytes():
    pytest.importorskip("avcloud.compression")
    config = make_config(models=[{"name": "echo"}], max_batch_size=4)
    with CloudService(config, insecure=True, runners={"echo": EchoRunner()}, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        # Many requests in flight: payloads are views of received frames, held until each reply.
        for request_id in range(40):
            client.send(RequestHeader(vehicle="car-1", request_id=request_id, task="FRONT", model="echo",
                                      codec="raw", shape=(1, 1, 3), budget_ms=5000), bytes([request_id] * 3))
        seen = {}
        for _ in range(40):
            header, detections = client.receive(REPLY_TIMEOUT_MS)
            assert header.status == "ok"
            seen[header.request_id] = float(detections[0, 4])
    assert seen == {request_id: float(request_id) for request_id in range(40)}


class GatedRunner:
    """A runner whose warm-up waits for the test, and which fails on request."""

    backend_name = "test"
    decodes_images = False
    expected_runtime_ms = 1.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.warm_gate = threading.Event()
        self.fail_next = False

    def warmup(self) -> None:
        assert self.warm_gate.wait(10)

    def run_batch(self, images, output_sizes_wh=None):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (pretend)")
        return [np.array([[1, 2, 3, 4, 0.5, 1]], np.float32) for _ in images]


def test_ready_only_after_warmup_and_model_failures_answer_error():
    runner = GatedRunner("gated")
    running = CloudService(make_config(models=[{"name": "gated"}]), insecure=True, runners={"gated": runner},
                           announce=lambda line: None)
    starter = threading.Thread(target=running.start)
    starter.start()
    try:
        give_up_at = time.monotonic() + 5
        while running.http_port is None and time.monotonic() < give_up_at:
            time.sleep(0.005)
        assert scrape(running, "/readyz") == (503, "not ready\n")
        assert scrape(running, "/healthz")[0] == 200  # loading is alive
        runner.warm_gate.set()
        starter.join(timeout=10)
        assert scrape(running, "/readyz") == (200, "ready\n")
        with CloudClient(running.address) as client:
            runner.fail_next = True
            failed, _ = infer(client, model="gated")
            assert failed.status == "error" and "internal: model gated failed" in failed.reason
            header, detections = infer(client, model="gated")
            assert header.status == "ok"
            np.testing.assert_array_equal(detections, [[1, 2, 3, 4, 0.5, 1]])
        assert scrape(running, "/healthz")[0] == 200
    finally:
        runner.warm_gate.set()
        starter.join(timeout=10)
        running.stop()


def test_downlink_allowance_shortens_the_server_deadline():
    config = make_config(downlink_allowance_ms=500)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        short, _ = infer(client, budget_ms=400)
        assert short.status == "expired" and "-100.0 ms left" in short.reason
        assert infer(client, budget_ms=600)[0].status == "ok"


def test_fifo_baseline_runs_everything_and_flags_late_results():
    config = make_config(scheduler="fifo")
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address) as client:
        header, _ = infer(client, model="slow", budget_ms=10)
    assert header.status == "ok" and header.late
    assert header.timings.inference_ms >= 60


def test_one_vehicle_cannot_fill_the_whole_queue():
    config = make_config(queue_limit=10, per_vehicle_queue_limit=1)
    with CloudService(config, insecure=True, announce=lambda line: None) as running, \
            CloudClient(running.address, vehicle="flood") as flood, \
            CloudClient(running.address, vehicle="quiet") as quiet:
        send_async(flood, 0, "slow", budget_ms=10_000)
        wait_until_running(running)
        for request_id in range(1, 4):
            send_async(flood, request_id, "slow", budget_ms=10_000)
        send_async(quiet, 0, "slow", budget_ms=10_000)
        flood_replies = collect(flood, 4)
        assert collect(quiet, 1)[0].status == "ok"
    rejected = [reply for reply in flood_replies.values() if reply.status == "rejected"]
    assert len(rejected) == 2
    assert all(reply.reason == "vehicle queue share full (1 requests)" for reply in rejected)


def test_ports_in_use_are_one_line_config_errors(service):
    port = service.address.rsplit(":", 1)[1]
    with pytest.raises(ConfigError, match=f"bind tcp://127.0.0.1:{port}"):
        CloudService(make_config(bind=f"tcp://127.0.0.1:{port}"), insecure=True, announce=lambda line: None).start()
    with pytest.raises(ConfigError, match=f"http_port {service.http_port}: cannot listen"):
        CloudService(make_config(http_port=service.http_port), insecure=True, announce=lambda line: None).start()
    assert scrape(service, "/readyz")[0] == 200  # the failed starts left the running service alone
