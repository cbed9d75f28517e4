"""The onboard agent: per-frame logic of the daemon, with its clock and all I/O passed in.

The same `OnboardAgent` runs in the live node (ZeroMQ sockets, `WallClock`, a thread pool for
the fallback model) and in tests (fakes and a `SimulatedClock`). It never reads the time itself
and never blocks: the caller feeds it events and calls `step()` at the time `next_wakeup_ms()`
asks for (or earlier).

Per frame and camera: the fallback model runs on every image (in the executor, in parallel with
the cloud round trip); the allocation is solved once per frame index from the current bandwidth
and RTT estimates; a camera allocated to a cloud option has its image compressed and sent, at
most `max_in_flight_per_camera` requests in flight (the next one only once the previous one has
left the uplink, by the car's estimate) and one waiting per camera (a newer frame replaces the waiting one;
a frame whose remaining budget cannot cover the bytes queued ahead of it, its transfer, runtime
and RTT is dropped before sending);
in-flight requests time out at their frame's cutoff (deadline less `publish_guard_ms`). The merge (onboard/merge.py) publishes
one result per camera per frame.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from avcloud.clock import Clock
from avcloud.protocol import PONG, ProtocolError, RequestHeader, decode_reply, encode_request, ping_request
from avcloud.types import Allocation, Option, Service, critical_bandwidth_mbps, empty_detections
from onboard.measurement import LinkMeasurement, RequestTiming
from onboard.merge import TaskFrame, decide
from onboard.planning import AllocationPlanner, planning_slo
from onboard.topics import DetectionResult

# After this long without a throughput sample, a plan that sends nothing gets one discovery
# request (the cheapest useful cloud option on one camera, in turn), so a real request measures
# the link again; each one that times out unanswered doubles the wait before the next, up to the
# maximum, and any reply sets it back. The policy spec sets both (optimizer/policies.py:
# stale_after_ms, max_discovery_wait_ms).
STALE_ESTIMATE_MS = 100.0
MAX_DISCOVERY_WAIT_MS = 1000.0
# Once the link answers, discovery holds the uplink (at the estimate) at most this share of the time.
DISCOVERY_UPLINK_SHARE = 0.25
MIN_ESTIMATE_MBPS = 1e-3  # an estimate of zero bounds the wait by `max_discovery_wait_ms`
RECENT_REQUESTS = 256
# The RTT is measured by a tiny ping this often (its pong is answered at once by the cloud).
PING_INTERVAL_MS = 1000.0
PINGS_KEPT = 8
MIN_PLANNING_SLO_MS = 1.0  # a backlog longer than the SLO leaves nothing for the cloud
ALLOCATIONS_KEPT = 8
MAX_ENCODING_PER_CAMERA = 2  # frames being compressed at once per camera (bounds memory)
# A capture stamp older than this is taken as coming from another clock, not as a late frame.
CAPTURE_CLOCK_TRUST_MS = 5000.0


@dataclass(frozen=True)
class EncodedFrame:
    """A camera image compressed for one cloud configuration, ready to go in a request."""

    model: str  # cloud model name for the request header
    codec: str  # "jpeg" | "png" | "raw"
    payload: bytes | memoryview
    shape_hw: tuple[int, int]  # size of the encoded image
    frame_shape_hw: tuple[int, int]  # size of the camera image the detections refer to
    encode_ms: float = 0.0


# Both take the image as decoded (possibly at reduced resolution) and the camera's full size
# (width, height): detections and `frame_shape_hw` always refer to the full camera image.
FrameEncoder = Callable[[np.ndarray, str, tuple[int, int]], EncodedFrame]
FallbackDetector = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


class CloudLink(Protocol):
    """What the agent needs from its transport (onboard.transport.CloudTransport in the node)."""

    def send(self, frames: list[Any]) -> bool: ...

    def reset(self) -> None: ...


def _useful_options(options) -> list[Option]:
    """The cloud options that beat the on-car result (what a discovery request may send)."""
    options = list(options)
    fallback_utility = max((option.utility for option in options if option.is_fallback), default=0.0)
    return [option for option in options if not option.is_fallback and option.utility > fallback_utility]


@dataclass(slots=True)
class _Request:
    task: TaskFrame
    option: Option
    encoded: EncodedFrame
    share_mbps: float  # bandwidth the allocation granted this camera
    request_id: int = -1
    send_ms: float = math.nan
    discovery: bool = False  # sent to learn the uplink (see OnboardAgent._add_discovery_request)

    @property
    def size_bytes(self) -> int:
        return len(self.encoded.payload)


@dataclass(slots=True)
class _CameraState:
    in_flight: int = 0  # this camera's requests sent and not yet answered or timed out
    upload_end_ms: float = -math.inf  # when its last request should have left the uplink (virtual)
    waiting: _Request | None = None
    fallback_running: Future | None = None
    fallback_task: TaskFrame | None = None
    fallback_waiting: tuple[TaskFrame, np.ndarray, tuple[int, int]] | None = None
    last_onboard: np.ndarray = field(default_factory=empty_detections)
    encoding: collections.deque = field(default_factory=collections.deque)  # (task, option, share, future)


@dataclass
class AgentCounters:
    frames: int = 0
    published: int = 0
    published_cloud: int = 0
    published_onboard: int = 0
    deadline_missed: int = 0
    requests_sent: int = 0
    send_failures: int = 0
    dropped_replaced: int = 0
    dropped_stale: int = 0
    timeouts: int = 0
    replies: int = 0
    replies_discarded: int = 0
    replies_not_ok: int = 0
    bad_replies: int = 0
    fallback_reused: int = 0
    arrived_late: int = 0
    encode_failures: int = 0
    capture_clock_ignored: int = 0
    transport_resets: int = 0


class OnboardAgent:
    def __init__(
        self,
        services: Sequence[Service],
        slo_ms: float,
        clock: Clock,
        planner: AllocationPlanner,
        measurement: LinkMeasurement,
        fallback: FallbackDetector,
        fallback_name: str,
        executor: Executor,
        encoder: FrameEncoder,
        link: CloudLink,
        publish: Callable[[DetectionResult], None],
        vehicle: str = "car-0",
        reconnect_after_timeouts: int = 3,
        min_reconnect_interval_ms: float = 1000.0,
        wake: Callable[[], None] | None = None,
        publish_guard_ms: float = 0.0,
        encode_executor: Executor | None = None,
        log_event: Callable[..., None] | None = None,
        log_replies: bool = False,
        stale_after_ms: float = STALE_ESTIMATE_MS,
        max_discovery_wait_ms: float = MAX_DISCOVERY_WAIT_MS,
        ping_interval_ms: float = PING_INTERVAL_MS,
        plans_for_uplink: bool = True,
        max_in_flight_per_camera: int = 1,
    ) -> None:
        self.services = tuple(services)
        self.cameras = [service.name for service in self.services]
        self.options = {service.name: {option.name: option for option in service.options}
                        for service in self.services}
        self.slo_ms = slo_ms
        self.clock = clock
        self.planner = planner
        self.measurement = measurement
        self.fallback = fallback
        self.fallback_name = fallback_name
        self.executor = executor
        self.encoder = encoder
        self.link = link
        self.publish = publish
        self.vehicle = vehicle
        self.reconnect_after_timeouts = reconnect_after_timeouts
        self.min_reconnect_interval_ms = min_reconnect_interval_ms
        self.wake = wake or (lambda: None)
        if max_in_flight_per_camera < 1:
            raise ValueError("max_in_flight_per_camera must be at least 1")
        self.max_in_flight_per_camera = max_in_flight_per_camera
        self.publish_guard_ms = publish_guard_ms
        self.encode_executor = encode_executor  # None: compress inline in on_camera_frame
        self.log_event = log_event or (lambda event, **fields: None)
        self.log_replies = log_replies
        self.stale_after_ms = stale_after_ms
        self.max_discovery_wait_ms = max(stale_after_ms, max_discovery_wait_ms)
        self.ping_interval_ms = ping_interval_ms
        # False for policies whose plan ignores the uplink (onboard, naive): no discovery requests,
        # no planning around the backlog.
        self.plans_for_uplink = plans_for_uplink
        self._pings: collections.OrderedDict[int, float] = collections.OrderedDict()  # request id -> send time
        self._next_ping_ms = -math.inf if math.isfinite(ping_interval_ms) else math.inf  # inf: never ping
        self._ping_now = False  # a reply found the uplink idle with a ping due (see `step`)
        self._last_reply_ms = -math.inf
        self.counters = AgentCounters()
        self._cameras = {camera: _CameraState() for camera in self.cameras}
        self._camera_states = list(self._cameras.items())
        self._pending: list[TaskFrame] = []  # unpublished task frames, oldest first
        self._allocations: collections.OrderedDict[int, Allocation] = collections.OrderedDict()
        self._in_flight: dict[int, _Request] = {}
        self._recent: collections.OrderedDict[int, RequestTiming] = collections.OrderedDict()
        # Timed-out requests whose reply may still come: request id -> (timing, when it timed out,
        # when its upper-bound sample is due). See `_take_overdue_samples`.
        self._overdue: dict[int, tuple[RequestTiming, float, float]] = {}
        self._next_request_id = 1
        self._consecutive_timeouts = 0
        self._last_reset_ms = -math.inf
        self._discovery_camera = 0
        self._steps_deferred = 0
        self._step_requested = False
        self._last_discovery_ms = -math.inf
        self._discovery_level = 0  # which size of useful cloud option the next discovery request uses
        self._discovery_succeeded = False
        self._discovery_outstanding = 0
        self._smallest_discovery_mbit = min((option.size_mbit for service in self.services
                                             for option in _useful_options(service.options)), default=0.0)
        self._discovery_wait_ms = stale_after_ms  # grows with each discovery request that times out unanswered

    @classmethod
    def for_policy(cls, policy, services: Sequence[Service], slo_ms: float, initial_rtt_ms: float, clock: Clock,
                   planner: AllocationPlanner | None = None, estimator=None, frame_interval_ms: float | None = None,
                   **io_and_settings: Any) -> OnboardAgent:
        """The agent a policy spec (optimizer.policies.PolicySpec) asks for: its planner and its
        measurement's forecast (for the cameras' `frame_interval_ms`), its discovery, ping and
        in-flight settings. The live node and the replay both build their agent here, so they
        make the same decisions from the same events."""
        from onboard.measurement import build_measurement
        from onboard.planning import build_planner

        return cls(services=services, slo_ms=slo_ms, clock=clock,
                   planner=planner or build_planner(services, policy, frame_interval_ms),
                   measurement=build_measurement(policy, initial_rtt_ms, estimator, frame_interval_ms),
                   stale_after_ms=policy.stale_after_ms, max_discovery_wait_ms=policy.max_discovery_wait_ms,
                   plans_for_uplink=policy.measures,
                   ping_interval_ms=policy.ping_interval_ms,
                   max_in_flight_per_camera=policy.max_in_flight_per_camera, **io_and_settings)

    @property
    def cutoff_after_arrival_ms(self) -> float:
        """How long after a frame's arrival a cloud result still counts: the deadline less the
        publish guard, so that the publish itself lands in time."""
        return self.slo_ms - self.publish_guard_ms

    # ------------------------------------------------------------ events

    def allocation_for(self, frame_index: int) -> Allocation:
        """The allocation of a frame index, solved when the first camera of that frame arrives."""
        allocation = self._allocations.get(frame_index)
        if allocation is None:
            now_ms = self.clock.now_ms()
            if self._overdue:
                self._take_overdue_samples(now_ms)
            # The cloud's recent queueing is part of the round trip a request must fit in.
            rtt_ms = self._round_trip_ms(now_ms)
            bandwidth_mbps = self.measurement.bandwidth_mbps()
            stale = now_ms - self.measurement.last_sample_ms > self.stale_after_ms
            # Bytes the car has already queued delay this frame's requests: they have that much
            # less time to reach the cloud (TURBO's critical bandwidth assumes an empty uplink).
            backlog_ms = self.measurement.backlog_ms(now_ms) if self.plans_for_uplink else 0.0
            # A cloud result counts only until the frame's cutoff, not the deadline: plan for that.
            planning_slo_ms = max(planning_slo(self.cutoff_after_arrival_ms, backlog_ms), MIN_PLANNING_SLO_MS)
            allocation = self.planner.plan(bandwidth_mbps, rtt_ms, planning_slo_ms,
                                           self.measurement.forecast_samples_mbps())
            allocation.extra["backlog_ms"] = backlog_ms
            # Discovery: after a stale interval at most one request per wait (a stale interval, more
            # after misses); while discovery requests keep coming back in time, one per frame, each
            # the next size up (slow start).
            growing = self._discovery_succeeded and not self._discovery_outstanding
            due = stale and now_ms - self._last_discovery_ms > self._discovery_wait_ms
            if self.plans_for_uplink and (growing or due) and self._sends_nothing(allocation):
                self._add_discovery_request(allocation, rtt_ms)
                # The planner's chance was that of sending nothing: it says nothing of the request
                # added here (a replay would score it as a plan sure to arrive).
                allocation.extra.pop("success_probability", None)
                self._last_discovery_ms = now_ms
                self._discovery_succeeded = False
            elif self.plans_for_uplink and due:
                # The plan sends, but on a stale estimate the drop-before-send check would judge
                # its requests by that estimate and could drop every one, so the car would never
                # measure again: its cheapest planned request goes out as a discovery request.
                sending = [(self.options[camera][choice].size_mbit, camera) for camera, choice in allocation.choices.items()
                           if choice in self.options.get(camera, {}) and not self.options[camera][choice].is_fallback]
                if sending:
                    allocation.extra["discovery"] = min(sending)[1]
                    self._last_discovery_ms = now_ms
            self._allocations[frame_index] = allocation
            while len(self._allocations) > ALLOCATIONS_KEPT:
                self._allocations.popitem(last=False)
        return allocation

    def on_camera_frame(self, frame_index: int, camera: str, image_bgr: np.ndarray,
                        capture_ms: float | None = None, full_size_wh: tuple[int, int] | None = None) -> None:
        """A camera image arrived: start its fallback, and compress and send it if allocated.

        The latency budget starts at `capture_ms` (same clock as the agent's) when the camera
        stamped the frame, else now. A frame that arrives after its deadline is answered at once
        with the camera's latest on-car result, so a backlog never turns into more work.
        `full_size_wh` is the camera's image size when `image_bgr` was decoded smaller.
        """
        if full_size_wh is None:
            full_size_wh = (image_bgr.shape[1], image_bgr.shape[0])
        if camera not in self._cameras:
            return
        now_ms = self.clock.now_ms()
        start_ms = capture_ms
        if capture_ms is None or not 0.0 <= now_ms - capture_ms <= CAPTURE_CLOCK_TRUST_MS:
            # No stamp, or one from another clock (another host): the budget starts on arrival.
            start_ms = now_ms
            self.counters.capture_clock_ignored += capture_ms is not None
        self.counters.frames += 1
        allocation = self.allocation_for(frame_index)
        choice = allocation.choices.get(camera, self.fallback_name)
        option = self.options[camera].get(choice)
        task = TaskFrame(frame_index=frame_index, camera=camera, arrival_ms=start_ms,
                         deadline_ms=start_ms + self.slo_ms,
                         cutoff_ms=start_ms + self.cutoff_after_arrival_ms, choice=choice)
        self._pending.append(task)
        if now_ms >= task.cutoff_ms:
            self.counters.arrived_late += 1
            self._reuse_onboard(self._cameras[camera], task)
            self.step()
            return
        if option is not None and not option.is_fallback:
            share_mbps = float(allocation.bandwidth_mbps.get(camera, 0.0))
            task.discovery = allocation.extra.get("discovery") == camera
            if task.discovery or allocation.extra.get("bandwidth_aware") is False:
                # Sent to learn the uplink, or planned without a notion of it: only RTT + runtime must fit.
                share_mbps = math.inf
            task.cloud_pending = True
            if self.encode_executor is None:
                self._queue_request(task, option, share_mbps, self._encode_now(image_bgr, option, full_size_wh))
            else:
                # Cameras compress in parallel; the request joins its camera's queue when ready.
                encoding = self._cameras[camera].encoding
                if len(encoding) >= MAX_ENCODING_PER_CAMERA and encoding[0][3].cancel():
                    encoding.popleft()[0].cloud_pending = False  # freshest first: not started, dropped
                    self.counters.dropped_replaced += 1
                if len(encoding) >= MAX_ENCODING_PER_CAMERA:
                    task.cloud_pending = False  # compression cannot keep up: this frame stays on board
                    self.counters.dropped_replaced += 1
                else:
                    future = self.encode_executor.submit(self.encoder, image_bgr, option.name, full_size_wh)
                    encoding.append((task, option, share_mbps, future))
                    future.add_done_callback(lambda _: self.wake())
            if self.encode_executor is None:
                self.step()  # the cloud request is the long pole: on the wire before the fallback starts
        self._start_fallback(task, image_bgr, full_size_wh)
        self.step()

    def _encode_now(self, image_bgr: np.ndarray, option: Option, full_size_wh: tuple[int, int]) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.encoder(image_bgr, option.name, full_size_wh))
        except Exception as error:  # reported through the future like an executor would
            future.set_exception(error)
        return future

    def _queue_request(self, task: TaskFrame, option: Option, share_mbps: float, encoded: Future) -> None:
        """Put an encoded frame in its camera's waiting slot (freshest first), or fall back."""
        try:
            frame = encoded.result()
        except Exception:  # a frame that cannot be encoded falls back; the node keeps running
            self.counters.encode_failures += 1
            task.cloud_pending = False
            return
        if task.published:  # its on-car result went out while it was being compressed
            task.cloud_pending = False
            self.counters.dropped_stale += 1
            return
        state = self._cameras[task.camera]
        if state.waiting is not None:
            state.waiting.task.cloud_pending = False  # freshest first: the newer frame goes instead
            self.counters.dropped_replaced += 1
        state.waiting = _Request(task, option, frame, share_mbps, discovery=task.discovery)

    def on_reply(self, frames: Sequence[Any]) -> None:
        now_ms = self.clock.now_ms()
        try:
            header, detections = decode_reply(frames)
        except ProtocolError:
            self.counters.bad_replies += 1
            return
        if not isinstance(header.request_id, int):
            return
        if header.kind == PONG:
            ping_sent_ms = self._pings.pop(header.request_id, None)
            if ping_sent_ms is not None:
                self.measurement.on_pong(ping_sent_ms, now_ms, header.timings.total_ms)
            return
        self.counters.replies += 1
        self._overdue.pop(header.request_id, None)  # late, but it measures the link itself
        timing = self._recent.pop(header.request_id, None)
        if timing is not None:
            self.measurement.on_reply(timing, now_ms, header.timings.total_ms)
        self._consecutive_timeouts = 0
        self._last_reply_ms = now_ms
        # Any reply, in time or late, shows that the uplink carries the car's bytes: slow perhaps,
        # but not dark. Discovery backs off only while nothing comes back (`_discovery_timed_out`).
        self._discovery_wait_ms = self._answered_discovery_wait_ms()
        if now_ms >= self._next_ping_ms and self._uplink_idle(now_ms):
            self._ping_now = True  # at the step this reply takes, ahead of anything it sends
        request = self._in_flight.pop(header.request_id, None)
        if self.log_replies and timing is not None:
            self.log_event("reply", request_id=header.request_id, task=header.task, frame=header.frame,
                           status=header.status, size_bytes=timing.size_bytes,
                           sent_after_capture_ms=round(timing.send_ms - timing.capture_ms, 2),
                           round_trip_ms=round(now_ms - timing.send_ms, 2),
                           server_ms=round(header.timings.total_ms, 2), in_time=request is not None)
        if request is None:
            self.counters.replies_discarded += 1  # timed out already: its frame has been published
            if self._ping_now:
                self.step()
            return
        camera = request.task.camera
        self._cameras[camera].in_flight -= 1
        task = request.task
        task.cloud_pending = False
        in_time = header.ok and not task.published and now_ms <= task.cutoff_ms
        if request.discovery:
            self._discovery_done(succeeded=in_time)
        if not header.ok:
            self.counters.replies_not_ok += 1
        elif not in_time:
            self.counters.replies_discarded += 1
        else:
            task.cloud_detections = detections
            task.cloud_config = task.choice
        self.step()

    # ------------------------------------------------------------ time

    def defer_steps(self) -> None:
        """Until `resume_steps()`, the events handed over take one `step()` at the end instead of
        one each: for a caller that hands over a burst of events at one instant (the replay)."""
        self._steps_deferred += 1

    def resume_steps(self) -> bool:
        """Ends a `defer_steps()`; True if it took the step that was asked for meanwhile."""
        self._steps_deferred -= 1
        if not self._steps_deferred and self._step_requested:
            self.step()
            return True
        return False

    @contextlib.contextmanager
    def one_step(self):
        """`defer_steps()` ... `resume_steps()` as a context."""
        self.defer_steps()
        try:
            yield
        finally:
            self.resume_steps()

    def step(self) -> None:
        """Time out requests, send waiting frames, collect fallback results, publish what is due."""
        if self._steps_deferred:
            self._step_requested = True
            return
        self._step_requested = False
        now_ms = self.clock.now_ms()
        if self._overdue:
            self._take_overdue_samples(now_ms)
        for request_id, request in list(self._in_flight.items()) if self._in_flight else ():
            if now_ms >= request.task.cutoff_ms:
                del self._in_flight[request_id]
                self._cameras[request.task.camera].in_flight -= 1
                request.task.cloud_pending = False
                self.counters.timeouts += 1
                self._consecutive_timeouts += 1
                if request.discovery:
                    self._discovery_timed_out()
                timing = self._recent.get(request_id)
                if timing is not None:
                    due_ms = now_ms + request.option.runtime_ms + self._round_trip_ms(now_ms)
                    self._overdue[request_id] = (timing, now_ms, due_ms)
        if (self._consecutive_timeouts >= self.reconnect_after_timeouts
                and now_ms - self._last_reply_ms >= self.min_reconnect_interval_ms
                and now_ms - self._last_reset_ms >= self.min_reconnect_interval_ms):
            # Nothing at all came back for a while: the connection may be half dead, and a fresh
            # socket reconnects. A link that is only slow still returns (late) replies: no reset,
            # which would throw away requests about to be answered.
            self.link.reset()
            self.counters.transport_resets += 1
            self.log_event("cloud_socket_reset", consecutive_timeouts=self._consecutive_timeouts,
                           silent_ms=None if math.isinf(self._last_reply_ms) else round(now_ms - self._last_reply_ms, 1))
            self._last_reset_ms = now_ms
            self._consecutive_timeouts = 0
        # A ping queued behind the car's own uploads measures them, not the RTT: it goes ahead of
        # this step's requests, when nothing is in flight, or when a reply finds the uplink idle
        # (`on_reply`), and at most one interval late.
        if now_ms >= self._next_ping_ms and (not self._in_flight or self._ping_now
                                             or now_ms >= self._next_ping_ms + self.ping_interval_ms):
            self._send_ping(now_ms)
        for camera, state in self._camera_states:  # the cheap checks inline: this runs many times a frame
            if state.fallback_running is not None and state.fallback_running.done():
                self._collect_fallback(camera)
            if state.encoding and state.encoding[0][3].done():
                self._collect_encodings(camera)
            if state.waiting is not None and self._may_send(state, now_ms):
                self._send_waiting(camera, now_ms)
        self._publish_ready(now_ms)

    def _uplink_idle(self, now_ms: float) -> bool:
        """Nothing of the car's on the uplink (by its virtual queue) or about to go onto it. A
        ping sent then measures the path alone; one sent while camera frames are being compressed
        is read, in the live node's single loop, only after the compression (that loop's pongs
        read 51-161 ms on a 30 ms path when the pings went at the start of a frame's step)."""
        return self.measurement.backlog_ms(now_ms) <= 0 and not any(
            state.encoding or state.waiting is not None for _, state in self._camera_states)

    def next_wakeup_ms(self) -> float:
        """When `step()` must run next (fallback completions call `wake` instead)."""
        earliest_ms = math.inf  # encodings and fallbacks call `wake`
        for task in self._pending:
            if task.cutoff_ms < earliest_ms:
                earliest_ms = task.cutoff_ms
        for request in self._in_flight.values():
            if request.task.cutoff_ms < earliest_ms:
                earliest_ms = request.task.cutoff_ms
        for _, state in self._camera_states:  # a waiting frame goes when its camera's upload ends
            if state.waiting is not None and state.in_flight and state.upload_end_ms < earliest_ms \
                    and state.in_flight < self.max_in_flight_per_camera:
                earliest_ms = state.upload_end_ms
        return earliest_ms

    def _may_send(self, state: _CameraState, now_ms: float) -> bool:
        """A camera's next request goes once its previous one has left the uplink (by the car's
        estimate), not only once it is answered: its cloud run overlaps the next upload."""
        return state.in_flight == 0 or (state.in_flight < self.max_in_flight_per_camera
                                        and now_ms >= state.upload_end_ms)

    @property
    def pending_frames(self) -> int:
        return len(self._pending)

    def status(self) -> dict[str, Any]:
        now_ms = self.clock.now_ms()
        return {
            **self.counters.__dict__,
            "pending_frames": len(self._pending),
            "in_flight": len(self._in_flight),
            "bandwidth_mbps": round(self.measurement.bandwidth_mbps(), 3),
            "rtt_ms": round(self.measurement.rtt_ms, 3),
            "cloud_wait_ms": self.measurement.cloud_wait_ms(now_ms),
            "estimate_age_ms": None if math.isinf(self.measurement.last_sample_ms)
            else round(now_ms - self.measurement.last_sample_ms, 1),
        }

    # ------------------------------------------------------------ internals

    def _sends_nothing(self, allocation: Allocation) -> bool:
        return all(self.options.get(camera, {}).get(choice) is None or self.options[camera][choice].is_fallback
                   for camera, choice in allocation.choices.items())

    def _add_discovery_request(self, allocation: Allocation, rtt_ms: float) -> None:
        """A planner that allocates nothing learns nothing: when the estimate is stale, one camera
        (in turn) sends a cloud option that beats its on-car result: the smallest at first, the
        next size up after each discovery request that came back in time. It is a real request,
        and its result is published when on time."""
        for _ in range(len(self.cameras)):
            camera = self.cameras[self._discovery_camera % len(self.cameras)]
            self._discovery_camera += 1
            useful = sorted((option.size_mbit, -option.utility, option.name)
                            for option in _useful_options(self.options[camera].values())
                            if math.isfinite(critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, rtt_ms,
                                                                     self.slo_ms)))
            if useful:
                choice = self.options[camera][useful[min(self._discovery_level, len(useful) - 1)][2]]
                allocation.choices[camera] = choice.name
                allocation.bandwidth_mbps[camera] = critical_bandwidth_mbps(choice.size_mbit, choice.runtime_ms,
                                                                            rtt_ms, self.slo_ms)
                allocation.extra["discovery"] = camera
                return

    def _discovery_done(self, succeeded: bool) -> None:
        """A discovery request came back in time (the next one may be larger, at once) or not
        (start again from the smallest)."""
        self._discovery_outstanding = max(0, self._discovery_outstanding - 1)
        self._discovery_succeeded = succeeded
        self._discovery_level = self._discovery_level + 1 if succeeded else 0

    def _answered_discovery_wait_ms(self) -> float:
        """The wait before the next discovery request once the link has answered: a frame
        interval, or longer where the smallest discovery request would hold the uplink, at the
        current estimate, for more than `DISCOVERY_UPLINK_SHARE` of the wait (a thin link answers
        late every time: without this, each late reply would bring the next request at once)."""
        upload_ms = 1000.0 * self._smallest_discovery_mbit / max(self.measurement.bandwidth_mbps(), MIN_ESTIMATE_MBPS)
        return min(self.max_discovery_wait_ms, max(self.stale_after_ms, upload_ms / DISCOVERY_UPLINK_SHARE))

    def _discovery_timed_out(self) -> None:
        """A discovery request reached its cutoff with no reply: start again from the smallest,
        after twice the last wait. As TCP's retransmission timer backs off on a timeout and not on
        a late acknowledgement: a dark link gets fewer and fewer of them, at most one per
        `max_discovery_wait_ms`, and any reply (`on_reply`) sets the wait back to a frame interval.
        Why back off at all: a request sent into a dark link stays queued on it, and when the link
        comes back its bytes delay every request behind them."""
        self._discovery_done(succeeded=False)
        self._discovery_wait_ms = min(self.max_discovery_wait_ms, 2.0 * self._discovery_wait_ms)

    def _round_trip_ms(self, now_ms: float) -> float:
        """What a request spends beyond its upload and its runtime: the network RTT and the cloud's
        recent queueing (onboard/measurement.py)."""
        return self.measurement.rtt_ms + self.measurement.cloud_wait_ms(now_ms)

    def _take_overdue_samples(self, now_ms: float) -> None:
        """A request that timed out at its cutoff tells the link's rate only if its upload had
        not ended by then. A reply still due (within the cloud's runtime and the RTT after the
        cutoff) would show that it had, and measures the link itself; once that time has passed
        without one, the upload had not ended at the cutoff, and its bytes over the time from
        sending to the cutoff are an upper bound of what the link carried (`on_timeout`), taken
        at the first step or plan after that (a car always has the next frame coming). Taking
        that bound at once would count a request that missed only by its cloud run as a slow
        link: on a steady 50 Mbps link, one such sample took TURBO's harmonic mean of five to a
        sixth of the link."""
        for request_id, (timing, timed_out_ms, due_ms) in list(self._overdue.items()):
            if now_ms >= due_ms:
                del self._overdue[request_id]
                self.measurement.on_timeout(timing, now_ms, timed_out_ms)
        while len(self._overdue) > RECENT_REQUESTS:
            del self._overdue[next(iter(self._overdue))]

    def _send_ping(self, now_ms: float) -> None:
        self._ping_now = False
        self._next_ping_ms = now_ms + self.ping_interval_ms
        request_id = self._next_request_id
        self._next_request_id += 1
        if self.link.send(ping_request(self.vehicle, request_id)):
            self._pings[request_id] = now_ms
            while len(self._pings) > PINGS_KEPT:
                self._pings.popitem(last=False)

    def _send_waiting(self, camera: str, now_ms: float) -> None:
        """Send the camera's waiting frame (`step` checks that it has one and `_may_send`)."""
        state = self._cameras[camera]
        request = state.waiting
        state.waiting = None
        task = request.task
        budget_ms = task.cutoff_ms - now_ms
        # Dropped only if it cannot make it even with the whole estimated uplink to itself: the
        # allocation's share is a floor (the critical bandwidth of the profiled size), not a cap.
        # It queues behind the bytes the car has already sent (not a discovery request: it is sent
        # to measure a link the car no longer trusts its view of).
        link_mbps = max(self.measurement.bandwidth_mbps(), request.share_mbps, 1e-6)
        transfer_ms = request.size_bytes * 8 / 1000.0 / link_mbps
        if self.plans_for_uplink and not request.discovery:
            transfer_ms += self.measurement.backlog_ms(now_ms)
        expected_ms = transfer_ms + request.option.runtime_ms + self._round_trip_ms(now_ms)
        if task.published or budget_ms < expected_ms:
            task.cloud_pending = False
            self.counters.dropped_stale += 1
            return
        request_id = self._next_request_id
        self._next_request_id += 1
        encoded = request.encoded
        header = RequestHeader(vehicle=self.vehicle, request_id=request_id, task=camera,
                               frame=task.frame_index, model=encoded.model, codec=encoded.codec,
                               shape=(encoded.shape_hw[0], encoded.shape_hw[1], 3), budget_ms=budget_ms,
                               frame_shape=encoded.frame_shape_hw)
        if not self.link.send(encode_request(header, encoded.payload)):
            task.cloud_pending = False
            self.counters.send_failures += 1
            return
        request.request_id = request_id
        request.send_ms = now_ms
        state.in_flight += 1
        self._in_flight[request_id] = request
        self._recent[request_id] = RequestTiming(request_id, request.size_bytes, now_ms, task.arrival_ms,
                                                 request.option.runtime_ms)
        state.upload_end_ms = self.measurement.on_send(self._recent[request_id])
        self._discovery_outstanding += request.discovery
        while len(self._recent) > RECENT_REQUESTS:
            self._recent.popitem(last=False)
        self.counters.requests_sent += 1

    def _collect_encodings(self, camera: str) -> None:
        state = self._cameras[camera]
        while state.encoding and state.encoding[0][3].done():  # in frame order
            task, option, share_mbps, future = state.encoding.popleft()
            self._queue_request(task, option, share_mbps, future)

    def _start_fallback(self, task: TaskFrame, image_bgr: np.ndarray, full_size_wh: tuple[int, int]) -> None:
        state = self._cameras[task.camera]
        self._collect_fallback(task.camera)
        if state.fallback_running is None:
            self._submit_fallback(state, task, image_bgr, full_size_wh)
            return
        if state.fallback_waiting is not None:
            # One running and one waiting per camera: the displaced frame reuses the latest on-car
            # result, so the node's memory and the fallback's backlog stay bounded.
            displaced = state.fallback_waiting[0]
            self._reuse_onboard(state, displaced)
        state.fallback_waiting = (task, image_bgr, full_size_wh)

    def _reuse_onboard(self, state: _CameraState, task: TaskFrame) -> None:
        task.onboard_detections = state.last_onboard
        task.onboard_config = f"{self.fallback_name}:reused"
        self.counters.fallback_reused += 1

    def _submit_fallback(self, state: _CameraState, task: TaskFrame, image_bgr: np.ndarray,
                         full_size_wh: tuple[int, int]) -> None:
        future = self.executor.submit(self.fallback, image_bgr, full_size_wh)
        state.fallback_running = future
        state.fallback_task = task
        future.add_done_callback(lambda _: self.wake())

    def _collect_fallback(self, camera: str) -> None:
        state = self._cameras[camera]
        future = state.fallback_running
        if future is None or not future.done():
            return
        task = state.fallback_task
        try:
            detections = future.result()
            # Most fallbacks already return float32 [N, 6]: skip the conversion (this runs per image).
            if type(detections) is not np.ndarray or detections.dtype != np.float32 or detections.ndim != 2 \
                    or detections.shape[1] != 6:
                detections = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
            config = self.fallback_name
        except Exception:  # a failing fallback must not stop the node; publish nothing found
            detections = empty_detections()
            config = f"{self.fallback_name}:failed"
        state.last_onboard = detections
        if task is not None:
            task.onboard_detections = detections
            task.onboard_config = config
        state.fallback_running = None
        state.fallback_task = None
        if state.fallback_waiting is not None:
            waiting_task, image_bgr, full_size_wh = state.fallback_waiting
            state.fallback_waiting = None
            if waiting_task.published:
                self._reuse_onboard(state, waiting_task)  # the cloud answered: skip the work
            else:
                self._submit_fallback(state, waiting_task, image_bgr, full_size_wh)

    def _publish_ready(self, now_ms: float) -> None:
        still_pending = []
        for task in self._pending:
            result = decide(task, now_ms)
            if result is None:
                still_pending.append(task)
                continue
            task.published = True
            self.counters.published += 1
            if result.source == "cloud":
                self.counters.published_cloud += 1
            else:
                self.counters.published_onboard += 1
            if not result.deadline_met:
                self.counters.deadline_missed += 1
            self.publish(result)
        self._pending = still_pending
