"""The service's bounded request queue: earliest-deadline-first with expiry, deadline-aware
batching and a per-vehicle fair share of worker time, or plain FIFO as a baseline.

Pure logic: time comes in as `now_ms` arguments, so tests and the simulated cloud drive it
without threads or sockets.

Who goes next:
- **Fair share across vehicles.** Every vehicle is charged the expected worker time of what it
  was served, divided by its weight (`served_ms`, a virtual time as in start-time fair
  queueing). Only vehicles within `fair_share_slack_ms` of the least-served backlogged vehicle
  are eligible. A vehicle that sends more than its share runs ahead of the others and waits
  until they catch up, so a flood costs the flooder, never another vehicle. A vehicle that
  starts sending after a pause enters at the current virtual time minus the slack: a burst of up
  to `fair_share_slack_ms` of work is served ahead of vehicles that kept the worker busy, but it
  keeps no credit for the time it was idle.
- **Deadline order among the eligible** (EDF: earliest deadline; FIFO: earliest arrival),
  across models. A head that cannot finish before its deadline (deadline - now < expected
  runtime) is expired without running.
- **Batching**: eligible requests for the same model join the head's batch, in deadline order,
  while the batch still finishes before every deadline in it and leaves time for other models'
  heads that a single run would not have made miss (FIFO: greedily up to max_batch_size).

What is held:
- at most `limit` requests in all and `per_vehicle_limit` per vehicle. When the queue is full,
  a request from a vehicle holding fewer requests than the fullest one pushes out that vehicle's
  least urgent request (latest deadline); the pushed-out request is handed back, to be answered
  `rejected`, by `drain_evicted()` or in the next `Decision.rejected`.

A request is accounted under `PendingRequest.vehicle`: the service sets it from the
authenticated key; it defaults to what the header claims.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from avcloud.protocol import RequestHeader

# Rebuild the heaps when they hold this many times more entries than live requests.
_COMPACT_FACTOR = 4


@dataclass(eq=False)
class PendingRequest:
    """A validated request waiting for a worker."""

    identity: bytes  # ROUTER identity of the sender
    header: RequestHeader
    payload: Any  # memoryview of the received frame (kept alive until the reply)
    arrival_ms: float
    deadline_ms: float
    sequence: int = field(default=0)
    # The vehicle this request is accounted under (queue share, fair share of worker time).
    # None: the header's `vehicle`. The service sets it from the authenticated CurveZMQ key.
    vehicle: str | None = None

    @property
    def model(self) -> str:
        return self.header.model

    @property
    def accounted_vehicle(self) -> str:
        return self.vehicle if self.vehicle is not None else self.header.vehicle


@dataclass
class Decision:
    """What a worker should do next: answer `expired` ones, run `batch` (same model), answer
    `rejected` ones (pushed out of a full queue by other vehicles' requests)."""

    expired: list[PendingRequest] = field(default_factory=list)
    batch: list[PendingRequest] = field(default_factory=list)
    rejected: list[PendingRequest] = field(default_factory=list)


# expected_ms(model, batch_size): decode + inference time of a batch of that model.
ExpectedRuntime = Callable[[str, int], float]

_Entry = tuple[float, int, PendingRequest]


class RequestQueue:
    """Bounded, thread-safe. `policy` is "edf" (deadline-aware) or "fifo" (plain baseline).

    `per_vehicle_limit`: queued requests one vehicle may hold (None: no limit besides `limit`).
    `fair_share`: share worker time across vehicles (see the module docstring); False serves
    strictly by deadline (or arrival) whoever sent it. `vehicle_weights`: relative shares by
    vehicle name (default 1).
    """

    def __init__(self, policy: str, limit: int, max_batch_size: int, expected_ms: ExpectedRuntime,
                 per_vehicle_limit: int | None = None, fair_share: bool = True,
                 fair_share_slack_ms: float = 100.0, vehicle_weights: Mapping[str, float] | None = None) -> None:
        if policy not in ("edf", "fifo"):
            raise ValueError(f"unknown scheduling policy {policy!r}")
        if fair_share_slack_ms < 0:
            raise ValueError("fair_share_slack_ms must be >= 0")
        self.policy = policy
        self.limit = limit
        self.per_vehicle_limit = per_vehicle_limit
        self.max_batch_size = max_batch_size
        self.expected_ms = expected_ms
        self.fair_share = fair_share
        self.fair_share_slack_ms = fair_share_slack_ms if fair_share else math.inf
        self.vehicle_weights = dict(vehicle_weights or {})
        self._by_model: dict[str, list[_Entry]] = {}
        self._by_vehicle: dict[str, list[_Entry]] = {}
        self._live: set[int] = set()  # sequences of queued requests; heap entries of others are stale
        self._entries = 0
        self._queued_per_vehicle: dict[str, int] = {}
        self._served_ms: dict[str, float] = {}  # weighted expected worker time, by vehicle
        self._virtual_ms = 0.0  # never decreases: where a newly backlogged vehicle starts
        self._evicted: list[PendingRequest] = []
        self._size = 0
        self._sequence = itertools.count()
        self._closed = False
        self._condition = threading.Condition()

    def __len__(self) -> int:
        return self._size

    # ------------------------------------------------------------ admission

    def _key(self, request: PendingRequest) -> float:
        return request.deadline_ms if self.policy == "edf" else float(request.sequence)

    def _weight(self, vehicle: str) -> float:
        return max(1e-9, float(self.vehicle_weights.get(vehicle, 1.0)))

    def push(self, request: PendingRequest) -> bool:
        """Enqueue; False (and nothing queued) when the queue is closed, the vehicle already holds
        its share (see `vehicle_full`), or the queue is full of requests from vehicles holding no
        more than this one. May push out another vehicle's request (see `drain_evicted`)."""
        with self._condition:
            vehicle = request.accounted_vehicle
            if self._closed or self.vehicle_full(vehicle):
                return False
            if self._size >= self.limit:
                victim = self._eviction_victim(vehicle)
                if victim is None:
                    return False
                self._remove(victim)
                self._evicted.append(victim)
            request.vehicle = vehicle
            if not self._queued_per_vehicle.get(vehicle):
                self._activate(vehicle)
            self._queued_per_vehicle[vehicle] = self._queued_per_vehicle.get(vehicle, 0) + 1
            request.sequence = next(self._sequence)
            entry = (self._key(request), request.sequence, request)
            heapq.heappush(self._by_model.setdefault(request.model, []), entry)
            heapq.heappush(self._by_vehicle.setdefault(vehicle, []), entry)
            self._entries += 2
            self._live.add(request.sequence)
            self._size += 1
            self._condition.notify()
            return True

    def vehicle_full(self, vehicle: str) -> bool:
        return self.per_vehicle_limit is not None and self._queued_per_vehicle.get(vehicle, 0) >= self.per_vehicle_limit

    def queued_by_vehicle(self) -> dict[str, int]:
        """Requests queued now, by vehicle."""
        with self._condition:
            return dict(self._queued_per_vehicle)

    def served_ms(self, vehicle: str) -> float:
        """Expected worker time charged to a vehicle so far, divided by its weight."""
        with self._condition:
            return self._served_ms.get(vehicle, 0.0)

    def drain_evicted(self) -> list[PendingRequest]:
        """Requests pushed out of the full queue since the last call (answer them `rejected`)."""
        with self._condition:
            evicted, self._evicted = self._evicted, []
            return evicted

    def _eviction_victim(self, vehicle: str) -> PendingRequest | None:
        """The least urgent request of the vehicle holding the most (by weight), if it holds more
        than `vehicle` would after this push."""
        incoming_load = (self._queued_per_vehicle.get(vehicle, 0) + 1) / self._weight(vehicle)
        fullest = max(self._queued_per_vehicle, default=None,
                      key=lambda name: self._queued_per_vehicle[name] / self._weight(name))
        if fullest is None or fullest == vehicle or \
                self._queued_per_vehicle[fullest] / self._weight(fullest) <= incoming_load:
            return None
        candidates = [entry for entry in self._by_vehicle[fullest] if entry[1] in self._live]
        return max(candidates, key=lambda entry: entry[:2])[2]

    def _activate(self, vehicle: str) -> None:
        """A vehicle with nothing queued starts sending: no credit for its idle time beyond the slack."""
        floor = self._virtual_ms - (self.fair_share_slack_ms if math.isfinite(self.fair_share_slack_ms) else 0.0)
        self._served_ms[vehicle] = max(self._served_ms.get(vehicle, floor), floor)
        if len(self._served_ms) > 4 * max(16, len(self._queued_per_vehicle)):
            # Forget idle vehicles without debt: they would start at the floor anyway.
            self._served_ms = {name: served for name, served in self._served_ms.items()
                               if served > floor or self._queued_per_vehicle.get(name) or name == vehicle}

    # ------------------------------------------------------------ taking work

    def take(self, now_ms: float) -> Decision:
        """The next decision at now_ms (empty when nothing is queued). Never blocks."""
        with self._condition:
            return self._take_locked(now_ms)

    def wait_and_take(self, now: Callable[[], float], timeout_s: float) -> Decision | None:
        """Block until there is work or timeout; None once the queue is closed and empty."""
        with self._condition:
            if self._size == 0 and not self._evicted and not self._closed:
                self._condition.wait(timeout_s)
            if self._size == 0 and not self._evicted and self._closed:
                return None
            return self._take_locked(now())

    def close(self) -> list[PendingRequest]:
        """Refuse new requests, wake every waiting worker, and hand back everything still queued
        (and not yet handed out as pushed out)."""
        with self._condition:
            self._closed = True
            remaining = [entry[2] for heap in self._by_model.values() for entry in heap if entry[1] in self._live]
            remaining += self._evicted
            self._evicted = []
            self._by_model.clear()
            self._by_vehicle.clear()
            self._live.clear()
            self._entries = 0
            self._queued_per_vehicle.clear()
            self._size = 0
            self._condition.notify_all()
            return sorted(remaining, key=lambda request: request.sequence)

    @property
    def closed(self) -> bool:
        return self._closed

    def expire_due(self, now_ms: float) -> list[PendingRequest]:
        """Take out every request that can no longer finish before its deadline (EDF only: the
        rule `take` applies to heads), to answer `expired` while no worker is free to take them."""
        if self.policy != "edf":
            return []
        with self._condition:
            due = [entry[2] for heap in self._by_model.values() for entry in heap
                   if entry[1] in self._live and entry[2].deadline_ms - now_ms < self.expected_ms(entry[2].model, 1)]
            for request in due:
                self._remove(request)
            return sorted(due, key=lambda request: (request.deadline_ms, request.sequence))

    def earliest_deadline_ms(self) -> float | None:
        """The earliest deadline among queued requests (None when empty)."""
        with self._condition:
            deadlines = [entry[2].deadline_ms for heap in self._by_model.values() for entry in heap
                         if entry[1] in self._live]
            return min(deadlines, default=None)

    def _remove(self, request: PendingRequest) -> None:
        """Take a queued request out (its heap entries go stale and are skipped later)."""
        self._live.discard(request.sequence)
        self._size -= 1
        vehicle = request.accounted_vehicle
        self._queued_per_vehicle[vehicle] -= 1
        if not self._queued_per_vehicle[vehicle]:
            del self._queued_per_vehicle[vehicle]
        if self._entries > _COMPACT_FACTOR * 2 * max(self._size, 16):
            self._compact()

    def _compact(self) -> None:
        for heaps in (self._by_model, self._by_vehicle):
            for name in list(heaps):
                live = [entry for entry in heaps[name] if entry[1] in self._live]
                if live:
                    heapq.heapify(live)
                    heaps[name] = live
                else:
                    del heaps[name]
        self._entries = 2 * self._size

    def _head(self, heaps: dict[str, list[_Entry]], name: str) -> _Entry | None:
        heap = heaps.get(name)
        while heap and heap[0][1] not in self._live:
            heapq.heappop(heap)
            self._entries -= 1
        if not heap:
            heaps.pop(name, None)
            return None
        return heap[0]

    def _least_served_ms(self) -> float:
        """The least service among backlogged vehicles (call only while some are)."""
        served_ms = self._served_ms
        return min(served_ms.get(name, 0.0) for name in self._queued_per_vehicle)

    def _is_eligible(self, vehicle: str, least_ms: float | None = None) -> bool:
        """Within the slack of the least served backlogged vehicle."""
        if vehicle not in self._queued_per_vehicle:
            return False
        least_ms = self._least_served_ms() if least_ms is None else least_ms
        served_ms = self._served_ms.get(vehicle, 0.0)
        return served_ms == least_ms or served_ms - least_ms < self.fair_share_slack_ms

    def _next_head(self) -> PendingRequest | None:
        """The most urgent head among the eligible vehicles."""
        if not self._queued_per_vehicle:
            return None
        least_ms = self._least_served_ms()
        # Usually the most urgent request of all belongs to an eligible vehicle: the models' heads
        # find it without visiting every backlogged vehicle (hundreds in a fleet).
        best: _Entry | None = None
        for model in list(self._by_model):
            entry = self._head(self._by_model, model)
            if entry is not None and (best is None or entry[:2] < best[:2]):
                best = entry
        if best is None or self._is_eligible(best[2].accounted_vehicle, least_ms):
            return best[2] if best is not None else None
        best = None
        for vehicle in list(self._queued_per_vehicle):
            if not self._is_eligible(vehicle, least_ms):
                continue
            entry = self._head(self._by_vehicle, vehicle)
            if entry is not None and (best is None or entry[:2] < best[:2]):
                best = entry
        return best[2] if best is not None else None

    def _charge(self, vehicle: str, cost_ms: float) -> None:
        self._served_ms[vehicle] = self._served_ms.get(vehicle, self._virtual_ms) + max(0.0, cost_ms) / self._weight(vehicle)

    def _advance_virtual_time(self, served: list[PendingRequest]) -> None:
        """The virtual time: the least service of the vehicles competing in this decision (those
        still queued and those just served), so a vehicle that was alone does not leave a newcomer
        credit for work nobody competed for."""
        competing = set(self._queued_per_vehicle) | {request.accounted_vehicle for request in served}
        if competing:
            least = min(self._served_ms.get(name, 0.0) for name in competing)
            self._virtual_ms = max(self._virtual_ms, least)

    def _take_locked(self, now_ms: float) -> Decision:
        decision = Decision(rejected=self._evicted)
        self._evicted = []
        while True:
            head = self._next_head()
            if head is None:
                return decision
            if self.policy == "edf" and head.deadline_ms - now_ms < self.expected_ms(head.model, 1):
                self._remove(head)
                decision.expired.append(head)
                continue
            break
        model = head.model
        self._remove(head)
        decision.batch.append(head)
        batch_ms = self.expected_ms(model, 1)
        self._charge(head.accounted_vehicle, batch_ms)
        if self.policy == "edf":
            finish_limit_ms = min(head.deadline_ms, self._latest_start_for_other_models(model, now_ms))
        else:
            finish_limit_ms = math.inf
        if self.max_batch_size > 1:
            self._head(self._by_model, model)
            candidates = sorted(entry for entry in self._by_model.get(model, []) if entry[1] in self._live)
            for _, _, request in candidates:
                if len(decision.batch) >= self.max_batch_size:
                    break
                bigger_ms = self.expected_ms(model, len(decision.batch) + 1)
                # A bigger batch must still finish before the earliest deadline in it, and must not
                # push another model's head past its deadline when a single run would not.
                if now_ms + bigger_ms > finish_limit_ms:
                    break
                if self.policy == "edf" and now_ms + bigger_ms > request.deadline_ms:
                    continue
                if not self._is_eligible(request.accounted_vehicle):
                    continue  # over its share: it does not ride along on others' time
                self._remove(request)
                decision.batch.append(request)
                self._charge(request.accounted_vehicle, bigger_ms - batch_ms)
                batch_ms = bigger_ms
                if self.policy == "edf":
                    finish_limit_ms = min(finish_limit_ms, request.deadline_ms)
        self._advance_virtual_time(decision.batch)
        return decision

    def _latest_start_for_other_models(self, model: str, now_ms: float) -> float:
        """Latest time another model's head can start and still make its deadline, over the heads
        that could make it if this model ran only one request first."""
        single_ms = self.expected_ms(model, 1)
        latest = math.inf
        for other in list(self._by_model):
            if other == model:
                continue
            entry = self._head(self._by_model, other)
            if entry is None:
                continue
            other_head = entry[2]
            other_ms = self.expected_ms(other, 1)
            if now_ms + single_ms + other_ms <= other_head.deadline_ms:
                latest = min(latest, other_head.deadline_ms - other_ms)
        return latest
