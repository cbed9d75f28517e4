"""The onboard agent's per-frame logic, driven with fakes and a simulated clock (no sockets)."""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future

import numpy as np
import pytest

from avcloud.clock import SimulatedClock
from avcloud.protocol import OK, PING, ReplyHeader, ServerTimings, decode_request, encode_reply, reply_to
from avcloud.types import Allocation, Option, Service
from onboard.daemon import EncodedFrame, OnboardAgent
from onboard.measurement import LinkMeasurement

SLO_MS = 100.0
FALLBACK = Option("onboard", 0.0, 0.0, 0.3)
CLOUD = Option("cloud-m-imgcompNone-inpcomp75", 0.4, 30.0, 0.6)
CAMERAS = ("FRONT", "SIDE_LEFT")


class ConstantEstimator:
    def __init__(self, mbps: float) -> None:
        self.mbps = mbps
        self.observed: list[tuple[float, float]] = []

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self.observed.append((time_ms, throughput_mbps))

    def estimate_mbps(self) -> float:
        return self.mbps


class FixedPlanner:
    """Sends the cameras in `cloud_cameras` to CLOUD, the rest stay on board."""

    def __init__(self, cloud_cameras: tuple[str, ...]) -> None:
        self.cloud_cameras = cloud_cameras
        self.calls: list[float] = []
        self.slos_ms: list[float] = []
        self.rtts_ms: list[float] = []

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps):
        self.calls.append(bandwidth_mbps)
        self.slos_ms.append(slo_ms)
        self.rtts_ms.append(rtt_ms)
        choices = {camera: CLOUD.name if camera in self.cloud_cameras else FALLBACK.name for camera in CAMERAS}
        bandwidth = {camera: (10.0 if camera in self.cloud_cameras else 0.0) for camera in CAMERAS}
        return Allocation(choices, 0.0, bandwidth)


class ManualExecutor(Executor):
    """Runs submitted work only when the test says so (the fallback 'takes time')."""

    def __init__(self, run_at_once: bool = True) -> None:
        self.run_at_once = run_at_once
        self.queued: list[tuple[Future, object, tuple]] = []

    def submit(self, fn, *args, **kwargs):
        future: Future = Future()
        if self.run_at_once:
            future.set_result(fn(*args))
        else:
            self.queued.append((future, fn, args))
        return future

    def finish_all(self) -> None:
        queued, self.queued = self.queued, []
        for future, fn, args in queued:
            if not future.cancelled():
                future.set_result(fn(*args))


class FakeLink:
    """Keeps inference requests in `sent` and the agent's RTT pings in `pings`."""

    def __init__(self) -> None:
        self.sent: list[list] = []
        self.pings: list[list] = []
        self.accept = True
        self.resets = 0

    def send(self, frames) -> bool:
        if self.accept:
            header, _ = decode_request(frames)
            (self.pings if header.kind == PING else self.sent).append(frames)
        return self.accept

    def reset(self) -> None:
        self.resets += 1


def fallback_detections(image: np.ndarray, full_size_wh: tuple[int, int]) -> np.ndarray:
    return np.array([[0, 0, 5, 5, 0.5, 1]], dtype=np.float32)


def encode(image: np.ndarray, configuration: str, full_size_wh: tuple[int, int]) -> EncodedFrame:
    return EncodedFrame("cloud-m", "jpeg", b"j" * 5000, (64, 64), image.shape[:2])


def make_agent(cloud_cameras=("FRONT",), run_fallback_at_once=True, estimator_mbps=10.0, guard_ms=0.0,
               encode_executor=None, plans_for_uplink=False):
    clock = SimulatedClock(1000.0)
    published = []
    link = FakeLink()
    executor = ManualExecutor(run_fallback_at_once)
    services = tuple(Service(camera, (FALLBACK, CLOUD)) for camera in CAMERAS)
    agent = OnboardAgent(
        services=services, slo_ms=SLO_MS, clock=clock, planner=FixedPlanner(cloud_cameras),
        measurement=LinkMeasurement(ConstantEstimator(estimator_mbps), initial_rtt_ms=10.0),
        fallback=fallback_detections, fallback_name=FALLBACK.name, executor=executor, encoder=encode,
        link=link, publish=published.append, reconnect_after_timeouts=2, min_reconnect_interval_ms=0.0,
        publish_guard_ms=guard_ms, encode_executor=encode_executor, plans_for_uplink=plans_for_uplink,
    )
    return agent, clock, link, executor, published


def reply_for(frames, detections=None, server_ms=30.0, status=OK):
    header, _ = decode_request(frames)
    reply = ReplyHeader(status=status, request_id=header.request_id, vehicle=header.vehicle, task=header.task,
                        frame=header.frame, model=header.model, timings=ServerTimings(total_ms=server_ms))
    if detections is None:
        detections = np.array([[1, 1, 9, 9, 0.9, 2]], dtype=np.float32)
    return encode_reply(reply, detections if status == OK else None)


IMAGE = np.zeros((48, 64, 3), dtype=np.uint8)


def test_cloud_result_in_time_is_published_once_with_its_latency():
    agent, clock, link, _, published = make_agent()
    agent.on_camera_frame(0, "FRONT", IMAGE)
    agent.on_camera_frame(0, "SIDE_LEFT", IMAGE)
    # SIDE_LEFT is not sent: its on-car result is final at once.
    assert [(r.camera, r.source) for r in published] == [("SIDE_LEFT", "onboard")]
    assert len(link.sent) == 1
    header, payload = decode_request(link.sent[0])
    assert (header.task, header.frame, header.model, header.codec) == ("FRONT", 0, "cloud-m", "jpeg")
    assert header.budget_ms == pytest.approx(SLO_MS)
    assert header.frame_shape == (48, 64)
    clock.advance_to(1060.0)
    agent.on_reply(reply_for(link.sent[0]))
    front = [r for r in published if r.camera == "FRONT"]
    assert len(front) == 1 and front[0].source == "cloud" and front[0].deadline_met
    assert front[0].latency_ms == pytest.approx(60.0)
    assert front[0].config == CLOUD.name
    np.testing.assert_array_equal(front[0].detections, np.array([[1, 1, 9, 9, 0.9, 2]], dtype=np.float32))
    clock.advance_to(1200.0)
    agent.step()
    assert len(published) == 2  # nothing more: exactly one result per camera per frame


def test_late_cloud_reply_falls_back_at_the_deadline_and_is_discarded():
    agent, clock, link, _, published = make_agent(cloud_cameras=("FRONT", "SIDE_LEFT"))
    events = []
    agent.log_event, agent.log_replies = (lambda event, **fields: events.append((event, fields))), True
    agent.on_camera_frame(0, "FRONT", IMAGE)
    assert published == []  # the cloud may still answer: wait
    assert agent.next_wakeup_ms() == pytest.approx(1100.0)
    clock.advance_to(1100.0)
    agent.step()
    assert [(r.source, r.deadline_met) for r in published] == [("onboard", True)]
    assert published[0].latency_ms == pytest.approx(SLO_MS)
    assert list(agent.measurement.samples_mbps) == []  # its reply may still come: see below
    clock.advance_to(1150.0)
    agent.on_reply(reply_for(link.sent[0], server_ms=30.0))
    assert len(published) == 1
    # The late reply measures the link: 5000 bytes left in 150 - 30 (server) - 10 (RTT) ms.
    assert list(agent.measurement.samples_mbps) == [pytest.approx(5000 * 8 / 1000.0 / 110.0)]
    assert agent.counters.replies_discarded == 1
    assert agent.counters.timeouts == 1
    (event, fields), = events
    assert event == "reply" and fields["in_time"] is False and fields["task"] == "FRONT"
    assert fields["round_trip_ms"] == pytest.approx(150.0) and fields["server_ms"] == pytest.approx(30.0)
    assert fields["sent_after_capture_ms"] == pytest.approx(0.0) and fields["size_bytes"] == 5000


def test_a_timeout_bounds_the_link_only_once_no_reply_can_show_the_upload_had_ended():
    agent, clock, link, _, published = make_agent()
    agent.on_camera_frame(0, "FRONT", IMAGE)  # sent at 1000 ms; cutoff 1100; runtime 30, RTT 10
    clock.advance_to(1100.0)
    agent.step()
    assert agent.counters.timeouts == 1 and list(agent.measurement.samples_mbps) == []
    clock.advance_to(1139.0)  # a reply now would still mean the upload ended by the cutoff
    agent.step()
    assert list(agent.measurement.samples_mbps) == []
    clock.advance_to(1140.0)  # none came: the upload had not ended; 5000 bytes in over 100 ms
    agent.step()
    assert list(agent.measurement.samples_mbps) == [pytest.approx(5000 * 8 / 1000.0 / 100.0)]
    assert agent.measurement.last_sample_ms == 1140.0


def test_a_reply_just_after_the_timeout_measures_the_link_instead_of_the_timeout():
    agent, clock, link, _, published = make_agent(cloud_cameras=("FRONT", "SIDE_LEFT"))
    agent.on_camera_frame(0, "FRONT", IMAGE)
    clock.advance_to(1100.0)
    agent.step()  # timed out: the frame falls back
    clock.advance_to(1105.0)  # the cloud's run made it late, not the link: upload ended at 1065
    agent.on_reply(reply_for(link.sent[0], server_ms=30.0))
    clock.advance_to(1200.0)
    agent.on_camera_frame(1, "FRONT", IMAGE)  # planning takes any upper bound that is due
    agent.step()
    assert agent.counters.replies_discarded == 1
    assert list(agent.measurement.samples_mbps) == [pytest.approx(5000 * 8 / 1000.0 / 65.0)]
    assert agent.planner.calls[-1] == pytest.approx(10.0)  # the constant estimator: planned as usual


def test_a_busy_cloud_is_planned_for_as_part_of_the_round_trip_until_its_replies_are_old():
    agent, clock, link, _, published = make_agent()
    agent.on_camera_frame(0, "FRONT", IMAGE)
    assert agent.planner.rtts_ms == [10.0]  # the RTT prior; CLOUD's profiled runtime is 30 ms
    clock.advance_to(1095.0)
    agent.on_reply(reply_for(link.sent[0], server_ms=80.4))  # 50.4 ms queued behind other cars' work
    assert published[-1].source == "cloud"
    clock.advance_to(1100.0)
    agent.on_camera_frame(1, "FRONT", IMAGE)
    assert agent.planner.rtts_ms[-1] == pytest.approx(10.0 + 50.0)  # in whole ms
    assert agent.status()["cloud_wait_ms"] == 50.0  # on the node's heartbeat
    clock.advance_to(3200.0)  # no reply for over 2 s: the wait is forgotten, the car tries again
    agent.step()
    agent.on_camera_frame(21, "FRONT", IMAGE)
    assert agent.planner.rtts_ms[-1] == pytest.approx(10.0)


def test_slow_fallback_is_published_when_it_finishes_with_honest_latency():
    agent, clock, link, executor, published = make_agent(cloud_cameras=(), run_fallback_at_once=False)
    agent.on_camera_frame(0, "FRONT", IMAGE)
    clock.advance_to(1100.0)
    agent.step()
    assert published == []  # nothing to publish yet: the on-car model is still running
    clock.advance_to(1130.0)
    executor.finish_all()
    agent.step()
    assert len(published) == 1
    assert published[0].source == "onboard" and not published[0].deadline_met
    assert published[0].latency_ms == pytest.approx(130.0)


def test_freshest_first_one_in_flight_one_waiting_per_camera():
    agent, clock, link, _, published = make_agent()
    for frame_index in range(3):
        clock.advance_to(1000.0 + 10 * frame_index)
        agent.on_camera_frame(frame_index, "FRONT", IMAGE)
    # Frame 0 is in flight, frame 1 was replaced by frame 2 while waiting.
    assert len(link.sent) == 1
    assert agent.counters.dropped_replaced == 1
    assert [(r.frame_index, r.source) for r in published if r.camera == "FRONT"] == [(1, "onboard")]
    clock.advance_to(1040.0)
    agent.on_reply(reply_for(link.sent[0]))
    assert len(link.sent) == 2  # the waiting frame 2 goes as soon as the slot frees
    header, _ = decode_request(link.sent[1])
    assert header.frame == 2
    assert header.budget_ms == pytest.approx(1020.0 + SLO_MS - 1040.0)


def test_frames_that_can_no_longer_make_it_are_dropped_before_sending():
    agent, clock, link, _, published = make_agent()
    agent.on_camera_frame(0, "FRONT", IMAGE)
    clock.advance_to(1005.0)
    agent.on_camera_frame(1, "FRONT", IMAGE)  # waits behind frame 0
    clock.advance_to(1070.0)  # frame 1 has 35 ms left: less than runtime 30 + RTT 10 + transfer
    agent.on_reply(reply_for(link.sent[0]))
    assert len(link.sent) == 1
    assert agent.counters.dropped_stale == 1
    assert [(r.frame_index, r.source) for r in published if r.camera == "FRONT"] == [(0, "cloud"), (1, "onboard")]


@pytest.mark.parametrize("plans_for_uplink", [True, False])
def test_the_drop_before_send_check_counts_the_bytes_queued_ahead(plans_for_uplink):
    # The car believes its uplink carries 0.5 Mbps: FRONT's 5 kB request holds it for about 80 ms.
    # SIDE_LEFT's own transfer (at its 10 Mbps share), runtime and RTT fit its 100 ms, but not
    # behind those 80 ms: an agent that plans for its uplink drops it instead of sending it late.
    agent, clock, link, _, published = make_agent(cloud_cameras=CAMERAS, estimator_mbps=0.5,
                                                  plans_for_uplink=plans_for_uplink)
    agent.on_camera_frame(0, "FRONT", IMAGE)
    agent.on_camera_frame(0, "SIDE_LEFT", IMAGE)
    assert [decode_request(frames)[0].task for frames in link.sent] == (["FRONT"] if plans_for_uplink
                                                                         else ["FRONT", "SIDE_LEFT"])
    assert agent.counters.dropped_stale == (1 if plans_for_uplink else 0)


def test_unreachable_cloud_keeps_publishing_and_resets_the_socket():
    agent, clock, link, _, published = make_agent(cloud_cameras=("FRONT", "SIDE_LEFT"))
    link.accept = False  # ZMQ_IMMEDIATE with no peer: sends fail at once
    agent.on_camera_frame(0, "FRONT", IMAGE)
    agent.on_camera_frame(0, "SIDE_LEFT", IMAGE)
    assert [r.source for r in published] == ["onboard", "onboard"]
    assert published[0].latency_ms == 0.0
    link.accept = True  # connected but nothing comes back: requests time out
    for frame_index in range(1, 4):
        clock.advance_to(1000.0 + 100 * frame_index)
        agent.step()
        agent.on_camera_frame(frame_index, "FRONT", IMAGE)
        agent.on_camera_frame(frame_index, "SIDE_LEFT", IMAGE)
    clock.advance_to(1400.0)
    agent.step()
    assert agent.counters.published == 8
    assert agent.counters.timeouts >= 2
    assert link.resets >= 1
    assert agent.pending_frames == 0


def test_rtt_comes_from_pings_and_bandwidth_from_reply_timing():
    agent, clock, link, _, _ = make_agent(estimator_mbps=2.0)
    estimator = agent.measurement.estimator
    agent.on_camera_frame(0, "FRONT", IMAGE)
    assert len(link.pings) == 1 and agent.measurement.rtt_ms == pytest.approx(10.0)  # the prior until a pong
    ping_header, _ = decode_request(link.pings[0])
    clock.advance_to(1012.0)
    agent.on_reply(encode_reply(reply_to(ping_header, OK, timings=ServerTimings(total_ms=0.5))))
    assert agent.measurement.rtt_ms == pytest.approx(11.5)
    clock.advance_to(1061.5)
    agent.on_reply(reply_for(link.sent[0], server_ms=30.0))
    # Transfer = 61.5 - 30 (server) - 11.5 (RTT) = 20 ms for 5000 bytes -> 2 Mbps.
    assert estimator.observed[-1] == (1061.5, pytest.approx(2.0))
    agent.on_camera_frame(1, "FRONT", IMAGE)
    assert agent.planner.calls[-1] == pytest.approx(2.0)
    assert math.isfinite(agent.next_wakeup_ms())


def test_a_reply_that_finds_the_uplink_idle_sends_the_due_ping_though_a_request_is_still_in_flight():
    agent, clock, link, _, _ = make_agent(cloud_cameras=("FRONT", "SIDE_LEFT"), estimator_mbps=1.0)
    agent.step()  # the first ping, at 1000 ms: the next is due at 2000
    assert len(link.pings) == 1
    clock.advance_to(1950.0)
    agent.on_camera_frame(9, "FRONT", IMAGE)
    agent.on_camera_frame(9, "SIDE_LEFT", IMAGE)  # 5000 bytes each at 1 Mbps: queued until 1990, 2030
    front, side = link.sent
    clock.advance_to(2020.0)
    agent.step()
    assert len(link.pings) == 1  # due, but the car's bytes are on the uplink and requests in flight
    clock.advance_to(2045.0)
    agent.on_reply(reply_for(side, server_ms=5.0))  # SIDE_LEFT's upload ended at 2030: FRONT's before it
    assert agent.measurement.backlog_ms(2045.0) == 0.0 and len(agent._in_flight) == 1  # FRONT's cloud run
    assert len(link.pings) == 2  # the path alone: nothing of the car's queued ahead of it
    clock.advance_to(2060.0)
    agent.on_reply(reply_for(front, server_ms=5.0))
    assert len(link.pings) == 2  # one ping per interval


def _frames_with_no_reply(agent, clock, frame_indices) -> None:
    for frame_index in frame_indices:  # 10 Hz; the test decides what the cloud answers
        clock.advance_to(1000.0 + 100 * frame_index)
        agent.step()
        agent.on_camera_frame(frame_index, "FRONT", IMAGE)
        agent.on_camera_frame(frame_index, "SIDE_LEFT", IMAGE)


def _frames_until_one_is_sent(agent, clock, link, first_frame: int) -> int:
    """Frames from `first_frame` until the agent sends a request; the frame it was sent at."""
    sent_before = len(link.sent)
    frame_index = first_frame
    while len(link.sent) == sent_before:
        _frames_with_no_reply(agent, clock, [frame_index])
        frame_index += 1
    return frame_index - 1


def test_discovery_requests_that_time_out_unanswered_back_off_to_one_a_second_and_one_in_time_resets_the_wait():
    agent, clock, link, _, _ = make_agent(cloud_cameras=(), estimator_mbps=0.1, plans_for_uplink=True)
    _frames_with_no_reply(agent, clock, range(30))  # 3 s, no reply ever arrives
    discoveries = [decode_request(frames)[0] for frames in link.sent]
    # One at the start; after each timeout the wait before the next doubles (100 ms, 200, 400,
    # ...), up to a second: the gaps grow, and never exceed the cap by more than the timeout's wait.
    frames = [header.frame for header in discoveries]
    gaps = [later - earlier for earlier, later in zip(frames, frames[1:], strict=False)]
    assert frames[0] == 0 and 3 <= len(frames) <= 6, frames
    assert gaps == sorted(gaps) and gaps[0] >= 2 and gaps[-1] >= 10, frames
    assert max(gaps) <= 10 + 2, frames
    assert {header.task for header in discoveries} == {"FRONT", "SIDE_LEFT"}  # cameras take turns
    assert all(header.model == "cloud-m" for header in discoveries)
    # The link answers the next one in time: the wait is a frame interval again, so once its
    # estimate is stale the car sends the next discovery request at the following frame.
    answered_at_frame = _frames_until_one_is_sent(agent, clock, link, 30)
    sent_before = len(link.sent) - 1
    clock.advance_to(clock.now_ms() + 40.0)
    agent.on_reply(reply_for(link.sent[-1], server_ms=10.0))
    _frames_with_no_reply(agent, clock, range(answered_at_frame + 1, answered_at_frame + 4))
    later = [decode_request(frames)[0].frame for frames in link.sent[sent_before + 1:]]
    assert later and later[0] == answered_at_frame + 1, (answered_at_frame, later)


@pytest.mark.parametrize(("estimate_mbps", "wait_frames"), [(16.0, 1), (2.0, 8)])
def test_a_late_reply_shows_the_link_is_alive_and_sets_the_discovery_wait_back(estimate_mbps, wait_frames):
    agent, clock, link, _, _ = make_agent(cloud_cameras=(), estimator_mbps=0.1, plans_for_uplink=True)
    _frames_with_no_reply(agent, clock, range(30))  # backed off to a second
    # The reply to the last discovery request comes after its cutoff: too late to publish, but
    # the link carries bytes (slow, not dark), so the wait is no longer backed off. It is a frame
    # interval where the next discovery request (0.4 Mbit) takes the uplink a quarter of that or
    # less at the estimate (16 Mbps: 25 ms), else four times its upload (2 Mbps: 200 ms -> 800 ms).
    late = link.sent[-1]
    sent_at_frame = decode_request(late)[0].frame
    last_frame = sent_at_frame + 3  # past its cutoff; the backed-off wait has 7 frames to go
    _frames_with_no_reply(agent, clock, range(30, last_frame + 1))
    assert agent.counters.timeouts == len(link.sent)  # every one timed out, this one too
    agent.measurement.estimator.mbps = estimate_mbps
    clock.advance_to(1000.0 + 100 * last_frame + 50.0)
    agent.on_reply(reply_for(late, server_ms=10.0))
    assert agent.counters.replies_discarded == 1
    # The late reply is also a sample: the estimate is stale again at the second frame after it.
    next_at_frame = _frames_until_one_is_sent(agent, clock, link, last_frame + 1)
    assert next_at_frame == max(last_frame + 2, sent_at_frame + wait_frames + 1), (sent_at_frame, next_at_frame)


def test_publish_guard_gets_the_fallback_out_before_the_deadline():
    agent, clock, link, _, published = make_agent(guard_ms=5.0)
    agent.on_camera_frame(0, "FRONT", IMAGE)
    # A cloud result counts until the cutoff, not the deadline: the frame is planned for that.
    assert agent.planner.slos_ms == [pytest.approx(SLO_MS - 5.0)]
    assert agent.next_wakeup_ms() == pytest.approx(1095.0)
    clock.advance_to(1095.0)
    agent.step()
    assert [(r.source, r.latency_ms, r.deadline_met) for r in published] == [("onboard", 95.0, True)]
    clock.advance_to(1097.0)  # before the deadline but after the cutoff: too late to be used
    agent.on_reply(reply_for(link.sent[0]))
    assert len(published) == 1 and agent.counters.replies_discarded == 1


def test_parallel_compression_sends_when_ready_in_frame_order_and_stays_bounded():
    encoder = ManualExecutor(run_at_once=False)
    agent, clock, link, _, published = make_agent(encode_executor=encoder)
    agent.on_camera_frame(0, "FRONT", IMAGE)
    assert link.sent == [] and published == []  # compressing: nothing to send yet, cloud still pending
    encoder.finish_all()
    agent.step()
    assert [decode_request(frames)[0].frame for frames in link.sent] == [0]
    clock.advance_to(1005.0)
    agent.on_reply(reply_for(link.sent[0]))
    # Three frames while compression lags: at most two compress at once per camera, and the
    # oldest job not yet started is cancelled for the newest frame (freshest first).
    for frame_index in (1, 2, 3):
        clock.advance_to(1000.0 + 10 * frame_index)
        agent.on_camera_frame(frame_index, "FRONT", IMAGE)
    assert [future.cancelled() for future, _, _ in encoder.queued] == [True, False, False]
    assert [(r.frame_index, r.source) for r in published] == [(0, "cloud"), (1, "onboard")]
    encoder.finish_all()
    agent.step()
    # Both finished before the agent looked: frame 3 replaced frame 2 in the waiting slot.
    assert [decode_request(frames)[0].frame for frames in link.sent] == [0, 3]
    assert [(r.frame_index, r.source) for r in published][-1] == (2, "onboard")


def test_capture_stamp_starts_the_budget_unless_it_comes_from_another_clock():
    agent, clock, link, _, published = make_agent(cloud_cameras=())
    agent.on_camera_frame(0, "FRONT", IMAGE, capture_ms=960.0)  # stamped 40 ms before it arrived
    assert published[-1].latency_ms == pytest.approx(40.0)
    agent.on_camera_frame(1, "FRONT", IMAGE, capture_ms=850.0)  # already past its deadline
    assert (published[-1].config, published[-1].deadline_met) == ("onboard:reused", False)
    agent.on_camera_frame(2, "FRONT", IMAGE, capture_ms=-1e9)  # another host's clock: ignored
    assert published[-1].latency_ms == 0.0 and agent.counters.capture_clock_ignored == 1


class ThinSharePlanner(FixedPlanner):
    """Sends FRONT to the cloud but grants it far too little bandwidth for its frame."""

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps):
        allocation = super().plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        allocation.bandwidth_mbps["FRONT"] = 0.05
        return allocation


def test_a_plan_on_a_stale_estimate_still_sends_one_request_to_measure_the_link():
    # The drop-before-send check, judging by a 0.05 Mbps share and a 0.1 Mbps estimate, would drop
    # every frame, and a car that never sends never measures: one request per stale interval goes,
    # and, as a discovery request, each one that times out unanswered doubles the wait before the next.
    agent, clock, link, _, _ = make_agent(estimator_mbps=0.1, plans_for_uplink=True)
    agent.planner = ThinSharePlanner(("FRONT",))
    for frame_index in range(25):
        clock.advance_to(1000.0 + 100 * frame_index)
        agent.step()
        agent.on_camera_frame(frame_index, "FRONT", IMAGE)
    sent_frames = [decode_request(frames)[0].frame for frames in link.sent]
    gaps = [later - earlier for earlier, later in zip(sent_frames, sent_frames[1:], strict=False)]
    assert sent_frames and sent_frames[0] == 0 and len(sent_frames) >= 3, sent_frames
    assert gaps == sorted(gaps) and gaps[0] >= 2 and max(gaps) <= 10 + 2, sent_frames
    assert agent.counters.dropped_stale >= 18  # the rest were judged by the estimate, as before
