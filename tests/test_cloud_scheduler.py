"""The request queue (EDF with expiry and deadline-aware batching, FIFO baseline) and runtime estimates."""

from __future__ import annotations

import threading
import time

import pytest

from avcloud.clock import SimulatedClock
from avcloud.protocol import RequestHeader
from cloudside.runners import RuntimeEstimate, SimulatedRunner
from cloudside.scheduler import PendingRequest, RequestQueue


def request(name: str, deadline_ms: float, model: str = "m", arrival_ms: float = 0.0) -> PendingRequest:
    header = RequestHeader(vehicle="car", request_id=name, task="FRONT", model=model, codec="raw",
                           shape=(1, 1, 3), budget_ms=deadline_ms - arrival_ms)
    return PendingRequest(identity=b"id", header=header, payload=b"xxx", arrival_ms=arrival_ms,
                          deadline_ms=deadline_ms)


def linear_runtime(per_image_ms: float, overhead_ms: float = 0.0):
    return lambda model, batch_size: overhead_ms + per_image_ms * batch_size


def ids(requests: list[PendingRequest]) -> list[str]:
    return [r.header.request_id for r in requests]


def test_edf_serves_earliest_deadline_first_across_models():
    queue = RequestQueue("edf", limit=10, max_batch_size=1, expected_ms=linear_runtime(1.0))
    for name, deadline, model in [("late", 300, "a"), ("soon", 100, "b"), ("middle", 200, "a")]:
        assert queue.push(request(name, deadline, model))
    order = [ids(queue.take(0).batch) for _ in range(3)]
    assert order == [["soon"], ["middle"], ["late"]]
    assert queue.take(0).batch == [] and len(queue) == 0


def test_fifo_serves_arrival_order_and_never_expires():
    queue = RequestQueue("fifo", limit=10, max_batch_size=1, expected_ms=linear_runtime(50.0))
    for name, deadline in [("first", 300), ("second", 10), ("third", 5)]:
        queue.push(request(name, deadline))
    decisions = [queue.take(now_ms=100) for _ in range(3)]
    assert [ids(d.batch) for d in decisions] == [["first"], ["second"], ["third"]]
    assert all(not d.expired for d in decisions)


def test_edf_expires_heads_that_cannot_finish_and_runs_the_next():
    queue = RequestQueue("edf", limit=10, max_batch_size=1, expected_ms=linear_runtime(30.0))
    queue.push(request("hopeless", deadline_ms=120))
    queue.push(request("barely", deadline_ms=125))
    queue.push(request("fine", deadline_ms=500))
    decision = queue.take(now_ms=95)  # 25 ms left < 30 ms needed; 30 ms left is enough
    assert ids(decision.expired) == ["hopeless"]
    assert ids(decision.batch) == ["barely"]


def test_edf_batches_same_model_only_while_the_earliest_deadline_is_met():
    # batch of k takes 10 + 10k ms; head deadline 45 ms away fits k <= 3.
    queue = RequestQueue("edf", limit=10, max_batch_size=8, expected_ms=linear_runtime(10.0, 10.0))
    for index in range(5):
        queue.push(request(f"a{index}", deadline_ms=45 + index, model="a"))
    queue.push(request("b0", deadline_ms=500, model="b"))
    decision = queue.take(now_ms=0)
    assert ids(decision.batch) == ["a0", "a1", "a2"]
    assert ids(queue.take(now_ms=0).batch) == ["a3", "a4"]


def test_batch_size_is_capped():
    queue = RequestQueue("fifo", limit=10, max_batch_size=2, expected_ms=linear_runtime(1.0))
    for index in range(5):
        queue.push(request(f"r{index}", deadline_ms=1000))
    assert [len(queue.take(0).batch) for _ in range(3)] == [2, 2, 1]


def test_queue_is_bounded_and_close_returns_leftovers():
    queue = RequestQueue("edf", limit=2, max_batch_size=1, expected_ms=linear_runtime(1.0))
    assert queue.push(request("a", 100)) and queue.push(request("b", 50))
    assert not queue.push(request("c", 10))
    assert len(queue) == 2
    leftovers = queue.close()
    assert ids(leftovers) == ["a", "b"]  # arrival order
    assert not queue.push(request("d", 10)) and queue.closed


def test_wait_and_take_wakes_on_push_and_returns_none_when_closed():
    queue = RequestQueue("edf", limit=4, max_batch_size=1, expected_ms=linear_runtime(0.0))
    results = []

    def worker():
        while (decision := queue.wait_and_take(lambda: 0.0, timeout_s=5)) is not None:
            results.extend(ids(decision.batch))

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    queue.push(request("x", 100))
    while not results and time.monotonic() - started < 2:
        time.sleep(0.005)
    queue.close()
    thread.join(timeout=2)
    assert results == ["x"] and not thread.is_alive()
    assert time.monotonic() - started < 2


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        RequestQueue("lifo", limit=1, max_batch_size=1, expected_ms=linear_runtime(1.0))


def test_runtime_estimate_tracks_observations_and_extrapolates_conservatively():
    estimate = RuntimeEstimate(initial_ms_per_image=20.0, initial_batch_overhead_ms=5.0, smoothing=0.5,
                               clock=SimulatedClock())
    assert estimate.expected_ms(2) == pytest.approx(45.0)
    estimate.observe_batch(1, 10.0)
    assert estimate.inference_ms(1) == pytest.approx(10.0)
    estimate.observe_batch(1, 20.0)
    assert estimate.inference_ms(1) == pytest.approx(15.0)  # EWMA
    assert estimate.inference_ms(4) == pytest.approx(60.0)  # linear from the nearest smaller size
    estimate.observe_batch(4, 40.0)
    assert estimate.inference_ms(4) == pytest.approx(40.0)
    assert estimate.inference_ms(8) == pytest.approx(80.0)
    estimate.observe_decode(2.0)
    assert estimate.expected_ms(4) == pytest.approx(48.0)


def test_simulated_runner_sleeps_its_profiled_time_and_finds_nothing():
    runner = SimulatedRunner("emulated", runtime_ms_per_image=10.0, batch_overhead_ms=5.0)
    started = time.perf_counter()
    results = runner.run_batch([None, None])  # type: ignore[list-item]
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert 25.0 <= elapsed_ms < 200.0
    assert [r.shape for r in results] == [(0, 6), (0, 6)]
    assert runner.expected_runtime_ms == 15.0



@pytest.mark.parametrize(("b_deadline_ms", "expected_batch"), [
    (None, ["a0", "a1", "a2", "a3"]),  # alone: batch up to the head's deadline (40 ms)
    (50, ["a0"]),  # b (35 ms) must start by 15 ms; one a-run (10 ms) would have let it
    (44, ["a0", "a1", "a2", "a3"]),  # b misses even after a single a-run: it does not hold a back
])
def test_edf_batch_leaves_room_for_other_models_heads(b_deadline_ms, expected_batch):
    # a-batch of k takes 10k ms; b takes 35 ms.
    runtime = lambda model, batch_size: (10.0 if model == "a" else 35.0) * batch_size  # noqa: E731
    queue = RequestQueue("edf", limit=10, max_batch_size=8, expected_ms=runtime)
    for index in range(4):
        queue.push(request(f"a{index}", deadline_ms=40 + index, model="a"))
    if b_deadline_ms is not None:
        queue.push(request("b0", deadline_ms=b_deadline_ms, model="b"))
    assert ids(queue.take(now_ms=0).batch) == expected_batch


def test_runtime_estimate_recovers_from_a_spike_once_stale():
    clock = SimulatedClock()
    estimate = RuntimeEstimate(initial_ms_per_image=10.0, smoothing=1.0, stale_after_ms=1000.0, clock=clock)
    estimate.observe_batch(1, 10.0)
    clock.advance_to(100.0)
    estimate.observe_batch(1, 500.0)  # a hiccup: counts for at most 3x the estimate
    assert estimate.expected_ms(1) == pytest.approx(30.0)
    clock.advance_to(1200.0)  # nothing ran since: fall back to the best seen so a request can run
    assert estimate.expected_ms(1) == pytest.approx(10.0)
    estimate.observe_batch(1, 12.0)
    assert estimate.expected_ms(1) == pytest.approx(12.0)


def test_one_pathological_decode_cannot_move_the_estimate_past_a_robust_bound():
    # The attack of issue 12: one 16384x16384 PNG took 4.8-27 s to decode; the decode time went
    # into the estimate and every later request was expired unrun, for good.
    clock = SimulatedClock()
    estimate = RuntimeEstimate(initial_ms_per_image=20.0, stale_after_ms=2000.0, clock=clock)
    for step in range(10):
        clock.advance_to(step * 100.0)
        estimate.observe_decode(2.0)
        estimate.observe_batch(1, 20.0)
    settled_ms = estimate.expected_ms(1)
    clock.advance_to(1000.0)
    estimate.observe_decode(27_000.0)
    estimate.observe_batch(1, 20.0)
    assert estimate.expected_ms(1) <= settled_ms + 3 * 2.0  # at most 3x the median decode of 2 ms
    assert estimate.expected_ms(1) < 200.0  # a 200 ms request still runs


def test_decode_estimate_goes_stale_and_recovers_like_inference():
    clock = SimulatedClock()
    estimate = RuntimeEstimate(initial_ms_per_image=10.0, smoothing=1.0, stale_after_ms=1000.0, clock=clock)
    estimate.observe_decode(5.0)
    estimate.observe_batch(1, 10.0)
    for step in range(1, 20):  # a lasting slowdown of the decoder moves the estimate (median follows)
        clock.advance_to(step * 10.0)
        estimate.observe_decode(50.0)
        estimate.observe_batch(1, 10.0)
    assert estimate.decode_ms(1) == pytest.approx(50.0)
    clock.advance_to(5000.0)  # then nothing ran: the best decode seen lets a request through
    assert estimate.expected_ms(1) == pytest.approx(15.0)


def test_per_vehicle_limit_keeps_room_for_other_vehicles():
    queue = RequestQueue("edf", limit=10, max_batch_size=1, expected_ms=linear_runtime(1.0), per_vehicle_limit=2)

    def from_vehicle(vehicle: str, name: str) -> PendingRequest:
        pending = request(name, 100)
        pending.header = RequestHeader(vehicle=vehicle, request_id=name, task="FRONT", model="m", codec="raw",
                                       shape=(1, 1, 3), budget_ms=100)
        return pending

    assert queue.push(from_vehicle("flood", "f1")) and queue.push(from_vehicle("flood", "f2"))
    assert not queue.push(from_vehicle("flood", "f3")) and queue.vehicle_full("flood")
    assert queue.push(from_vehicle("quiet", "q1"))
    queue.take(0)  # f1 leaves the queue: the flood may queue one more
    assert not queue.vehicle_full("flood") and queue.push(from_vehicle("flood", "f4"))


# ---------------------------------------------------------------- fair share across vehicles


def vehicle_request(vehicle: str, name: str, arrival_ms: float, budget_ms: float, model: str = "m",
                    claimed: str | None = None) -> PendingRequest:
    header = RequestHeader(vehicle=claimed or vehicle, request_id=name, task="FRONT", model=model, codec="raw",
                           shape=(1, 1, 3), budget_ms=budget_ms)
    return PendingRequest(identity=vehicle.encode(), header=header, payload=b"xxx", arrival_ms=arrival_ms,
                          deadline_ms=arrival_ms + budget_ms, vehicle=vehicle)


def simulate_cloud(arrivals: list[PendingRequest], queue: RequestQueue, runtime_ms: float,
                   until_ms: float) -> dict[str, dict[str, int]]:
    """One worker on a simulated clock: per vehicle, how many requests were sent, finished on
    time, expired, rejected (pushed out or refused)."""
    outcome: dict[str, dict[str, int]] = {}

    def count(request: PendingRequest, what: str) -> None:
        per_vehicle = outcome.setdefault(request.accounted_vehicle, {"sent": 0, "on_time": 0, "late": 0,
                                                                     "expired": 0, "rejected": 0})
        per_vehicle[what] += 1

    arrivals = sorted(arrivals, key=lambda request: request.arrival_ms)
    next_arrival = 0
    now_ms = 0.0
    while now_ms <= until_ms:
        while next_arrival < len(arrivals) and arrivals[next_arrival].arrival_ms <= now_ms:
            request = arrivals[next_arrival]
            next_arrival += 1
            count(request, "sent")
            if not queue.push(request):
                count(request, "rejected")
            for pushed_out in queue.drain_evicted():
                count(pushed_out, "rejected")
        decision = queue.take(now_ms)
        for request in decision.expired:
            count(request, "expired")
        if decision.batch:
            now_ms += queue.expected_ms(decision.batch[0].model, len(decision.batch))
            for request in decision.batch:
                count(request, "on_time" if now_ms <= request.deadline_ms else "late")
            continue
        if next_arrival >= len(arrivals):
            break
        now_ms = arrivals[next_arrival].arrival_ms
    return outcome


def fleet_arrivals(seconds: float, flood_per_s: float) -> list[PendingRequest]:
    """car-1: 2 cameras every 100 ms, 200 ms budget (20% of a 10 ms/request worker). car-2: a
    flood with shorter budgets (150 ms)."""
    arrivals = [vehicle_request("car-1", f"good-{frame}-{camera}", frame * 100.0, 200.0)
                for frame in range(int(seconds * 10)) for camera in range(2)]
    if flood_per_s:
        period_ms = 1000.0 / flood_per_s
        for index in range(int(seconds * flood_per_s)):
            arrivals.append(vehicle_request("car-2", f"flood-{index}", index * period_ms + 0.5, 150.0))
    return arrivals


def on_time_rate(outcome: dict, vehicle: str = "car-1") -> float:
    return outcome[vehicle]["on_time"] / outcome[vehicle]["sent"]


def run_fleet(flood_per_s: float, **queue_options) -> dict:
    queue = RequestQueue("edf", expected_ms=linear_runtime(10.0), **{"limit": 256, "max_batch_size": 1,
                                                                      **queue_options})
    return simulate_cloud(fleet_arrivals(10.0, flood_per_s), queue, 10.0, until_ms=12_000)


@pytest.mark.parametrize(("per_vehicle_limit", "max_batch_size"), [(None, 1), (16, 1), (16, 8)])
def test_a_flooding_vehicle_cannot_starve_a_well_behaved_one(per_vehicle_limit, max_batch_size):
    # Worker capacity 100 requests/s: each of two vehicles' fair share is 50/s. car-2 sends 10x
    # that (500/s) with shorter budgets than car-1's, which EDF alone would always serve first.
    options = {"per_vehicle_limit": per_vehicle_limit, "max_batch_size": max_batch_size}
    alone = on_time_rate(run_fleet(0.0, **options))
    assert alone == 1.0
    flooded = run_fleet(500.0, **options)
    assert on_time_rate(flooded) >= 0.95 * alone
    assert flooded["car-2"]["on_time"] > 0.7 * 800  # the flooder still gets the rest of the worker
    if max_batch_size == 1:
        strict_edf = run_fleet(500.0, fair_share=False, **options)
        assert on_time_rate(strict_edf) < 0.7  # what the service did before the fair share (issue 12)


def test_a_full_queue_pushes_out_the_flooders_request_not_the_newcomers():
    queue = RequestQueue("edf", limit=4, max_batch_size=1, expected_ms=linear_runtime(10.0))
    for index in range(4):
        assert queue.push(vehicle_request("flood", f"f{index}", 0.0, 100.0 + index))
    assert queue.push(vehicle_request("quiet", "q0", 0.0, 500.0))
    assert ids(queue.drain_evicted()) == ["f3"]  # the flooder's least urgent request
    assert queue.queued_by_vehicle() == {"flood": 3, "quiet": 1}
    assert not queue.push(vehicle_request("flood", "f4", 0.0, 50.0))  # full, and the flood holds the most
    assert queue.drain_evicted() == [] and len(queue) == 4


def test_pushed_out_requests_come_back_in_the_next_decision_when_not_drained():
    queue = RequestQueue("edf", limit=2, max_batch_size=1, expected_ms=linear_runtime(10.0))
    assert queue.push(vehicle_request("flood", "f0", 0.0, 100.0))
    assert queue.push(vehicle_request("flood", "f1", 0.0, 300.0))
    assert queue.push(vehicle_request("quiet", "q0", 0.0, 500.0))
    decision = queue.take(0.0)
    assert ids(decision.rejected) == ["f1"] and ids(decision.batch) == ["f0"]


def test_requests_are_accounted_under_the_explicit_vehicle_not_the_claimed_one():
    queue = RequestQueue("edf", limit=10, max_batch_size=1, expected_ms=linear_runtime(1.0), per_vehicle_limit=1)
    assert queue.push(vehicle_request("car-2", "a", 0.0, 100.0, claimed="car-1"))
    assert queue.vehicle_full("car-2") and not queue.vehicle_full("car-1")
    assert queue.push(vehicle_request("car-1", "b", 0.0, 100.0))
    assert not queue.push(vehicle_request("car-2", "c", 0.0, 100.0, claimed="car-3"))


def test_fair_share_follows_weights_under_contention():
    queue = RequestQueue("edf", limit=1000, max_batch_size=1, expected_ms=linear_runtime(10.0),
                         vehicle_weights={"gold": 3.0}, fair_share_slack_ms=0.0)
    for index in range(200):
        queue.push(vehicle_request("gold", f"g{index}", 0.0, 1e9))
        queue.push(vehicle_request("basic", f"b{index}", 0.0, 1e9))
    served = [queue.take(0.0).batch[0].accounted_vehicle for _ in range(200)]
    assert served.count("gold") == pytest.approx(150, abs=3)


def test_batches_take_only_requests_of_vehicles_within_their_share():
    def second_batch(fair_share: bool) -> list[str]:
        queue = RequestQueue("edf", limit=100, max_batch_size=8, expected_ms=linear_runtime(10.0),
                             fair_share=fair_share, fair_share_slack_ms=0.0)
        for index in range(8):
            queue.push(vehicle_request("flood", f"f{index}", 0.0, 1000.0 + index))
        assert len(queue.take(0.0).batch) == 8  # alone: one big batch
        for index in range(8):
            queue.push(vehicle_request("flood", f"g{index}", 0.0, 1000.0 + index))
        queue.push(vehicle_request("quiet", "q0", 0.0, 5000.0))
        queue.push(vehicle_request("quiet", "q1", 0.0, 6000.0, model="other"))
        return ids(queue.take(0.0).batch)

    # Level with quiet, the flood runs its most urgent request; having run it, it is ahead and its
    # other requests do not ride along on quiet's time; quiet's does.
    assert second_batch(fair_share=True) == ["g0", "q0"]
    assert second_batch(fair_share=False) == [f"g{index}" for index in range(8)]


def test_single_vehicle_behaviour_is_unchanged_by_the_fair_share():
    for fair_share in (True, False):
        queue = RequestQueue("edf", limit=10, max_batch_size=8, expected_ms=linear_runtime(10.0, 10.0),
                             fair_share=fair_share)
        for index in range(5):
            queue.push(request(f"a{index}", deadline_ms=45 + index, model="a"))
        assert ids(queue.take(now_ms=0).batch) == ["a0", "a1", "a2"]
