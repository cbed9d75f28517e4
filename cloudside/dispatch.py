"""Deadline-aware dispatch across a pool of replicas: which replica gets a request, and when.

Pure logic: time comes in as `now_ms` arguments; the Ray engine (`cloudside.ray_engine`) drives
it from one event loop and the tests drive it on a simulated clock.

The fleet's queue is the service's `RequestQueue` (admission, fair share, EDF order, batches);
this module decides where its decisions go:

- **Room.** A replica is sent more work only while the work it already holds (the expected
  runtime of what was sent to it and is not answered yet, `backlog_ms`) is under
  `dispatch_ahead_ms`, or when it holds nothing. Everything else waits in the fleet's queue,
  in deadline order, so a request that arrives later with an earlier deadline still goes
  first: earliest deadline first across the fleet, not per replica.
- **Placement.** A batch goes to the replica that can start it soonest (least backlog), and
  only if it can finish there before every deadline in it: now + backlog + expected runtime
  <= deadline. A batch that does not fit is split and its requests placed one by one; a request
  that fits on no replica is handed back to be answered `expired`, never sent.
- **Leaving.** A replica that Serve stops listing (scaled down, being replaced) gets no new work
  and finishes what it holds; it leaves once it holds nothing.
- **Failures.** A replica that died hands back every request it held; so does one that holds a
  request for `hang_timeout_ms` past its expected finish (hung), which then gets no more work
  until it answers something. A replica judged hung that answers after all was slow, not hung:
  its allowance doubles (up to `MAX_HANG_BACKOFF` times `hang_timeout_ms`), so that a pool of one
  slow replica (a large payload on a loaded host) converges instead of taking every request back
  each time it nears the end. Each handed-back request is re-queued while its deadline allows.
  Every dispatch is an `Assignment` with a unique attempt number; `finished(attempt)` returns it
  once, and never for an attempt that was handed back, so every request is answered once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cloudside.scheduler import PendingRequest

# expected_ms(model, batch_size): decode + inference time of a batch of that model on one replica.
ExpectedRuntime = Callable[[str, int], float]

# How far a slow replica's hang allowance may grow (2 s becomes at most 32 s), so that a replica
# that is stuck after all still hands its work back in bounded time.
MAX_HANG_BACKOFF = 16.0


@dataclass(eq=False)
class Assignment:
    """One request sent to one replica (one attempt)."""

    request: PendingRequest
    replica: str
    attempt: int
    dispatched_ms: float
    cost_ms: float  # this request's share of the expected runtime of the batch it was sent in
    expected_finish_ms: float  # dispatched + backlog ahead of it + the batch's expected runtime


@dataclass
class Placement:
    """What `place()` decided for one batch."""

    assignments: list[Assignment] = field(default_factory=list)
    # Requests no replica can finish before their deadline: (request, earliest start in ms from
    # now, expected runtime in ms).
    infeasible: list[tuple[PendingRequest, float, float]] = field(default_factory=list)


@dataclass
class ReplicaLoad:
    """What the dispatcher knows about one replica."""

    name: str
    joined_ms: float
    assignments: dict[int, Assignment] = field(default_factory=dict)
    backlog_ms: float = 0.0
    last_progress_ms: float = 0.0
    hung: bool = False
    leaving: bool = False  # no longer listed by Serve: finishes what it holds, gets nothing new
    answered: int = 0
    hang_allowance_ms: float = 0.0  # how long past an expected finish it is judged hung (`overdue`)

    @property
    def held(self) -> int:
        return len(self.assignments)


class FleetDispatcher:
    """Replicas, what each holds, and where the next batch goes. Not thread-safe: one owner."""

    def __init__(self, expected_ms: ExpectedRuntime, dispatch_ahead_ms: float = 50.0,
                 hang_timeout_ms: float = 2000.0) -> None:
        self.expected_ms = expected_ms
        self.dispatch_ahead_ms = dispatch_ahead_ms
        self.hang_timeout_ms = hang_timeout_ms
        self._replicas: dict[str, ReplicaLoad] = {}
        self._failed: set[str] = set()  # died: never again, even while a stale replica list names it
        self._attempts = itertools.count(1)

    # ------------------------------------------------------------ the pool

    @property
    def replicas(self) -> dict[str, ReplicaLoad]:
        return self._replicas

    def live(self) -> list[ReplicaLoad]:
        """Replicas that may get work (neither hung nor leaving)."""
        return [load for load in self._replicas.values() if not load.hung and not load.leaving]

    def update_replicas(self, names: Iterable[str], now_ms: float) -> None:
        """The pool's replicas are now `names`: new ones join; absent ones leave once they have
        answered what they hold (a dead one's calls fail: `replica_failed`)."""
        wanted = {name for name in names if name not in self._failed}
        for name, load in list(self._replicas.items()):
            if name not in wanted:
                load.leaving = True
                if not load.assignments:
                    del self._replicas[name]
        for name in sorted(wanted):
            load = self._replicas.get(name)
            if load is None:
                self._replicas[name] = ReplicaLoad(name, joined_ms=now_ms, last_progress_ms=now_ms,
                                                   hang_allowance_ms=self.hang_timeout_ms)
            else:
                load.leaving = False

    def lost_below_floor(self, names: Iterable[str], floor: int) -> list[str]:
        """The replicas this pool holds that a listing of only `names` drops, when that listing is
        below `floor`, the size Serve never scales under on purpose: they died. (Serve's router
        hears of a death only through a failed call, and an idle replica gets none; Serve's own
        controller may list the pool without it first.)"""
        listed = set(names)
        if len(listed) >= floor:
            return []
        return sorted(name for name, load in self._replicas.items() if name not in listed and not load.leaving)

    def replica_failed(self, name: str) -> list[Assignment]:
        """A replica died: it leaves for good and hands back what it held."""
        self._failed.add(name)
        return self._remove(name)

    def _remove(self, name: str) -> list[Assignment]:
        load = self._replicas.pop(name, None)
        if load is None:
            return []
        return sorted(load.assignments.values(), key=lambda assignment: assignment.attempt)

    # ------------------------------------------------------------ dispatch

    def has_room(self) -> bool:
        return any(self._has_room(load) for load in self.live())

    def _has_room(self, load: ReplicaLoad) -> bool:
        return not load.assignments or load.backlog_ms < self.dispatch_ahead_ms

    def place(self, batch: list[PendingRequest], now_ms: float) -> Placement:
        """Send a same-model batch (in deadline order, as `RequestQueue.take` gives it) where it
        can finish in time: whole to the replica that can start it soonest, else one by one."""
        placement = Placement()
        if not batch:
            return placement
        candidates = [load for load in self.live() if self._has_room(load)]
        if not candidates:
            raise RuntimeError("place() needs a replica with room: check has_room() first")
        model = batch[0].model
        best = min(candidates, key=self._start_order)
        batch_ms = self.expected_ms(model, len(batch))
        if len(batch) > 1 and now_ms + best.backlog_ms + batch_ms <= min(request.deadline_ms for request in batch):
            for request in batch:
                placement.assignments.append(self._assign(best, request, now_ms, batch_ms, batch_ms / len(batch)))
            best.backlog_ms += batch_ms
            return placement
        single_ms = self.expected_ms(model, 1)
        for request in batch:
            best = min(candidates, key=self._start_order)
            if now_ms + best.backlog_ms + single_ms <= request.deadline_ms:
                placement.assignments.append(self._assign(best, request, now_ms, single_ms, single_ms))
                best.backlog_ms += single_ms
            else:
                placement.infeasible.append((request, best.backlog_ms, single_ms))
        return placement

    @staticmethod
    def _start_order(load: ReplicaLoad) -> tuple[float, int, str]:
        return (load.backlog_ms, load.held, load.name)

    def _assign(self, load: ReplicaLoad, request: PendingRequest, now_ms: float, batch_ms: float,
                cost_ms: float) -> Assignment:
        if not load.assignments:
            load.last_progress_ms = now_ms  # an idle replica's clock starts now
        assignment = Assignment(request=request, replica=load.name, attempt=next(self._attempts),
                                dispatched_ms=now_ms, cost_ms=cost_ms,
                                expected_finish_ms=now_ms + load.backlog_ms + batch_ms)
        load.assignments[assignment.attempt] = assignment
        return assignment

    # ------------------------------------------------------------ answers and failures

    def finished(self, assignment: Assignment, now_ms: float) -> bool:
        """The replica answered this attempt. True exactly once per live attempt: the caller
        replies to the request; False for an attempt already handed back (drop the answer)."""
        load = self._replicas.get(assignment.replica)
        if load is None:
            return False
        load.last_progress_ms = now_ms
        if load.hung:  # it answers: it was slow, not hung; judge it more patiently from now on
            load.hang_allowance_ms = min(2.0 * load.hang_allowance_ms, MAX_HANG_BACKOFF * self.hang_timeout_ms)
        load.hung = False
        load.answered += 1
        found = load.assignments.pop(assignment.attempt, None) is not None
        load.backlog_ms = max(0.0, load.backlog_ms - assignment.cost_ms) if load.assignments else 0.0
        if load.leaving and not load.assignments:
            del self._replicas[load.name]
        return found

    def overdue(self, now_ms: float) -> list[str]:
        """Live replicas holding a request past its expected finish by more than their hang
        allowance (`hang_timeout_ms`, doubled for each time it was judged hung and answered after
        all), with no answer for that long either: hung."""
        hung = []
        for load in self._replicas.values():
            if load.hung or not load.assignments:
                continue
            oldest_finish_ms = min(assignment.expected_finish_ms for assignment in load.assignments.values())
            if now_ms - max(oldest_finish_ms, load.last_progress_ms) > load.hang_allowance_ms:
                hung.append(load.name)
        return hung

    def mark_hung(self, name: str) -> list[Assignment]:
        """Stop sending to a hung replica and hand back what it held (it stays in the pool, and
        takes work again once it answers anything)."""
        load = self._replicas.get(name)
        if load is None:
            return []
        load.hung = True
        handed_back = sorted(load.assignments.values(), key=lambda assignment: assignment.attempt)
        load.assignments.clear()
        load.backlog_ms = 0.0
        if load.leaving:
            del self._replicas[name]
        return handed_back

    def outstanding(self) -> list[Assignment]:
        """Every attempt not answered yet."""
        return [assignment for load in self._replicas.values() for assignment in load.assignments.values()]

    def drain(self) -> list[Assignment]:
        """Hand back every outstanding attempt (shutdown)."""
        handed_back = self.outstanding()
        for load in self._replicas.values():
            load.assignments.clear()
            load.backlog_ms = 0.0
        return sorted(handed_back, key=lambda assignment: assignment.attempt)
