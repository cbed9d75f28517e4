"""A fleet on several processes, making exactly the decisions it makes on one.

The vehicles of a fleet interact only through the network: the cell's uplink (whose
opportunities they share) and the cloud's pool. Both reach a car only as network arrivals
(replies, pongs), and no arrival comes sooner than RTT/2 after the network side decided it: a
reply leaves the cloud at the end of its batch, a pong at the request's delivery, and each takes
RTT/2 back. So simulated time is cut into windows of RTT/2 (the shortest of the fleet's). In
each window:

1. every group of cars runs its own events up to the window's end, on its own `EventLoop`:
   the cars are the shipped agents of `ReplayedCar`, and the network side of their connection
   is a stand-in that writes each request down (`_ToSharedSide`);
2. the shared side (the cell and the cloud, on this process) takes the window's requests, in
   the order one loop would have sent them (by time, then vehicle: `EventLoop`'s order), and
   runs up to the same end; what it decides for a car (a delivery time, a reply and when it
   arrives) it writes down for the car's group (`_CarElsewhere`), which takes it before its
   next window. Everything decided in window k arrives at the cars in window k + 1 or later.

Every car sees the same events in the same order as in `simulate_fleet` on one process (a test
compares the two runs' every plan, outcome, result time and published detection). The first
group runs on this process, the others in forked processes, each answering one window at a
time over a pipe. The gain is the cars' share of the work divided among the processes, less a
round trip over the pipes per window. Ctrl-C and SIGTERM are this process's to handle: the
children leave with it (their pipes close), and a child that dies is one clear error here.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from avcloud.clock import SimulatedClock
from avcloud.replay.simulator import (
    EventLoop,
    PolicyRun,
    ReplayedCar,
    SimulatedCloud,
    UplinkPath,
    run_instant,
)

# Below this many vehicles per process, the windows' round trips over the pipes cost more than
# dividing the cars saves (default scene, shared cell: 10 vehicles 35x real time on one process
# and 32x on two; 30 vehicles 24x and 29x; 100 vehicles 7.4-7.9x and 11.2x).
MIN_VEHICLES_PER_PROCESS = 16

# What the shared side writes down for a car's group.
_DELIVERED, _ARRIVAL = 0, 1


def can_run_on_processes() -> bool:
    """Forked children inherit the loaded inputs and the solver's compiled kernels; without fork
    (Windows, macOS's default) the fleet runs on one process."""
    return "fork" in multiprocessing.get_all_start_methods()


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def processes_for(vehicles: int, processes: int) -> int:
    """How many of `processes` a fleet of `vehicles` is worth splitting over."""
    return max(1, min(processes, vehicles // MIN_VEHICLES_PER_PROCESS))


class _ToSharedSide:
    """A car's side of its connection when the cell and the cloud run on another process: each
    request is written down, with what the shared side needs of it, and always accepted (a fleet's
    uplinks never refuse a message: their queues are unbounded)."""

    __slots__ = ("vehicle", "outbox")

    def __init__(self, vehicle: int, outbox: list) -> None:
        self.vehicle, self.outbox = vehicle, outbox

    def send(self, now_ms: float, index: int, epoch: int, header, wire_bytes: int, runtime_ms: float) -> bool:
        self.outbox.append((now_ms, self.vehicle, index, epoch, header, wire_bytes, runtime_ms))
        return True


class _CarElsewhere:
    """The shared side's view of a car on another process: what happens to its messages is
    written down for the car's group."""

    __slots__ = ("vehicle", "inbox")

    def __init__(self, vehicle: int, inbox: list) -> None:
        self.vehicle, self.inbox = vehicle, inbox

    def delivered(self, index: int, delivered_ms: float) -> None:
        self.inbox.append((_DELIVERED, self.vehicle, index, delivered_ms))

    def reply_at(self, arrival_ms: float, epoch: int, header, image) -> None:
        self.inbox.append((_ARRIVAL, self.vehicle, arrival_ms, epoch, header, image))


class _VehicleGroup:
    """Some of the fleet's cars on their own loop and clock (`make_car(vehicle, loop, path)`:
    the fleet's car, as `simulate_fleet` builds it)."""

    def __init__(self, make_car: Callable[..., ReplayedCar], vehicles: Sequence[int]) -> None:
        self.loop = EventLoop(SimulatedClock(0.0))
        self.outbox: list = []
        self.cars = {vehicle: make_car(vehicle, self.loop, _ToSharedSide(vehicle, self.outbox)) for vehicle in vehicles}

    def run_window(self, end_ms: float, inbox: list) -> tuple[list, float]:
        """Take what the shared side decided, run every instant before `end_ms`; returns the
        requests sent meanwhile and the time of this group's next event."""
        self._take(inbox)
        events = self.loop._events  # noqa: SLF001
        while events and events[0][0] < end_ms:
            run_instant(self.loop)
        sent = self.outbox[:]
        self.outbox.clear()
        return sent, self.loop.next_time_ms()

    def finish(self, inbox: list) -> list[PolicyRun]:
        self._take(inbox)
        return [car.run(0.0) for car in self.cars.values()]

    def _take(self, inbox: list) -> None:
        now_ms = self.loop.clock.now_ms()
        for item in inbox:
            uplink = self.cars[item[1]].uplink
            if item[0] == _DELIVERED:
                uplink.delivered(item[2], item[3])
                continue
            _, _, arrival_ms, epoch, header, image = item
            if arrival_ms < now_ms:  # the windows' guarantee: never in a window already run
                raise RuntimeError(f"a reply arriving at {arrival_ms} ms reached car-{item[1]} after {now_ms} ms")
            uplink.reply_at(arrival_ms, epoch, header, image)


class _SharedSide:
    """The cell (if shared) and the cloud, fed the cars' requests window by window."""

    def __init__(self, loop: EventLoop, cloud: SimulatedCloud, cell, links: Sequence[Any],
                 half_rtt_ms: Sequence[float], group_of: Sequence[int], groups: int) -> None:
        self.loop = loop
        self.cell = cell
        self.inboxes: list[list] = [[] for _ in range(groups)]
        self.paths = [UplinkPath(loop, link, half_rtt_ms[vehicle], cloud,
                                 _CarElsewhere(vehicle, self.inboxes[group_of[vehicle]]))
                      for vehicle, link in enumerate(links)]

    def take_requests(self, sent: list) -> None:
        """The window's requests, as events at their send times ranked as their cars' own: after
        the cloud's events of that instant, in vehicle order (as `run_fleet` steps the cars), and
        a car's own in the order it sent them."""
        for now_ms, vehicle, index, epoch, header, wire_bytes, runtime_ms in sent:
            path = self.paths[vehicle]

            def send(path=path, now_ms=now_ms, index=index, epoch=epoch, header=header, wire_bytes=wire_bytes,
                     runtime_ms=runtime_ms) -> None:
                if not path.send(now_ms, index, epoch, header, wire_bytes, runtime_ms):
                    raise RuntimeError("a fleet on several processes needs uplinks that accept every message")

            self.loop.at(now_ms, send, rank=2 * vehicle + 1)

    def run_until(self, end_ms: float) -> None:
        """Every event before `end_ms`, handing out the cell's opportunities up to the next event
        as `run_fleet` does, but none at or after `end_ms` (later requests are not known yet)."""
        loop, cell = self.loop, self.cell
        events = loop._events  # noqa: SLF001

        def limit_ms() -> float:
            return min(loop.next_time_ms(), end_ms)

        if cell is not None:
            cell.advance(limit_ms)
        while events and events[0][0] < end_ms:
            run_instant(loop)
            if cell is not None:
                cell.advance(limit_ms)

    def next_time_ms(self) -> float:
        """When the shared side next acts: its next event, or the cell's next opportunity for a
        queued packet."""
        next_ms = self.loop.next_time_ms()
        if self.cell is not None and self.cell.backlog_packets():
            next_ms = min(next_ms, self.cell.next_opportunity_ms())
        return next_ms

    def take_inbox(self, group: int) -> list:
        inbox = self.inboxes[group][:]
        self.inboxes[group].clear()
        return inbox


def _child(connection, *group_arguments: Any) -> None:
    """A forked process running one group, built here (its cars' memory is its own, not pages
    shared with the parent and copied on every write): a window per message, then its runs.
    Ctrl-C is the parent's to handle, and SIGTERM simply ends it (not the CLI's handler, which
    it inherited); a parent that stopped (closed pipe) ends it quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        group = _VehicleGroup(*group_arguments)
        while True:
            command, *arguments = connection.recv()
            if command == "window":
                connection.send(("ok", group.run_window(*arguments)))
            else:
                connection.send(("ok", group.finish(*arguments)))
                return
    except (EOFError, OSError):
        return
    except Exception:  # reported to the parent, which raises it
        with contextlib.suppress(OSError):
            connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def _answer(connection, child) -> Any:
    """A child's answer; its exception raised here (a bug: with its traceback), or a one-line
    `ChildProcessError` (an OSError: the CLI prints one line) if it died (killed, out of memory)."""
    try:
        status, payload = connection.recv()
    except (EOFError, OSError):
        child.join(timeout=5.0)
        raise ChildProcessError(f"a fleet simulation process (pid {child.pid}) ended unexpectedly "
                                f"with exit code {child.exitcode}") from None
    if status != "ok":
        raise RuntimeError(f"a fleet process failed:\n{payload}")
    return payload


def run_on_processes(make_car: Callable[..., ReplayedCar], rtts_ms: Sequence[float], loop: EventLoop,
                     cloud: SimulatedCloud, cell, links: Sequence[Any], processes: int) -> list[PolicyRun]:
    """The fleet's runs (in vehicle order) with its cars split over `processes` processes
    (vehicle i in group i mod processes; `make_car(vehicle, loop, path)` builds one, forked
    children inherit it); `loop`, `cloud`, `cell` and `links` are the shared side's, on this
    process; `rtts_ms` the vehicles' round trips."""
    vehicles = len(rtts_ms)
    half_rtt_ms = [rtt_ms / 2.0 for rtt_ms in rtts_ms]
    window_ms = min(half_rtt_ms)
    if not window_ms > 0:
        raise ValueError("a fleet on several processes needs an RTT above 0 ms (its windows are RTT/2 long)")
    groups = max(1, min(processes, vehicles))
    group_of = [vehicle % groups for vehicle in range(vehicles)]
    members = [[vehicle for vehicle in range(vehicles) if group_of[vehicle] == group] for group in range(groups)]
    shared = _SharedSide(loop, cloud, cell, links, half_rtt_ms, group_of, groups)
    context = multiprocessing.get_context("fork")
    connections, children = [], []
    try:
        for group in range(1, groups):
            parent_end, child_end = context.Pipe()
            child = context.Process(target=_child, daemon=True, args=(child_end, make_car, members[group]))
            child.start()
            child_end.close()
            connections.append(parent_end)
            children.append(child)
        here = _VehicleGroup(make_car, members[0])
        done_ms, groups_next_ms = 0.0, 0.0  # everything before done_ms has run everywhere
        while True:
            arrivals_ms = [item[2] for inbox in shared.inboxes for item in inbox if item[0] == _ARRIVAL]
            next_ms = min([groups_next_ms, shared.next_time_ms()] + arrivals_ms)
            if next_ms == math.inf:
                break
            # Nothing happens anywhere before next_ms, so nothing decided from then on arrives
            # before next_ms + RTT/2: the window may end there (skipping idle time).
            end_ms = max(done_ms, next_ms) + window_ms
            for group, connection in enumerate(connections, start=1):
                connection.send(("window", end_ms, shared.take_inbox(group)))
            sent, groups_next_ms = here.run_window(end_ms, shared.take_inbox(0))
            for more, group_next_ms in (_answer(connection, child)
                                        for connection, child in zip(connections, children, strict=True)):
                sent.extend(more)
                groups_next_ms = min(groups_next_ms, group_next_ms)
            shared.take_requests(sent)
            shared.run_until(end_ms)
            done_ms = end_ms
        runs_by_group = [here.finish(shared.take_inbox(0))]
        for group, connection in enumerate(connections, start=1):
            connection.send(("finish", shared.take_inbox(group)))
        runs_by_group += [_answer(connection, child) for connection, child in zip(connections, children, strict=True)]
    finally:
        for connection in connections:
            connection.close()
        for child in children:
            child.join(timeout=5.0)
            if child.is_alive():
                child.kill()
    runs: list[PolicyRun | None] = [None] * vehicles
    for group, group_runs in enumerate(runs_by_group):
        for vehicle, run in zip(members[group], group_runs, strict=True):
            runs[vehicle] = run
    return runs  # type: ignore[return-value]
