"""Simulated replay: the shipped onboard agent, on a simulated clock, with fake I/O.

This is openpilot's process_replay idea. `onboard.daemon.OnboardAgent`, the per-frame logic the
daemon runs, is driven here exactly as the live node drives it, except that time and I/O are
simulated:

- a `SimulatedClock` and an event loop (`EventLoop`, `run_cars`) in place of the node's poll
  loop: all events of one instant run, then each car they concern takes one agent `step()` (one
  round of the node's poll loop), and a wake-up event follows the agent's `next_wakeup_ms()`;
- executors whose work takes simulated time (`SimulatedExecutor`): the on-car fallback takes
  the profile's fallback runtime on `fallback_workers` workers, compression takes the profile's
  `Encode [ms]` on `encode_workers` workers (the daemon's default compresses one camera at a
  time in its loop);
- an encoder and a fallback backed by the profiler's detection cache: the real encoded sizes
  and the real detections of every frame, camera and configuration;
- a `CloudLink` (`SimulatedUplink`, the car side) whose network side (`UplinkPath`) puts the
  request's bytes on a `TraceLink` (Mahimahi semantics; every camera of the car shares it),
  delays them RTT/2 each way, and hands them to a simulated cloud built on
  `cloudside.scheduler.RequestQueue` (EDF, expiry, batching) with `cloud_workers` workers (None:
  a GPU pool large enough that no request waits).

Requests and replies are real wire messages (`avcloud.protocol`): the agent reads real bytes,
so what it measures (RTT, throughput from reply timings) is what the live daemon measures.
Cloud runtimes come from the scenario, i.e. from a declared runtime model
(avcloud/replay/cloud_runtimes.py), never from the load of the moment.

`oracle` is the same agent with a planner and an estimator that read the trace (`OraclePlanner`,
`TraceCapacityEstimate`).

`ReplayedCar` is one car on a shared loop, link and cloud; `simulate_policy` runs one car alone
(the replay); the fleet simulation (avcloud/fleet) puts many on one cell and one cloud.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import itertools
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from avcloud.clock import SimulatedClock
from avcloud.compression import parse_configuration_name
from avcloud.link import BITS_PER_PACKET, DeliverySchedule, TraceLink
from avcloud.protocol import (
    EXPIRED,
    OK,
    PING,
    REJECTED,
    ServerTimings,
    decode_request,
    encode_reply,
    reply_to,
)
from avcloud.types import Allocation, AllocationProblem, Service
from optimizer.policies import PolicySpec

FALLBACK_INDEX = -1
DEFAULT_FRAME_SIZE_WH = (1920, 1280)
# The simulated cloud's queue bound; it never fills in a single car's replay.
CLOUD_QUEUE_LIMIT = 100_000
CLOUD_MAX_BATCH_SIZE = 8


class RequestOutcome(IntEnum):
    """What became of one (frame, camera) under a policy."""

    FALLBACK = 0  # the allocation chose the on-car fallback; nothing sent
    ON_TIME = 1  # sent, result back before the deadline: the cloud result is published
    LATE = 2  # sent, no usable result in time (late, expired or refused): the on-car result is published
    NOT_SENT = 3  # a cloud option was chosen but the agent dropped the frame before sending it


@dataclass(frozen=True)
class ThroughputSample:
    """One uplink measurement the agent took (from its own reply timings)."""

    observed_ms: float
    throughput_mbps: float


@dataclass
class ReplayScenario:
    """What every policy shares: frames, cameras, options and their real encoded sizes.

    `size_bytes[f, c, k]` is the encoded payload of frame position f of camera c under
    configuration `config_names[k]` (from the profiler's detection cache). The services' option
    runtimes are the declared cloud's (what the car plans with); `runtime_ms[k]` is what the
    simulated cloud takes for configuration k.
    """

    cameras: tuple[str, ...]
    frame_indices: np.ndarray  # int64 [F], scene frame index of each position
    capture_ms: np.ndarray  # float64 [F], capture time relative to the first frame
    services: tuple[Service, ...]  # one per camera, same order
    config_names: tuple[str, ...]
    size_bytes: np.ndarray  # int64 [F, C, K]
    runtime_ms: np.ndarray  # float64 [K], cloud runtime per configuration
    encode_ms: np.ndarray  # float64 [K], on-car encode time per configuration
    fallback_config: str
    rtt_ms: float
    slo_ms: float
    # Time the car needs per camera image before it can compress it, cameras in order: 0 for
    # raw images from camera drivers; decoding a dataset's JPEGs costs the live replay this.
    camera_input_ms: float = 0.0
    fallback_runtime_ms: float = 0.0
    camera_size_wh: dict[str, tuple[int, int]] = field(default_factory=dict)
    config_position: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.config_position = {name: position for position, name in enumerate(self.config_names)}
        frames, cameras = len(self.frame_indices), len(self.cameras)
        if self.size_bytes.shape != (frames, cameras, len(self.config_names)):
            raise ValueError(f"size_bytes has shape {self.size_bytes.shape}, expected {(frames, cameras, len(self.config_names))}")
        if tuple(service.name for service in self.services) != self.cameras:
            raise ValueError("services must be given one per camera, in camera order")
        for service in self.services:
            for option in service.options:
                if option.name not in self.config_position and not option.is_fallback:
                    raise ValueError(f"option '{option.name}' of '{service.name}' has no sizes in the scenario")
        self.models = {name: parse_configuration_name(name)[0] for name in self.config_names}

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @functools.cached_property  # a median: asked by every car of a fleet
    def frame_interval_ms(self) -> float:
        if len(self.capture_ms) < 2:
            return 100.0
        return float(np.median(np.diff(self.capture_ms)))

    @property
    def duration_s(self) -> float:
        return self.num_frames * self.frame_interval_ms / 1000.0


@dataclass
class PolicyRun:
    """Everything one policy did over the scenario, for metrics and plots."""

    policy: str
    planned_config: np.ndarray  # int32 [F, C], configuration position or FALLBACK_INDEX
    outcome: np.ndarray  # int8 [F, C], RequestOutcome
    result_ms: np.ndarray  # float64 [F, C], when a sent request's reply reached the car (nan if none)
    budget_mbps: np.ndarray  # float64 [F], bandwidth the allocation was asked to fit
    estimate_mbps: np.ndarray  # float64 [F], the agent's bandwidth estimate when it planned
    allocated_mbps: np.ndarray  # float64 [F], sum of the chosen options' critical bandwidths
    solve_us: np.ndarray  # float64 [F]
    sent_bytes: int
    sent_until_ms: float  # last delivery on the uplink
    transfers: list[tuple[float, float, int]]  # (enqueue_ms, delivered_ms, wire bytes) in send order, pings too
    samples: list[ThroughputSample]
    wall_s: float
    # What the agent published per (frame position, camera): None where scoring should read the
    # cache (live recordings); the simulated agent's own results otherwise.
    published: list[list[np.ndarray | None]] | None = None
    counters: dict[str, int] = field(default_factory=dict)
    rtt_estimate_ms: np.ndarray | None = None  # float64 [F], the agent's RTT estimate when it planned
    latency_ms: np.ndarray | None = None  # float64 [F, C], capture -> publish of each result
    published_config: list[list[str]] | None = None  # the configuration each result came from
    policy_spec: dict[str, Any] = field(default_factory=dict)
    # float64 [F]: the planner's chance that every request of the frame arrives in time (the
    # quantile planner's `success_probability`; nan where the planner gives none).
    planned_success_probability: np.ndarray | None = None

    def served_config(self) -> np.ndarray:
        """Configuration whose detections are published per (frame, camera); FALLBACK_INDEX = on-car."""
        return np.where(self.outcome == RequestOutcome.ON_TIME, self.planned_config, FALLBACK_INDEX)


# ----------------------------------------------------------------------------- simulated time


class EventLoop:
    """Callbacks at simulated times, in time order. An event may name the car it concerns
    (`owner`), so the loop can give each car touched at one instant a single agent step (see
    `run_cars`). A cancelled event stays in the heap but runs nothing and touches no car.

    Events of one instant run in an order that does not depend on when events of different
    owners were scheduled: first those with no owner (the cloud's), then each car's in the order
    of its `event_rank`, a car's arrivals from the network (replies, pongs) before its own events,
    and events of one owner and kind in the order they were scheduled. So a car's instant sees
    the same events in the same order whether its fleet runs on one process or on several
    (avcloud/fleet/parallel.py)."""

    def __init__(self, clock: SimulatedClock) -> None:
        self.clock = clock
        # [time_ms, rank, sequence, callback, owner]: a list, so that `cancel` can blank it in place
        self._events: list[list] = []
        self._sequence = itertools.count()

    def at(self, time_ms: float, callback: Callable[[], None], owner: Any = None, arrival: bool = False,
           rank: int | None = None) -> list:
        """Schedule `callback`; returns the event, for `cancel`. `arrival`: a network arrival at the
        owner (ranked before its own events). `rank`: an explicit place among the owners of one
        instant, for an event that acts for a car without touching it (the fleet's shared side)."""
        now_ms = self.clock.now_ms()
        if rank is None:
            rank = -1 if owner is None else getattr(owner, "event_rank", 0) + (0 if arrival else 1)
        event = [time_ms if time_ms > now_ms else now_ms, rank, next(self._sequence), callback, owner]
        heapq.heappush(self._events, event)
        return event

    @staticmethod
    def cancel(event: list) -> None:
        event[3] = _nothing
        event[4] = None

    def next_time_ms(self) -> float:
        return self._events[0][0] if self._events else math.inf

    def run_next(self) -> Any:
        """Run the next event; returns its owner."""
        time_ms, _, _, callback, owner = heapq.heappop(self._events)
        self.clock.advance_to(time_ms)
        callback()
        return owner


def _nothing() -> None:
    """A cancelled event's callback."""


class SimulatedFuture:
    """The part of `concurrent.futures.Future` the agent uses, without its locks: in simulated
    time one thread does everything, and the replay creates thousands of these per second."""

    __slots__ = ("_state", "_result", "_error", "_callbacks")

    def __init__(self) -> None:
        self._state = "pending"  # pending -> running -> done, or pending -> cancelled
        self._result = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable] = []

    def cancel(self) -> bool:
        if self._state == "pending":
            self._state = "cancelled"
            self._finish()
        return self._state == "cancelled"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def done(self) -> bool:
        return self._state in ("done", "cancelled")

    def set_running_or_notify_cancel(self) -> bool:
        if self._state == "cancelled":
            return False
        self._state = "running"
        return True

    def set_result(self, result) -> None:
        self._result, self._state = result, "done"
        self._finish()

    def set_exception(self, error: BaseException) -> None:
        self._error, self._state = error, "done"
        self._finish()

    def result(self, timeout: float | None = None):
        if self._state == "cancelled":
            from concurrent.futures import CancelledError

            raise CancelledError()
        if self._state != "done":
            raise RuntimeError("a simulated future has no result before its simulated time")
        if self._error is not None:
            raise self._error
        return self._result

    def add_done_callback(self, callback: Callable) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    def _finish(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


class SimulatedExecutor(Executor):
    """An executor whose work takes simulated time: `duration_ms(*args)` on one of `workers`
    workers (None: as many as there is work), first come first served. The function runs when
    its work is done, so a cancelled job never runs, as with a real executor's queue."""

    def __init__(self, loop: EventLoop, duration_ms: Callable[..., float], workers: int | None = None,
                 owner: Any = None) -> None:
        self.loop = loop
        self.duration_ms = duration_ms
        self.workers = workers
        self.owner = owner
        self._busy = 0
        self._queue: collections.deque[tuple[SimulatedFuture, Callable, tuple]] = collections.deque()
        # Jobs that end at the same instant (workers started together on equal work) share one
        # event: finish time -> jobs, in the order they started.
        self._ending: dict[float, list[tuple[SimulatedFuture, Callable, tuple]]] = {}

    def submit(self, fn, /, *args, **kwargs) -> SimulatedFuture:  # type: ignore[override]
        future = SimulatedFuture()
        self._queue.append((future, fn, args))
        self._start_queued()
        return future

    def _start_queued(self) -> None:
        while self._queue and (self.workers is None or self._busy < self.workers):
            future, fn, args = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            self._busy += 1
            finish_ms = self.loop.clock.now_ms() + max(0.0, float(self.duration_ms(*args)))
            ending = self._ending.get(finish_ms)
            if ending is None:
                self._ending[finish_ms] = [(future, fn, args)]
                self.loop.at(finish_ms, lambda finish_ms=finish_ms: self._finish(finish_ms), self.owner)
            else:
                ending.append((future, fn, args))

    def _finish(self, finish_ms: float) -> None:
        for future, fn, args in self._ending.pop(finish_ms):
            self._busy -= 1
            try:
                future.set_result(fn(*args))
            except Exception as error:  # reported through the future, as a real executor does
                future.set_exception(error)
        self._start_queued()


# ----------------------------------------------------------------------------- the car's inputs


@dataclass(frozen=True)
class CachedImage:
    """A camera image as the replay knows it: its position in the scenario. The agent never looks
    inside an image; it hands it to the fallback and the encoder, which read the cache."""

    frame: int  # position in the scenario
    camera: int


@functools.lru_cache(maxsize=16)
def _zero_payload(length: int) -> memoryview:
    """Read-only zero bytes that stand for encoded images (the cloud reads only their length):
    one buffer for every car of a fleet, not one each."""
    return memoryview(bytes(length))


class CacheBackedCar:
    """The fallback detector and the encoder of a replayed car, reading the detection cache."""

    def __init__(self, scenario: ReplayScenario, detections: Callable[[int, int, str], np.ndarray]) -> None:
        from onboard.daemon import EncodedFrame

        self.scenario = scenario
        self.detections = detections  # (frame position, camera position, config) -> [N, 6]
        self._encoded_frame = EncodedFrame
        self._codecs = {name: parse_configuration_name(name)[1].codec for name in scenario.config_names}
        largest = int(scenario.size_bytes.max()) if scenario.size_bytes.size else 0
        self._zeros = _zero_payload(largest)
        self.encoded_config: dict[tuple[int, str], str] = {}  # (frame index, camera) -> config sent

    def fallback(self, image: CachedImage, full_size_wh: tuple[int, int]) -> np.ndarray:
        return self.detections(image.frame, image.camera, self.scenario.fallback_config)

    def fallback_ms(self, image: CachedImage, full_size_wh: tuple[int, int]) -> float:
        return self.scenario.fallback_runtime_ms

    def encode(self, image: CachedImage, config: str, full_size_wh: tuple[int, int]):
        scenario = self.scenario
        k = scenario.config_position[config]
        size_bytes = int(scenario.size_bytes[image.frame, image.camera, k])
        codec = {"None": "raw", "PNG": "png"}.get(self._codecs[config], "jpeg")
        frame_index = int(scenario.frame_indices[image.frame])
        self.encoded_config[(frame_index, scenario.cameras[image.camera])] = config
        height_width = (full_size_wh[1], full_size_wh[0])
        shape_hw = _raw_shape_hw(size_bytes, full_size_wh) if codec == "raw" else height_width
        return self._encoded_frame(model=scenario.models[config], codec=codec, payload=self._zeros[:size_bytes],
                                   shape_hw=shape_hw, frame_shape_hw=height_width,
                                   encode_ms=float(scenario.encode_ms[k]))

    def encode_ms(self, image: CachedImage, config: str, full_size_wh: tuple[int, int]) -> float:
        return float(self.scenario.encode_ms[self.scenario.config_position[config]])


def _raw_shape_hw(size_bytes: int, full_size_wh: tuple[int, int]) -> tuple[int, int]:
    """A (height, width) whose raw BGR size is `size_bytes` (the protocol checks raw lengths)."""
    pixels = size_bytes // 3
    width = full_size_wh[0] if pixels % full_size_wh[0] == 0 else next(
        w for w in range(min(pixels, 16384), 0, -1) if pixels % w == 0)
    return pixels // width, width


# ----------------------------------------------------------------------------- the network and the cloud


@dataclass(frozen=True)
class CloudFaults:
    """Scripted cloud trouble for tests of the agent's invariants: while `down`, requests that
    reach the cloud are lost (a killed service answers nothing); while `slow`, runtimes are
    multiplied by the factor."""

    down_ms: tuple[tuple[float, float], ...] = ()
    slow_ms: tuple[tuple[float, float, float], ...] = ()  # (start, end, runtime factor)

    def is_down(self, time_ms: float) -> bool:
        return any(start <= time_ms < end for start, end in self.down_ms)

    def runtime_factor(self, time_ms: float) -> float:
        return math.prod(factor for start, end, factor in self.slow_ms if start <= time_ms < end)


class SimulatedCloud:
    """The cloud service's scheduling on simulated time: `cloudside.scheduler.RequestQueue`
    (EDF with expiry and deadline-aware batching) in front of `workers` workers (None: a pool
    large enough that no request waits). A batch takes the sum of its requests' runtimes (no
    batching gain is assumed)."""

    def __init__(self, loop: EventLoop, scenario: ReplayScenario, workers: int | None = None,
                 downlink_allowance_ms: float = 0.0, faults: CloudFaults | None = None) -> None:
        from cloudside.scheduler import RequestQueue

        if workers is not None and workers < 1:
            raise ValueError(f"cloud workers must be >= 1 or None (unlimited), got {workers}")
        self.loop = loop
        self.scenario = scenario
        self.workers = workers
        self.downlink_allowance_ms = downlink_allowance_ms
        self.faults = faults or CloudFaults()
        model_ms: dict[str, float] = {}
        for name, runtime in zip(scenario.config_names, scenario.runtime_ms, strict=True):
            model = scenario.models[name]
            model_ms[model] = max(model_ms.get(model, 0.0), float(runtime))
        self._model_ms = model_ms
        self.queue = RequestQueue("edf", CLOUD_QUEUE_LIMIT, CLOUD_MAX_BATCH_SIZE,
                                  lambda model, batch: self._model_ms.get(model, 0.0) * batch)
        self._busy = 0
        self.busy_ms = 0.0

    def arrive(self, identity: Any, header, runtime_ms: float) -> None:
        from cloudside.scheduler import PendingRequest

        now_ms = self.loop.clock.now_ms()
        if self.faults.is_down(now_ms):
            return  # the service is not running: nothing answers
        runtime_ms *= self.faults.runtime_factor(now_ms)
        request = PendingRequest(identity=identity, header=header, payload=runtime_ms, arrival_ms=now_ms,
                                 deadline_ms=now_ms + header.budget_ms - self.downlink_allowance_ms)
        if not self.queue.push(request):
            identity.reply(reply_to(header, REJECTED, "queue full", _timings(request, now_ms, 0.0)))
            return
        for evicted in self.queue.drain_evicted():  # pushed out by another vehicle's request
            evicted.identity.reply(reply_to(evicted.header, REJECTED, "queue full",
                                            _timings(evicted, now_ms, 0.0)))
        self._dispatch()

    def _dispatch(self) -> None:
        while len(self.queue) and (self.workers is None or self._busy < self.workers):
            now_ms = self.loop.clock.now_ms()
            decision = self.queue.take(now_ms)
            for request in decision.rejected:
                request.identity.reply(reply_to(request.header, REJECTED, "queue full",
                                                _timings(request, now_ms, 0.0)))
            for request in decision.expired:
                request.identity.reply(reply_to(request.header, EXPIRED, "deadline",
                                                _timings(request, now_ms, 0.0)))
            if not decision.batch:
                if not (decision.expired or decision.rejected):
                    return  # nothing runnable now
                continue
            run_ms = sum(request.payload for request in decision.batch)  # the simulated payload: its runtime
            self.busy_ms += run_ms
            finish_ms = now_ms + run_ms
            for request in decision.batch:  # the replies leave when the batch is done
                request.identity.reply(reply_to(request.header, OK, None, _timings(request, finish_ms, run_ms),
                                                late=finish_ms > request.deadline_ms), at_ms=finish_ms)
            if self.workers is not None:  # a pool that never queues needs no word when a worker frees
                self._busy += 1
                self.loop.at(finish_ms, self._release)

    def _release(self) -> None:
        self._busy -= 1
        self._dispatch()


def _timings(request, now_ms: float, inference_ms: float) -> ServerTimings:
    return ServerTimings(queue_ms=max(0.0, now_ms - inference_ms - request.arrival_ms), decode_ms=0.0,
                         inference_ms=inference_ms, total_ms=now_ms - request.arrival_ms)


class _ReplyRoute:
    """The cloud's identity for one request: its reply goes back down the car's connection."""

    __slots__ = ("path", "epoch", "image")

    def __init__(self, path: UplinkPath, epoch: int, image: tuple[int, str]) -> None:
        self.path, self.epoch, self.image = path, epoch, image

    def reply(self, header, at_ms: float | None = None) -> None:
        """The reply leaves the cloud at `at_ms` (default now)."""
        self.path.reply(header, self.epoch, self.image, at_ms)


class UplinkPath:
    """The network side of one car's connection: a request's bytes over the car's uplink (a
    `TraceLink`, or a `CellLink` that delivers later), RTT/2 to the simulated cloud, and the
    cloud's replies RTT/2 back to `car`: the car's `SimulatedUplink`, or, when the car runs on
    another process, a stand-in that forwards to it (avcloud/fleet/parallel.py)."""

    def __init__(self, loop: EventLoop, link, half_rtt_ms: float, cloud: SimulatedCloud, car) -> None:
        self.loop = loop
        self.link = link
        self.half_rtt_ms = half_rtt_ms
        self.cloud = cloud
        self.car = car
        # A shared cell (avcloud/fleet/cell.py): when the last packet leaves depends on other
        # vehicles' later sends, so the link calls back with the delivery time instead.
        self._delivers_later = getattr(link, "delivers_later", False)

    def send(self, now_ms: float, index: int, epoch: int, header, wire_bytes: int, runtime_ms: float) -> bool:
        """Put transfer `index` of the car on the uplink; False if the link refused it."""
        if self._delivers_later:
            transfer = self.link.send(now_ms, wire_bytes, lambda delivered_ms: self._delivered(
                index, epoch, header, runtime_ms, delivered_ms))
        else:
            transfer = self.link.send(now_ms, wire_bytes)
        if not transfer.accepted:
            return False
        if not self._delivers_later:
            self._delivered(index, epoch, header, runtime_ms, transfer.delivered_ms)
        return True

    def _delivered(self, index: int, epoch: int, header, runtime_ms: float, delivered_ms: float) -> None:
        """The request's last packet left the uplink at `delivered_ms`: it reaches the cloud RTT/2
        later; the service answers a ping at once (if running)."""
        self.car.delivered(index, delivered_ms)
        if header.kind == PING:
            if not self.cloud.faults.is_down(delivered_ms + self.half_rtt_ms):
                self.car.reply_at(delivered_ms + 2 * self.half_rtt_ms, epoch, reply_to(header, OK), None)
            return
        route = _ReplyRoute(self, epoch, (header.frame, header.task))
        self.loop.at(delivered_ms + self.half_rtt_ms, lambda: self.cloud.arrive(route, header, runtime_ms))

    def reply(self, header, epoch: int, image: tuple[int, str], at_ms: float | None) -> None:
        leaves_ms = self.loop.clock.now_ms() if at_ms is None else at_ms
        self.car.reply_at(leaves_ms + self.half_rtt_ms, epoch, header, image)


class SimulatedUplink:
    """The agent's `CloudLink`: requests go down `path` (an `UplinkPath`: the trace-driven
    uplink, RTT/2 each way, the simulated cloud), and replies come back as network arrivals at
    the car. A `reset()` (the agent reconnects) drops the replies still owed to the old
    connection, as a new socket identity does on the real ROUTER."""

    def __init__(self, loop: EventLoop, car: CacheBackedCar, on_reply: Callable[[list], None],
                 owner: Any = None) -> None:
        self.loop = loop
        self.owner = owner  # the replayed car whose agent reads the replies
        self.car = car
        self.on_reply = on_reply
        self.path: Any = None  # set by the car: an UplinkPath, or a stand-in for one elsewhere
        self.epoch = 0
        self.resets = 0
        self.transfers: list[tuple[float, float, int]] = []  # (enqueued, delivered, bytes); NaN until delivered
        self.sent: dict[tuple[int, str], float] = {}  # (frame index, camera) -> send time
        self.replied: dict[tuple[int, str], float] = {}  # (frame index, camera) -> reply arrival time
        self.sent_bytes = 0
        self._camera_position = {name: position for position, name in enumerate(car.scenario.cameras)}
        self._frame_position = {int(index): position for position, index in enumerate(car.scenario.frame_indices)}

    def send(self, frames: list[Any]) -> bool:
        now_ms = self.loop.clock.now_ms()
        header, payload = decode_request(frames)
        wire_bytes = len(frames[0]) + payload.nbytes
        runtime_ms = 0.0
        if header.kind != PING:
            scenario = self.car.scenario
            config = self.car.encoded_config[(header.frame, header.task)]
            runtime_ms = float(scenario.runtime_ms[scenario.config_position[config]])
        index = len(self.transfers)
        self.transfers.append((now_ms, math.nan, wire_bytes))
        if not self.path.send(now_ms, index, self.epoch, header, wire_bytes, runtime_ms):
            self.transfers.pop()
            return False
        self.sent_bytes += wire_bytes
        if header.kind != PING:
            self.sent[(header.frame, header.task)] = now_ms
        return True

    def delivered(self, index: int, delivered_ms: float) -> None:
        """Transfer `index` left the uplink at `delivered_ms`."""
        enqueue_ms, _, wire_bytes = self.transfers[index]
        self.transfers[index] = (enqueue_ms, delivered_ms, wire_bytes)

    def reply_at(self, arrival_ms: float, epoch: int, header, image: tuple[int, str] | None) -> None:
        """A reply (to the request for `image`) or a pong (`image` None) reaches the car at
        `arrival_ms`; the agent reads it if the connection it was sent on is still the car's."""
        self.loop.at(arrival_ms, lambda: self._arrive(epoch, header, image), self.owner, arrival=True)

    def _arrive(self, epoch: int, header, image: tuple[int, str] | None) -> None:
        if epoch != self.epoch:
            return
        if image is None:
            self.on_reply(encode_reply(header))
            return
        self.replied[image] = self.loop.clock.now_ms()
        self.on_reply(encode_reply(header, self.reply_detections(*image) if header.ok else None))

    def reset(self) -> None:
        self.epoch += 1
        self.resets += 1

    def reply_detections(self, frame_index: int, camera: str) -> np.ndarray:
        config = self.car.encoded_config[(frame_index, camera)]
        return self.car.detections(self._frame_position[frame_index], self._camera_position[camera], config)


# ----------------------------------------------------------------------------- planners


class TraceCapacityEstimate:
    """What an oracle knows of its uplink: the trace's true capacity over the frame interval that
    begins now or, with the policy's `oracle_lag_ms`, the one that began that long ago (clamped to
    the trace's start): a perfect measurement of the past instead of the future.

    It is the oracle's bandwidth estimator, so that everything the agent judges by its estimate
    reads that capacity: the plan, the drop-before-send check and the virtual uplink queue. An
    oracle judged by a measured estimate instead would drop the requests its plan sends whenever
    that estimate lagged the link, and, measuring only what it sends, never renew it. Its
    throughput samples are recorded for the report, not used."""

    needs_seed = False  # onboard.measurement.build_measurement: it knows the capacity from the start

    def __init__(self, schedule: DeliverySchedule, clock: SimulatedClock, frame_interval_ms: float,
                 lag_ms: float = 0.0) -> None:
        self.schedule = schedule
        self.clock = clock
        self.frame_interval_ms = frame_interval_ms
        self.lag_ms = lag_ms
        self._known_at_ms = math.nan
        self._known_mbps = 0.0

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        pass

    def estimate_mbps(self) -> float:
        now_ms = self.clock.now_ms()
        if now_ms != self._known_at_ms:  # asked at every send and plan: once per instant
            start_ms = max(0.0, now_ms - self.lag_ms)
            self._known_mbps = self.schedule.capacity_mbps(start_ms, start_ms + self.frame_interval_ms)
            self._known_at_ms = now_ms
        return self._known_mbps


class TraceFedForecast:
    """A quantile forecaster (`optimizer.bandwidth.QuantileForecaster`) fed the trace's true
    capacity instead of the car's samples (the policy field `forecast_from_trace`): at the first
    instant of each frame interval it is asked at (the plan's, every frame), the capacity of the
    interval that began `TraceCapacityEstimate.lag_ms` ago, as one sample spanning an interval.
    With a lag of one interval the samples tile the past, each interval once, as a car that
    measured every interval exactly would see them. The agent judges by it as by its own view (the
    plan, the drop-before-send check, the virtual queue); the car's own samples are recorded for
    the report, not used."""

    needs_seed = False  # onboard.measurement.build_measurement: it knows the capacity from the start

    def __init__(self, forecaster, known: TraceCapacityEstimate) -> None:
        self.forecaster = forecaster
        self.known = known
        self._next_feed_ms = -math.inf

    def _feed(self) -> None:
        now_ms = self.known.clock.now_ms()
        if now_ms >= self._next_feed_ms:
            self._next_feed_ms = now_ms + self.known.frame_interval_ms
            self.forecaster.observe(now_ms, self.known.estimate_mbps(), self.known.frame_interval_ms)

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        pass

    def estimate_mbps(self) -> float | None:
        self._feed()
        return self.forecaster.estimate_mbps()

    def samples_mbps(self) -> np.ndarray:
        self._feed()
        return self.forecaster.samples_mbps()


class OraclePlanner:
    """Plans for the capacity its estimator knows from the trace (`TraceCapacityEstimate`),
    times a fraction: the only planner given the trace."""

    def __init__(self, services: tuple[Service, ...], frame_interval_ms: float, capacity_fraction: float,
                 allocator_name: str = "exact", policy: PolicySpec | None = None) -> None:
        from onboard.planning import planning_rtt_ms, services_for_deadline
        from optimizer.allocators import get_allocator

        self.services = services
        self.services_at = services_for_deadline(services, policy, frame_interval_ms)
        self.capacity_fraction = capacity_fraction
        self.allocator = get_allocator(allocator_name)
        self._planning_rtt_ms = planning_rtt_ms

    def plan(self, bandwidth_mbps: float, rtt_ms: float, slo_ms: float, bandwidth_samples_mbps) -> Allocation:
        budget_mbps = bandwidth_mbps * self.capacity_fraction
        rtt_ms = self._planning_rtt_ms(rtt_ms)
        allocation = self.allocator.solve(AllocationProblem(self.services_at(rtt_ms, slo_ms), budget_mbps, rtt_ms, slo_ms))
        allocation.extra["planning_budget_mbps"] = budget_mbps
        return allocation


class _RecordingPlanner:
    """Passes planning through and remembers the budget each allocation was asked to fit."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.last_budget_mbps = math.nan

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps) -> Allocation:
        allocation = self.inner.plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        self.last_budget_mbps = float(allocation.extra.get("planning_budget_mbps", bandwidth_mbps))
        return allocation


class _RecordingEstimator:
    """Passes samples to the policy's estimator and keeps them for the report."""

    def __init__(self, inner, samples: list[ThroughputSample]) -> None:
        self.inner = inner
        self.samples = samples
        self.needs_seed = getattr(inner, "needs_seed", True)

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self.samples.append(ThroughputSample(time_ms, throughput_mbps))
        self.inner.observe(time_ms, throughput_mbps, transfer_ms)

    def estimate_mbps(self):
        return self.inner.estimate_mbps()

    def samples_mbps(self):
        forecast = getattr(self.inner, "samples_mbps", None)
        return forecast() if callable(forecast) else np.zeros(0)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class CarSettings:
    """The daemon settings a replayed car runs with (onboard/params.py defaults)."""

    fallback_workers: int = 2
    # The daemon compresses in its loop, one camera at a time: one worker taking the profile's
    # encode time. 0 compresses inline at no simulated cost (the node's code path exactly).
    encode_workers: int = 1
    publish_guard_ms: float = 3.0


# A frame the car never planned (its scene ended first): (estimate, budget, RTT estimate, solve
# time, success probability, allocated Mbps), as ReplayedCar.frame_plans records them.
_NO_PLAN = (math.nan, math.nan, math.nan, 0.0, math.nan, 0.0)


class ReplayedCar:
    """One car of a replay: the shipped agent, built from its policy as the daemon builds it, with
    cache-backed cameras, fallback and encoder, on a shared event loop, uplink link and cloud.
    It schedules its own frames (`start_ms` later than the scenario's capture times) and records
    what the agent planned, sent and published."""

    def __init__(self, policy: PolicySpec, scenario: ReplayScenario, detections: Callable[[int, int, str], np.ndarray],
                 loop: EventLoop, link, cloud: SimulatedCloud, car: CarSettings | None = None, planner=None,
                 vehicle: str = "car-0", start_ms: float = 0.0, schedule: DeliverySchedule | None = None,
                 oracle_capacity_fraction: float = 1.0, index: int = 0, path=None) -> None:
        from onboard.daemon import OnboardAgent
        from onboard.planning import build_planner
        from optimizer.policies import make_estimator

        car = car or CarSettings()
        self.policy = policy
        self.scenario = scenario
        self.loop = loop
        self.start_ms = start_ms
        frames, cameras = scenario.num_frames, len(scenario.cameras)
        self.samples: list[ThroughputSample] = []
        reads_trace = policy.planner == "oracle" or policy.forecast_from_trace
        if reads_trace and schedule is None:
            raise ValueError(f"policy '{policy.name}' reads the trace: give the car its schedule")
        if policy.planner == "oracle":
            estimator = TraceCapacityEstimate(schedule, loop.clock, scenario.frame_interval_ms, policy.oracle_lag_ms)
        elif policy.forecast_from_trace:
            estimator = TraceFedForecast(
                make_estimator(dataclasses.replace(policy, forecast_from_trace=False), scenario.frame_interval_ms),
                TraceCapacityEstimate(schedule, loop.clock, scenario.frame_interval_ms, policy.oracle_lag_ms))
        else:
            estimator = make_estimator(policy, scenario.frame_interval_ms)
        if planner is not None:  # tests script the allocation
            inner_planner = planner
        elif policy.planner == "oracle":
            inner_planner = OraclePlanner(scenario.services, scenario.frame_interval_ms, oracle_capacity_fraction,
                                          policy.allocator, policy)
        else:
            inner_planner = build_planner(scenario.services, policy, scenario.frame_interval_ms)
        self.planner = _RecordingPlanner(inner_planner)
        cache_car = CacheBackedCar(scenario, detections)
        # Per frame and camera, filled as the agent publishes (lists: a numpy item write costs
        # several times a list's, and this runs for every image of every car).
        self.published: list[list[np.ndarray | None]] = [[None] * cameras for _ in range(frames)]
        self.from_cloud: list[list[bool]] = [[False] * cameras for _ in range(frames)]
        self.latency_ms: list[list[float]] = [[math.nan] * cameras for _ in range(frames)]  # capture -> publish
        self.published_config: list[list[str]] = [[""] * cameras for _ in range(frames)]
        self._cameras = [(c, camera, scenario.camera_size_wh.get(camera, DEFAULT_FRAME_SIZE_WH))
                         for c, camera in enumerate(scenario.cameras)]
        self.frame_position = {int(index): position for position, index in enumerate(scenario.frame_indices)}
        self.camera_position = {name: position for position, name in enumerate(scenario.cameras)}
        self.woken = False  # an executor finished: the agent asked for a step (the node's wake pipe)
        # Its place among the cars of a fleet at one instant (EventLoop): the fleet's vehicle index.
        self.event_rank = 2 * index
        self.uplink = SimulatedUplink(loop, cache_car, lambda frames_: self.agent.on_reply(frames_), owner=self)
        # `path`: the network side when it runs on another process (avcloud/fleet/parallel.py).
        self.uplink.path = path if path is not None else UplinkPath(loop, link, scenario.rtt_ms / 2.0, cloud,
                                                                    self.uplink)
        self.agent = OnboardAgent.for_policy(
            policy, scenario.services, scenario.slo_ms, scenario.rtt_ms, loop.clock, planner=self.planner,
            estimator=_RecordingEstimator(estimator, self.samples),
            fallback=cache_car.fallback, fallback_name=scenario.fallback_config,
            executor=SimulatedExecutor(loop, cache_car.fallback_ms, car.fallback_workers, owner=self),
            encoder=cache_car.encode, link=self.uplink, publish=self._publish, publish_guard_ms=car.publish_guard_ms,
            encode_executor=(SimulatedExecutor(loop, cache_car.encode_ms, car.encode_workers, owner=self)
                             if car.encode_workers else None),
            vehicle=vehicle, wake=self._wake,
        )
        # Per frame, as the agent planned it: planned configuration positions per camera, and
        # (estimate, budget, RTT estimate, solve time, success probability, allocated Mbps).
        self.planned: list[list[int]] = [[FALLBACK_INDEX] * cameras for _ in range(frames)]
        self.frame_plans: list[tuple[float, ...]] = [_NO_PLAN] * frames
        self._last_wakeup_ms = -math.inf
        self._scheduled_wakeup_ms = math.inf
        self._wakeup_event: list | None = None
        for f in range(frames):
            loop.at(start_ms + float(scenario.capture_ms[f]), lambda f=f: self._start_frame(f), self)

    def _wake(self) -> None:
        self.woken = True

    def _publish(self, result) -> None:
        f, c = self.frame_position[result.frame_index], self.camera_position[result.camera]
        self.published[f][c] = result.detections
        self.from_cloud[f][c] = result.source == "cloud"
        self.latency_ms[f][c] = result.latency_ms
        self.published_config[f][c] = result.config

    def _start_frame(self, f: int) -> None:
        scenario, agent = self.scenario, self.agent
        frame_index = int(scenario.frame_indices[f])
        estimate_mbps = agent.measurement.bandwidth_mbps()
        allocation = agent.allocation_for(frame_index)
        self.frame_plans[f] = (estimate_mbps, self.planner.last_budget_mbps, agent.measurement.rtt_ms,
                               allocation.solve_us, allocation.extra.get("success_probability", math.nan),
                               sum(allocation.bandwidth_mbps.values()))
        planned, choices, config_position = self.planned[f], allocation.choices, scenario.config_position
        for c, camera, _ in self._cameras:
            k = config_position.get(choices.get(camera, ""))
            if k is not None:
                planned[c] = k
        capture_ms = self.start_ms + float(scenario.capture_ms[f])
        for c, camera, size_wh in self._cameras:
            if scenario.camera_input_ms == 0:  # every camera arrives at this instant: no event needed
                agent.on_camera_frame(frame_index, camera, CachedImage(f, c), capture_ms, size_wh)
                continue
            self.loop.at(capture_ms + (c + 1) * scenario.camera_input_ms,
                         lambda camera=camera, image=CachedImage(f, c), size_wh=size_wh:
                         agent.on_camera_frame(frame_index, camera, image, capture_ms, size_wh), self)

    def end_of_instant(self) -> None:
        """After the loop handled this car's events of one instant: the agent's one step (if its
        events asked for one, or an executor woke it), then a wake-up event at the agent's next
        deadline (the node's poll timeout). A wake before the step is handled by it; one raised
        during it asks for another, as the node's wake pipe would."""
        woken_before, self.woken = self.woken, False
        stepped = self.agent.resume_steps()
        if self.woken or (woken_before and not stepped):
            self.woken = False
            self.agent.step()
        wakeup_ms = self.agent.next_wakeup_ms()
        now_ms = self.loop.clock.now_ms()
        # A deadline already handled (a task waiting for its on-car result) needs no new wake-up.
        if math.isfinite(wakeup_ms) and wakeup_ms > self._last_wakeup_ms and wakeup_ms != self._scheduled_wakeup_ms \
                and wakeup_ms >= now_ms:
            if self._wakeup_event is not None:
                self.loop.cancel(self._wakeup_event)  # replaced: it would not step, nor touch the car
            self._scheduled_wakeup_ms = wakeup_ms
            self._wakeup_event = self.loop.at(wakeup_ms, lambda: self._wakeup(wakeup_ms), self)

    def _wakeup(self, wakeup_ms: float) -> None:
        self._wakeup_event = None
        self._scheduled_wakeup_ms = math.inf
        self._last_wakeup_ms = wakeup_ms
        self.agent.step()

    def run(self, wall_s: float) -> PolicyRun:
        """What this car did, as a PolicyRun (after the loop has run out of events)."""
        frame_position, camera_position = self.frame_position, self.camera_position
        planned = np.array(self.planned, dtype=np.int32).reshape(len(self.planned), len(self._cameras))
        outcome = np.where(planned == FALLBACK_INDEX, RequestOutcome.FALLBACK, RequestOutcome.NOT_SENT).astype(np.int8)
        for frame_index, camera in self.uplink.sent:
            f, c = frame_position[frame_index], camera_position[camera]
            outcome[f, c] = RequestOutcome.ON_TIME if self.from_cloud[f][c] else RequestOutcome.LATE
        plans = np.array(self.frame_plans, dtype=float).reshape(len(self.frame_plans), len(_NO_PLAN))
        estimate_mbps, budget_mbps, rtt_estimate_ms, solve_us, success_probability, allocated_mbps = plans.T.copy()
        result_ms = np.full(outcome.shape, math.nan)
        for (frame_index, camera), arrival_ms in self.uplink.replied.items():
            result_ms[frame_position[frame_index], camera_position[camera]] = arrival_ms - self.start_ms
        uplink = self.uplink
        return PolicyRun(
            policy=self.policy.name, planned_config=planned, outcome=outcome, result_ms=result_ms,
            budget_mbps=budget_mbps, estimate_mbps=estimate_mbps, allocated_mbps=allocated_mbps,
            solve_us=solve_us, sent_bytes=uplink.sent_bytes,
            sent_until_ms=max((delivered for _, delivered, _ in uplink.transfers), default=0.0),
            transfers=uplink.transfers, samples=self.samples, wall_s=wall_s, published=self.published,
            counters={key: int(value) for key, value in self.agent.counters.__dict__.items()},
            rtt_estimate_ms=rtt_estimate_ms, policy_spec=self.policy.to_json_dict(),
            latency_ms=np.array(self.latency_ms, dtype=float).reshape(outcome.shape),
            published_config=self.published_config, planned_success_probability=success_probability,
        )


def run_instant(loop: EventLoop) -> None:
    """Every event of the next instant, then one agent step for each car they concerned (one
    round of the node's poll loop), so a burst of camera frames or replies costs one step, not
    one each. Cars step in the order of their first event of the instant (EventLoop's order)."""
    events = loop._events  # noqa: SLF001 (peek: defer the owner's steps before its event runs)
    time_ms = events[0][0]
    touched: dict[Any, None] = {}  # cars hash by identity; insertion order is the step order
    while events and events[0][0] == time_ms:
        owner = events[0][4]
        if owner is not None and owner not in touched:
            touched[owner] = None
            owner.agent.defer_steps()
        loop.run_next()
    for car in touched:
        car.end_of_instant()


def run_cars(loop: EventLoop, cars) -> None:
    """Run the loop, an instant at a time (`run_instant`), until no event is left."""
    while loop._events:  # noqa: SLF001
        run_instant(loop)


def simulate_policy(policy: PolicySpec, scenario: ReplayScenario, schedule: DeliverySchedule,
                    detections: Callable[[int, int, str], np.ndarray], queue_limit_bytes: int | None = None,
                    cloud_workers: int | None = None, car: CarSettings | None = None,
                    oracle_capacity_fraction: float = 1.0, cloud_faults: CloudFaults | None = None,
                    planner=None) -> PolicyRun:
    """Run the shipped agent with one policy over every frame of the scenario, on its own uplink.

    `detections(frame position, camera position, config)` reads the detection cache.
    `cloud_workers`: None serves every request on arrival (a GPU pool); k queues them for k workers.
    """
    started = time.perf_counter()
    loop = EventLoop(SimulatedClock(0.0))
    cloud = SimulatedCloud(loop, scenario, cloud_workers, faults=cloud_faults)
    replayed = ReplayedCar(policy, scenario, detections, loop, TraceLink(schedule, queue_limit_bytes=queue_limit_bytes),
                           cloud, car, planner=planner, schedule=schedule,
                           oracle_capacity_fraction=oracle_capacity_fraction)
    run_cars(loop, [replayed])
    return replayed.run(time.perf_counter() - started)


def true_capacity_mbps(schedule: DeliverySchedule, start_ms: float, end_ms: float, bin_ms: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """The trace's capacity in bins (bin start times in ms, Mbps), for plots and summaries."""
    starts_ms = np.arange(start_ms, end_ms, bin_ms)
    capacity = np.array([schedule.packets_between(s, s + bin_ms) for s in starts_ms], dtype=float)
    return starts_ms, capacity * BITS_PER_PACKET / (bin_ms * 1000.0)
