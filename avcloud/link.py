"""Trace-driven uplink model with Mahimahi semantics, shared by the replay and the link emulator.

A trace is a sorted list of millisecond timestamps; each is an opportunity for one packet of
at most 1500 bytes to leave the bottleneck queue. The trace loops with a period equal to its
last timestamp (as mm-link does). Messages are split into packets and queued FIFO across all
senders; a message is delivered when the opportunity that carries its last packet comes.
Opportunities that find the queue empty are lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PACKET_BYTES = 1500
BITS_PER_PACKET = PACKET_BYTES * 8


def packets_for(size_bytes: int) -> int:
    """Packets a message of this size occupies (an empty message still takes one)."""
    return max(1, math.ceil(size_bytes / PACKET_BYTES))


class DeliverySchedule:
    """The looping sequence of delivery opportunities of one trace, indexed globally from 0."""

    def __init__(self, opportunities_ms: np.ndarray) -> None:
        opportunities_ms = np.asarray(opportunities_ms, dtype=np.int64)
        if opportunities_ms.ndim != 1 or opportunities_ms.size == 0:
            raise ValueError("a trace needs at least one delivery opportunity")
        if np.any(np.diff(opportunities_ms) < 0):
            raise ValueError("trace timestamps must be non-decreasing")
        if opportunities_ms[-1] <= 0:
            raise ValueError("a trace's last timestamp must be positive (it is the loop period)")
        self.opportunities_ms = opportunities_ms
        self.period_ms = int(opportunities_ms[-1])
        self.count_per_period = int(opportunities_ms.size)

    def rotated(self, start_ms: float) -> DeliverySchedule:
        """The same loop seen from a later start, for replaying a scene over another stretch of
        the trace: the start is `start_ms` (mod the period) moved back to the nearest time that
        holds an opportunity, so that the new list still ends with one at the period."""
        period_ms = self.period_ms
        starts_ms = np.unique(self.opportunities_ms % period_ms)  # always holds 0 (the period itself)
        origin_ms = int(starts_ms[np.searchsorted(starts_ms, int(start_ms) % period_ms, side="right") - 1])
        first = self.first_index_at_or_after(origin_ms + 1)
        last = self.first_index_at_or_after(origin_ms + period_ms + 1)
        return DeliverySchedule(self.time_ms(np.arange(first, last)) - origin_ms)

    def time_ms(self, index: int | np.ndarray) -> int | np.ndarray:
        """Time of the opportunity with this global index."""
        cycle, within = np.divmod(index, self.count_per_period)
        result = self.opportunities_ms[within] + cycle * self.period_ms
        return int(result) if np.isscalar(index) or np.ndim(index) == 0 else result

    def first_index_at_or_after(self, time_ms: float) -> int:
        """Global index of the first opportunity at or after time_ms."""
        time_ms = math.ceil(time_ms)
        # Timestamps lie in [0, period], so cycle c covers [c*period, (c+1)*period]; the first
        # cycle that can hold an opportunity at or after time_ms is the one ending at or after it.
        cycle = max(0, (time_ms - 1) // self.period_ms)
        offset_ms = time_ms - cycle * self.period_ms
        within = int(np.searchsorted(self.opportunities_ms, offset_ms, side="left"))
        return int(cycle * self.count_per_period + within)

    def packets_between(self, start_ms: float, end_ms: float) -> int:
        """Opportunities in [start_ms, end_ms)."""
        return self.first_index_at_or_after(end_ms) - self.first_index_at_or_after(start_ms)

    def capacity_mbps(self, start_ms: float, end_ms: float) -> float:
        """Mean link capacity over [start_ms, end_ms) in megabits per second."""
        duration_ms = end_ms - start_ms
        if duration_ms <= 0:
            raise ValueError("capacity needs a positive interval")
        return self.packets_between(start_ms, end_ms) * BITS_PER_PACKET / (duration_ms * 1000.0)

    def mean_mbps(self) -> float:
        return self.count_per_period * BITS_PER_PACKET / (self.period_ms * 1000.0)


@dataclass(frozen=True)
class Transfer:
    """Outcome of one message sent over the link."""

    accepted: bool
    enqueue_ms: float
    delivered_ms: float  # when the last packet leaves the queue (propagation delay not included)
    packets: int


class TraceLink:
    """A FIFO bottleneck queue drained by a DeliverySchedule; optional drop-tail limit in bytes.

    Messages must be sent in non-decreasing time order. The model is exact: a message's
    delivery time is the time of the opportunity carrying its last packet.
    """

    def __init__(self, schedule: DeliverySchedule, queue_limit_bytes: int | None = None) -> None:
        self.schedule = schedule
        self.queue_limit_bytes = queue_limit_bytes
        self._next_free_index = 0
        self._last_send_ms = -math.inf

    def queued_packets(self, now_ms: float) -> int:
        """Packets still waiting in the queue at now_ms."""
        return max(0, self._next_free_index - self.schedule.first_index_at_or_after(now_ms))

    def send(self, now_ms: float, size_bytes: int) -> Transfer:
        if now_ms < self._last_send_ms:
            raise ValueError("messages must be sent in time order")
        self._last_send_ms = now_ms
        packets = packets_for(size_bytes)
        if self.queue_limit_bytes is not None:
            queued_bytes = self.queued_packets(now_ms) * PACKET_BYTES
            if queued_bytes + size_bytes > self.queue_limit_bytes:
                return Transfer(False, now_ms, math.inf, packets)
        first = max(self._next_free_index, self.schedule.first_index_at_or_after(now_ms))
        last = first + packets - 1
        self._next_free_index = last + 1
        return Transfer(True, now_ms, float(self.schedule.time_ms(last)), packets)
