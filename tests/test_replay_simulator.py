"""Simulator mechanics on hand-computable cases: a 12 Mbps constant trace is one 1500-byte packet per ms."""

from __future__ import annotations

import numpy as np
import pytest

from avcloud.link import DeliverySchedule
from avcloud.replay.simulator import (
    FALLBACK_INDEX,
    PlanningContext,
    PolicyDecision,
    ReplayScenario,
    RequestOutcome,
    ThroughputSample,
    simulate_policy,
)
from avcloud.types import Allocation, Option, Service

FALLBACK = Option("car-imgcompNone-inpcompNone", 0.0, 0.0, 0.3)
CLOUD = Option("big-imgcomp75-inpcompNone", 0.12, 20.0, 0.6)
ONE_PACKET_PER_MS = DeliverySchedule(np.array([1]))  # 12 Mbps


def make_scenario(sizes_bytes, *, cameras=("FRONT",), rtt_ms=40.0, slo_ms=200.0, runtime_ms=20.0,
                  encode_ms=0.0, interval_ms=100.0) -> ReplayScenario:
    """sizes_bytes[f][c]: encoded size of frame f, camera c, for the one cloud configuration."""
    sizes = np.asarray(sizes_bytes, dtype=np.int64).reshape(len(sizes_bytes), len(cameras), 1)
    frames = sizes.shape[0]
    cloud = Option(CLOUD.name, CLOUD.size_mbit, runtime_ms, CLOUD.utility)
    return ReplayScenario(
        cameras=tuple(cameras),
        frame_indices=np.arange(frames),
        capture_ms=np.arange(frames) * interval_ms,
        services=tuple(Service(camera, (FALLBACK, cloud)) for camera in cameras),
        config_names=(CLOUD.name,),
        size_bytes=sizes,
        runtime_ms=np.array([runtime_ms]),
        encode_ms=np.array([encode_ms]),
        fallback_config=FALLBACK.name,
        rtt_ms=rtt_ms,
        slo_ms=slo_ms,
    )


class ScriptedPolicy:
    """Sends the cloud option on the cameras listed for each frame; records what it learns."""

    name = "scripted"

    def __init__(self, send_frames: dict[int, tuple[str, ...]] | None = None, every_frame=(), budget_mbps=12.0,
                 budget_by_frame: dict[int, float] | None = None):
        # What it believes the uplink carries (the daemon's send-or-drop check uses it).
        self.budget_mbps = budget_mbps
        self.budget_by_frame = budget_by_frame or {}
        self.send_frames = send_frames or {}
        self.every_frame = tuple(every_frame)
        self.samples: list[ThroughputSample] = []
        self.contexts: list[PlanningContext] = []

    def plan(self, context: PlanningContext) -> PolicyDecision:
        self.contexts.append(context)
        senders = self.send_frames.get(context.frame_position, self.every_frame)
        choices = {s.name: (CLOUD.name if s.name in senders else FALLBACK.name) for s in context.services}
        return PolicyDecision(Allocation(choices, 0.0, {name: 0.0 for name in choices}), budget_mbps=self.budget_by_frame.get(context.frame_position, self.budget_mbps))

    def observe(self, sample: ThroughputSample) -> None:
        self.samples.append(sample)


def test_message_delivery_and_result_time_follow_the_trace_exactly():
    scenario = make_scenario([[15000]], rtt_ms=40.0, runtime_ms=20.0)
    policy = ScriptedPolicy(every_frame=("FRONT",))
    run = simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert run.transfers == [(0.0, 10.0, 15000)]  # 10 packets leave at t = 1..10 ms
    assert run.result_ms[0, 0] == pytest.approx(10.0 + 20.0 + 20.0 + 20.0)
    assert run.outcome[0, 0] == RequestOutcome.ON_TIME
    assert run.served_config()[0, 0] == 0


def test_encode_time_delays_the_send():
    scenario = make_scenario([[15000]], encode_ms=5.0)
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT",)), scenario, ONE_PACKET_PER_MS)
    assert run.transfers == [(5.0, 14.0, 15000)]  # opportunities at 5..14 ms


def test_result_after_the_deadline_falls_back_to_the_car():
    # 150 packets: delivered at 150 ms; + 40 ms RTT + 20 ms runtime = 210 ms > 200 ms SLO. The policy
    # overestimates the uplink (24 Mbps), so it sends.
    scenario = make_scenario([[225000]], rtt_ms=40.0, runtime_ms=20.0, slo_ms=200.0)
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT",), budget_mbps=24.0), scenario, ONE_PACKET_PER_MS)
    assert run.result_ms[0, 0] == pytest.approx(210.0)
    assert run.outcome[0, 0] == RequestOutcome.LATE
    assert run.served_config()[0, 0] == FALLBACK_INDEX
    # Just within: 140 packets -> 200 ms exactly meets the deadline.
    scenario = make_scenario([[210000]], rtt_ms=40.0, runtime_ms=20.0, slo_ms=200.0)
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT",)), scenario, ONE_PACKET_PER_MS)
    assert run.outcome[0, 0] == RequestOutcome.ON_TIME


def test_cameras_share_one_fifo_uplink():
    scenario = make_scenario([[15000, 30000]], cameras=("FRONT", "SIDE_LEFT"))
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT", "SIDE_LEFT")), scenario, ONE_PACKET_PER_MS)
    assert sorted(delivered for _, delivered, _ in run.transfers) == [10.0, 30.0]
    assert run.sent_bytes == 45000


def test_one_in_flight_until_the_reply_and_one_waiting_newer_frame_replaces_it():
    # Each frame takes 250 ms on the uplink; frames every 100 ms; generous SLO so nothing times out.
    scenario = make_scenario([[375000]] * 4, slo_ms=2000.0)
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT",)), scenario, ONE_PACKET_PER_MS)
    # Frame 0 is sent at 0 and its reply is back at 250 + 40 + 20 = 310. Frames 1 and 2 wait in
    # turn and are replaced; frame 3 is sent when the slot frees at 310 (delivered 560).
    assert [(enqueue, delivered) for enqueue, delivered, _ in run.transfers] == [(0.0, 250.0), (310.0, 559.0)]
    assert list(run.outcome[:, 0]) == [RequestOutcome.ON_TIME, RequestOutcome.SUPERSEDED,
                                      RequestOutcome.SUPERSEDED, RequestOutcome.ON_TIME]


def test_slot_frees_at_the_deadline_and_queued_bytes_still_occupy_the_uplink():
    # The policy overestimates the uplink (24 Mbps). Frame 0 (250 ms of upload) times out at its
    # deadline, 200 ms; frame 1 (one packet) is sent then, but waits behind frame 0's bytes still on
    # the uplink: delivered at 251, back at 311 > 300.
    scenario = make_scenario([[375000], [1500]], slo_ms=200.0)
    run = simulate_policy(ScriptedPolicy(every_frame=("FRONT",), budget_mbps=24.0), scenario, ONE_PACKET_PER_MS)
    assert [(enqueue, delivered) for enqueue, delivered, _ in run.transfers] == [(0.0, 250.0), (200.0, 251.0)]
    assert list(run.outcome[:, 0]) == [RequestOutcome.LATE, RequestOutcome.LATE]


def test_frame_is_not_sent_when_its_budget_cannot_cover_the_upload():
    # Frame 0 is sent on an overestimate (24 Mbps) and holds the slot until its deadline, 200 ms.
    # For frame 1 the policy believes 0.5 Mbps, below the option's critical bandwidth, 0.12 Mb / 140 ms
    # = 0.857 Mbps, so it counts on that: at 200 ms, 100 ms left, 280 ms of upload + 60 ms cannot fit.
    scenario = make_scenario([[375000], [30000]], slo_ms=200.0)
    policy = ScriptedPolicy(every_frame=("FRONT",), budget_mbps=0.5, budget_by_frame={0: 24.0})
    run = simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert run.outcome[1, 0] == RequestOutcome.EXPIRED
    assert len(run.transfers) == 1
    # A policy with no notion of bandwidth (no budget) sends it anyway, and is late.
    policy = ScriptedPolicy(every_frame=("FRONT",), budget_mbps=float("nan"), budget_by_frame={0: 24.0})
    run = simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert run.outcome[1, 0] == RequestOutcome.LATE and len(run.transfers) == 2


def test_a_timed_out_request_teaches_an_upper_bound_at_its_deadline():
    scenario = make_scenario([[375000]], slo_ms=200.0)
    policy = ScriptedPolicy(every_frame=("FRONT",), budget_mbps=24.0)
    simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    timeout, reply = policy.samples
    assert timeout.observed_ms == 200.0 and timeout.throughput_mbps == pytest.approx(375000 * 8 / 200 / 1000)
    assert reply.observed_ms == 310.0 and reply.throughput_mbps == pytest.approx(12.0)


def test_throughput_sample_measures_the_link_time_of_each_transfer_and_arrives_with_the_reply():
    scenario = make_scenario([[15000, 30000]], cameras=("FRONT", "SIDE_LEFT"))
    policy = ScriptedPolicy(every_frame=("FRONT", "SIDE_LEFT"))
    simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert [s.throughput_mbps for s in policy.samples] == pytest.approx([12.0, 12.0])
    # Learnt when the reply is back: delivery + RTT + runtime.
    assert [s.observed_ms for s in policy.samples] == pytest.approx([70.0, 90.0])


def test_policy_learns_nothing_before_the_reply_arrives():
    # The first frame's reply is back at 70 ms: before the second frame (100 ms) the policy knows it.
    scenario = make_scenario([[15000], [15000]])
    policy = ScriptedPolicy(every_frame=("FRONT",))

    seen_at_plan: list[int] = []
    original_plan = policy.plan

    def plan(context):
        seen_at_plan.append(len(policy.samples))
        return original_plan(context)

    policy.plan = plan  # type: ignore[method-assign]
    simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert seen_at_plan == [0, 1]


def test_policy_on_a_dead_link_sees_misses_not_the_trace():
    # Capacity drops to almost nothing after 1 s: a policy that keeps sending experiences late results.
    opportunities = np.concatenate([np.arange(1, 1001), [60000]])  # 12 Mbps for 1 s, then silence to 60 s
    scenario = make_scenario([[15000]] * 30)
    policy = ScriptedPolicy(every_frame=("FRONT",))
    run = simulate_policy(policy, scenario, DeliverySchedule(opportunities))
    assert all(run.outcome[:10, 0] == RequestOutcome.ON_TIME)
    assert RequestOutcome.LATE in set(run.outcome[10:, 0].tolist())
    assert not any(run.outcome[10:, 0] == RequestOutcome.ON_TIME)
    assert (run.budget_mbps == 12.0).all()


def test_planning_context_has_no_trace_and_carries_the_frame_interval():
    scenario = make_scenario([[1500]] * 3, interval_ms=100.0)
    policy = ScriptedPolicy()
    simulate_policy(policy, scenario, ONE_PACKET_PER_MS)
    assert [c.now_ms for c in policy.contexts] == [0.0, 100.0, 200.0]
    assert {c.frame_interval_ms for c in policy.contexts} == {100.0}
    assert not any(isinstance(value, DeliverySchedule) for c in policy.contexts for value in vars(c).values())


def test_a_single_cloud_worker_queues_requests_and_expires_what_cannot_finish_in_time():
    # Three cameras' 1500-byte frames arrive at the cloud at 1, 2 and 3 ms + 20 ms (RTT/2).
    cameras = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT")
    scenario = make_scenario([[1500, 1500, 1500]], cameras=cameras, rtt_ms=40.0, runtime_ms=60.0, slo_ms=200.0)
    pool = simulate_policy(ScriptedPolicy(every_frame=cameras), scenario, ONE_PACKET_PER_MS)
    assert list(pool.result_ms[0]) == pytest.approx([1 + 20 + 60 + 20, 2 + 20 + 60 + 20, 3 + 20 + 60 + 20])
    single = simulate_policy(ScriptedPolicy(every_frame=cameras), scenario, ONE_PACKET_PER_MS, cloud_workers=1)
    # The second waits for the first (81 -> 141); the third could finish only at 201 > 200 - 20:
    # expired unrun, its reply back at once, and it does not hold the worker.
    assert single.result_ms[0, 0] == pytest.approx(101.0)
    assert single.result_ms[0, 1] == pytest.approx(81 + 60 + 20)
    assert single.result_ms[0, 2] == pytest.approx(3 + 20 + 20)
    assert list(single.outcome[0]) == [RequestOutcome.ON_TIME, RequestOutcome.ON_TIME, RequestOutcome.LATE]
    two = simulate_policy(ScriptedPolicy(every_frame=cameras), scenario, ONE_PACKET_PER_MS, cloud_workers=2)
    assert two.result_ms[0, 2] == pytest.approx(81 + 60 + 20)  # the first free worker takes it
    with pytest.raises(ValueError, match="cloud workers"):
        simulate_policy(ScriptedPolicy(), scenario, ONE_PACKET_PER_MS, cloud_workers=0)
