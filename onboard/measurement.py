"""Uplink bandwidth and network RTT, measured by the car from its own traffic.

- RTT: the agent sends a tiny ping every `ping_interval_ms` (about 100 bytes a second), when
  nothing of the car's is on the uplink or about to go onto it (onboard/daemon.py); the cloud
  answers at once. RTT sample = pong arrival - ping send - server time; the estimate is
  the smallest of the recent ones (the one least inflated by queueing behind the car's own
  uploads). Until the first pong, the configured prior.
- Upload end of a request = reply arrival - server time (`timings_ms.total`) - RTT estimate.
- The uplink is one FIFO queue: when a request's last byte has left, so have those of every
  request sent before it. Replies come back out of order (cloud runtimes differ), so a reply
  measures its request together with every earlier one not yet measured: throughput sample =
  their bits / (upload end - transfer start), where the transfer start is the later of the
  first one's send time and the upload end last measured. Measuring a request alone would
  count the time it queued behind an earlier request still unanswered as its own transfer:
  with pipelined uploads on a fast LTE uplink, that read 5 Mbps off a 20 Mbps link. A reply
  whose request an earlier reply already measured (or that `on_send` never saw) gives no
  sample. Samples are clamped to a plausible range.
- Application-limited samples (as BBR marks them): a transfer shorter than
  `APP_LIMITED_TRANSFER_MS` says more about where it fell among the link's bursts than about
  its capacity, and a car that sends little only learns that the link carried at least that
  much. Such a sample does not lower an estimate that a sample confirmed within the last
  `APP_LIMITED_TRUST_MS`, and raises it to at most `APP_LIMITED_GROWTH` times the estimate its
  transfer was sent under (slow start, once per round trip as in TCP: a lucky burst cannot make
  the car trust a fast link at once, and the replies of requests sent under one estimate cannot
  compound; docs/BANDWIDTH.md has the on-and-off link where, doubling per reply, they took the
  estimate from 3 to 33 Mbps in 11 frames on a link of about 4). Past that window an estimate
  that only app-limited samples still see is taken back to them (as BBR's max filter expires):
  on a fast link every transfer is short, and an estimate one lucky burst inflated would
  otherwise stay, and the forecast errors behind it would never be renewed.
- Cloud wait: a reply says how long the request spent at the cloud (`timings.total`); beyond
  the runtime the plan expected, that is queueing behind other cars' work. The median of the
  last 2 s of replies (`cloud_wait_ms`) is planned with as part of the round trip, so a car
  backs off from a busy GPU pool instead of reading its late replies as a slow uplink.
- Backlog: the car keeps a virtual copy of its uplink queue (each request's bits at the
  estimate, re-anchored when a reply tells where its upload really ended: the requests queued
  behind it move with it, once, and those sent before it are settled), so planning can count
  the bytes still queued (`backlog_ms`). A reply that is overdue moves it too, before it comes:
  while the oldest unanswered request's reply has not come an RTT, its cloud run and the
  cloud's recent wait after its expected upload end, its upload had not ended by then, and the
  queue is counted that much later. Without this the car learned of a stall only from the
  replies it delayed, and kept planning (and sending) into the stall for an RTT and a cloud run
  longer; the agent's drop-before-send check reads the same backlog.
A request that times out gives an upper-bound sample (see `on_timeout`), once no reply can show
any more that its upload had ended by the cutoff (the cloud's runtime and an RTT later: until
then a late reply is the cloud's lateness, not the link's, and measures the link itself).
When no sample has come for a while the agent plans a cheap real request, which measures the
link again (onboard/daemon.py).

Samples go to an `optimizer.bandwidth` estimator (`observe(time_ms, throughput_mbps)`,
`estimate_mbps()`), and are kept for the quantile planner.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Protocol

MIN_TRANSFER_MS = 1.0
MIN_SAMPLE_MBPS = 0.01
MAX_SAMPLE_MBPS = 10_000.0
# Transfers shorter than this are application-limited samples (see the module docstring); 20 ms
# spans several LTE scheduling bursts.
APP_LIMITED_TRANSFER_MS = 20.0
APP_LIMITED_GROWTH = 2.0
APP_LIMITED_TRUST_MS = 1000.0
VIRTUAL_ENDS_KEPT = 256
# An unanswered request older than this is taken as lost (the cloud restarted, the connection was
# replaced), not queued: it no longer delays the car's virtual queue (its timeout sample has long
# since brought the estimate down).
OVERDUE_WINDOW_MS = 2000.0
RTT_WINDOW = 16  # pings: the last 16 s at the default interval
# Cloud wait: replies of the last 2 s (older ones are forgotten, so that a car that stopped sending
# to a busy cloud tries again), at most 32 of them.
CLOUD_WAIT_WINDOW_MS = 2000.0
CLOUD_WAITS_KEPT = 32


class BandwidthEstimator(Protocol):
    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None: ...

    def estimate_mbps(self) -> float: ...


@dataclass(frozen=True)
class RequestTiming:
    """What the measurement needs to know about one request."""

    request_id: int
    size_bytes: int
    send_ms: float
    capture_ms: float = float("nan")  # when its frame's latency budget started (for logs)
    runtime_ms: float = 0.0  # the cloud runtime the plan expected (its profile's)


class SeededEstimator:
    """An estimator that answers the policy's initial bandwidth until it has seen a sample (and
    whenever its own estimate is not a positive number)."""

    def __init__(self, inner: BandwidthEstimator, initial_mbps: float) -> None:
        self.inner = inner
        self.initial_mbps = initial_mbps
        self.seen = False

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self.seen = True
        self.inner.observe(time_ms, throughput_mbps, transfer_ms)

    def estimate_mbps(self) -> float:
        if not self.seen:
            return self.initial_mbps
        estimate = self.inner.estimate_mbps()
        return float(estimate) if estimate is not None and math.isfinite(estimate) and estimate > 0 \
            else self.initial_mbps


class LinkMeasurement:
    """Bandwidth and RTT estimates of the car's uplink, fed by request outcomes."""

    def __init__(self, estimator: BandwidthEstimator, initial_rtt_ms: float, sample_window: int = 50) -> None:
        self.estimator = estimator
        self.initial_rtt_ms = initial_rtt_ms
        self._rtts_ms: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)
        self.samples_mbps: collections.deque[float] = collections.deque(maxlen=sample_window)
        self.last_sample_ms = -math.inf
        self._upload_end_ms = -math.inf  # estimated end of the most recent upload we know of
        self._queue_end_ms = -math.inf  # when the car's queued uplink bytes will have left (virtual)
        # Each queued request's virtual end, less `_queue_shift_ms` at the time it was stored: a
        # reply that moves the queue moves every request still in it, so a stored end plus the
        # current shift is that request's end now (see `on_reply`).
        self._virtual_ends_ms: collections.OrderedDict[int, float] = collections.OrderedDict()
        # (request id, send time, expected cloud runtime) in send order, for the oldest request
        # still in the virtual queue (see `backlog_ms`); those settled or too old are dropped from
        # the front as they are met.
        self._overdue_candidates: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=2 * VIRTUAL_ENDS_KEPT)
        self._queue_shift_ms = 0.0
        # Requests sent and not yet measured, in send order: request id -> (send time, bytes, the
        # bandwidth estimate when it was sent).
        self._unmeasured: collections.OrderedDict[int, tuple[float, int, float]] = collections.OrderedDict()
        self.replies = 0
        self.timeouts = 0
        self.app_limited_samples = 0
        self._last_taken_ms = -math.inf  # when the estimator last took a sample
        self._cloud_waits_ms: collections.deque[tuple[float, float]] = collections.deque(maxlen=CLOUD_WAITS_KEPT)
        self._forecast_source: object = None  # the forecaster's last distribution, and it as a tuple
        self._forecast_tuple: tuple[float, ...] = ()

    @property
    def rtt_ms(self) -> float:
        return min(self._rtts_ms) if self._rtts_ms else self.initial_rtt_ms

    def cloud_wait_ms(self, now_ms: float) -> float:
        """How much longer than their expected runtime recent requests took at the cloud (the
        median of the last `CLOUD_WAIT_WINDOW_MS` of replies, in whole ms: a timing's rounding
        noise is no wait; 0 without any)."""
        if not self._cloud_waits_ms:
            return 0.0
        recent = sorted(wait_ms for reply_ms, wait_ms in self._cloud_waits_ms if now_ms - reply_ms <= CLOUD_WAIT_WINDOW_MS)
        return float(math.floor(recent[len(recent) // 2])) if recent else 0.0

    def bandwidth_mbps(self) -> float:
        return float(self.estimator.estimate_mbps())

    def forecast_samples_mbps(self) -> tuple[float, ...]:
        """Equally likely values of the next interval's bandwidth: the forecaster's distribution when
        the estimator is one (`samples_mbps()`), else the recent samples themselves."""
        inner = getattr(self.estimator, "inner", self.estimator)
        forecast = getattr(inner, "samples_mbps", None)
        if not callable(forecast):
            return tuple(self.samples_mbps)
        values = forecast()
        # QuantileForecaster hands out one read-only array until its next sample: convert it once.
        frozen = not getattr(getattr(values, "flags", None), "writeable", True)
        if values is not self._forecast_source or not frozen:
            self._forecast_source = values
            self._forecast_tuple = tuple(float(value) for value in values)
        return self._forecast_tuple

    def on_send(self, request: RequestTiming) -> float:
        """A request went onto the uplink: it queues behind what the car sent before. Returns
        when its last byte should have left (virtual)."""
        estimate_mbps = self.bandwidth_mbps()
        self._queue_end_ms = max(self._queue_end_ms, request.send_ms) + \
            request.size_bytes * 8 / 1000.0 / max(estimate_mbps, MIN_SAMPLE_MBPS)
        self._virtual_ends_ms[request.request_id] = self._queue_end_ms - self._queue_shift_ms
        self._overdue_candidates.append((request.request_id, request.send_ms, request.runtime_ms))
        while len(self._virtual_ends_ms) > VIRTUAL_ENDS_KEPT:
            self._virtual_ends_ms.popitem(last=False)
        self._unmeasured[request.request_id] = (request.send_ms, request.size_bytes, estimate_mbps)
        while len(self._unmeasured) > VIRTUAL_ENDS_KEPT:
            self._unmeasured.popitem(last=False)
        return self._queue_end_ms

    def backlog_ms(self, now_ms: float) -> float:
        """How long the bytes the car has already queued will still occupy the uplink: the virtual
        queue, later by as much as the oldest unanswered request's reply is overdue."""
        return max(0.0, self._queue_end_ms + self._overdue_ms(now_ms) - now_ms)

    def _overdue_ms(self, now_ms: float) -> float:
        """How much later than the virtual queue expects the oldest request still in it (sent
        within `OVERDUE_WINDOW_MS`) must have left the uplink, since its reply has not come. The
        agent asks with its clock's time, which never goes back: a request too old now stays so.
        (The result is bounded: once overdue, it grows as fast as time, so the backlog is at most
        the bytes queued behind that request.)"""
        candidates = self._overdue_candidates
        while candidates and (candidates[0][0] not in self._virtual_ends_ms
                              or now_ms - candidates[0][1] > OVERDUE_WINDOW_MS):
            candidates.popleft()
        if not candidates:
            return 0.0
        request_id, _, runtime_ms = candidates[0]
        # Had its upload ended by then, its reply (an RTT and the cloud's run later) would be here.
        overdue_ms = now_ms - self.rtt_ms - runtime_ms - (self._virtual_ends_ms[request_id] + self._queue_shift_ms)
        return max(0.0, overdue_ms - self.cloud_wait_ms(now_ms)) if overdue_ms > 0 else 0.0

    def on_reply(self, request: RequestTiming, arrival_ms: float, server_ms: float) -> float | None:
        """Account a reply; returns the throughput sample taken, if any."""
        self.replies += 1
        self._cloud_waits_ms.append((arrival_ms, max(0.0, server_ms - request.runtime_ms)))
        upload_end_ms = arrival_ms - max(0.0, server_ms) - self.rtt_ms
        previous_end_ms = self._upload_end_ms
        self._upload_end_ms = max(self._upload_end_ms, upload_end_ms)
        if request.request_id in self._virtual_ends_ms:  # what was queued behind it moves with it
            # The requests sent before it had left by then (one FIFO queue): their later replies
            # must not move the queue again.
            while True:
                request_id, stored_end_ms = self._virtual_ends_ms.popitem(last=False)
                if request_id == request.request_id:
                    break
            shift_ms = upload_end_ms - (stored_end_ms + self._queue_shift_ms)
            self._queue_shift_ms += shift_ms
            self._queue_end_ms = max(upload_end_ms, self._queue_end_ms + shift_ms)
        if request.request_id not in self._unmeasured:
            return None  # its bytes were in the sample of a request sent after it
        first_send_ms, size_bytes, sent_under_mbps = self._take_unmeasured(request.request_id)
        start_ms = max(first_send_ms, previous_end_ms) if previous_end_ms < upload_end_ms else first_send_ms
        transfer_ms = max(MIN_TRANSFER_MS, upload_end_ms - start_ms)
        return self._observe(arrival_ms, size_bytes, transfer_ms, app_limited=transfer_ms < APP_LIMITED_TRANSFER_MS,
                             sent_under_mbps=sent_under_mbps)

    def _take_unmeasured(self, last_request_id: int) -> tuple[float, int, float]:
        """The send time of the first unmeasured request, the bytes of all of them up to this one
        (in send order), now measured, and the estimate the first one was sent under."""
        first_send_ms, _, sent_under_mbps = self._unmeasured[next(iter(self._unmeasured))]
        size_bytes = 0
        while True:
            request_id, (_, request_bytes, _) = self._unmeasured.popitem(last=False)
            size_bytes += request_bytes
            if request_id == last_request_id:
                return first_send_ms, size_bytes, sent_under_mbps

    def on_pong(self, send_ms: float, arrival_ms: float, server_ms: float) -> None:
        """A ping came back: one RTT sample (a ping's upload is negligible)."""
        self._rtts_ms.append(max(0.0, arrival_ms - send_ms - max(0.0, server_ms)))

    def on_timeout(self, request: RequestTiming, now_ms: float, timed_out_ms: float) -> float:
        """A request got no reply within its frame's budget, and its upload had not ended when it
        timed out (`timed_out_ms`; the agent waits until a reply would have come, see
        `OnboardAgent._take_overdue_samples`): its size over the time from sending to then is an
        upper bound of what the uplink carried, taken now so that an outage drives the estimate
        down without waiting for a reply that may never come (the simulator learns the same). A
        reply that still comes back late is measured again then. Returns the sample taken."""
        self.timeouts += 1
        return self._observe(now_ms, request.size_bytes, max(MIN_TRANSFER_MS, timed_out_ms - request.send_ms))

    def _observe(self, now_ms: float, size_bytes: int, transfer_ms: float, app_limited: bool = False,
                 sent_under_mbps: float = math.inf) -> float | None:
        sample_mbps = size_bytes * 8 / 1000.0 / transfer_ms
        sample_mbps = min(MAX_SAMPLE_MBPS, max(MIN_SAMPLE_MBPS, sample_mbps))
        self.last_sample_ms = now_ms  # the link answered: the estimate is fresh either way
        if app_limited:
            self.app_limited_samples += 1
            estimate_mbps = self.bandwidth_mbps()
            if sample_mbps <= estimate_mbps and now_ms - self._last_taken_ms < APP_LIMITED_TRUST_MS:
                return None  # "at least this much": nothing a recently confirmed estimate does not say
            # Slow start: at most a doubling of the estimate the transfer was sent under (or of
            # today's, if that is lower), so that the replies of one round cannot compound.
            sample_mbps = min(sample_mbps, APP_LIMITED_GROWTH * min(estimate_mbps, sent_under_mbps))
        self._last_taken_ms = now_ms
        self.estimator.observe(now_ms, sample_mbps, transfer_ms)
        self.samples_mbps.append(sample_mbps)
        return sample_mbps


def build_measurement(policy, initial_rtt_ms: float, estimator: BandwidthEstimator | None = None,
                      frame_interval_ms: float | None = None) -> LinkMeasurement:
    """The measurement a policy spec (optimizer.policies.PolicySpec) asks for: its estimator (for
    the cameras' `frame_interval_ms`, the span a plan must carry), seeded with its initial
    estimate. The daemon and the replay both build it here."""
    from optimizer.policies import make_estimator

    estimator = estimator or make_estimator(policy, frame_interval_ms)
    # An estimator that knows the capacity without samples (the replay's oracle) takes no seed: its
    # 0 in an outage is the truth, not a missing estimate.
    seeded = SeededEstimator(estimator, policy.initial_estimate_mbps) if getattr(estimator, "needs_seed", True) \
        else estimator
    return LinkMeasurement(seeded, initial_rtt_ms, max(policy.quantile_window, policy.estimator_window))
