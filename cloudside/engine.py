"""What runs the models behind the service's ZeroMQ front end: the engine interface, the model
set every engine drives, and the default engine (worker threads in this process).

The front end (`cloudside.service.CloudService`) owns the ROUTER socket, validation, identity,
image checks, replies and metrics. It hands each admitted request to an `Engine` with
`submit()`, and the engine answers every request it accepted exactly once through its
`EngineHost` (`host.reply(...)`), from any thread.

Engines:
- `ThreadEngine` (`engine: threads`, the default): `config.workers` threads in this process,
  each taking decisions from one `cloudside.scheduler.RequestQueue` and running batches.
- `cloudside.ray_engine.RayEngine` (`engine: ray`): a Ray Serve deployment of model replicas
  behind a deadline-aware dispatcher; each replica drives its own `RequestQueue` and a
  `ModelSet`, exactly as a worker thread does here.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from avcloud.clock import Clock, WallClock
from avcloud.errors import ConfigError, UserError
from avcloud.protocol import ERROR, EXPIRED, OK, REJECTED, ReplyHeader, RequestHeader, ServerTimings, reply_to
from cloudside.config import CloudConfig
from cloudside.health import ServiceMetrics
from cloudside.runners import ModelRunner, RuntimeEstimate, build_runner
from cloudside.scheduler import PendingRequest, RequestQueue

logger = logging.getLogger("avcloud.cloud")

PUSHED_OUT = "pushed out of the full queue by another vehicle's request (this vehicle holds the most)"


def expiry_reason(left_ms: float, model: str, needed_ms: float) -> str:
    return f"deadline: {left_ms:.1f} ms left, {model} needs ~{needed_ms:.1f} ms"


def refusal_reason(queue: RequestQueue, vehicle: str) -> str:
    """Why `queue.push` refused a request of this vehicle."""
    if queue.closed:
        return "service shutting down"
    if queue.vehicle_full(vehicle):
        return f"vehicle queue share full ({queue.per_vehicle_limit} requests)"
    return f"queue full ({queue.limit} requests)"


def admission_queue(config: CloudConfig, expected_ms: Callable[[str, int], float]) -> RequestQueue:
    """The service's queue of admitted requests, with every admission rule of the config."""
    return RequestQueue(config.scheduler, config.queue_limit, config.max_batch_size, expected_ms,
                        per_vehicle_limit=config.per_vehicle_queue_limit, fair_share=config.fair_share,
                        fair_share_slack_ms=config.fair_share_slack_ms, vehicle_weights=config.vehicle_weights)


class EngineHost(Protocol):
    """What the front end offers an engine."""

    metrics: ServiceMetrics
    clock: Clock

    def reply(self, request: PendingRequest, header: ReplyHeader, detections: np.ndarray | None = None) -> None:
        """Send (and count) the one reply to an accepted request; any thread."""
        ...

    def timings(self, request: PendingRequest, taken_ms: float | None = None, decode_ms: float = 0.0,
                inference_ms: float = 0.0) -> ServerTimings: ...

    def vehicle_label(self, vehicle: str | None) -> str: ...


class Engine(Protocol):
    """The worker side of the service. Lifecycle: `load()` (models warm, before the socket
    opens), `start(host)`, then `submit()` from the I/O thread, and `stop(grace_ms)` once."""

    name: str
    queue: RequestQueue  # admission: limits, fair share, push-out, EDF order

    def load(self, announce: Callable[[str], None]) -> None: ...

    def start(self, host: EngineHost) -> None: ...

    @property
    def model_names(self) -> list[str]: ...

    def decodes_images(self, model: str) -> bool: ...

    def expected_ms(self, model: str, batch_size: int) -> float: ...

    def submit(self, request: PendingRequest) -> str | None:
        """Take a validated request: None when accepted (it will be answered), else the reason
        to answer it `rejected` now."""
        ...

    def pending(self) -> int:
        """Requests accepted and not answered yet."""
        ...

    def stop(self, grace_ms: float) -> list[PendingRequest]:
        """Stop taking work; let what is pending finish for up to grace_ms; hand back what is
        left unanswered (the front end answers it `expired`)."""
        ...

    def close(self) -> None:
        """Release everything (after a failed start, or after stop); idempotent."""
        ...

    @property
    def healthy(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


# ---------------------------------------------------------------- running batches


@dataclass
class BatchResult:
    """What running one request of a batch gave: `ok` with detections, or `error`."""

    request: PendingRequest
    status: str
    reason: str | None = None
    detections: np.ndarray | None = None
    decode_ms: float = 0.0
    inference_ms: float = 0.0  # model time of the whole batch
    batch_size: int = 0  # requests that ran in the batch (0: refused before the model ran)
    first_in_batch: bool = False  # count per-batch metrics once
    late: bool = False


class ModelSet:
    """The served models of one worker pool (this process, or one Ray replica): their runners and
    running runtime estimates, and how one batch runs (decode, model, estimate updates)."""

    def __init__(self, runners: dict[str, ModelRunner], estimates: dict[str, RuntimeEstimate], clock: Clock) -> None:
        self.runners = runners
        self.estimates = estimates
        self.clock = clock

    @classmethod
    def load(cls, config: CloudConfig, runners: dict[str, ModelRunner] | None = None, clock: Clock | None = None,
             announce: Callable[[str], None] | None = None) -> ModelSet:
        """Build (unless given), warm up and estimate every configured model."""
        clock = clock or WallClock()
        if runners is None:
            runners = {}
            for entry in config.models:
                try:
                    runners[entry.name] = build_runner(entry, config.warmup_iterations)
                except UserError:
                    raise
                except Exception as error:  # a backend's own exception types
                    raise ConfigError(f"models: cannot load '{entry.name}' "
                                      f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                                      ) from None
        if any(runner.decodes_images for runner in runners.values()):
            import avcloud.compression  # noqa: F401 - OpenCV loads now, not on the first request
        estimates: dict[str, RuntimeEstimate] = {}
        for name, runner in runners.items():
            runner.warmup()
            simulated_overhead_ms = getattr(runner, "batch_overhead_ms", 0.0)
            estimates[name] = RuntimeEstimate(
                initial_ms_per_image=max(0.0, runner.expected_runtime_ms - simulated_overhead_ms),
                initial_batch_overhead_ms=simulated_overhead_ms, clock=clock)
            if announce is not None:
                announce(f"model {name}: backend {runner.backend_name}, warm, "
                         f"~{runner.expected_runtime_ms:.1f} ms per image")
        return cls(dict(runners), estimates, clock)

    @property
    def names(self) -> list[str]:
        return list(self.runners)

    def decodes_images(self, model: str) -> bool:
        return self.runners[model].decodes_images

    def expected_ms(self, model: str, batch_size: int) -> float:
        estimate = self.estimates.get(model)
        return estimate.expected_ms(batch_size) if estimate is not None else 0.0

    def run_batch(self, batch: list[PendingRequest]) -> list[BatchResult]:
        """Decode and run one same-model batch; one result per request, in batch order."""
        model = batch[0].model
        runner = self.runners[model]
        estimate = self.estimates[model]
        results: list[BatchResult] = []
        runnable: list[BatchResult] = []
        images: list[np.ndarray] = []
        output_sizes_wh: list[tuple[int, int]] = []
        for request in batch:
            header = request.header
            started_ms = self.clock.now_ms()
            if runner.decodes_images:
                try:
                    image = decode_payload(request.payload, header)
                except Exception as error:  # any codec failure is the sender's bad image
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    results.append(BatchResult(request, ERROR, f"undecodable image: {reason}"[:300]))
                    continue
            else:
                image = np.zeros((header.height, header.width, 0), dtype=np.uint8)  # emulated model needs no pixels
            result = BatchResult(request, OK, decode_ms=self.clock.now_ms() - started_ms)
            frame_height, frame_width = header.frame_shape or (header.height, header.width)
            results.append(result)
            runnable.append(result)
            images.append(image)
            output_sizes_wh.append((frame_width, frame_height))
        if not runnable:
            return results
        if runner.decodes_images:
            estimate.observe_decode(sum(result.decode_ms for result in runnable) / len(runnable))
        started_ms = self.clock.now_ms()
        try:
            detections = runner.run_batch(images, output_sizes_wh)
        except Exception as error:  # a model failure answers this batch; the service keeps serving
            logger.exception("model %s failed on a batch of %d", model, len(runnable))
            for result in runnable:
                result.status = ERROR
                result.reason = f"internal: model {model} failed ({type(error).__name__})"
            return results
        inference_ms = self.clock.now_ms() - started_ms
        estimate.observe_batch(len(runnable), inference_ms)
        finished_ms = self.clock.now_ms()
        for index, (result, found) in enumerate(zip(runnable, detections, strict=True)):
            result.detections = found
            result.inference_ms = inference_ms
            result.batch_size = len(runnable)
            result.first_in_batch = index == 0
            result.late = finished_ms > result.request.deadline_ms
        return results


def decode_payload(payload: Any, header: RequestHeader) -> np.ndarray:
    from avcloud.compression import decode_image  # OpenCV; only needed when images are decoded

    return decode_image(payload, header.codec, header.width, header.height)


def record_batch_metrics(host: EngineHost, model: str, results: list[BatchResult], queue_ms: list[float],
                         expected_single_ms: float, replica: str | None = None) -> None:
    """The service metrics of one batch's results (`queue_ms`: per result, arrival to taken)."""
    metrics = host.metrics
    for result, waited_ms in zip(results, queue_ms, strict=True):
        metrics.queue_time.labels(model).observe(max(0.0, waited_ms) / 1000.0)
        if result.status != OK:
            continue
        metrics.decode_time.labels(model).observe(result.decode_ms / 1000.0)
        metrics.worker_time.labels(host.vehicle_label(result.request.accounted_vehicle)).inc(
            (result.decode_ms + result.inference_ms / max(1, result.batch_size)) / 1000.0)
        if result.first_in_batch:
            metrics.inference_time.labels(model).observe(result.inference_ms / 1000.0)
            metrics.batch_size.labels(model).observe(result.batch_size)
    metrics.expected_runtime.labels(model).set(expected_single_ms / 1000.0)


# ---------------------------------------------------------------- the default engine


class ThreadEngine:
    """`config.workers` worker threads (one per emulated GPU) in this process: each takes the next
    decision from one `RequestQueue`, answers expired and pushed-out requests, and runs a
    same-model batch."""

    name = "threads"

    def __init__(self, config: CloudConfig, runners: dict[str, ModelRunner] | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or WallClock()
        self._given_runners = runners
        self.models: ModelSet | None = None
        self.queue = admission_queue(config, self.expected_ms)
        self._host: EngineHost | None = None
        self._workers: list[threading.Thread] = []
        self._busy_workers = 0
        self._busy_lock = threading.Lock()
        self._failed = False

    # ------------------------------------------------------------ lifecycle

    def load(self, announce: Callable[[str], None]) -> None:
        self.models = ModelSet.load(self.config, self._given_runners, self.clock, announce)
        gc.freeze()  # loaded models and modules stay out of full collections while serving

    def start(self, host: EngineHost) -> None:
        self._host = host
        for name in self.model_names:
            host.metrics.expected_runtime.labels(name).set(self.expected_ms(name, 1) / 1000.0)
        for index in range(self.config.workers):
            worker = threading.Thread(target=self._worker_loop, name=f"cloud-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, grace_ms: float) -> list[PendingRequest]:
        give_up_at = time.monotonic() + grace_ms / 1000.0
        while self.pending() and time.monotonic() < give_up_at:
            time.sleep(0.005)
        leftovers = self.queue.close()
        for worker in self._workers:
            worker.join(timeout=30)
        self._workers = []
        return leftovers

    def close(self) -> None:
        if not self.queue.closed:
            self.queue.close()

    # ------------------------------------------------------------ what the front end asks

    @property
    def runners(self) -> dict[str, ModelRunner]:
        return self.models.runners if self.models is not None else {}

    @property
    def model_names(self) -> list[str]:
        return self.models.names if self.models is not None else []

    def decodes_images(self, model: str) -> bool:
        return self.models is not None and self.models.decodes_images(model)

    def expected_ms(self, model: str, batch_size: int) -> float:
        return self.models.expected_ms(model, batch_size) if self.models is not None else 0.0

    def submit(self, request: PendingRequest) -> str | None:
        if not self.queue.push(request):
            return refusal_reason(self.queue, request.accounted_vehicle)
        assert self._host is not None
        for pushed_out in self.queue.drain_evicted():
            self._host.reply(pushed_out, reply_to(pushed_out.header, REJECTED, PUSHED_OUT,
                                                  self._host.timings(pushed_out)))
        self._host.metrics.queue_depth.set(len(self.queue))
        return None

    def pending(self) -> int:
        return len(self.queue) + self._busy_workers

    @property
    def busy_workers(self) -> int:
        """Workers running a batch (or answering expired requests) right now."""
        return self._busy_workers

    @property
    def healthy(self) -> bool:
        return not self._failed

    @property
    def ready(self) -> bool:
        return self.models is not None and not self.queue.closed

    # ------------------------------------------------------------ workers

    def _worker_loop(self) -> None:
        host = self._host
        assert host is not None and self.models is not None
        try:
            while True:
                decision = self.queue.wait_and_take(self.clock.now_ms, timeout_s=0.1)
                if decision is None:
                    return
                if not decision.expired and not decision.batch and not decision.rejected:
                    continue
                with self._busy_lock:
                    self._busy_workers += 1
                try:
                    host.metrics.queue_depth.set(len(self.queue))
                    now_ms = self.clock.now_ms()
                    for request in decision.rejected:
                        host.reply(request, reply_to(request.header, REJECTED, PUSHED_OUT,
                                                     host.timings(request, taken_ms=now_ms)))
                    for request in decision.expired:
                        host.reply(request, reply_to(
                            request.header, EXPIRED, expiry_reason(request.deadline_ms - now_ms, request.model,
                                                                   self.expected_ms(request.model, 1)),
                            host.timings(request, taken_ms=now_ms)))
                    if decision.batch:
                        self._run_batch(host, decision.batch)
                finally:
                    with self._busy_lock:
                        self._busy_workers -= 1
        except Exception:
            self._failed = True
            logger.exception("cloud worker failed")

    def _run_batch(self, host: EngineHost, batch: list[PendingRequest]) -> None:
        assert self.models is not None
        taken_ms = self.clock.now_ms()
        model = batch[0].model
        results = self.models.run_batch(batch)
        record_batch_metrics(host, model, results, [taken_ms - request.arrival_ms for request in batch],
                             self.expected_ms(model, 1))
        for result in results:
            request = result.request
            timings = host.timings(request, taken_ms=taken_ms, decode_ms=result.decode_ms,
                                   inference_ms=result.inference_ms)
            if result.status == OK:
                host.reply(request, reply_to(request.header, OK, None, timings, late=result.late), result.detections)
            else:
                host.reply(request, reply_to(request.header, result.status, result.reason, timings))
