"""Bandwidth discovery and the forecast behind turbo-q: bounded time to learn a link that opens,
and a forecast whose quantiles mean what they say."""

from __future__ import annotations

import numpy as np
import pytest
from replay_fakes import constant_opportunities, make_case

from avcloud.replay.simulator import simulate_policy
from optimizer.bandwidth import QuantileForecaster
from optimizer.policies import get_policy

FRAME_MS = 100.0


def dark_then_open(open_s: float, mbps: float, total_s: float) -> np.ndarray:
    return open_s * 1000 + constant_opportunities(mbps, total_s - open_s)


@pytest.mark.parametrize("policy", ["turbo", "turbo-q", "equal"])
@pytest.mark.parametrize("open_s", [2.0, 5.0])
def test_a_link_that_opens_late_is_found_within_the_stated_bound(policy, open_s):
    """Worst case to the first useful sample after the link opens (README: bandwidth discovery):
    what was queued in the dark comes back within an SLO (slow samples: they measured the dark),
    or its timeout's upper bound is taken within the cloud's runtime and an RTT after its cutoff;
    then a discovery request is planned within the longest wait between them (a car in the dark
    has backed off to it) + one frame and answered within its SLO."""
    case = make_case(dark_then_open(open_s, 6.0, 20.0), frames=150)
    spec = get_policy(policy)
    run = simulate_policy(spec, case.scenario, case.schedule, case.detections_at)
    open_ms = open_s * 1000
    slowest_reply_ms = max(option.runtime_ms for service in case.scenario.services for option in service.options)
    bound_ms = (open_ms + max(spec.stale_after_ms, spec.max_discovery_wait_ms) + FRAME_MS + 2 * case.scenario.slo_ms
                + slowest_reply_ms + case.scenario.rtt_ms)
    useful = [sample for sample in run.samples if sample.observed_ms >= open_ms and sample.throughput_mbps > 0.5]
    assert useful and useful[0].observed_ms <= bound_ms, [(s.observed_ms, s.throughput_mbps) for s in run.samples[:8]]
    # ...and the cloud serves frames again soon after: within 3 s of the link opening.
    served = np.flatnonzero((run.served_config() >= 0).any(axis=1))
    assert served.size and served[served >= open_ms / FRAME_MS].min() * FRAME_MS <= open_ms + 3000.0


def test_discovery_requests_grow_while_they_come_back_in_time():
    # A thin but working link: the plan at the start value sends nothing, discovery finds more.
    case = make_case(constant_opportunities(4.0, 20.0), frames=60)
    run = simulate_policy(get_policy("turbo", {"initial_estimate_mbps": 0.2}), case.scenario, case.schedule,
                          case.detections_at)
    sizes = [case.scenario.config_names[k] for k in run.planned_config[:20].max(axis=1) if k >= 0]
    assert sizes, "nothing was sent"
    assert run.counters["published_cloud"] > 0
    assert np.nanmedian(run.estimate_mbps[30:]) > 2.0  # it learnt the link from a 0.2 Mbps start


@pytest.mark.parametrize("recalibrate", [False, True])
def test_the_forecast_is_calibrated_on_a_stationary_process(recalibrate):
    rng = np.random.default_rng(7)
    forecaster = QuantileForecaster(window=50, recalibrate=recalibrate)
    below = []
    for step, value in enumerate(rng.lognormal(np.log(5.0), 0.5, size=3000)):
        forecast = forecaster.samples_mbps()
        if step >= 100:
            below.append([value < np.quantile(forecast, q) for q in (0.1, 0.5, 0.9)])
        forecaster.observe(float(step), float(value))
    coverage = np.mean(below, axis=0)
    assert coverage == pytest.approx([0.1, 0.5, 0.9], abs=0.04)


def _forecast_and_true_spread(interval_ms: float | None) -> tuple[float, float]:
    """The forecast's median P90 / P10, and that of the next interval's capacity, for a car that
    measures a 10 ms transfer at the start of every 100 ms interval of a link whose every ms
    carries an independent amount (mean 10 Mbps)."""
    rng = np.random.default_rng(11)
    forecaster = QuantileForecaster(window=50, interval_ms=interval_ms)
    per_ms_mbps = rng.gamma(1.0, 10.0, size=(2000, int(FRAME_MS)))
    spreads = []
    for step, interval in enumerate(per_ms_mbps):
        if step >= 100:
            forecast = forecaster.samples_mbps()
            spreads.append(np.quantile(forecast, 0.9) / np.quantile(forecast, 0.1))
        forecaster.observe(step * FRAME_MS, float(interval[:10].mean()), transfer_ms=10.0)
    interval_mbps = per_ms_mbps[100:].mean(axis=1)
    return float(np.median(spreads)), float(np.quantile(interval_mbps, 0.9) / np.quantile(interval_mbps, 0.1))


def test_the_forecast_is_as_wide_as_the_interval_it_forecasts_though_its_samples_are_shorter():
    forecast_spread, true_spread = _forecast_and_true_spread(FRAME_MS)
    assert forecast_spread == pytest.approx(true_spread, rel=0.1)
    # Taken whole, the short transfers' errors make it as wide as a 10 ms span is.
    whole_spread, _ = _forecast_and_true_spread(None)
    assert whole_spread > 1.6 * true_spread


class _LastSample:
    """An estimator that believes the last sample it took."""

    def __init__(self, mbps: float) -> None:
        self.mbps = mbps
        self.transfer_ms: float | None = None

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self.mbps = throughput_mbps
        self.transfer_ms = transfer_ms

    def estimate_mbps(self) -> float:
        return self.mbps


def _reply_after(measurement, request_id: int, size_bytes: int, send_ms: float, transfer_ms: float):
    from onboard.measurement import RequestTiming

    timing = RequestTiming(request_id, size_bytes, send_ms)
    measurement.on_send(timing)
    arrival_ms = send_ms + transfer_ms + measurement.rtt_ms  # no server time
    return measurement.on_reply(timing, arrival_ms, 0.0)


def test_an_estimate_only_app_limited_samples_see_is_taken_back_to_them_after_a_while():
    from onboard.measurement import APP_LIMITED_TRUST_MS, LinkMeasurement

    measurement = LinkMeasurement(_LastSample(1.0), initial_rtt_ms=20.0, sample_window=50)
    # A full transfer (250 kB in 20 ms) shows 100 Mbps; then short ones (15 kB in 10 ms, 12 Mbps).
    assert _reply_after(measurement, 1, 250_000, 0.0, 20.0) == pytest.approx(100.0)
    for step in range(1, 9):  # within the trust window: "at least 12 Mbps" says nothing new
        assert _reply_after(measurement, 1 + step, 15_000, 100.0 * step, 10.0) is None
    assert measurement.bandwidth_mbps() == pytest.approx(100.0)
    late_ms = 40.0 + APP_LIMITED_TRUST_MS  # the 100 Mbps sample is older than the window now
    assert _reply_after(measurement, 20, 15_000, late_ms, 10.0) == pytest.approx(12.0)
    assert measurement.bandwidth_mbps() == pytest.approx(12.0)


def test_slow_start_doubles_the_estimate_once_per_round_not_once_per_reply():
    from onboard.measurement import LinkMeasurement, RequestTiming

    # RTT 500 ms: three short requests (15 kB in 10 ms: 12 Mbps, app-limited) are all sent under
    # the 1 Mbps estimate before the first reply comes.
    measurement = LinkMeasurement(_LastSample(1.0), initial_rtt_ms=500.0, sample_window=50)
    round_one = [RequestTiming(request_id, 15_000, 100.0 * request_id) for request_id in (1, 2, 3)]
    for timing in round_one:
        measurement.on_send(timing)
    samples = [measurement.on_reply(timing, timing.send_ms + 10.0 + 500.0, 0.0) for timing in round_one]
    assert samples == pytest.approx([2.0, 2.0, 2.0])  # doubling per reply would read 2, 4, 8
    # A request sent under the raised estimate may double it again.
    assert _reply_after(measurement, 4, 15_000, 1000.0, 10.0) == pytest.approx(4.0)


def test_a_reply_measures_its_request_with_every_earlier_one_still_unmeasured():
    from onboard.measurement import LinkMeasurement, RequestTiming

    estimator = _LastSample(1.0)
    measurement = LinkMeasurement(estimator, initial_rtt_ms=20.0, sample_window=50)
    # An 8 Mbps uplink: A (25 kB) leaves 0-25 ms, B (25 kB, sent at 5 ms) queues behind it, 25-50 ms.
    first, second = RequestTiming(1, 25_000, 0.0), RequestTiming(2, 25_000, 5.0)
    measurement.on_send(first)
    measurement.on_send(second)
    # B's cloud run was short, so its reply comes first: both requests left in 50 ms, 8 Mbps.
    # Alone, B would read 25 kB in 45 ms, 4.4 Mbps: the time it queued behind A counted as its own.
    assert measurement.on_reply(second, 50.0 + 20.0 + 5.0, 5.0) == pytest.approx(8.0)
    assert estimator.transfer_ms == pytest.approx(50.0)  # the forecast learns what span it measured
    assert measurement.on_reply(first, 25.0 + 20.0 + 60.0, 60.0) is None  # measured already
    # The next request starts after B's measured end: it is measured alone.
    third = RequestTiming(3, 25_000, 100.0)
    measurement.on_send(third)
    assert measurement.on_reply(third, 125.0 + 20.0, 0.0) == pytest.approx(8.0)
    assert estimator.transfer_ms == pytest.approx(25.0)
    # A request the measurement never saw sent cannot be placed in the queue: no sample.
    assert measurement.on_reply(RequestTiming(9, 25_000, 200.0), 250.0 + 20.0, 0.0) is None


class _Believes8Mbps:
    """An estimator that always says 8 Mbps: the virtual queue's tests set the link's timing."""

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        pass

    def estimate_mbps(self) -> float:
        return 8.0


def test_the_virtual_uplink_queue_moves_once_for_a_delay_every_queued_request_shares():
    from onboard.measurement import LinkMeasurement, RequestTiming

    measurement = LinkMeasurement(_Believes8Mbps(), initial_rtt_ms=20.0, sample_window=50)
    # Three 25 kB requests at 0 ms, 25 ms each at 8 Mbps: the car expects them gone at 25, 50, 75
    # ms. The uplink stalled for 100 ms first: they really left at 125, 150 and 175 ms.
    requests = [RequestTiming(request_id, 25_000, 0.0) for request_id in (1, 2, 3)]
    for request in requests:
        measurement.on_send(request)
    assert measurement.backlog_ms(0.0) == pytest.approx(75.0)
    measurement.on_reply(requests[0], 125.0 + 20.0, 0.0)  # the stall shows: the whole queue moves
    assert measurement.backlog_ms(145.0) == pytest.approx(30.0)
    # The second reply shows the same stall again: it moved the queue already, so nothing moves.
    # (Moving it again counted the stall once per queued request: 100 ms more here, and with ten
    # requests in the queue a second of backlog the car planned around, sending nothing.)
    measurement.on_reply(requests[1], 150.0 + 20.0, 0.0)
    assert measurement.backlog_ms(170.0) == pytest.approx(5.0)
    measurement.on_reply(requests[2], 175.0 + 20.0, 0.0)
    # Replies out of order: E (sent behind D) comes back first and moves the queue by the 5 ms it
    # was late; D's reply then must not move it again, for D had left before E.
    first, second = RequestTiming(4, 25_000, 200.0), RequestTiming(5, 25_000, 200.0)
    measurement.on_send(first)
    measurement.on_send(second)  # expected gone at 225 and 250 ms; really at 230 and 255
    measurement.on_reply(second, 255.0 + 20.0 + 5.0, 5.0)
    assert measurement.backlog_ms(250.0) == pytest.approx(5.0)
    measurement.on_reply(first, 230.0 + 20.0 + 60.0, 60.0)
    assert measurement.backlog_ms(250.0) == pytest.approx(5.0)


def test_an_overdue_reply_moves_the_virtual_queue_before_it_comes():
    from onboard.measurement import OVERDUE_WINDOW_MS, LinkMeasurement, RequestTiming

    measurement = LinkMeasurement(_Believes8Mbps(), initial_rtt_ms=20.0, sample_window=50)
    # Four 25 kB requests at 0 ms with a 10 ms cloud run each: expected gone at 25, 50, 75 and 100
    # ms, the first reply due at 25 + 20 + 10 = 55 ms.
    requests = [RequestTiming(request_id, 25_000, 0.0, runtime_ms=10.0) for request_id in (1, 2, 3, 4)]
    for request in requests:
        measurement.on_send(request)
    assert measurement.backlog_ms(55.0) == pytest.approx(45.0)  # due now: nothing overdue yet
    # At 60 ms it is 5 ms overdue: the first upload had not ended by 30 ms, 5 ms later than
    # expected, so neither had the three behind it. At 100 ms, 45 ms overdue: the queue's last
    # 75 ms of bytes had not started by 55 ms.
    assert measurement.backlog_ms(60.0) == pytest.approx(45.0)
    assert measurement.backlog_ms(100.0) == pytest.approx(45.0)
    # The reply comes at 110 ms: the first upload ended at 80 ms. The queue moves by those 55 ms,
    # and the next reply is not yet due.
    measurement.on_reply(requests[0], 110.0, 10.0)
    assert measurement.backlog_ms(110.0) == pytest.approx(155.0 - 110.0)
    # A request unanswered for longer than the window is lost, not queued: it delays nothing.
    late = LinkMeasurement(_Believes8Mbps(), initial_rtt_ms=20.0, sample_window=50)
    late.on_send(RequestTiming(1, 25_000, 0.0, runtime_ms=10.0))
    assert late.backlog_ms(OVERDUE_WINDOW_MS - 1.0) == pytest.approx(0.0)  # its bytes behind it: none
    late.on_send(RequestTiming(2, 250_000, OVERDUE_WINDOW_MS - 1.0, runtime_ms=10.0))  # 250 ms at 8 Mbps
    assert late.backlog_ms(OVERDUE_WINDOW_MS + 100.0) == pytest.approx(150.0 - 1.0)
