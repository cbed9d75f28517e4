"""One cell's uplink, shared by many vehicles: a trace of delivery opportunities split by a scheduler.

The cell's capacity is one Mahimahi trace (`avcloud.link.DeliverySchedule`): each opportunity
carries one packet of at most 1500 bytes. Every vehicle has its own FIFO queue (its modem's
buffer); at each opportunity the scheduler gives the opportunity to one backlogged vehicle, whose
head packet leaves. A message is delivered when its last packet leaves. An opportunity that finds
every queue empty is lost, as in Mahimahi. Schedulers (`SCHEDULERS`):

- `pf`, proportional fair: the backlogged vehicle with the least average throughput. PF ranks
  users by instantaneous rate over average throughput; one trace gives every vehicle the same
  instantaneous rate, so the rank is by average throughput alone, an exponential average with
  time constant `pf_window_ms` (LTE's usual 1000 TTIs, 1 s). Over a long backlog it shares
  equally; a vehicle that was idle is served first when it starts sending (a frame's burst).
- `equal`: round robin among the backlogged vehicles, one packet each in turn (a vehicle that
  becomes backlogged joins the end of the round).
- `per-vehicle`: no sharing; every vehicle has a private uplink with its own trace (a
  `TraceLink` each, see `private_links`).

Delivery times are exact under the scheduler, but they are not known when a message is sent: a
later send by another vehicle takes opportunities this one would have had. So the cell delivers
through callbacks: `CellLink.send(now_ms, size_bytes, on_delivered)` queues the message and
returns a `Transfer` whose `delivered_ms` is NaN; the fleet loop calls `advance()` after every
simulated instant, which hands out every opportunity before the loop's next event (sends only
happen in events, so those are final) and calls `on_delivered(delivered_ms)` for each message
completed. A callback only schedules events (at `delivered_ms` plus a delay), so the next event
can come earlier; `advance` rereads it after every delivery. A send at time t may use an
opportunity at t, as `TraceLink` allows: opportunities at t are handed out only once every event
at t has run.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence

from avcloud.link import PACKET_BYTES, DeliverySchedule, TraceLink, Transfer, packets_for

SCHEDULERS: tuple[str, ...] = ("pf", "equal", "per-vehicle")
SHARED_SCHEDULERS: tuple[str, ...] = ("pf", "equal")
DEFAULT_PF_WINDOW_MS = 1000.0
# The PF averages are kept as sums of exp((t - t0) / window); rescaled before they overflow.
_PF_RESCALE_EXPONENT = 300.0

DeliveryCallback = Callable[[float], None]


class _Message:
    __slots__ = ("remaining_packets", "on_delivered")

    def __init__(self, packets: int, on_delivered: DeliveryCallback | None) -> None:
        self.remaining_packets = packets
        self.on_delivered = on_delivered


class _VehicleQueue:
    __slots__ = ("messages", "queued_packets", "credit", "delivered_packets", "delivered_bytes")

    def __init__(self) -> None:
        self.messages: deque[_Message] = deque()
        self.queued_packets = 0
        self.credit = 0.0  # pf: sum of exp((t - t0) / window) over the packets served
        self.delivered_packets = 0
        self.delivered_bytes = 0


class CellUplink:
    """A cell whose opportunities are shared by `vehicles` vehicles under `scheduler` (pf, equal).

    `queue_limit_bytes`: each vehicle's buffer (drop-tail, as `TraceLink`); None: unbounded.
    """

    def __init__(self, schedule: DeliverySchedule, vehicles: int, scheduler: str = "pf",
                 pf_window_ms: float = DEFAULT_PF_WINDOW_MS, queue_limit_bytes: int | None = None) -> None:
        if scheduler not in SHARED_SCHEDULERS:
            raise ValueError(f"unknown cell scheduler {scheduler!r} (shared cells: {', '.join(SHARED_SCHEDULERS)})")
        if vehicles < 1:
            raise ValueError(f"a cell needs at least one vehicle, got {vehicles}")
        if not pf_window_ms > 0:
            raise ValueError(f"pf_window_ms must be > 0, got {pf_window_ms}")
        self.schedule = schedule
        self.scheduler = scheduler
        self.pf_window_ms = float(pf_window_ms)
        self.queue_limit_bytes = queue_limit_bytes
        self._times = [int(value) for value in schedule.opportunities_ms.tolist()]
        self._count = schedule.count_per_period
        self._period_ms = schedule.period_ms
        self._queues = [_VehicleQueue() for _ in range(vehicles)]
        self._next_index = 0  # the first opportunity not yet handed out
        self._last_send_ms = -math.inf
        self._backlogged = 0  # vehicles with queued packets
        self._round: deque[int] = deque()  # equal: backlogged vehicles in turn
        self._heap: list[tuple[float, int, int]] = []  # pf: (credit, arrival order, vehicle)
        self._arrivals = 0
        self._pf_origin_ms = 0.0
        self.opportunities_used = 0

    @property
    def vehicles(self) -> int:
        return len(self._queues)

    def link(self, vehicle: int) -> CellLink:
        """The view one vehicle's uplink sends through."""
        if not 0 <= vehicle < len(self._queues):
            raise ValueError(f"vehicle {vehicle} is not in this cell of {len(self._queues)}")
        return CellLink(self, vehicle)

    def _time_ms(self, index: int) -> int:
        cycle, within = divmod(index, self._count)
        return self._times[within] + cycle * self._period_ms

    def backlog_packets(self, vehicle: int | None = None) -> int:
        """Packets queued now, of one vehicle or of the whole cell."""
        if vehicle is not None:
            return self._queues[vehicle].queued_packets
        return sum(queue.queued_packets for queue in self._queues)

    def next_opportunity_ms(self) -> float:
        """When the next opportunity not yet handed out comes (a queued packet's earliest delivery)."""
        return float(self._time_ms(self._next_index))

    def delivered_bytes(self, vehicle: int) -> int:
        return self._queues[vehicle].delivered_bytes

    # ------------------------------------------------------------ sending

    def enqueue(self, vehicle: int, now_ms: float, size_bytes: int, on_delivered: DeliveryCallback | None) -> Transfer:
        if now_ms < self._last_send_ms:
            raise ValueError("messages must be sent in time order")
        self._last_send_ms = now_ms
        if self._backlogged:
            if self._time_ms(self._next_index) < now_ms:
                raise ValueError("the cell was not advanced before this send (call advance() after every instant)")
        else:  # nothing queued: the opportunities before now went unused
            self._next_index = max(self._next_index, self.schedule.first_index_at_or_after(now_ms))
        packets = packets_for(size_bytes)
        queue = self._queues[vehicle]
        if self.queue_limit_bytes is not None and queue.queued_packets * PACKET_BYTES + size_bytes > self.queue_limit_bytes:
            return Transfer(False, now_ms, math.inf, packets)
        queue.messages.append(_Message(packets, on_delivered))
        if not queue.queued_packets:
            self._backlogged += 1
            if self.scheduler == "equal":
                self._round.append(vehicle)
            else:
                heapq.heappush(self._heap, (queue.credit, self._arrivals, vehicle))
                self._arrivals += 1
        queue.queued_packets += packets
        return Transfer(True, now_ms, math.nan, packets)

    # ------------------------------------------------------------ handing out opportunities

    def advance(self, next_event_ms: Callable[[], float]) -> None:
        """Hand out every opportunity before `next_event_ms()` (reread after each delivery, whose
        callback may schedule an earlier event); with no event left, until the backlog is gone."""
        if not self._backlogged:
            return  # idle: the opportunities go unused (`enqueue` skips past them)
        limit_ms = next_event_ms()
        while self._backlogged:
            time_ms = self._time_ms(self._next_index)
            if time_ms >= limit_ms:
                return
            if self._backlogged == 1 and self.scheduler == "equal":
                delivered = self._serve_alone(self._round[0], limit_ms)
            else:
                delivered = self._serve_one(time_ms)
            if delivered:
                limit_ms = next_event_ms()

    def _serve_one(self, time_ms: int) -> bool:
        """The opportunity at `time_ms` goes to the scheduler's choice; True if a message completed."""
        if self.scheduler == "equal":
            vehicle = self._round.popleft()
        else:
            _, _, vehicle = heapq.heappop(self._heap)
        queue = self._queues[vehicle]
        self._next_index += 1
        self.opportunities_used += 1
        queue.queued_packets -= 1
        queue.delivered_packets += 1
        if self.scheduler == "pf":
            exponent = (time_ms - self._pf_origin_ms) / self.pf_window_ms
            if exponent > _PF_RESCALE_EXPONENT:
                self._rescale_pf(time_ms)
                exponent = 0.0
            queue.credit += math.exp(exponent)
        message = queue.messages[0]
        message.remaining_packets -= 1
        completed = message.remaining_packets == 0
        if completed:
            queue.messages.popleft()
        if queue.queued_packets:
            if self.scheduler == "equal":
                self._round.append(vehicle)
            else:
                heapq.heappush(self._heap, (queue.credit, self._arrivals, vehicle))
                self._arrivals += 1
        else:
            self._backlogged -= 1
        if completed and message.on_delivered is not None:
            message.on_delivered(float(time_ms))
        return completed

    def _serve_alone(self, vehicle: int, limit_ms: float) -> bool:
        """Only one vehicle is backlogged (equal share): its head message takes the coming
        opportunities in one step, up to the limit; True if it completed."""
        queue = self._queues[vehicle]
        message = queue.messages[0]
        available = (self.schedule.first_index_at_or_after(limit_ms) - self._next_index
                     if math.isfinite(limit_ms) else message.remaining_packets)
        served = min(message.remaining_packets, available)
        last_index = self._next_index + served - 1
        self._next_index += served
        self.opportunities_used += served
        queue.queued_packets -= served
        queue.delivered_packets += served
        message.remaining_packets -= served
        if message.remaining_packets:
            return False
        queue.messages.popleft()
        if not queue.queued_packets:
            self._backlogged -= 1
            self._round.popleft()
        if message.on_delivered is not None:
            message.on_delivered(float(self._time_ms(last_index)))
        return True

    def _rescale_pf(self, time_ms: float) -> None:
        factor = math.exp(-(time_ms - self._pf_origin_ms) / self.pf_window_ms)
        for queue in self._queues:
            queue.credit *= factor
        self._heap = [(credit * factor, order, vehicle) for credit, order, vehicle in self._heap]
        heapq.heapify(self._heap)
        self._pf_origin_ms = time_ms


class CellLink:
    """One vehicle's view of the cell, for `SimulatedUplink`: `send(now_ms, size_bytes,
    on_delivered)` queues a message and returns its `Transfer` (delivery time NaN: the cell calls
    `on_delivered(delivered_ms)` once the last packet has left)."""

    delivers_later = True

    def __init__(self, cell: CellUplink, vehicle: int) -> None:
        self.cell = cell
        self.vehicle = vehicle

    def send(self, now_ms: float, size_bytes: int, on_delivered: DeliveryCallback | None = None) -> Transfer:
        return self.cell.enqueue(self.vehicle, now_ms, size_bytes, on_delivered)


def private_links(schedules: Sequence[DeliverySchedule], vehicles: int,
                  queue_limit_bytes: int | None = None) -> list[TraceLink]:
    """`per-vehicle`: vehicle i gets a private uplink on trace i modulo the number of traces."""
    if not schedules:
        raise ValueError("per-vehicle uplinks need at least one trace")
    return [TraceLink(schedules[vehicle % len(schedules)], queue_limit_bytes=queue_limit_bytes)
            for vehicle in range(vehicles)]
