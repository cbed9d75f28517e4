"""Simulated replay: one allocation policy over one scene's frames and one uplink trace.

Only time is simulated. Every frame (at the scene's rate) the policy chooses, per camera, a cloud
configuration or the on-car fallback. A chosen frame is encoded (the profile's `Encode [ms]`) and
put on the shared uplink, a `TraceLink` with Mahimahi semantics that every camera of this policy
shares, byte for byte the real encoded size of that frame. The result is back at

    delivery over the uplink + RTT/2 + cloud runtime + RTT/2

and is published if that is no later than capture + SLO; otherwise the on-car result is.

Sender discipline, as the onboard daemon (onboard/daemon.py): per camera at most one request in
flight (until its reply arrives or its deadline passes) and one waiting; a newer frame replaces
the waiting one; a frame is not sent when its remaining budget cannot cover
RTT + cloud runtime + its upload at the bandwidth the policy planned with (the larger of the
option's critical bandwidth and the policy's budget; a policy without a budget, naive, only
checks RTT + runtime). Bytes already on the uplink keep occupying
it even when their result will be late: that is what a wrong estimate costs.

The policy measures only what the car can. When a reply arrives: size / time the link spent on
it (from max(enqueue, previous delivery) to its delivery: the car knows its own send log and the
uplink carries only its own cameras; the reply tells when the cloud received it). When a request
times out at its deadline: size / time since sending, an upper bound, so an outage drives the
estimate down without waiting for the late reply.

The cloud: by default every request is served as it arrives (a pool of GPU workers, TURBO's
assumption). With `cloud_workers=k` it is k workers serving in arrival order, as the live
service on a small CPU machine is: a request waits for a free worker, and one that could no
longer finish before its deadline is answered `expired` at once without occupying a worker
(the service's deadline check).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import numpy as np

from avcloud.link import BITS_PER_PACKET, PACKET_BYTES, DeliverySchedule, TraceLink
from avcloud.types import Allocation, Service, critical_bandwidth_mbps

FALLBACK_INDEX = -1


class RequestOutcome(IntEnum):
    """What became of one (frame, camera) under a policy."""

    FALLBACK = 0  # the allocation chose the on-car fallback; nothing sent
    ON_TIME = 1  # sent, result back before the deadline: the cloud result is published
    LATE = 2  # sent, result after the deadline: the on-car result is published
    SUPERSEDED = 3  # waited for the uplink and a newer frame of the same camera replaced it
    EXPIRED = 4  # waited for the uplink until its budget could no longer cover RTT + runtime
    REJECTED = 5  # the uplink queue was full (only with a drop-tail queue limit)


@dataclass(frozen=True)
class ThroughputSample:
    """One uplink measurement the car can make from its own send log."""

    observed_ms: float  # when the car learns it (the cloud's reply arrives)
    delivered_ms: float
    throughput_mbps: float
    size_bytes: int


@dataclass(frozen=True)
class PlanningContext:
    """Everything a policy may look at when it plans one frame: no trace, no future."""

    frame_position: int
    now_ms: float
    services: tuple[Service, ...]
    rtt_ms: float
    slo_ms: float
    frame_interval_ms: float


@dataclass
class PolicyDecision:
    """A policy's plan for one frame: the allocation, and the figures it planned with."""

    allocation: Allocation
    budget_mbps: float = math.nan  # bandwidth the allocation was asked to fit
    estimate_mbps: float = math.nan  # the policy's bandwidth estimate at this frame


class Policy(Protocol):
    name: str

    def plan(self, context: PlanningContext) -> PolicyDecision: ...

    def observe(self, sample: ThroughputSample) -> None: ...


@dataclass
class ReplayScenario:
    """What every policy shares: frames, cameras, options and their real encoded sizes.

    `size_bytes[f, c, k]` is the encoded payload of frame position f of camera c under
    configuration `config_names[k]` (from the profiler's detection cache).
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

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
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
    result_ms: np.ndarray  # float64 [F, C], when a sent request's result is back (nan if not sent)
    budget_mbps: np.ndarray  # float64 [F]
    estimate_mbps: np.ndarray  # float64 [F]
    allocated_mbps: np.ndarray  # float64 [F], sum of the chosen options' critical bandwidths
    solve_us: np.ndarray  # float64 [F]
    sent_bytes: int
    sent_until_ms: float  # last delivery on the uplink
    transfers: list[tuple[float, float, int]]  # (enqueue_ms, delivered_ms, size_bytes) in send order
    samples: list[ThroughputSample]
    wall_s: float

    def served_config(self) -> np.ndarray:
        """Configuration whose detections are published per (frame, camera); FALLBACK_INDEX = on-car."""
        return np.where(self.outcome == RequestOutcome.ON_TIME, self.planned_config, FALLBACK_INDEX)


# Heap event kinds. At equal times: a camera's slot is freed, then what the car learnt reaches the
# policy, then a newly encoded frame asks for the slot.
_SLOT_FREE, _LEARN, _READY = 0, 1, 2


@dataclass
class _Request:
    frame: int
    camera: int
    config: int
    size_bytes: int
    deadline_ms: float
    runtime_ms: float
    share_mbps: float  # bandwidth the policy planned this request to get


class CloudWorkers:
    """When each request's result leaves the cloud: at once, or after queueing for k workers."""

    def __init__(self, workers: int | None) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"cloud workers must be >= 1 or None (unlimited), got {workers}")
        self._free_at_ms = [-math.inf] * workers if workers else None

    def finish_ms(self, arrival_ms: float, runtime_ms: float, latest_finish_ms: float) -> float:
        """Finish time of a request arriving at arrival_ms; inf when it is expired unrun."""
        if self._free_at_ms is None:
            return arrival_ms + runtime_ms
        start_ms = max(arrival_ms, self._free_at_ms[0])
        if start_ms + runtime_ms > latest_finish_ms:
            return math.inf
        heapq.heapreplace(self._free_at_ms, start_ms + runtime_ms)
        return start_ms + runtime_ms


def simulate_policy(policy: Policy, scenario: ReplayScenario, schedule: DeliverySchedule,
                    queue_limit_bytes: int | None = None, cloud_workers: int | None = None) -> PolicyRun:
    """Run one policy over every frame of the scenario on its own uplink following `schedule`.

    `cloud_workers`: None serves every request on arrival; k queues them for k workers."""
    started = time.perf_counter()
    cloud = CloudWorkers(cloud_workers)
    frames, cameras = scenario.num_frames, len(scenario.cameras)
    link = TraceLink(schedule, queue_limit_bytes=queue_limit_bytes)
    half_rtt_ms = scenario.rtt_ms / 2.0
    planned = np.full((frames, cameras), FALLBACK_INDEX, dtype=np.int32)
    outcome = np.zeros((frames, cameras), dtype=np.int8)
    result_ms = np.full((frames, cameras), math.nan)
    budget_mbps = np.full(frames, math.nan)
    estimate_mbps = np.full(frames, math.nan)
    allocated_mbps = np.zeros(frames)
    solve_us = np.zeros(frames)
    transfers: list[tuple[float, float, int]] = []
    samples: list[ThroughputSample] = []
    in_flight: list[_Request | None] = [None] * cameras
    waiting: list[_Request | None] = [None] * cameras
    events: list[tuple[float, int, int, object]] = []
    sequence = 0
    last_delivery_ms = -math.inf
    sent_bytes = 0

    def push(time_ms: float, kind: int, payload: object) -> None:
        nonlocal sequence
        heapq.heappush(events, (time_ms, kind, sequence, payload))
        sequence += 1

    def send(request: _Request, now_ms: float) -> None:
        nonlocal last_delivery_ms, sent_bytes
        upload_ms = request.size_bytes * 8 / 1000.0 / request.share_mbps if request.share_mbps > 0 else math.inf
        if request.deadline_ms - now_ms < scenario.rtt_ms + request.runtime_ms + upload_ms:
            outcome[request.frame, request.camera] = RequestOutcome.EXPIRED
            return
        transfer = link.send(now_ms, request.size_bytes)
        if not transfer.accepted:
            outcome[request.frame, request.camera] = RequestOutcome.REJECTED
            return
        delivered_ms = transfer.delivered_ms
        busy_ms = max(delivered_ms - max(now_ms, last_delivery_ms), 1.0)
        last_delivery_ms = delivered_ms
        sent_bytes += request.size_bytes
        transfers.append((now_ms, delivered_ms, request.size_bytes))
        finished_ms = cloud.finish_ms(delivered_ms + half_rtt_ms, request.runtime_ms,
                                      request.deadline_ms - half_rtt_ms)
        # An expired request's reply comes back at once (its deadline is what frees the slot).
        back_ms = (finished_ms if math.isfinite(finished_ms) else delivered_ms + half_rtt_ms) + half_rtt_ms
        result_ms[request.frame, request.camera] = back_ms
        on_time = math.isfinite(finished_ms) and back_ms <= request.deadline_ms
        outcome[request.frame, request.camera] = RequestOutcome.ON_TIME if on_time else RequestOutcome.LATE
        in_flight[request.camera] = request
        push(min(back_ms, request.deadline_ms), _SLOT_FREE, request)
        if back_ms > request.deadline_ms:
            timed_out_mbps = request.size_bytes * 8 / 1000.0 / max(request.deadline_ms - now_ms, 1.0)
            push(request.deadline_ms, _LEARN, ThroughputSample(request.deadline_ms, delivered_ms, timed_out_mbps,
                                                               request.size_bytes))
        sample = ThroughputSample(back_ms, delivered_ms, request.size_bytes * 8 / busy_ms / 1000.0, request.size_bytes)
        push(back_ms, _LEARN, sample)

    def process_until(limit_ms: float) -> None:
        while events and events[0][0] <= limit_ms:
            now_ms, kind, _, payload = heapq.heappop(events)
            if kind == _SLOT_FREE:
                camera = payload.camera  # type: ignore[attr-defined]
                if in_flight[camera] is payload:
                    in_flight[camera] = None
                    queued = waiting[camera]
                    if queued is not None:
                        waiting[camera] = None
                        send(queued, now_ms)
            elif kind == _LEARN:
                samples.append(payload)  # type: ignore[arg-type]
                policy.observe(payload)  # type: ignore[arg-type]
            else:
                request: _Request = payload  # type: ignore[assignment]
                if in_flight[request.camera] is None:
                    send(request, now_ms)
                else:
                    replaced = waiting[request.camera]
                    if replaced is not None:
                        outcome[replaced.frame, replaced.camera] = RequestOutcome.SUPERSEDED
                    waiting[request.camera] = request

    service_by_camera = {service.name: position for position, service in enumerate(scenario.services)}
    option_by_name = [{option.name: option for option in service.options} for service in scenario.services]
    frame_interval_ms = scenario.frame_interval_ms
    for frame in range(frames):
        now_ms = float(scenario.capture_ms[frame])
        process_until(now_ms)
        context = PlanningContext(frame, now_ms, scenario.services, scenario.rtt_ms, scenario.slo_ms,
                                  frame_interval_ms)
        decision = policy.plan(context)
        budget_mbps[frame] = decision.budget_mbps
        estimate_mbps[frame] = decision.estimate_mbps
        solve_us[frame] = decision.allocation.solve_us
        ready: list[tuple[float, float, _Request]] = []
        for camera_name, option_name in decision.allocation.choices.items():
            camera = service_by_camera[camera_name]
            option = option_by_name[camera][option_name]
            if option.is_fallback:
                continue
            config = scenario.config_position[option_name]
            planned[frame, camera] = config
            option_mbps = critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, scenario.rtt_ms, scenario.slo_ms)
            allocated_mbps[frame] += option_mbps
            # A policy without a bandwidth notion (naive) cannot predict the upload: it sends whenever
            # RTT + runtime still fit, and learns the hard way.
            share_mbps = max(option_mbps, decision.budget_mbps) if math.isfinite(decision.budget_mbps) else math.inf
            request = _Request(frame, camera, config, int(scenario.size_bytes[frame, camera, config]),
                               now_ms + scenario.slo_ms, float(scenario.runtime_ms[config]), share_mbps)
            # Earliest deadline on the wire first: the request with least slack for the uplink goes first.
            slack_ms = scenario.slo_ms - request.runtime_ms
            input_ms = (camera + 1) * scenario.camera_input_ms
            ready.append((now_ms + input_ms + float(scenario.encode_ms[config]), slack_ms, request))
        for ready_ms, _, request in sorted(ready, key=lambda item: (item[0], item[1])):
            push(ready_ms, _READY, request)
    process_until(math.inf)  # every slot frees eventually, so every waiting frame is sent or dropped
    return PolicyRun(
        policy=policy.name,
        planned_config=planned,
        outcome=outcome,
        result_ms=result_ms,
        budget_mbps=budget_mbps,
        estimate_mbps=estimate_mbps,
        allocated_mbps=allocated_mbps,
        solve_us=solve_us,
        sent_bytes=sent_bytes,
        sent_until_ms=last_delivery_ms if transfers else 0.0,
        transfers=transfers,
        samples=samples,
        wall_s=time.perf_counter() - started,
    )


def true_capacity_mbps(schedule: DeliverySchedule, start_ms: float, end_ms: float, bin_ms: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """The trace's capacity in bins (bin start times in ms, Mbps), for plots and summaries."""
    starts_ms = np.arange(start_ms, end_ms, bin_ms)
    capacity = np.array([schedule.packets_between(s, s + bin_ms) for s in starts_ms], dtype=float)
    return starts_ms, capacity * BITS_PER_PACKET / (bin_ms * 1000.0)


__all__ = [
    "FALLBACK_INDEX",
    "CloudWorkers",
    "PACKET_BYTES",
    "PlanningContext",
    "Policy",
    "PolicyDecision",
    "PolicyRun",
    "ReplayScenario",
    "RequestOutcome",
    "ThroughputSample",
    "simulate_policy",
    "true_capacity_mbps",
]
