"""The service's bounded request queue: earliest-deadline-first with expiry and deadline-aware
batching, or plain FIFO as a baseline.

Pure logic: time comes in as `now_ms` arguments, so tests drive it without threads or sockets.
Requests are kept in one heap per model; the next batch is always taken from the model whose
head is most urgent (EDF: earliest deadline; FIFO: earliest arrival).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from avcloud.protocol import RequestHeader


@dataclass(eq=False)
class PendingRequest:
    """A validated request waiting for a worker."""

    identity: bytes  # ROUTER identity of the sender
    header: RequestHeader
    payload: Any  # memoryview of the received frame (kept alive until the reply)
    arrival_ms: float
    deadline_ms: float
    sequence: int = field(default=0)

    @property
    def model(self) -> str:
        return self.header.model


@dataclass
class Decision:
    """What a worker should do next: answer `expired` ones, run `batch` (same model)."""

    expired: list[PendingRequest] = field(default_factory=list)
    batch: list[PendingRequest] = field(default_factory=list)


# expected_ms(model, batch_size): decode + inference time of a batch of that model.
ExpectedRuntime = Callable[[str, int], float]


class RequestQueue:
    """Bounded, thread-safe. `policy` is "edf" (deadline-aware) or "fifo" (plain baseline).

    EDF: the head whose deadline is earliest runs first; a head that cannot finish before its
    deadline (deadline - now < expected runtime) is expired without running; other requests
    for the same model join its batch, in deadline order, while the batch still finishes
    before the head's deadline and leaves time for other models' heads that a single run
    would not have made miss. FIFO: arrival order, nothing expired, same-model requests
    batched greedily up to max_batch_size.
    """

    def __init__(self, policy: str, limit: int, max_batch_size: int, expected_ms: ExpectedRuntime,
                 per_vehicle_limit: int | None = None) -> None:
        if policy not in ("edf", "fifo"):
            raise ValueError(f"unknown scheduling policy {policy!r}")
        self.policy = policy
        self.limit = limit
        # One vehicle may hold at most this many queued requests, so a flood cannot starve others.
        self.per_vehicle_limit = per_vehicle_limit
        self._queued_per_vehicle: dict[str, int] = {}
        self.max_batch_size = max_batch_size
        self.expected_ms = expected_ms
        self._heaps: dict[str, list[tuple[float, int, PendingRequest]]] = {}
        self._size = 0
        self._sequence = itertools.count()
        self._closed = False
        self._condition = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def _key(self, request: PendingRequest) -> float:
        return request.deadline_ms if self.policy == "edf" else float(request.sequence)

    def push(self, request: PendingRequest) -> bool:
        """Enqueue; False (and nothing queued) when the queue is full or closed, or the vehicle
        already holds its share (see `vehicle_full`)."""
        with self._condition:
            if self._closed or self._size >= self.limit or self.vehicle_full(request.header.vehicle):
                return False
            vehicle = request.header.vehicle
            self._queued_per_vehicle[vehicle] = self._queued_per_vehicle.get(vehicle, 0) + 1
            request.sequence = next(self._sequence)
            heapq.heappush(self._heaps.setdefault(request.model, []),
                           (self._key(request), request.sequence, request))
            self._size += 1
            self._condition.notify()
            return True

    def vehicle_full(self, vehicle: str) -> bool:
        return self.per_vehicle_limit is not None and self._queued_per_vehicle.get(vehicle, 0) >= self.per_vehicle_limit

    def take(self, now_ms: float) -> Decision:
        """The next decision at now_ms (empty when nothing is queued). Never blocks."""
        with self._condition:
            return self._take_locked(now_ms)

    def wait_and_take(self, now: Callable[[], float], timeout_s: float) -> Decision | None:
        """Block until there is work or timeout; None once the queue is closed and empty."""
        with self._condition:
            if self._size == 0 and not self._closed:
                self._condition.wait(timeout_s)
            if self._size == 0 and self._closed:
                return None
            return self._take_locked(now())

    def close(self) -> list[PendingRequest]:
        """Refuse new requests, wake every waiting worker, and hand back everything still queued."""
        with self._condition:
            self._closed = True
            remaining = [entry[2] for heap in self._heaps.values() for entry in heap]
            self._heaps.clear()
            self._queued_per_vehicle.clear()
            self._size = 0
            self._condition.notify_all()
            return sorted(remaining, key=lambda request: request.sequence)

    @property
    def closed(self) -> bool:
        return self._closed

    def _pop(self, model: str) -> PendingRequest:
        heap = self._heaps[model]
        request = heapq.heappop(heap)[2]
        if not heap:
            del self._heaps[model]
        self._size -= 1
        vehicle = request.header.vehicle
        self._queued_per_vehicle[vehicle] -= 1
        if not self._queued_per_vehicle[vehicle]:
            del self._queued_per_vehicle[vehicle]
        return request

    def _most_urgent_model(self) -> str | None:
        best = None
        for model, heap in self._heaps.items():
            if best is None or heap[0][:2] < self._heaps[best][0][:2]:
                best = model
        return best

    def _take_locked(self, now_ms: float) -> Decision:
        decision = Decision()
        while True:
            model = self._most_urgent_model()
            if model is None:
                return decision
            head = self._heaps[model][0][2]
            if self.policy == "edf" and head.deadline_ms - now_ms < self.expected_ms(model, 1):
                decision.expired.append(self._pop(model))
                continue
            break
        decision.batch.append(self._pop(model))
        finish_limit_ms = head.deadline_ms if self.policy == "edf" else float("inf")
        if self.policy == "edf":
            finish_limit_ms = min(finish_limit_ms, self._latest_start_for_other_models(model, now_ms))
        heap = self._heaps.get(model)
        while heap and len(decision.batch) < self.max_batch_size:
            # A bigger batch must still finish before the head's deadline (the earliest), and
            # must not push another model's head past its deadline when a single run would not.
            if now_ms + self.expected_ms(model, len(decision.batch) + 1) > finish_limit_ms:
                break
            decision.batch.append(self._pop(model))
            heap = self._heaps.get(model)
        return decision

    def _latest_start_for_other_models(self, model: str, now_ms: float) -> float:
        """Latest time another model's head can start and still make its deadline, over the heads
        that could make it if this model ran only one request first."""
        single_ms = self.expected_ms(model, 1)
        latest = float("inf")
        for other, heap in self._heaps.items():
            if other == model or not heap:
                continue
            other_head = heap[0][2]
            other_ms = self.expected_ms(other, 1)
            if now_ms + single_ms + other_ms <= other_head.deadline_ms:
                latest = min(latest, other_head.deadline_ms - other_ms)
        return latest
