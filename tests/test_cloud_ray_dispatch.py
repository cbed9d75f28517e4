"""Deadline-aware dispatch across replicas and the autoscaling rule of the Ray engine: pure logic
on a simulated clock (no Ray needed; `cloudside.dispatch`, `cloudside.autoscaling`)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from avcloud.protocol import RequestHeader
from cloudside import autoscaling
from cloudside.dispatch import FleetDispatcher
from cloudside.scheduler import PendingRequest, RequestQueue


def linear_runtime(per_image_ms: float, overhead_ms: float = 0.0):
    return lambda model, batch_size: overhead_ms + per_image_ms * batch_size


def request(request_id: int, deadline_ms: float, arrival_ms: float = 0.0, model: str = "m",
            vehicle: str = "car-1") -> PendingRequest:
    header = RequestHeader(vehicle=vehicle, request_id=request_id, task="FRONT", model=model, codec="raw",
                           shape=(2, 2, 3), budget_ms=deadline_ms - arrival_ms)
    return PendingRequest(identity=b"", header=header, payload=b"", arrival_ms=arrival_ms, deadline_ms=deadline_ms)


def test_a_batch_goes_to_the_replica_that_can_start_it_soonest():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=50.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    first = dispatcher.place([request(1, 1000.0)], now_ms=0.0)
    second = dispatcher.place([request(2, 1000.0)], now_ms=0.0)
    assert [assignment.replica for assignment in first.assignments + second.assignments] == ["a", "b"]
    assert dispatcher.replicas["a"].backlog_ms == pytest.approx(10.0)


def test_no_request_is_sent_where_it_cannot_finish_before_its_deadline():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=50.0)
    dispatcher.update_replicas(["a"], now_ms=0.0)
    dispatcher.place([request(1, 1000.0), request(2, 1000.0), request(3, 1000.0)], now_ms=0.0)  # 30 ms held
    placement = dispatcher.place([request(4, 35.0), request(5, 45.0)], now_ms=0.0)
    # 30 ms ahead of it: request 4 (deadline 35) cannot finish by 40; request 5 can (by 40 <= 45).
    assert [assignment.request.header.request_id for assignment in placement.assignments] == [5]
    [(refused, start_in_ms, needed_ms)] = placement.infeasible
    assert refused.header.request_id == 4 and start_in_ms == pytest.approx(30.0) and needed_ms == pytest.approx(10.0)
    for assignment in placement.assignments:
        assert assignment.expected_finish_ms <= assignment.request.deadline_ms


def test_work_waits_at_the_dispatcher_once_every_replica_holds_its_window():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=25.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    placed = 0
    while dispatcher.has_room():
        placed += len(dispatcher.place([request(placed, 1000.0)], now_ms=0.0).assignments)
    assert placed == 6  # each replica takes work while it holds under 25 ms: 0, 10, 20 ms
    assert sorted(load.held for load in dispatcher.replicas.values()) == [3, 3]
    assert not dispatcher.has_room()
    assignment = next(iter(dispatcher.replicas["a"].assignments.values()))
    assert dispatcher.finished(assignment, now_ms=10.0)
    assert dispatcher.has_room()


def test_fleet_edf_sends_the_most_urgent_waiting_request_first():
    """The fleet's queue decides the order; a later, more urgent arrival overtakes held work."""
    queue = RequestQueue("edf", limit=100, max_batch_size=1, expected_ms=linear_runtime(10.0), fair_share=False)
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=10.0)
    dispatcher.update_replicas(["a"], now_ms=0.0)
    for request_id, deadline_ms in ((1, 500.0), (2, 400.0), (3, 300.0)):
        queue.push(request(request_id, deadline_ms))
    sent = []

    def dispatch(now_ms: float) -> None:
        while dispatcher.has_room():
            decision = queue.take(now_ms)
            if not decision.batch:
                return
            sent.extend(dispatcher.place(decision.batch, now_ms).assignments)

    dispatch(0.0)
    queue.push(request(4, 100.0, arrival_ms=1.0))  # arrives later, most urgent
    for now_ms in (10.0, 20.0, 30.0):
        dispatcher.finished(sent[-1], now_ms)
        dispatch(now_ms)
    assert [assignment.request.header.request_id for assignment in sent] == [3, 4, 2, 1]


def test_a_dead_replica_hands_back_what_it_held_and_its_late_answers_are_dropped():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=100.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    held = dispatcher.place([request(1, 1000.0)], now_ms=0.0).assignments + \
        dispatcher.place([request(2, 1000.0)], now_ms=0.0).assignments + \
        dispatcher.place([request(3, 1000.0)], now_ms=0.0).assignments
    on_a = [assignment for assignment in held if assignment.replica == "a"]
    handed_back = dispatcher.replica_failed("a")
    assert handed_back == on_a
    assert all(not dispatcher.finished(assignment, now_ms=5.0) for assignment in on_a)
    # A stale listing that still names the dead replica does not bring it back.
    dispatcher.update_replicas(["a", "b"], now_ms=6.0)
    assert list(dispatcher.replicas) == ["b"]
    retried = dispatcher.place([on_a[0].request], now_ms=6.0).assignments
    assert [assignment.replica for assignment in retried] == ["b"]
    assert dispatcher.finished(retried[0], now_ms=20.0)
    assert not dispatcher.finished(retried[0], now_ms=21.0)  # one answer per attempt


def test_a_hung_replica_hands_back_its_work_and_takes_work_again_once_it_answers():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=100.0, hang_timeout_ms=500.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    stuck = dispatcher.place([request(1, 10_000.0)], now_ms=0.0).assignments[0]
    assert dispatcher.overdue(now_ms=400.0) == []
    assert dispatcher.overdue(now_ms=600.0) == [stuck.replica]
    assert dispatcher.mark_hung(stuck.replica) == [stuck]
    assert [load.name for load in dispatcher.live()] == ["b"]
    assert not dispatcher.finished(stuck, now_ms=700.0)  # its late answer is dropped...
    assert {load.name for load in dispatcher.live()} == {"a", "b"}  # ...and shows it is alive


def test_a_replica_serve_stops_listing_finishes_what_it_holds_and_gets_nothing_new():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=100.0)
    dispatcher.update_replicas(["a"], now_ms=0.0)
    held = dispatcher.place([request(1, 1000.0)], now_ms=0.0).assignments[0]
    dispatcher.update_replicas(["b"], now_ms=1.0)
    assert [load.name for load in dispatcher.live()] == ["b"]
    assert dispatcher.place([request(2, 1000.0)], now_ms=1.0).assignments[0].replica == "b"
    assert dispatcher.finished(held, now_ms=10.0)
    assert list(dispatcher.replicas) == ["b"]


def test_a_batch_that_fits_stays_together_and_one_that_does_not_is_split():
    dispatcher = FleetDispatcher(linear_runtime(10.0, overhead_ms=5.0), dispatch_ahead_ms=100.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    together = dispatcher.place([request(1, 100.0), request(2, 100.0)], now_ms=0.0)
    assert {assignment.replica for assignment in together.assignments} == {"a"}
    assert dispatcher.replicas["a"].backlog_ms == pytest.approx(25.0)
    split = dispatcher.place([request(3, 16.0), request(4, 100.0)], now_ms=0.0)  # 25 ms as a pair: too late for 3
    assert [(assignment.request.header.request_id, assignment.replica) for assignment in split.assignments] == \
        [(3, "b"), (4, "b")]


def test_draining_hands_back_every_attempt_once():
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=100.0)
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)
    sent = [dispatcher.place([request(index, 1000.0)], now_ms=0.0).assignments[0] for index in range(4)]
    assert sorted(assignment.attempt for assignment in dispatcher.drain()) == sorted(a.attempt for a in sent)
    assert dispatcher.drain() == []
    assert not any(dispatcher.finished(assignment, now_ms=1.0) for assignment in sent)


def test_the_queue_expires_what_can_no_longer_make_it_while_no_replica_is_free():
    queue = RequestQueue("edf", limit=10, max_batch_size=1, expected_ms=linear_runtime(10.0))
    for request_id, deadline_ms in ((1, 15.0), (2, 50.0), (3, 12.0)):
        queue.push(request(request_id, deadline_ms))
    assert queue.earliest_deadline_ms() == 12.0
    due = queue.expire_due(now_ms=6.0)
    assert [item.header.request_id for item in due] == [3, 1]
    assert len(queue) == 1 and queue.earliest_deadline_ms() == 50.0
    assert RequestQueue("fifo", limit=10, max_batch_size=1, expected_ms=linear_runtime(10.0)).expire_due(1e9) == []


# ---------------------------------------------------------------- autoscaling


def report(busy: float = 0.0, queued_ms: float = 0.0, held_ms: float = 0.0,
           slack_ms: float = autoscaling.NO_SLACK_MS) -> dict[str, float]:
    return {autoscaling.BUSY: busy, autoscaling.QUEUED_MS: queued_ms, autoscaling.HELD_MS: held_ms,
            autoscaling.SLACK_MS: slack_ms}


def test_idle_replicas_want_to_scale_down():
    assert autoscaling.desired_replicas([report(), report(), report()], target_utilization=0.7) == 0.0


def test_busy_replicas_with_urgent_waiting_work_want_more():
    # Two replicas saturated, 400 ms of work waiting at the dispatcher that must start within 100 ms.
    wanted = autoscaling.desired_replicas([report(1.0, held_ms=400, slack_ms=100), report(1.0, held_ms=400)],
                                          target_utilization=1.0)
    assert wanted == pytest.approx(2.0 + 400 / 100)


def test_waiting_work_with_ample_slack_asks_for_little():
    relaxed = autoscaling.desired_replicas([report(0.5, queued_ms=100, slack_ms=10_000)], target_utilization=1.0)
    urgent = autoscaling.desired_replicas([report(0.5, queued_ms=100, slack_ms=60)], target_utilization=1.0)
    assert relaxed == pytest.approx(0.51) and urgent > relaxed


def test_steady_load_at_the_target_utilization_keeps_the_count():
    assert autoscaling.desired_replicas([report(0.7), report(0.7)], target_utilization=0.7) == pytest.approx(2.0)


def test_the_serve_policy_reads_per_replica_metrics_and_keeps_the_count_before_any_report():
    policy = autoscaling.DeadlineSlackPolicy(target_utilization=0.5)
    quiet = SimpleNamespace(aggregated_metrics={}, running_replicas=["r1"], policy_state={}, target_num_replicas=3)
    assert policy(quiet)[0] == 3
    metrics = {autoscaling.BUSY: {"r1": 1.0, "r2": 0.9}, autoscaling.QUEUED_MS: {"r1": 0.0, "r2": 0.0},
               autoscaling.HELD_MS: {"r1": 0.0, "r2": 0.0},
               autoscaling.SLACK_MS: {"r1": autoscaling.NO_SLACK_MS, "r2": autoscaling.NO_SLACK_MS}}
    busy = SimpleNamespace(aggregated_metrics=metrics, running_replicas=["r1", "r2"], policy_state={},
                           target_num_replicas=2)
    wanted, state = policy(busy)
    assert wanted == math.ceil(1.9 / 0.5) and state["last_desired"] == pytest.approx(3.8)


# ---------------------------------------------------------------- configuration


def test_ray_settings_are_checked():
    from cloudside.config import CloudConfig

    base = {"models": [{"name": "m", "simulated_runtime_ms": 1.0}], "engine": "ray"}
    with pytest.raises(ValueError, match="max_replicas \\(1\\) is below min_replicas \\(2\\)"):
        CloudConfig.model_validate({**base, "ray": {"min_replicas": 2, "max_replicas": 1}})
    with pytest.raises(ValueError, match="initial_replicas"):
        CloudConfig.model_validate({**base, "ray": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}})
    config = CloudConfig.model_validate({**base, "ray": {"min_replicas": 1, "max_replicas": 4}})
    assert config.ray.autoscaling and config.ray.replica_num_gpus == "auto"


def test_engine_ray_without_ray_installed_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from avcloud.errors import ConfigError
    from cloudside.config import CloudConfig
    from cloudside.service import CloudService

    monkeypatch.setitem(sys.modules, "cloudside.ray_engine", None)  # import fails as if ray were missing
    config = CloudConfig.model_validate({"models": [{"name": "m", "simulated_runtime_ms": 1.0}], "engine": "ray"})
    with pytest.raises(ConfigError) as failure:
        CloudService(config, insecure=True)
    message = str(failure.value)
    assert "\n" not in message and "engine: ray needs Ray Serve" in message and "'.[ray]'" in message


def test_a_replica_judged_hung_that_answers_after_all_is_judged_more_patiently_up_to_a_bound():
    # One slow replica (a large payload on a loaded host): with a fixed allowance, every retry of
    # the request would be taken back again just before it finished.
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=100.0, hang_timeout_ms=500.0)
    dispatcher.update_replicas(["a"], now_ms=0.0)
    now_ms, allowances = 0.0, []
    for _ in range(8):
        attempt = dispatcher.place([request(1, 1e9)], now_ms=now_ms).assignments[0]
        late_ms = now_ms + 10.0 + dispatcher.replicas["a"].hang_allowance_ms
        assert dispatcher.overdue(now_ms=late_ms) == []
        assert dispatcher.overdue(now_ms=late_ms + 1.0) == ["a"]
        assert dispatcher.mark_hung("a") == [attempt]
        assert not dispatcher.finished(attempt, now_ms=late_ms + 2.0)  # slow, not hung
        allowances.append(dispatcher.replicas["a"].hang_allowance_ms)
        now_ms = late_ms + 2.0
    assert allowances == [1000.0, 2000.0, 4000.0, 8000.0, 8000.0, 8000.0, 8000.0, 8000.0]


def test_a_replica_dropped_below_the_floor_died_one_dropped_above_it_may_be_a_scale_down():
    # Serve's router hears of a death only through a failed call: an idle replica killed may
    # first show up as a shorter listing.
    dispatcher = FleetDispatcher(linear_runtime(10.0), dispatch_ahead_ms=50.0)
    dispatcher.update_replicas(["a", "b", "c"], now_ms=0.0)
    assert dispatcher.lost_below_floor(["a", "b"], floor=3) == ["c"]
    assert dispatcher.lost_below_floor(["a", "b"], floor=2) == []  # the autoscaler may have done it
    assert dispatcher.lost_below_floor(["a", "b", "c", "d"], floor=3) == []  # growing loses nothing
    dispatcher.update_replicas(["a", "b"], now_ms=0.0)  # c leaves (a scale-down above the floor of 2)
    assert dispatcher.lost_below_floor(["a"], floor=2) == ["b"]
