"""`engine: ray`: model replicas as a Ray Serve deployment behind the service's ZeroMQ front end.

Vehicles still talk to the CurveZMQ ROUTER of `cloudside.service.CloudService`, with the same
wire protocol; only what runs the models changes.

Driver side (this process), `RayEngine`:
- Admission is the service's `RequestQueue` (limits, fair share, push-out, EDF order), exactly
  as for the threaded engine.
- A dispatcher on one asyncio loop takes decisions from that queue while some replica has room
  and places them with `cloudside.dispatch.FleetDispatcher`: a request goes to a replica only
  when that replica can finish it before its deadline, earliest deadline first across the
  fleet. The Serve call names the replica; `cloudside.ray_router.DeadlineRouter` routes it there.
- Failures: a replica that dies (Serve's call fails with an actor error) or hangs (holds a
  request `hang_timeout_ms` past its expected finish) hands back what it held; each request goes
  back into the queue while its deadline allows and is answered `expired` otherwise. Every
  request is answered exactly once (the dispatcher's attempts); late answers of a hung replica
  are dropped. Serve replaces dead replicas; its health check (`ModelReplica.check_health`)
  fails a replica whose worker is stuck (no progress `hang_timeout_ms` past the expected end of
  the batch it runs).
- Metrics: the front end's metrics count every reply; `cloudside.health.ReplicaMetrics` adds the
  pool by replica.

Replica side, `ModelReplica` (one per GPU, or per CPU slot without GPUs): the configured models
(`cloudside.engine.ModelSet`, warm), its own `RequestQueue` (EDF, expiry, deadline-aware
batching; no fair share, which the fleet queue already applies) and one worker thread driving
it, as a worker thread of the threaded engine does. It reports busy time, queued work and
deadline slack to Ray Serve's autoscaler (`cloudside.autoscaling`).

`dispatch: serve` replaces all of this with plain Ray Serve: each request goes straight to the
deployment handle, Serve's router picks a replica and `@serve.batch` batches in arrival order
(`ServeBatchReplica`): the FIFO baseline of `benchmarks/bench_runtime.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from avcloud.clock import Clock, WallClock
from avcloud.errors import ConfigError
from avcloud.protocol import ERROR, EXPIRED, OK, REJECTED, RequestHeader, reply_to
from cloudside import autoscaling
from cloudside.config import CloudConfig
from cloudside.dispatch import Assignment, FleetDispatcher
from cloudside.engine import (
    PUSHED_OUT,
    BatchResult,
    EngineHost,
    ModelSet,
    admission_queue,
    expiry_reason,
    record_batch_metrics,
    refusal_reason,
)
from cloudside.health import ReplicaMetrics
from cloudside.runners import RuntimeEstimate
from cloudside.scheduler import PendingRequest, RequestQueue

logger = logging.getLogger("avcloud.cloud.ray")

# Status of a replica's answer that is not a reply: the replica gave the request back unrun
# (it is shutting down); the dispatcher sends it elsewhere.
REQUEUE = "requeue"
_DEPLOYMENT = "models"
_TICK_S = 0.02  # the dispatcher runs at least this often (hang checks, expiry)
_GAUGE_PERIOD_MS = 100.0
_FLEET_INFO_STALE_MS = 2000.0  # a replica's copy of the fleet's held work expires after this
_MAX_REPLICA_LABELS = 256
_POOL_EMPTY_UNHEALTHY_MS = 60_000.0
_RECEIVED_KEPT = 4096
_TEARDOWN_TIMEOUT_S = 20.0
_GRPC_HEADROOM_BYTES = 1024 * 1024  # request header and framing around the payload  # no live replica for this long: /healthz fails
_SERVE_LOGGER_NAMES = ("ray.serve", "ray")


# ---------------------------------------------------------------- the replica set, as Serve sees it


class ReplicaDirectory:
    """Per Serve application, the replicas its router knows (from `DeadlineRouter`), passed on to
    the dispatcher that listens. Process-wide: the router runs in Serve's own loop thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, list[str]] = {}
        self._listeners: dict[str, Callable[[list[str] | None, str | None], None]] = {}

    def update(self, app: str, replicas: list[str]) -> None:
        with self._lock:
            self._latest[app] = list(replicas)
            listener = self._listeners.get(app)
        if listener is not None:
            listener(list(replicas), None)

    def died(self, app: str, replica: str) -> None:
        with self._lock:
            listener = self._listeners.get(app)
        if listener is not None:
            listener(None, replica)

    def latest(self, app: str) -> list[str]:
        with self._lock:
            return list(self._latest.get(app, []))

    def listen(self, app: str, listener: Callable[[list[str] | None, str | None], None]) -> None:
        with self._lock:
            self._listeners[app] = listener
            latest = self._latest.get(app)
        if latest is not None:
            listener(list(latest), None)

    def forget(self, app: str) -> None:
        with self._lock:
            self._listeners.pop(app, None)
            self._latest.pop(app, None)


replica_directory = ReplicaDirectory()


# ---------------------------------------------------------------- replica side


@dataclass
class ReplicaOutcome:
    """A replica's answer to one request."""

    status: str  # ok, error, expired, or REQUEUE
    replica: str
    reason: str | None = None
    detections: np.ndarray | None = None
    queue_ms: float = 0.0  # waiting in the replica's own queue
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    first_in_batch: bool = False
    late: bool = False  # finished after the deadline the replica was given
    replica_ms: float = 0.0  # arrival at the replica to answer ready
    queue_depth: int = 0  # the replica's queue after this answer


class ModelReplica:
    """One Ray Serve replica: the models, an EDF queue and a worker thread (see the module doc)."""

    def __init__(self, config_json: str) -> None:
        self.config = CloudConfig.model_validate_json(config_json)
        self.clock = WallClock()
        try:
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.name = f"local-{os.getpid()}"
        self.models = ModelSet.load(self.config, clock=self.clock)
        self.queue = RequestQueue(self.config.scheduler, limit=1_000_000, max_batch_size=self.config.max_batch_size,
                                  expected_ms=self.models.expected_ms, per_vehicle_limit=None, fair_share=False)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[PendingRequest, asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._busy_ms_total = 0.0
        self._running_since_ms: float | None = None
        self._running_expected_ms = 0.0  # the expected runtime of the batch in progress
        self._stats_at_ms = self.clock.now_ms()
        self._stats_busy_ms = 0.0
        self._last_progress_ms = self.clock.now_ms()
        self._fleet_held_ms = 0.0
        self._fleet_slack_ms = autoscaling.NO_SLACK_MS
        self._fleet_info_ms = -float("inf")
        # (ms left until the deadline, this replica's expected runtime) of the latest arrivals.
        self._received: deque[tuple[float, float]] = deque(maxlen=_RECEIVED_KEPT)
        self._worker = threading.Thread(target=self._work, name="replica-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ Serve calls

    async def infer(self, header: RequestHeader, payload: bytes, remaining_ms: float, target: str | None = None,
                    fleet: tuple[float, float] | None = None) -> ReplicaOutcome:
        """Queue one request with `remaining_ms` until its deadline; answer when it has run."""
        arrival_ms = self.clock.now_ms()
        if fleet is not None:
            self._fleet_held_ms, self._fleet_slack_ms = fleet
            self._fleet_info_ms = arrival_ms
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        request = PendingRequest(identity=b"", header=header, payload=payload, arrival_ms=arrival_ms,
                                 deadline_ms=arrival_ms + remaining_ms)
        self._received.append((remaining_ms, self.models.expected_ms(header.model, 1)))
        with self._lock:
            self._waiting[id(request)] = (request, loop, future)
        if not self.queue.push(request):
            with self._lock:
                self._waiting.pop(id(request), None)
            return self._outcome(request, REQUEUE, "replica shutting down")
        try:
            return await future
        finally:
            with self._lock:
                self._waiting.pop(id(request), None)

    def describe(self, target: str | None = None) -> dict[str, Any]:
        """Who this replica is and what it serves."""
        try:
            gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - outside a Ray worker
            gpu_ids = []
        return {
            "replica": self.name, "pid": os.getpid(), "gpu_ids": gpu_ids,
            "node_id": _node_id(),
            "models": {name: {"expected_ms": self.models.expected_ms(name, 1),
                              "decodes_images": self.models.decodes_images(name),
                              "backend": self.models.runners[name].backend_name}
                       for name in self.models.names},
        }

    def received(self, target: str | None = None) -> list[tuple[float, float]]:
        """(ms left until the deadline at arrival, expected runtime) of the latest requests this
        replica was sent: what the deadline-aware dispatch promises, seen from the replica."""
        return list(self._received)

    def check_health(self) -> None:
        """Ray Serve's health check: fails when the worker died, or holds work without progress
        for `hang_timeout_ms` past the expected end of the batch it runs (a batch of a slow
        model on CPU may rightly take longer than the timeout itself)."""
        if not self._worker.is_alive():
            raise RuntimeError("replica worker thread died")
        with self._lock:
            holding = bool(self._waiting)
            running_expected_ms = self._running_expected_ms if self._running_since_ms is not None else 0.0
        stalled_ms = self.clock.now_ms() - self._last_progress_ms
        if holding and stalled_ms > self.config.ray.hang_timeout_ms + running_expected_ms:
            raise RuntimeError(f"replica worker made no progress for {stalled_ms:.0f} ms while holding work")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for `cloudside.autoscaling.DeadlineSlackPolicy`."""
        now_ms = self.clock.now_ms()
        with self._lock:
            busy_ms = self._busy_ms_total + (now_ms - self._running_since_ms if self._running_since_ms else 0.0)
            waiting = [request for request, _, _ in self._waiting.values()]
        period_ms = max(1.0, now_ms - self._stats_at_ms)
        busy = min(1.0, max(0.0, (busy_ms - self._stats_busy_ms) / period_ms))
        self._stats_at_ms, self._stats_busy_ms = now_ms, busy_ms
        queued_ms = sum(self.models.expected_ms(request.model, 1) for request in waiting)
        slack_ms = min((request.deadline_ms - now_ms - self.models.expected_ms(request.model, 1)
                        for request in waiting), default=autoscaling.NO_SLACK_MS)
        fresh = now_ms - self._fleet_info_ms < _FLEET_INFO_STALE_MS
        return {autoscaling.BUSY: busy, autoscaling.QUEUED_MS: queued_ms,
                autoscaling.HELD_MS: self._fleet_held_ms if fresh else 0.0,
                autoscaling.SLACK_MS: min(slack_ms, self._fleet_slack_ms if fresh else autoscaling.NO_SLACK_MS)}

    def __del__(self) -> None:
        # Serve is stopping this replica (after its ongoing requests, or at its timeout): what is
        # still queued goes back to the dispatcher.
        queue = getattr(self, "queue", None)
        if queue is None:
            return
        for request in queue.close():
            self._resolve(request, self._outcome(request, REQUEUE, "replica shutting down"))

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            decision = self.queue.wait_and_take(self.clock.now_ms, timeout_s=0.1)
            if decision is None:
                return
            now_ms = self.clock.now_ms()
            self._last_progress_ms = now_ms
            for request in decision.expired:
                self._resolve(request, self._outcome(request, EXPIRED, expiry_reason(
                    request.deadline_ms - now_ms, request.model, self.models.expected_ms(request.model, 1))))
            for request in decision.rejected:  # not with this queue's limits; kept for completeness
                self._resolve(request, self._outcome(request, REQUEUE, "replica queue full"))
            batch = [request for request in decision.batch if not self._cancelled(request)]
            if not batch:
                continue
            with self._lock:
                self._running_since_ms = now_ms
                self._running_expected_ms = self.models.expected_ms(batch[0].model, len(batch))
            try:
                results = self.models.run_batch(batch)
            except Exception as error:  # noqa: BLE001 - a bug costs this batch, not the replica
                logger.exception("replica batch failed")
                results = [BatchResult(request, ERROR, f"internal: {type(error).__name__}") for request in batch]
            finished_ms = self.clock.now_ms()
            with self._lock:
                self._busy_ms_total += finished_ms - now_ms
                self._running_since_ms = None
            self._last_progress_ms = finished_ms
            depth = len(self.queue)
            for result in results:
                request = result.request
                self._resolve(request, ReplicaOutcome(
                    status=result.status, replica=self.name, reason=result.reason, detections=result.detections,
                    queue_ms=now_ms - request.arrival_ms, decode_ms=result.decode_ms,
                    inference_ms=result.inference_ms, batch_size=result.batch_size,
                    first_in_batch=result.first_in_batch, late=result.late,
                    replica_ms=finished_ms - request.arrival_ms, queue_depth=depth))

    def _outcome(self, request: PendingRequest, status: str, reason: str) -> ReplicaOutcome:
        now_ms = self.clock.now_ms()
        return ReplicaOutcome(status=status, replica=self.name, reason=reason, queue_ms=now_ms - request.arrival_ms,
                              replica_ms=now_ms - request.arrival_ms, queue_depth=len(self.queue))

    def _cancelled(self, request: PendingRequest) -> bool:
        with self._lock:
            waiting = self._waiting.get(id(request))
        return waiting is not None and waiting[2].cancelled()

    def _resolve(self, request: PendingRequest, outcome: ReplicaOutcome) -> None:
        with self._lock:
            waiting = self._waiting.get(id(request))
        if waiting is None:
            return
        _, loop, future = waiting

        def deliver() -> None:
            if not future.done():
                future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the replica's loop is gone (shutting down)
            loop.call_soon_threadsafe(deliver)


class ServeBatchReplica:
    """Plain Ray Serve (`dispatch: serve`, a benchmark baseline): Serve's router picks the replica
    and `@serve.batch` batches calls in arrival order; no deadlines, no expiry."""

    def __init__(self, config_json: str) -> None:
        self.config = CloudConfig.model_validate_json(config_json)
        self.clock = WallClock()
        try:
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001
            self.name = f"local-{os.getpid()}"
        self.models = ModelSet.load(self.config, clock=self.clock)
        self.infer_batch.set_max_batch_size(self.config.max_batch_size)

    async def infer(self, header: RequestHeader, payload: bytes, remaining_ms: float, target: str | None = None,
                    fleet: tuple[float, float] | None = None) -> ReplicaOutcome:
        arrival_ms = self.clock.now_ms()
        request = PendingRequest(identity=b"", header=header, payload=payload, arrival_ms=arrival_ms,
                                 deadline_ms=arrival_ms + remaining_ms)
        return await self.infer_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def infer_batch(self, requests: list[PendingRequest]) -> list[ReplicaOutcome]:
        outcomes: dict[int, ReplicaOutcome] = {}
        by_model: dict[str, list[PendingRequest]] = {}
        for request in requests:
            by_model.setdefault(request.model, []).append(request)
        for batch in by_model.values():
            started_ms = self.clock.now_ms()
            results = await asyncio.to_thread(self.models.run_batch, batch)
            finished_ms = self.clock.now_ms()
            for result in results:
                request = result.request
                outcomes[id(request)] = ReplicaOutcome(
                    status=result.status, replica=self.name, reason=result.reason, detections=result.detections,
                    queue_ms=started_ms - request.arrival_ms, decode_ms=result.decode_ms,
                    inference_ms=result.inference_ms, batch_size=result.batch_size,
                    first_in_batch=result.first_in_batch, late=result.late,
                    replica_ms=finished_ms - request.arrival_ms)
        return [outcomes[id(request)] for request in requests]

    def describe(self, target: str | None = None) -> dict[str, Any]:
        return {"replica": self.name, "pid": os.getpid(), "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                "node_id": _node_id(),
                "models": {name: {"expected_ms": self.models.expected_ms(name, 1),
                                  "decodes_images": self.models.decodes_images(name),
                                  "backend": self.models.runners[name].backend_name}
                           for name in self.models.names}}


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""


# ---------------------------------------------------------------- driver side


class RayEngine:
    """The Ray engine of the service (see the module doc)."""

    name = "ray"

    def __init__(self, config: CloudConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.settings = config.ray
        self.clock = clock or WallClock()
        self.queue = admission_queue(config, self.expected_ms)
        self.app_name = f"{self.settings.app_name}-{uuid.uuid4().hex[:8]}"
        self.dispatcher = FleetDispatcher(self.expected_ms, self.settings.dispatch_ahead_ms,
                                          self.settings.hang_timeout_ms)
        self._estimates: dict[str, RuntimeEstimate] = {}
        self._decodes: dict[str, bool] = {}
        self._backends: dict[str, str] = {}
        self._host: EngineHost | None = None
        self._pool_metrics: ReplicaMetrics | None = None
        self._handle: Any = None
        self._requests: Any = None  # the handle inference requests go through
        self._started_ray = False
        self._deployed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_scheduled = False
        self._calls: dict[int, asyncio.Task] = {}  # attempt -> the task awaiting its answer
        self._serve_calls: dict[int, PendingRequest] = {}  # dispatch: serve, requests in flight
        self._closing = False
        self._closed = False
        self._failed = False
        self._no_live_since_ms: float | None = None
        self._gauges_at_ms = -float("inf")
        self._live_replicas = 0  # as of the dispatcher's last look (read from other threads)
        self._replica_labels: set[str] = set()
        self._hop_ms = 1.0  # EWMA of the Ray hop (round trip minus replica time)
        self.gpus_per_replica = 0.0

    # ------------------------------------------------------------ lifecycle

    def load(self, announce: Callable[[str], None]) -> None:
        """Join (or start) Ray, deploy the replicas, wait until they serve."""
        for name in _SERVE_LOGGER_NAMES:
            logging.getLogger(name).setLevel(logging.WARNING)
        settings = self.settings
        if not ray.is_initialized():
            address = settings.address or os.environ.get("RAY_ADDRESS") or None
            try:
                if address:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
                    announce(f"Ray: joined the cluster at {address}")
                else:
                    # "local": a new instance, even where `ray start` left a cluster address behind.
                    ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False,
                             log_to_driver=False, logging_level=logging.WARNING)
                    announce(f"Ray: started a local instance ({_resources_line()})")
            except (ConnectionError, ValueError, RuntimeError) as error:
                hint = ("; a cluster started with `ray start` uses token authentication: set RAY_AUTH_MODE=token "
                        "with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                        if address and not os.environ.get("RAY_AUTH_MODE") else "")
                raise ConfigError(f"ray.address {address or '(local)'}: cannot start or join Ray "
                                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__}){hint}"
                                  ) from None
            self._started_ray = True
        num_gpus = settings.replica_num_gpus
        if num_gpus == "auto":
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0.0) >= 1.0 else 0.0
        self.gpus_per_replica = float(num_gpus)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        self._start_loop()
        self._deployed = True
        try:
            serve.run(self._application(), name=self.app_name, route_prefix=None, logging_config={"log_level": "WARNING"})
        except Exception as error:  # noqa: BLE001 - Serve's deploy errors (replica constructor failed, ...)
            raise ConfigError(f"engine: ray: the model replicas did not start "
                              f"({str(error).strip().splitlines()[-1][:300] if str(error) else type(error).__name__})"
                              ) from None
        self._handle = self._on_loop(self._get_handle()).result(timeout=60)
        self._requests = self._on_loop(self._get_request_handle()).result(timeout=60)
        described = self._on_loop(self._describe_any()).result(timeout=120)
        for name, model in described["models"].items():
            self._estimates[name] = RuntimeEstimate(initial_ms_per_image=float(model["expected_ms"]), clock=self.clock)
            self._decodes[name] = bool(model["decodes_images"])
            self._backends[name] = str(model["backend"])
        for name in self._estimates:
            announce(f"model {name}: backend {self._backends[name]} on Ray Serve replicas, warm, "
                     f"~{self._estimates[name].expected_ms(1):.1f} ms per image")
        if settings.dispatch == "edf":
            give_up_at = time.monotonic() + 60.0
            while not replica_directory.latest(self.app_name) and time.monotonic() < give_up_at:
                time.sleep(0.05)
            if not replica_directory.latest(self.app_name):
                raise ConfigError("engine: ray: Ray Serve started the replicas but the router never listed them")
        scaling = (f"autoscaled {settings.min_replicas}-{settings.max_replicas}" if settings.autoscaling
                   else f"{settings.min_replicas}")
        announce(f"Ray Serve app {self.app_name}: {scaling} replica(s), {self.gpus_per_replica:g} GPU and "
                 f"{settings.replica_num_cpus:g} CPU each, dispatch {settings.dispatch}")

    def _application(self) -> Any:
        settings = self.settings
        from ray.serve.config import RequestRouterConfig

        options: dict[str, Any] = {
            "name": _DEPLOYMENT,
            "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "num_gpus": self.gpus_per_replica},
            "health_check_period_s": settings.health_check_period_s,
            "health_check_timeout_s": settings.health_check_timeout_s,
            "graceful_shutdown_timeout_s": 5.0,
            "graceful_shutdown_wait_loop_s": 0.2,
        }
        if settings.autoscaling:
            options["autoscaling_config"] = self._autoscaling_config()
        else:
            options["num_replicas"] = settings.initial_replicas or settings.min_replicas
        # The replica's methods only queue and await (the models run on a thread of their own), so
        # they can run on Serve's own replica loop: one thread hop less each way. Requests travel
        # over Serve's gRPC channel: the replica must take the largest payload the front end
        # admits (Serve's default limit is 4 MiB; a raw Waymo frame is 7.4 MB).
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(max(
                4 * 1024 * 1024, self.config.max_payload_bytes + _GRPC_HEADROOM_BYTES))}}
        if settings.dispatch == "edf":
            options["max_ongoing_requests"] = 100_000
            options["request_router_config"] = RequestRouterConfig(
                request_router_class="cloudside.ray_router:DeadlineRouter")
            deployment = serve.deployment(ModelReplica)
        else:
            deployment = serve.deployment(ServeBatchReplica)
        return deployment.options(**options).bind(self.config.model_dump_json())

    def _autoscaling_config(self) -> Any:
        """Serve's autoscaler, bounded by the config, driven by `DeadlineSlackPolicy`."""
        from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

        settings = self.settings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s, see below
            return AutoscalingConfig(
                min_replicas=settings.min_replicas, max_replicas=settings.max_replicas,
                initial_replicas=settings.initial_replicas, upscale_delay_s=settings.upscale_delay_s,
                downscale_delay_s=settings.downscale_delay_s, look_back_period_s=settings.look_back_period_s,
                metrics_interval_s=_metrics_interval_s(settings.look_back_period_s),
                policy=AutoscalingPolicy(policy_function="cloudside.autoscaling:DeadlineSlackPolicy",
                                         policy_kwargs={"target_utilization": settings.target_utilization}))

    def start(self, host: EngineHost) -> None:
        self._host = host
        self._pool_metrics = ReplicaMetrics(host.metrics.registry)
        for name in self._estimates:
            host.metrics.expected_runtime.labels(name).set(self.expected_ms(name, 1) / 1000.0)
        if self.settings.dispatch == "edf":
            assert self._loop is not None
            replica_directory.listen(self.app_name, self._replicas_changed)
            self._on_loop(_barrier()).result(timeout=10)  # the pool as listed now is in the dispatcher
            self._loop.call_soon_threadsafe(self._tick)

    def stop(self, grace_ms: float) -> list[PendingRequest]:
        give_up_at = time.monotonic() + grace_ms / 1000.0
        while self.pending() and time.monotonic() < give_up_at and not self._failed:
            time.sleep(0.005)
        if self._loop is not None:
            return self._on_loop(self._shut_dispatch()).result(timeout=30)
        return self.queue.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        replica_directory.forget(self.app_name)
        if not self.queue.closed:
            self.queue.close()
        if self._loop is not None:
            try:
                self._on_loop(self._shut_dispatch()).result(timeout=30)
            except Exception:  # noqa: BLE001 - closing anyway
                logger.debug("dispatcher shutdown failed", exc_info=True)
        # Ray may be gone already (a signal to the whole process group stops a local Ray's own
        # processes too): no step of the teardown may hang the service's shutdown.
        if self._deployed:
            _bounded(lambda: serve.delete(self.app_name), _TEARDOWN_TIMEOUT_S, "deleting the Serve application")
        if self._started_ray:
            _bounded(serve.shutdown, _TEARDOWN_TIMEOUT_S, "stopping Ray Serve")
            _bounded(ray.shutdown, _TEARDOWN_TIMEOUT_S, "stopping the local Ray instance")

    # ------------------------------------------------------------ what the front end asks

    @property
    def model_names(self) -> list[str]:
        return list(self._estimates)

    def decodes_images(self, model: str) -> bool:
        return self._decodes.get(model, False)

    def expected_ms(self, model: str, batch_size: int) -> float:
        estimate = self._estimates.get(model)
        return estimate.expected_ms(batch_size) if estimate is not None else 0.0

    def submit(self, request: PendingRequest) -> str | None:
        if self._closing:
            return "service shutting down"
        if self.settings.dispatch == "serve":
            assert self._loop is not None
            self._serve_calls[id(request)] = request
            self._loop.call_soon_threadsafe(self._start_serve_call, request)
            return None
        if not self.queue.push(request):
            return refusal_reason(self.queue, request.accounted_vehicle)
        host = self._host
        assert host is not None and self._loop is not None
        for pushed_out in self.queue.drain_evicted():
            host.reply(pushed_out, reply_to(pushed_out.header, REJECTED, PUSHED_OUT, host.timings(pushed_out)))
        self._loop.call_soon_threadsafe(self._kick)
        return None

    def pending(self) -> int:
        if self._loop is None:
            return len(self.queue)
        try:  # the dispatcher belongs to the loop: count there
            return self._on_loop(self._pending_on_loop()).result(timeout=5)
        except Exception:  # noqa: BLE001 - a stuck loop: what the queue holds
            return len(self.queue)

    async def _pending_on_loop(self) -> int:
        return len(self.queue) + len(self.dispatcher.outstanding()) + len(self._serve_calls)

    def pool(self, timeout_s: float = 10.0) -> dict[str, list[str]]:
        """The dispatcher's view of the replicas, by state: live, hung, leaving."""
        assert self._loop is not None
        return self._on_loop(self._pool_on_loop()).result(timeout=timeout_s)

    async def _pool_on_loop(self) -> dict[str, list[str]]:
        loads = self.dispatcher.replicas.values()
        return {"live": sorted(load.name for load in loads if not load.hung and not load.leaving),
                "hung": sorted(load.name for load in loads if load.hung),
                "leaving": sorted(load.name for load in loads if load.leaving and not load.hung)}

    @property
    def healthy(self) -> bool:
        if self._failed or (_LOOP_THREAD is not None and not _LOOP_THREAD.is_alive()):
            return False
        if self._no_live_since_ms is not None:
            return self.clock.now_ms() - self._no_live_since_ms < _POOL_EMPTY_UNHEALTHY_MS
        return True

    @property
    def ready(self) -> bool:
        if self._closing or self._failed:
            return False
        if self.settings.dispatch == "serve":
            return self._handle is not None
        return self._live_replicas > 0

    def replicas(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """What each replica says of itself (id, pid, node, GPU ids, models); for operators and tests."""
        names = replica_directory.latest(self.app_name)
        answers = self._on_loop(self._ask_all("describe", names)).result(timeout=timeout_s)
        return [answer for answer in answers if answer is not None]

    def received(self, timeout_s: float = 30.0) -> dict[str, list[tuple[float, float]]]:
        """Per replica, (ms left until the deadline, expected runtime) of what it was sent lately."""
        names = replica_directory.latest(self.app_name)
        answers = self._on_loop(self._ask_all("received", names)).result(timeout=timeout_s)
        return dict(zip(names, answers, strict=True))

    # ------------------------------------------------------------ the loop

    def _start_loop(self) -> None:
        self._loop = _dispatch_loop()

    def _on_loop(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _get_handle(self) -> Any:
        """The deployment handle, its router on this loop (one thread hop less each way; Serve's
        default runs it on a loop thread of its own)."""
        handle = serve.get_deployment_handle(_DEPLOYMENT, app_name=self.app_name)
        try:
            handle._init(_run_router_in_separate_loop=False)
        except Exception:  # noqa: BLE001 - a Serve without the option: its default router loop
            logger.debug("router on the dispatcher's loop not available", exc_info=True)
        return handle

    async def _get_request_handle(self) -> Any:
        """The handle requests go through: by value over Serve's direct gRPC channel to the replica
        (`_by_reference=False`), which on this machine halves the hop of Ray's actor-call path."""
        try:
            return self._handle.options(_by_reference=False)
        except Exception:  # noqa: BLE001 - a Serve without the option: actor calls
            logger.debug("direct gRPC requests not available", exc_info=True)
            return self._handle

    async def _describe_any(self) -> dict[str, Any]:
        return await self._handle.describe.remote()

    async def _ask_all(self, method: str, names: list[str]) -> list[Any]:
        """Call a method on each named replica (None for one that fails)."""
        answers = await asyncio.gather(*(getattr(self._handle, method).remote(target=name) for name in names),
                                       return_exceptions=True)
        return [None if isinstance(answer, BaseException) else answer for answer in answers]

    def _replicas_changed(self, replicas: list[str] | None, died: str | None) -> None:
        """From Serve's router thread: hand over to the dispatcher's loop."""
        if self._loop is None or self._closing:
            return
        with contextlib.suppress(RuntimeError):  # loop closed
            self._loop.call_soon_threadsafe(self._apply_replicas, replicas, died)

    def _apply_replicas(self, replicas: list[str] | None, died: str | None) -> None:
        now_ms = self.clock.now_ms()
        if died is not None:
            self._replica_lost(died, "died", now_ms)
        if replicas is not None:
            for name in self.dispatcher.lost_below_floor(replicas, self._replica_floor()):
                self._replica_lost(name, "died", now_ms)
            self.dispatcher.update_replicas(replicas, now_ms)
            self._update_gauges(now_ms, force=True)
        self._kick()

    def _replica_floor(self) -> int:
        """The fewest replicas Serve keeps on purpose: its fixed size, or the autoscaler's minimum."""
        settings = self.settings
        return settings.min_replicas if settings.autoscaling else (settings.initial_replicas or settings.min_replicas)

    def _kick(self) -> None:
        """On the loop: dispatch soon (once, however many kicks come before it runs)."""
        if not self._step_scheduled and self._loop is not None:
            self._step_scheduled = True
            self._loop.call_soon(self._step)

    def _tick(self) -> None:
        """On the loop, every _TICK_S: hang checks and expiry even when nothing else happens."""
        if self._closing or self._loop is None:
            return
        self._step()
        self._loop.call_later(_TICK_S, self._tick)

    def _step(self) -> None:
        self._step_scheduled = False
        if self._closing or self._failed:
            return
        try:
            now_ms = self.clock.now_ms()
            for name in self.dispatcher.overdue(now_ms):
                self._replica_lost(name, "hung", now_ms)
            self._dispatch(now_ms)
            self._update_gauges(now_ms)
        except Exception:
            self._failed = True
            logger.exception("Ray dispatcher failed")

    def _dispatch(self, now_ms: float) -> None:
        host = self._host
        assert host is not None
        if not self.dispatcher.has_room():
            for request in self.queue.expire_due(now_ms):
                self._reply_expired(request, now_ms)
            return
        while self.dispatcher.has_room():
            decision = self.queue.take(now_ms)
            for request in decision.rejected:
                host.reply(request, reply_to(request.header, REJECTED, PUSHED_OUT,
                                             host.timings(request, taken_ms=now_ms)))
            for request in decision.expired:
                self._reply_expired(request, now_ms)
            if not decision.batch:
                return
            placement = self.dispatcher.place(decision.batch, now_ms)
            for request, start_in_ms, needed_ms in placement.infeasible:
                left_ms = request.deadline_ms - now_ms
                host.reply(request, reply_to(request.header, EXPIRED, (
                    f"deadline: {left_ms:.1f} ms left; the earliest any replica can start it is in "
                    f"{start_in_ms:.1f} ms and {request.model} needs ~{needed_ms:.1f} ms"),
                    host.timings(request, taken_ms=now_ms)))
            fleet = self._fleet_info(now_ms)
            for assignment in placement.assignments:
                self._calls[assignment.attempt] = asyncio.get_running_loop().create_task(
                    self._call(assignment, fleet))

    def _fleet_info(self, now_ms: float) -> tuple[float, float]:
        """(expected work held at the dispatcher, least slack of it) for the autoscaler."""
        held = len(self.queue)
        if not held:
            return 0.0, autoscaling.NO_SLACK_MS
        mean_single_ms = sum(self.expected_ms(name, 1) for name in self._estimates) / max(1, len(self._estimates))
        earliest = self.queue.earliest_deadline_ms()
        slack_ms = (earliest - now_ms - mean_single_ms) if earliest is not None else autoscaling.NO_SLACK_MS
        return held * mean_single_ms, slack_ms

    async def _call(self, assignment: Assignment, fleet: tuple[float, float]) -> None:
        request = assignment.request
        sent_ms = self.clock.now_ms()
        try:
            remaining_ms = request.deadline_ms - sent_ms - self._hop_ms / 2.0
            outcome: ReplicaOutcome = await self._requests.infer.remote(
                request.header, bytes(request.payload), remaining_ms, target=assignment.replica, fleet=fleet)
        except asyncio.CancelledError:
            return  # handed back already (hung replica, shutdown)
        except Exception as error:  # noqa: BLE001 - classified below
            self._calls.pop(assignment.attempt, None)
            now_ms = self.clock.now_ms()
            lost = _replica_failure(error)
            if lost is not None:  # the replica, not the request: send it elsewhere
                self._replica_lost(assignment.replica, lost, now_ms)
            elif self.dispatcher.finished(assignment, now_ms):  # the request itself failed there
                logger.warning("replica %s failed a request: %s", assignment.replica, error)
                host = self._host
                assert host is not None
                host.reply(request, reply_to(request.header, ERROR,
                                             f"internal: replica failed ({type(error).__name__})",
                                             host.timings(request, taken_ms=assignment.dispatched_ms)))
            self._wake_dispatcher()
            return
        finally:
            self._calls.pop(assignment.attempt, None)
        now_ms = self.clock.now_ms()
        self._hop_ms += 0.1 * (max(0.0, now_ms - sent_ms - outcome.replica_ms) - self._hop_ms)
        if not self.dispatcher.finished(assignment, now_ms):
            self._wake_dispatcher()
            return  # a late answer of a request already sent elsewhere (or answered)
        self._wake_dispatcher()
        if outcome.status == REQUEUE:
            self._retry(request, f"replica {outcome.replica} gave it back ({outcome.reason})", "given back", now_ms)
            return
        self._answer(assignment, outcome, sent_ms, now_ms)

    def _answer(self, assignment: Assignment, outcome: ReplicaOutcome, sent_ms: float, now_ms: float) -> None:
        host = self._host
        assert host is not None and self._pool_metrics is not None
        request = assignment.request
        model = request.model
        replica = self._replica_label(outcome.replica)
        pool = self._pool_metrics
        pool.replica_requests.labels(replica, model, outcome.status).inc()
        pool.replica_queue_depth.labels(replica).set(outcome.queue_depth)
        pool.dispatch_hop.observe(max(0.0, now_ms - sent_ms - outcome.replica_ms) / 1000.0)
        taken_ms = sent_ms + outcome.queue_ms
        if outcome.status == OK:
            estimate = self._estimates.get(model)
            if estimate is not None and outcome.first_in_batch:
                estimate.observe_batch(outcome.batch_size, outcome.inference_ms)
                if self._decodes.get(model):
                    estimate.observe_decode(outcome.decode_ms)
            if outcome.first_in_batch:
                pool.replica_inference_time.labels(replica, model).observe(outcome.inference_ms / 1000.0)
        result = BatchResult(request, outcome.status, outcome.reason, outcome.detections, outcome.decode_ms,
                             outcome.inference_ms, outcome.batch_size, outcome.first_in_batch, outcome.late)
        if outcome.status in (OK, ERROR):
            record_batch_metrics(host, model, [result], [taken_ms - request.arrival_ms], self.expected_ms(model, 1))
        timings = host.timings(request, taken_ms=taken_ms, decode_ms=outcome.decode_ms,
                               inference_ms=outcome.inference_ms)
        if outcome.status == OK:
            host.reply(request, reply_to(request.header, OK, None, timings,
                                         late=outcome.late or now_ms > request.deadline_ms), outcome.detections)
        else:
            host.reply(request, reply_to(request.header, outcome.status, outcome.reason, timings))

    # ------------------------------------------------------------ failures

    def _replica_lost(self, name: str, reason: str, now_ms: float) -> None:
        """A replica died or hung: everything it held goes back to the queue (or is answered)."""
        load = self.dispatcher.replicas.get(name)
        newly_lost = load is not None and not load.hung  # count each loss once (hung, then dead: one)
        if reason == "died":
            handed_back = self.dispatcher.replica_failed(name)
        else:
            handed_back = self.dispatcher.mark_hung(name)
        if self._pool_metrics is not None and newly_lost:
            self._pool_metrics.replica_failures.labels(reason).inc()
        if handed_back or reason == "hung":
            logger.warning("replica %s %s; %d request(s) it held go back to the queue where their deadlines allow",
                           name, reason, len(handed_back))
        for assignment in handed_back:
            self._cancel_call(assignment)
            self._retry(assignment.request, f"replica {name} {reason}", reason, now_ms)
        self._update_gauges(now_ms, force=True)

    def _cancel_call(self, assignment: Assignment) -> None:
        task = self._calls.pop(assignment.attempt, None)
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _retry(self, request: PendingRequest, why: str, reason: str, now_ms: float) -> None:
        """Send a handed-back request again while its deadline allows, else answer it expired."""
        host = self._host
        assert host is not None
        needed_ms = self.expected_ms(request.model, 1)
        left_ms = request.deadline_ms - now_ms
        if self.config.scheduler == "edf" and left_ms < needed_ms:
            host.reply(request, reply_to(request.header, EXPIRED, (
                f"{why}; {left_ms:.1f} ms left, too little to run it elsewhere ({request.model} needs "
                f"~{needed_ms:.1f} ms)"), host.timings(request, taken_ms=now_ms)))
            return
        if not self.queue.push(request):
            status = EXPIRED if self.queue.closed else REJECTED
            host.reply(request, reply_to(request.header, status, f"{why}; "
                                         f"{refusal_reason(self.queue, request.accounted_vehicle)}",
                                         host.timings(request, taken_ms=now_ms)))
            return
        for pushed_out in self.queue.drain_evicted():
            host.reply(pushed_out, reply_to(pushed_out.header, REJECTED, PUSHED_OUT, host.timings(pushed_out)))
        if self._pool_metrics is not None:
            self._pool_metrics.redispatched.labels(reason).inc()
        self._wake_dispatcher()

    def _reply_expired(self, request: PendingRequest, now_ms: float) -> None:
        host = self._host
        assert host is not None
        host.reply(request, reply_to(request.header, EXPIRED, expiry_reason(
            request.deadline_ms - now_ms, request.model, self.expected_ms(request.model, 1)),
            host.timings(request, taken_ms=now_ms)))

    def _wake_dispatcher(self) -> None:
        self._kick()

    async def _shut_dispatch(self) -> list[PendingRequest]:
        """On the loop: stop dispatching; hand back what is queued and what replicas still hold."""
        self._closing = True
        leftovers = self.queue.close()
        for assignment in self.dispatcher.drain():
            self._cancel_call(assignment)
            leftovers.append(assignment.request)
        leftovers += self._serve_calls.values()
        self._serve_calls.clear()
        return leftovers

    # ------------------------------------------------------------ plain Serve (dispatch: serve)

    def _start_serve_call(self, request: PendingRequest) -> None:
        asyncio.get_running_loop().create_task(self._serve_call(request))

    async def _serve_call(self, request: PendingRequest) -> None:
        host = self._host
        assert host is not None
        sent_ms = self.clock.now_ms()
        try:
            outcome: ReplicaOutcome = await self._requests.infer.remote(
                request.header, bytes(request.payload), request.deadline_ms - sent_ms)
        except Exception as error:  # noqa: BLE001 - the baseline has no failure handling: the request fails
            if self._serve_calls.pop(id(request), None) is not None:
                host.reply(request, reply_to(request.header, ERROR, f"internal: replica failed "
                                             f"({type(error).__name__})", host.timings(request, taken_ms=sent_ms)))
            return
        if self._serve_calls.pop(id(request), None) is None:
            return  # answered at shutdown already
        now_ms = self.clock.now_ms()
        self._answer(Assignment(request, outcome.replica, 0, sent_ms, 0.0, 0.0), outcome, sent_ms, now_ms)

    # ------------------------------------------------------------ metrics

    def _replica_label(self, replica: str) -> str:
        if replica not in self._replica_labels:
            if len(self._replica_labels) >= _MAX_REPLICA_LABELS:
                return "(other)"
            self._replica_labels.add(replica)
        return replica

    def _update_gauges(self, now_ms: float, force: bool = False) -> None:
        if not force and now_ms - self._gauges_at_ms < _GAUGE_PERIOD_MS:
            return
        self._gauges_at_ms = now_ms
        live = self.dispatcher.live()
        self._live_replicas = len(live)
        self._no_live_since_ms = None if live else (self._no_live_since_ms or now_ms)
        if self._host is None or self._pool_metrics is None:
            return
        pool = self._pool_metrics
        loads = self.dispatcher.replicas
        pool.replicas.labels("live").set(len(live))
        pool.replicas.labels("hung").set(len(loads) - len(live))
        for name in list(self._replica_labels):
            if name not in loads:
                for gauge in (pool.replica_up, pool.held, pool.replica_queue_depth):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
        for name, load in loads.items():
            label = self._replica_label(name)
            pool.replica_up.labels(label).set(0 if load.hung else 1)
            pool.held.labels(label).set(load.held)
        self._host.metrics.queue_depth.set(len(self.queue))


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_THREAD: threading.Thread | None = None
_LOOP_LOCK = threading.Lock()


def _dispatch_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for Ray engines (dispatch, Serve calls, the Serve router of
    their handles). It runs for the life of the process: Serve binds its shared long-poll client
    to the loop of the first router, so that loop must outlive every service."""
    global _LOOP, _LOOP_THREAD
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP_THREAD is None or not _LOOP_THREAD.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            _LOOP_THREAD = threading.Thread(target=run, name="cloud-ray-dispatch", daemon=True)
            _LOOP_THREAD.start()
            ready.wait(5)
            _LOOP = loop
        return _LOOP


async def _barrier() -> None:
    """Awaited on the loop: everything scheduled on it before has run."""


def _replica_failure(error: BaseException) -> str | None:
    """How a failed call to a replica lost it: "died" (its actor is dead), "hung" (unreachable for
    now: treated as hung until it answers again), or None (the request failed, the replica lives)."""
    if isinstance(error, ActorUnavailableError):
        return "hung"
    if isinstance(error, RayActorError):
        return "died"
    try:
        import grpc  # Serve's direct channel to replicas
    except ImportError:
        return None
    if isinstance(error, grpc.RpcError) and getattr(error, "code", lambda: None)() in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return "hung"
    return None


def _bounded(step: Callable[[], Any], timeout_s: float, what: str) -> bool:
    """Run a teardown step for at most timeout_s (in a daemon thread); False if it did not finish."""
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except Exception:  # noqa: BLE001 - tearing down anyway
            logger.debug("%s failed", what, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name="cloud-ray-teardown", daemon=True).start()
    if not done.wait(timeout_s):
        logger.warning("%s did not finish within %.0f s (is Ray still running?); going on", what, timeout_s)
        return False
    return True


def _metrics_interval_s(look_back_period_s: float) -> float:
    """How often replicas push autoscaling metrics: a few times per look-back period. Serve marks
    the field deprecated (to become an environment variable) but still reads it."""
    return min(0.5, look_back_period_s / 4)


def _resources_line() -> str:
    resources = ray.cluster_resources()
    return f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
