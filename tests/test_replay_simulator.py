"""The replay's simulated world around the shipped agent, on hand-computable cases.

A 12 Mbps constant trace is one 1500-byte packet per ms. Requests are real wire messages, so a
transfer is the payload plus its JSON header; the tests read the wire size from the transfer.
Pings are switched off (the RTT is then the prior, the scenario's) except where they are tested.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from avcloud.link import PACKET_BYTES, DeliverySchedule
from avcloud.replay.simulator import (
    FALLBACK_INDEX,
    ReplayScenario,
    RequestOutcome,
    simulate_policy,
)
from avcloud.types import Allocation, Option, Service
from optimizer.policies import get_policy

FALLBACK = Option("car-imgcompNone-inpcompNone", 0.0, 0.0, 0.3)
CLOUD = Option("big-imgcomp75-inpcompNone", 0.12, 20.0, 0.6)
ONE_PACKET_PER_MS = DeliverySchedule(np.array([1]))  # 12 Mbps
TURBO_WITHOUT_PINGS = get_policy("turbo", {"ping_interval_ms": math.inf})


def make_scenario(sizes_bytes, *, cameras=("FRONT",), rtt_ms=40.0, slo_ms=200.0, runtime_ms=20.0,
                  encode_ms=0.0, interval_ms=100.0) -> ReplayScenario:
    """sizes_bytes[f][c]: encoded size of frame f, camera c, for the one cloud configuration."""
    sizes = np.asarray(sizes_bytes, dtype=np.int64).reshape(len(sizes_bytes), len(cameras), 1)
    frames = sizes.shape[0]
    cloud = Option(CLOUD.name, CLOUD.size_mbit, runtime_ms, CLOUD.utility)
    return ReplayScenario(
        cameras=tuple(cameras), frame_indices=np.arange(frames), capture_ms=np.arange(frames) * interval_ms,
        services=tuple(Service(camera, (FALLBACK, cloud)) for camera in cameras), config_names=(CLOUD.name,),
        size_bytes=sizes, runtime_ms=np.array([runtime_ms]), encode_ms=np.array([encode_ms]),
        fallback_config=FALLBACK.name, rtt_ms=rtt_ms, slo_ms=slo_ms,
    )


def detections(frame: int, camera: int, config: str) -> np.ndarray:
    """A detection whose score says where it came from: 0.6 cloud, 0.3 car."""
    score = CLOUD.utility if config == CLOUD.name else FALLBACK.utility
    return np.array([[0, 0, 10, 10, score, 1]], dtype=np.float32)


class ScriptedPlanner:
    """Sends the cloud option on `cameras` every frame, telling the agent it has `share_mbps` each."""

    def __init__(self, cameras=("FRONT",), share_mbps: float = 12.0, share_by_call: dict[int, float] | None = None):
        self.cameras = cameras
        self.share_mbps = share_mbps
        self.share_by_call = share_by_call or {}
        self.calls = 0

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps) -> Allocation:
        share = self.share_by_call.get(self.calls, self.share_mbps)
        self.calls += 1
        names = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT")
        choices = {name: CLOUD.name if name in self.cameras else FALLBACK.name for name in names}
        return Allocation(choices, 0.0, {name: share if name in self.cameras else 0.0 for name in names})


def simulate(scenario, planner=None, schedule=ONE_PACKET_PER_MS, policy=TURBO_WITHOUT_PINGS, **kwargs):
    return simulate_policy(policy, scenario, schedule, detections, planner=planner or ScriptedPlanner(), **kwargs)


def packets(size_bytes: int) -> int:
    return math.ceil(size_bytes / PACKET_BYTES)


def delivered_at(enqueue_ms: float, size_bytes: int) -> float:
    """On the 1-packet-per-ms trace: opportunities at every whole ms from 1 on."""
    return max(enqueue_ms, 1.0) + packets(size_bytes) - 1


def test_result_time_is_the_trace_delivery_plus_rtt_and_runtime():
    run = simulate(make_scenario([[15000]], rtt_ms=40.0, runtime_ms=20.0))
    ((enqueue_ms, delivered_ms, size),) = run.transfers
    assert size > 15000  # the payload and its header
    assert (enqueue_ms, delivered_ms) == (0.0, delivered_at(0.0, size))
    assert run.result_ms[0, 0] == pytest.approx(delivered_ms + 20.0 + 20.0 + 20.0)
    assert run.outcome[0, 0] == RequestOutcome.ON_TIME and run.served_config()[0, 0] == 0
    assert run.published[0][0][0, 4] == pytest.approx(CLOUD.utility)


def test_encode_time_delays_the_send():
    run = simulate(make_scenario([[15000]], encode_ms=5.0))
    ((enqueue_ms, delivered_ms, size),) = run.transfers
    assert (enqueue_ms, delivered_ms) == (5.0, delivered_at(5.0, size))


def test_a_result_after_the_cutoff_leaves_the_car_result_published():
    # About 150 packets: delivered at ~151 ms; + 40 ms RTT + 20 ms runtime > the 197 ms cutoff. The
    # planner overstates the uplink (24 Mbps), so the agent sends.
    run = simulate(make_scenario([[225000]], rtt_ms=40.0, runtime_ms=20.0, slo_ms=200.0),
                   ScriptedPlanner(share_mbps=24.0))
    assert run.result_ms[0, 0] > 197.0
    assert run.outcome[0, 0] == RequestOutcome.LATE and run.served_config()[0, 0] == FALLBACK_INDEX
    assert run.published[0][0][0, 4] == pytest.approx(FALLBACK.utility)
    assert run.counters["timeouts"] == 1


def test_cameras_share_one_fifo_uplink():
    # The car knows its uplink's 12 Mbps (at its 1 Mbps start value, the first request's bytes would
    # hold the uplink past the second one's cutoff, and the agent would drop it before sending).
    run = simulate(make_scenario([[15000, 30000]], cameras=("FRONT", "SIDE_LEFT")),
                   ScriptedPlanner(("FRONT", "SIDE_LEFT")),
                   policy=TURBO_WITHOUT_PINGS.with_overrides({"initial_estimate_mbps": 12.0}))
    (first, second) = sorted(run.transfers, key=lambda transfer: transfer[1])
    assert first[1] == delivered_at(0.0, first[2]) and second[1] == first[1] + packets(second[2])
    assert run.sent_bytes == first[2] + second[2]


def test_one_in_flight_per_camera_and_a_newer_frame_replaces_the_waiting_one():
    # Each frame takes ~250 ms on the uplink; frames every 100 ms; a generous SLO.
    run = simulate(make_scenario([[375000]] * 4, slo_ms=2000.0))
    # Frame 0 is sent at 0 and its reply is back at ~250 + 40 + 20. Frames 1 and 2 wait in turn and
    # are replaced; frame 3 goes when the reply frees the camera's slot.
    assert len(run.transfers) == 2
    assert run.transfers[1][0] == pytest.approx(run.result_ms[0, 0])
    assert list(run.outcome[:, 0]) == [RequestOutcome.ON_TIME, RequestOutcome.NOT_SENT,
                                      RequestOutcome.NOT_SENT, RequestOutcome.ON_TIME]
    assert run.counters["dropped_replaced"] == 2


def test_a_frame_is_not_sent_when_its_budget_cannot_cover_the_upload():
    # Frame 0 is sent on an overstated share (24 Mbps) and holds the slot until its cutoff, 197 ms,
    # which teaches the agent an upper bound of 15 Mbps. Frame 1 is granted 0.5 Mbps: at 197 ms,
    # 100 ms left, 300 kB take 160 ms even at 15 Mbps: dropped before sending.
    scenario = make_scenario([[375000], [300000]], slo_ms=200.0)
    run = simulate(scenario, ScriptedPlanner(share_mbps=0.5, share_by_call={0: 24.0}))
    assert run.outcome[1, 0] == RequestOutcome.NOT_SENT and len(run.transfers) == 1
    assert run.counters["dropped_stale"] == 1


def test_a_timed_out_request_whose_reply_still_comes_is_measured_by_the_reply():
    # 375 kB at 12 Mbps: the upload ends at ~250 ms, after the 197 ms cutoff, and the frame falls
    # back then. Its upper bound falls due at the cutoff + runtime + RTT, 257 ms; the agent takes it
    # at its next step, and the reply, at ~310 ms, comes first: it measures the link itself.
    run = simulate(make_scenario([[375000]], slo_ms=200.0), ScriptedPlanner(share_mbps=24.0))
    assert run.counters["timeouts"] == 1
    reply, = run.samples
    assert reply.observed_ms == pytest.approx(run.result_ms[0, 0])
    assert reply.throughput_mbps == pytest.approx(12.0, rel=0.01)


def test_throughput_samples_measure_each_transfer_from_reply_timing():
    run = simulate(make_scenario([[45000, 60000]], cameras=("FRONT", "SIDE_LEFT")),
                   ScriptedPlanner(("FRONT", "SIDE_LEFT")),
                   policy=TURBO_WITHOUT_PINGS.with_overrides({"initial_estimate_mbps": 12.0}))
    # Payload bits over the link time of the payload and its header: within a packet of 12 Mbps.
    assert [sample.throughput_mbps for sample in run.samples] == pytest.approx([12.0, 12.0], rel=0.05)


def test_short_transfers_are_app_limited_and_only_raise_the_estimate_by_slow_start():
    # 15 kB at 12 Mbps take 11 ms: too short to measure the link. The estimate (1 Mbps to start)
    # may only double per round trip (here each request goes out after the last reply: per
    # sample), and never falls because of one.
    run = simulate(make_scenario([[15000]] * 8, slo_ms=200.0))
    samples = [sample.throughput_mbps for sample in run.samples]
    assert len(samples) == 8 and samples[0] == pytest.approx(2.0)
    assert all(later > earlier for earlier, later in zip(samples, samples[1:], strict=False))  # it grows...
    assert max(samples) <= 12.5  # ...but never past what the link showed


def test_pings_measure_the_rtt_and_share_the_uplink():
    run = simulate(make_scenario([[1500]] * 25, rtt_ms=40.0), policy=get_policy("turbo", {"ping_interval_ms": 500.0}))
    assert run.counters["requests_sent"] == 25
    # A ping is one small packet: its sample is the RTT plus at most a few ms of queueing.
    assert 40.0 <= np.nanmin(run.rtt_estimate_ms[10:]) <= 43.0
    assert sum(size for _, _, size in run.transfers) == run.sent_bytes  # pings are uplink bytes too
    assert 25 + 5 <= len(run.transfers) <= 25 + 6  # one ping every 500 ms over the 2.5-2.7 s run
    assert all(size < 200 for _, _, size in run.transfers[:1])  # the first message out is a ping


def test_a_single_cloud_worker_queues_requests_earliest_deadline_first():
    # Three cameras' small frames reach the cloud at ~21-23 ms; each takes 60 ms.
    cameras = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT")
    scenario = make_scenario([[1000, 1000, 1000]], cameras=cameras, rtt_ms=40.0, runtime_ms=60.0, slo_ms=200.0)
    pool = simulate(scenario, ScriptedPlanner(cameras))
    assert list(pool.outcome[0]) == [RequestOutcome.ON_TIME] * 3
    assert sorted(pool.result_ms[0]) == pytest.approx([1 + 20 + 60 + 20, 2 + 20 + 60 + 20, 3 + 20 + 60 + 20])
    single = simulate(scenario, ScriptedPlanner(cameras), cloud_workers=1)
    # The first runs at once (back at ~102). When the worker frees at ~82 the scheduler batches the
    # other two (the earliest deadline still holds at the cloud: 82 + 2 x 60 < 22 + 197) and their
    # results are back at ~222, after the car's 197 ms cutoff.
    assert sorted(single.result_ms[0]) == pytest.approx([102.0, 222.0, 222.0], abs=2.0)
    assert sorted(single.outcome[0].tolist()) == [RequestOutcome.ON_TIME, RequestOutcome.LATE, RequestOutcome.LATE]
    two = simulate(scenario, ScriptedPlanner(cameras), cloud_workers=2)
    assert list(two.outcome[0]) == [RequestOutcome.ON_TIME] * 3
    with pytest.raises(ValueError, match="cloud workers"):
        simulate(scenario, cloud_workers=0)


def test_two_in_flight_overlap_the_next_upload_with_the_cloud_run():
    # 30 packets (~30 ms on the uplink) + RTT 80 + runtime 60: a reply comes ~170 ms after the send,
    # longer than the 100 ms frame interval. Waiting for the reply, every other frame misses its
    # turn; with two in flight the next frame goes as soon as the previous one has left the uplink.
    scenario = make_scenario([[45000]] * 10, rtt_ms=80.0, runtime_ms=60.0, slo_ms=200.0)
    knows_the_link = TURBO_WITHOUT_PINGS.with_overrides({"initial_estimate_mbps": 12.0, "max_in_flight_per_camera": 1})
    one = simulate(scenario, ScriptedPlanner(share_mbps=12.0), policy=knows_the_link)
    two = simulate(scenario, ScriptedPlanner(share_mbps=12.0),
                   policy=knows_the_link.with_overrides({"max_in_flight_per_camera": 2}))
    on_time_one = int((one.outcome[:, 0] == RequestOutcome.ON_TIME).sum())
    on_time_two = int((two.outcome[:, 0] == RequestOutcome.ON_TIME).sum())
    assert on_time_one <= 5 and on_time_two == 10
    # The second request of a camera waits for the first one's upload, never shares the uplink with it.
    transfers = sorted(two.transfers)
    for (_, previous_delivered_ms, _), (next_enqueue_ms, _, _) in zip(transfers, transfers[1:], strict=False):
        assert next_enqueue_ms >= previous_delivered_ms - 1.0


def test_a_second_request_waits_for_the_first_ones_upload():
    # 150 packets (~150 ms on the uplink, as the car's 12 Mbps estimate says) per frame: the next
    # frame is ready at 100 ms but goes only when the first one's upload has ended.
    scenario = make_scenario([[225000]] * 3, rtt_ms=40.0, runtime_ms=20.0, slo_ms=2000.0)
    run = simulate(scenario, ScriptedPlanner(share_mbps=12.0), policy=TURBO_WITHOUT_PINGS.with_overrides(
        {"max_in_flight_per_camera": 2, "initial_estimate_mbps": 12.0}))
    first, second = sorted(run.transfers)[:2]
    assert second[0] >= first[1] - 1.0  # enqueued once the first had (nearly) left
    assert second[0] < first[1] + 40.0 + 20.0  # and before the first one's reply came back


def test_simulated_executor_runs_first_come_first_served_and_jobs_ending_together_share_an_event():
    from avcloud.clock import SimulatedClock
    from avcloud.replay.simulator import EventLoop, SimulatedExecutor

    loop = EventLoop(SimulatedClock(0.0))
    executor = SimulatedExecutor(loop, lambda job: 10.0, workers=2)
    finished: list[tuple[str, float]] = []

    def work(job: str) -> str:
        finished.append((job, loop.clock.now_ms()))
        return job

    futures = [executor.submit(work, name) for name in "abcde"]
    assert len(loop._events) == 1  # a and b end at 10 ms together: one event  # noqa: SLF001
    assert futures[3].cancel()  # d never started: cancelled, it never runs
    while math.isfinite(loop.next_time_ms()):
        loop.run_next()
    assert finished == [("a", 10.0), ("b", 10.0), ("c", 20.0), ("e", 20.0)]
    assert [future.result() for future in futures if not future.cancelled()] == ["a", "b", "c", "e"]


def test_a_cancelled_event_runs_nothing_and_touches_no_car():
    from avcloud.clock import SimulatedClock
    from avcloud.replay.simulator import EventLoop, run_cars

    class Agent:
        def __init__(self) -> None:
            self.deferred = 0

        def defer_steps(self) -> None:
            self.deferred += 1

    class Car:
        def __init__(self) -> None:
            self.agent = Agent()
            self.instants = 0

        def end_of_instant(self) -> None:
            self.instants += 1

    loop = EventLoop(SimulatedClock(0.0))
    car, ran = Car(), []
    kept = loop.at(5.0, lambda: ran.append("kept"), car)
    replaced = loop.at(10.0, lambda: ran.append("replaced"), car)
    loop.cancel(replaced)
    run_cars(loop, [car])
    assert kept is not replaced and ran == ["kept"]
    assert car.agent.deferred == 1 and car.instants == 1  # the cancelled one's instant left the car alone


def test_one_instant_runs_the_clouds_events_first_then_each_cars_arrivals_before_its_own_events():
    """The order a fleet split over processes reproduces (avcloud/fleet/parallel.py): it must not
    depend on when events of different owners, or a car's arrivals and own events, were scheduled."""
    from avcloud.clock import SimulatedClock
    from avcloud.replay.simulator import EventLoop

    class Car:
        def __init__(self, rank: int) -> None:
            self.event_rank = rank

    loop = EventLoop(SimulatedClock(0.0))
    first, second, ran = Car(0), Car(2), []
    loop.at(5.0, lambda: ran.append("second: own"), second)
    loop.at(5.0, lambda: ran.append("first: own"), first)
    loop.at(5.0, lambda: ran.append("second: reply"), second, arrival=True)
    loop.at(5.0, lambda: ran.append("cloud"))
    loop.at(5.0, lambda: ran.append("first: own, later"), first)
    loop.at(5.0, lambda: ran.append("first: reply"), first, arrival=True)
    loop.at(5.0, lambda: ran.append("for the second car, not touching it"), rank=3)
    loop.at(4.0, lambda: ran.append("earlier"), second)
    while math.isfinite(loop.next_time_ms()):
        loop.run_next()
    assert ran == ["earlier", "cloud", "first: reply", "first: own", "first: own, later", "second: reply",
                   "second: own", "for the second car, not touching it"]


class PredictingPlanner(ScriptedPlanner):
    """ScriptedPlanner that also gives each frame's chance of arriving in time, as turbo-q's does."""

    def __init__(self, chances, **kwargs):
        super().__init__(**kwargs)
        self.chances = list(chances)

    def plan(self, bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps) -> Allocation:
        allocation = super().plan(bandwidth_mbps, rtt_ms, slo_ms, bandwidth_samples_mbps)
        allocation.extra["success_probability"] = self.chances[self.calls - 1]
        return allocation


def test_the_run_keeps_each_frames_predicted_chance_and_scores_it_against_what_arrived():
    from avcloud.replay.metrics import plan_success_calibration

    # Frame 0 (a few packets) arrives; frame 1 (about 150 packets behind an overstated 24 Mbps)
    # does not. The planner gave them 0.6 and 0.97.
    run = simulate(make_scenario([[15000], [225000]]), PredictingPlanner([0.6, 0.97], share_mbps=24.0))
    assert run.planned_success_probability.tolist() == [0.6, 0.97]
    assert run.outcome[:, 0].tolist() == [RequestOutcome.ON_TIME, RequestOutcome.LATE]
    calibration = plan_success_calibration(run)
    by_bin = {tuple(bounds): (frames, succeeded) for bounds, frames, succeeded in
              zip(calibration["bins"], calibration["frames"], calibration["succeeded"], strict=True) if frames}
    assert by_bin == {(0.5, 0.7): (1, 1), (0.95, 1.0): (1, 0)}
    assert plan_success_calibration(simulate(make_scenario([[15000]]))) is None  # a planner that gives no chance
