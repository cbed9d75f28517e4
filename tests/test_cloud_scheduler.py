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
    estimate.observe_batch(1, 500.0)  # a hiccup: now every 100 ms request would be expired unrun
    assert estimate.expected_ms(1) == pytest.approx(500.0)
    clock.advance_to(1200.0)  # nothing ran since: fall back to the best seen so a request can run
    assert estimate.expected_ms(1) == pytest.approx(10.0)
    estimate.observe_batch(1, 12.0)
    assert estimate.expected_ms(1) == pytest.approx(12.0)


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
