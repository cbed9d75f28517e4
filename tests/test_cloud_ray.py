"""The cloud service on the Ray engine (`engine: ray`) against a local Ray instance on CPU, with
emulated GPU time (sleep-based `SimulatedRunner` models): the same CurveZMQ front end and wire
protocol, model replicas as a Ray Serve deployment.

The module's fixture starts Ray once and always shuts it down. The smoke test runs in the default
suite; the failure, deadline and autoscaling tests are `slow` (make test-all)."""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

ray = pytest.importorskip(
    "ray", reason="the Ray engine tests need the optional extra: pip install -c requirements.lock -e '.[ray]'")
pytest.importorskip(
    "ray.serve", reason="the Ray engine tests need Ray Serve: pip install -c requirements.lock -e '.[ray]'")

from avcloud import keys  # noqa: E402
from avcloud.protocol import RequestHeader  # noqa: E402
from cloudside.client import CloudClient  # noqa: E402
from cloudside.config import CloudConfig  # noqa: E402
from cloudside.service import CloudService  # noqa: E402

# Generous on purpose: these tests check what is answered, not how fast. On a loaded 2-core machine
# a 5.4 MB request through Ray once took over 5 s (its replica was judged hung and the request
# re-queued), and a 5 s budget then expired it.
BUDGET_MS = 60_000
REPLY_TIMEOUT_MS = 70_000


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module (2 logical CPUs: replicas reserve 0.1 each)."""
    owned = not ray.is_initialized()
    if owned:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        yield
    finally:
        if owned:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def ray_config(**changes) -> CloudConfig:
    # CPU replicas with emulated GPU time, on a machine with GPUs too (placement has its own test).
    ray_settings = {"replica_num_cpus": 0.1, "replica_num_gpus": 0, "min_replicas": 1, "max_replicas": 1,
                    "health_check_period_s": 1.0, "health_check_timeout_s": 3.0}
    ray_settings.update(changes.pop("ray", {}))
    fields = dict(bind="tcp://127.0.0.1:0", http_port=0, engine="ray", shutdown_grace_ms=2000, max_batch_size=1,
                  models=[{"name": "emulated", "simulated_runtime_ms": 10.0, "simulated_decode": False}],
                  ray=ray_settings)
    fields.update(changes)
    return CloudConfig.model_validate(fields)


def scrape(service: CloudService, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(service: CloudService, name: str, **labels) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def send(client: CloudClient, request_id: int, budget_ms: float, model: str = "emulated") -> None:
    client.send(RequestHeader(vehicle=client.vehicle, request_id=request_id, task="FRONT", frame=request_id,
                              model=model, codec="raw", shape=(2, 2, 3), budget_ms=budget_ms), bytes(12))


def collect(client: CloudClient, expected: int, linger_ms: float = 1000.0) -> tuple[Counter, dict]:
    """Every reply until `expected` distinct requests are answered, then `linger_ms` more (to catch
    a second reply to any of them): (replies per request id, last reply header per request id)."""
    counts: Counter = Counter()
    replies: dict = {}
    give_up_at = time.monotonic() + 120.0
    linger_until = None
    while time.monotonic() < give_up_at:
        if linger_until is None and len(counts) >= expected:
            linger_until = time.monotonic() + linger_ms / 1000.0
        if linger_until is not None and time.monotonic() >= linger_until:
            break
        reply = client.receive(100)
        if reply is not None:
            counts[reply[0].request_id] += 1
            replies[reply[0].request_id] = reply[0]
    return counts, replies


def wait_for(condition, timeout_s: float, what: str) -> None:
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up_at, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------- default suite


def test_ray_engine_serves_curve_clients_with_the_same_protocol(local_ray, tmp_path):
    allow = tmp_path / "allowed"
    keys.generate_keypair("cloud", tmp_path / "server")
    for car in ("car-1", "car-2"):
        keys.generate_keypair(car, tmp_path / car, allowlist_dir=allow)
    keys.generate_keypair("stranger", tmp_path / "stranger")
    # Hang detection has its own test (below): here a replica slowed by a loaded machine must not be
    # judged hung (a 5.4 MB request was once, and its one replica took the rest of the budget back).
    config = ray_config(security={"server_secret_key": str(tmp_path / "server" / "cloud.key_secret"),
                                  "allowlist_dir": str(allow)}, ray={"hang_timeout_ms": 30_000.0})

    def connect(key_name: str, vehicle: str) -> CloudClient:
        return CloudClient(service.address, vehicle, tmp_path / key_name / f"{key_name}.key_secret",
                           tmp_path / "server" / "cloud.key")

    with CloudService(config, announce=lambda line: None) as service:
        assert service.engine.name == "ray"
        assert scrape(service, "/readyz") == (200, "ready\n")
        with connect("car-1", "car-1") as car:
            reply = car.infer(bytes(12), task="FRONT", model="emulated", codec="raw", shape=(2, 2, 3),
                              budget_ms=BUDGET_MS, timeout_ms=REPLY_TIMEOUT_MS)
            assert reply is not None and reply[0].status == "ok" and not reply[0].late
            assert reply[0].timings.inference_ms >= 9.0  # the replica's emulated GPU time
            expired = car.infer(bytes(12), task="FRONT", model="emulated", codec="raw", shape=(2, 2, 3),
                                budget_ms=1.0, timeout_ms=REPLY_TIMEOUT_MS)
            assert expired is not None and expired[0].status == "expired"
            large = car.infer(bytes(1200 * 1500 * 3), task="FRONT", model="emulated", codec="raw",
                              shape=(1200, 1500, 3), budget_ms=BUDGET_MS, timeout_ms=REPLY_TIMEOUT_MS)
            assert large is not None and large[0].status == "ok"  # 5.4 MB: over gRPC's default 4 MiB
            unknown = car.infer(bytes(12), task="FRONT", model="yolo", codec="raw", shape=(2, 2, 3),
                                budget_ms=BUDGET_MS, timeout_ms=REPLY_TIMEOUT_MS)
            assert unknown is not None and unknown[0].status == "rejected" and "unknown model" in unknown[0].reason
        with connect("car-2", "car-1") as impostor:  # identity still comes from the key
            reply = impostor.infer(bytes(12), task="FRONT", model="emulated", codec="raw", shape=(2, 2, 3),
                                   budget_ms=BUDGET_MS, timeout_ms=REPLY_TIMEOUT_MS)
            assert reply is not None and reply[0].status == "rejected"
            assert reply[0].reason == "vehicle 'car-1' is not this connection's vehicle ('car-2', from its key)"
        with connect("stranger", "stranger") as stranger:  # not allow-listed: no connection, no reply
            assert stranger.ping(timeout_ms=500) is None
        [replica] = service.engine.replicas()
        assert replica["pid"] != os.getpid() and replica["gpu_ids"] == []
        status, text = scrape(service, "/metrics")
        assert status == 200
        assert f'avcloud_cloud_replica_up{{replica="{replica["replica"]}"}} 1.0' in text
        assert metric(service, "avcloud_cloud_requests_total", vehicle="car-1", model="emulated", status="ok") == 2
        assert metric(service, "avcloud_cloud_replica_requests_total", replica=replica["replica"],
                      model="emulated", status="ok") == 2
        assert metric(service, "avcloud_cloud_identity_mismatches_total", vehicle="car-2") == 1
        app = service.engine.app_name
    from ray import serve

    assert app not in serve.status().applications  # the service removed its replicas


def test_each_replica_gets_a_gpu_when_the_cluster_has_them(local_ray):
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus < 1:
        pytest.skip("no GPU in this Ray cluster: GPU placement cannot be checked here")
    config = ray_config(ray={"replica_num_gpus": "auto", "min_replicas": 1, "max_replicas": 1})
    with CloudService(config, insecure=True, announce=lambda line: None) as service:
        assert service.engine.gpus_per_replica == 1.0
        [replica] = service.engine.replicas()
        assert len(replica["gpu_ids"]) == 1
        with CloudClient(service.address, vehicle="car-1") as client:
            reply = client.infer(bytes(12), task="FRONT", model="emulated", codec="raw", shape=(2, 2, 3),
                                 budget_ms=BUDGET_MS, timeout_ms=REPLY_TIMEOUT_MS)
            assert reply is not None and reply[0].status == "ok"


# ---------------------------------------------------------------- slow: failures, deadlines, scaling


@pytest.mark.slow
def test_every_request_gets_one_reply_when_a_replica_is_killed_mid_load(local_ray):
    config = ray_config(ray={"min_replicas": 3, "max_replicas": 3}, per_vehicle_queue_limit=None,
                        models=[{"name": "emulated", "simulated_runtime_ms": 20.0, "simulated_decode": False}])
    total = 240
    with CloudService(config, insecure=True, announce=lambda line: None) as service, \
            CloudClient(service.address, vehicle="car-1") as client:
        replicas = service.engine.replicas()
        assert len(replicas) == 3
        victim = replicas[0]
        killed = False
        for request_id in range(total):  # ~65 requests/s against ~150/s of capacity (~100/s after the kill)
            send(client, request_id, budget_ms=600.0 if request_id % 2 else 2000.0)
            if request_id == total // 3 and not killed:
                os.kill(victim["pid"], signal.SIGKILL)
                killed = True
            time.sleep(0.015)
        counts, replies = collect(client, total, linger_ms=2000)
        assert set(counts) == set(range(total)), f"no reply to {sorted(set(range(total)) - set(counts))}"
        assert max(counts.values()) == 1, f"answered twice: {[rid for rid, n in counts.items() if n > 1]}"
        statuses = Counter(reply.status for reply in replies.values())
        assert statuses["ok"] >= total * 0.6, statuses
        assert set(statuses) <= {"ok", "expired"}, {reply.reason for reply in replies.values() if reply.reason}
        # Lost once: "died" when Ray reports the actor dead first, "hung" when its calls fail first.
        failures = {reason: metric(service, "avcloud_cloud_replica_failures_total", reason=reason)
                    for reason in ("died", "hung")}
        assert sum(failures.values()) == 1, failures
        # Serve replaces the replica; the dispatcher takes the new one into the pool.
        wait_for(lambda: len(service.engine.pool()["live"]) == 3
                 and victim["replica"] not in sum(service.engine.pool().values(), []), 60, "a replacement replica")
        assert service.ready


@pytest.mark.slow
def test_no_request_is_dispatched_to_a_replica_past_its_deadline(local_ray):
    config = ray_config(ray={"min_replicas": 2, "max_replicas": 2},
                        models=[{"name": "emulated", "simulated_runtime_ms": 20.0, "simulated_decode": False}])
    with CloudService(config, insecure=True, announce=lambda line: None) as service, \
            CloudClient(service.address, vehicle="car-1") as client:
        placed = []
        place = service.engine.dispatcher.place

        def spy(batch, now_ms):
            placement = place(batch, now_ms)
            placed.extend((assignment.expected_finish_ms, assignment.request.deadline_ms)
                          for assignment in placement.assignments)
            return placement

        service.engine.dispatcher.place = spy
        total = 300
        budgets = (25.0, 60.0, 120.0, 400.0)
        for request_id in range(total):  # 200 requests/s: twice the capacity of two 20 ms replicas
            send(client, request_id, budget_ms=budgets[request_id % len(budgets)])
            time.sleep(0.005)
        counts, replies = collect(client, total, linger_ms=500)
        assert set(counts) == set(range(total)) and max(counts.values()) == 1
        statuses = Counter(reply.status for reply in replies.values())
        assert statuses["ok"] > 0 and statuses["expired"] > 0, statuses
        refused = [reply for reply in replies.values() if reply.status == "expired"
                   and "the earliest any replica can start it" in (reply.reason or "")]
        assert refused, "overload never made the dispatcher hold a request back"
        assert placed and all(finish_ms <= deadline_ms for finish_ms, deadline_ms in placed)
        received = [entry for entries in service.engine.received().values() for entry in entries or []]
        assert len(received) >= statuses["ok"]
        # Each replica was sent a request only with at least its expected runtime left (up to half
        # the measured Ray hop, which the dispatcher takes off the budget it sends along).
        worst = min(left_ms - needed_ms for left_ms, needed_ms in received)
        assert worst >= -5.0, f"a replica got a request {-worst:.1f} ms short of its runtime"


@pytest.mark.slow
def test_the_replica_count_follows_the_load_up_and_down(local_ray):
    config = ray_config(ray={"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
                             "look_back_period_s": 1.0},
                        models=[{"name": "emulated", "simulated_runtime_ms": 20.0, "simulated_decode": False}])
    with CloudService(config, insecure=True, announce=lambda line: None) as service, \
            CloudClient(service.address, vehicle="car-1") as client:
        assert len(service.engine.pool()["live"]) == 1
        started = time.monotonic()
        request_id = 0
        grew = False
        while time.monotonic() - started < 45 and not grew:  # ~125 requests/s: 2.5x one replica
            for _ in range(5):
                send(client, request_id, budget_ms=300.0)
                request_id += 1
            time.sleep(0.04)
            while client.receive(0) is not None:
                pass
            grew = len(service.engine.pool()["live"]) >= 2
        assert grew, "no replica added under 2.5x one replica's load"
        collect(client, 0, linger_ms=1000)
        wait_for(lambda: len(sum(service.engine.pool().values(), [])) == 1, 60, "the pool to shrink back to one")
        assert metric(service, "avcloud_cloud_replicas", state="live") == 1


@pytest.mark.slow
def test_a_hung_replica_has_its_requests_sent_elsewhere(local_ray):
    config = ray_config(ray={"min_replicas": 2, "max_replicas": 2, "hang_timeout_ms": 300.0,
                             "health_check_period_s": 1.0, "health_check_timeout_s": 2.0},
                        models=[{"name": "emulated", "simulated_runtime_ms": 10.0, "simulated_decode": False}])
    with CloudService(config, insecure=True, announce=lambda line: None) as service, \
            CloudClient(service.address, vehicle="car-1") as client:
        victim = service.engine.replicas()[0]
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            total = 60
            for request_id in range(total):
                send(client, request_id, budget_ms=3000.0)
                time.sleep(0.01)
            counts, replies = collect(client, total, linger_ms=1000)
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        assert set(counts) == set(range(total)) and max(counts.values()) == 1
        assert Counter(reply.status for reply in replies.values()) == {"ok": total}
        assert metric(service, "avcloud_cloud_replica_failures_total", reason="hung") >= 1
        assert metric(service, "avcloud_cloud_redispatched_total", reason="hung") >= 1


def test_a_replica_running_a_batch_slower_than_the_hang_timeout_is_still_healthy():
    # A slow model on CPU: one batch is expected to take longer than the hang timeout itself. The
    # health check judges progress from the batch's expected end, so Serve does not replace a
    # replica that is only working (run outside Serve: the class itself, on the wall clock).
    import asyncio

    from cloudside.ray_engine import ModelReplica

    config = ray_config(warmup_iterations=0, ray={"hang_timeout_ms": 300.0},
                        models=[{"name": "emulated", "simulated_runtime_ms": 1500.0, "simulated_decode": False}])
    replica = ModelReplica(config.model_dump_json())
    header = RequestHeader(vehicle="car-1", request_id=1, task="FRONT", model="emulated", codec="raw",
                           shape=(2, 2, 3), budget_ms=BUDGET_MS)

    async def one_request():
        answer = asyncio.ensure_future(replica.infer(header, bytes(12), remaining_ms=BUDGET_MS))
        await asyncio.sleep(0.6)
        replica.check_health()  # 0.6 s into a batch expected to take 1.5 s: healthy
        return await answer

    try:
        assert asyncio.run(one_request()).status == "ok"
    finally:
        replica.__del__()
