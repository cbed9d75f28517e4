"""Prometheus metrics of one service and its HTTP endpoint: /healthz, /readyz, /metrics.

Each service owns a CollectorRegistry (not the process-global one), so several services can
run in one process (tests, the live replay).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "avcloud_cloud_requests", "Requests answered, by vehicle, model and reply status",
            ["vehicle", "model", "status"], registry=self.registry)
        self.deadline_misses = Counter(
            "avcloud_cloud_deadline_misses",
            "Requests that missed their server-side deadline (expired, or finished late)",
            ["vehicle", "model"], registry=self.registry)
        self.identity_mismatches = Counter(
            "avcloud_cloud_identity_mismatches",
            "Requests rejected because their header named another vehicle than the sender's key, by the key's vehicle",
            ["vehicle"], registry=self.registry)
        self.worker_time = Counter(
            "avcloud_cloud_worker_seconds", "Worker time (decode + the request's share of its batch) by vehicle",
            ["vehicle"], registry=self.registry)
        self.unsafe_images = Counter(
            "avcloud_cloud_unsafe_images",
            "Images refused before decoding (too large for the model, header disagreeing with the request, malformed)",
            ["vehicle", "model"], registry=self.registry)
        self.queue_time = Histogram(
            "avcloud_cloud_queue_time_seconds", "Arrival to taken by a worker", ["model"],
            buckets=_TIME_BUCKETS_S, registry=self.registry)
        self.decode_time = Histogram(
            "avcloud_cloud_decode_time_seconds", "Image decode time per request", ["model"],
            buckets=_TIME_BUCKETS_S, registry=self.registry)
        self.inference_time = Histogram(
            "avcloud_cloud_inference_time_seconds", "Model time per batch", ["model"],
            buckets=_TIME_BUCKETS_S, registry=self.registry)
        self.batch_size = Histogram(
            "avcloud_cloud_batch_size", "Requests per model batch", ["model"],
            buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("avcloud_cloud_queue_depth", "Requests waiting for a worker",
                                 registry=self.registry)
        self.expected_runtime = Gauge(
            "avcloud_cloud_expected_runtime_seconds", "Current estimate of a single-image run (decode + model)",
            ["model"], registry=self.registry)
        self.ready = Gauge("avcloud_cloud_ready", "1 when models are warm and the service accepts requests",
                           registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaMetrics:
    """The replica pool of `engine: ray`, on the service's registry: the front end's own metrics
    (`ServiceMetrics`) already count every reply, queue and batch over all replicas; these break
    the pool down by replica (the replica label is Ray Serve's replica id)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.replicas = Gauge("avcloud_cloud_replicas", "Replicas in the pool, by state (live, hung)", ["state"],
                              registry=registry)
        self.replica_up = Gauge("avcloud_cloud_replica_up", "1 while a replica takes work, 0 while it is hung",
                                ["replica"], registry=registry)
        self.held = Gauge("avcloud_cloud_replica_held", "Requests sent to a replica and not answered yet",
                          ["replica"], registry=registry)
        self.replica_queue_depth = Gauge(
            "avcloud_cloud_replica_queue_depth", "Requests waiting in a replica's own EDF queue (as it last reported)",
            ["replica"], registry=registry)
        self.replica_requests = Counter(
            "avcloud_cloud_replica_requests", "Requests a replica answered, by model and status",
            ["replica", "model", "status"], registry=registry)
        self.replica_inference_time = Histogram(
            "avcloud_cloud_replica_inference_time_seconds", "Model time per batch, by replica", ["replica", "model"],
            buckets=_TIME_BUCKETS_S, registry=registry)
        self.replica_failures = Counter(
            "avcloud_cloud_replica_failures", "Replicas lost, by reason (died, hung)", ["reason"], registry=registry)
        self.redispatched = Counter(
            "avcloud_cloud_redispatched", "Requests sent again after their replica died or hung, by reason",
            ["reason"], registry=registry)
        self.dispatch_hop = Histogram(
            "avcloud_cloud_dispatch_hop_seconds",
            "Round trip to a replica minus the replica's own time (the Ray hop), per request",
            buckets=_TIME_BUCKETS_S, registry=registry)


class HealthServer:
    """A small threaded HTTP server: /healthz (alive: loading or serving, no dead thread),
    /readyz (warm and accepting), /metrics (Prometheus text format)."""

    def __init__(self, host: str, port: int, metrics: ServiceMetrics,
                 is_healthy: Callable[[], bool], is_ready: Callable[[], bool]) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server_self.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    healthy = server_self.is_healthy()
                    self._reply(200 if healthy else 503, b"ok\n" if healthy else b"unhealthy\n")
                elif path == "/readyz":
                    ready = server_self.is_ready()
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # scrapes every few seconds would flood the service log

        self.metrics = metrics
        self.is_healthy = is_healthy
        self.is_ready = is_ready
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown quick (the default waits up to 0.5 s).
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="cloud-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
