"""The cell's uplink: a trace's opportunities split among vehicles, on hand-computable cases.

On the 1-packet-per-ms trace (opportunities at every whole ms from 1 on), a message of p packets
sent alone at t is delivered at max(t, 1) + p - 1, as `TraceLink` delivers it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avcloud.clock import SimulatedClock
from avcloud.fleet.cell import CellUplink, private_links
from avcloud.fleet.simulation import run_fleet
from avcloud.link import PACKET_BYTES, DeliverySchedule, TraceLink
from avcloud.replay.simulator import EventLoop

ONE_PACKET_PER_MS = DeliverySchedule(np.array([1]))


def deliveries(cell: CellUplink, sends: list[tuple[float, int, int]]) -> dict[int, float]:
    """Run `sends` (time ms, vehicle, packets) through the cell on an event loop; message number ->
    delivery time."""
    loop = EventLoop(SimulatedClock(0.0))
    delivered: dict[int, float] = {}
    links = [cell.link(vehicle) for vehicle in range(cell.vehicles)]
    for number, (time_ms, vehicle, packets) in enumerate(sends):
        def send(number=number, vehicle=vehicle, packets=packets) -> None:
            transfer = links[vehicle].send(loop.clock.now_ms(), packets * PACKET_BYTES,
                                           lambda delivered_ms: delivered.__setitem__(number, delivered_ms))
            assert transfer.accepted and np.isnan(transfer.delivered_ms)
        loop.at(time_ms, send)
    run_fleet(loop, [], cell)
    return delivered


@pytest.mark.parametrize("scheduler", ["pf", "equal"])
def test_one_vehicle_is_delivered_exactly_as_on_its_own_trace_link(scheduler):
    schedule = DeliverySchedule(np.array([3, 3, 4, 9, 10, 10, 10, 15, 22, 30]))  # bursty, loops every 30 ms
    sends = [(0.0, 0, 2), (0.5, 0, 1), (3.0, 0, 4), (3.0, 0, 1), (9.7, 0, 3), (40.0, 0, 12), (41.0, 0, 1)]
    link = TraceLink(schedule)
    expected = {number: link.send(time_ms, packets * PACKET_BYTES).delivered_ms
                for number, (time_ms, _, packets) in enumerate(sends)}
    assert deliveries(CellUplink(schedule, 1, scheduler), sends) == expected


def test_equal_share_interleaves_backlogged_vehicles_one_packet_each():
    got = deliveries(CellUplink(ONE_PACKET_PER_MS, 2, "equal"), [(0.0, 0, 10), (0.0, 1, 10)])
    assert got == {0: 19.0, 1: 20.0}  # A takes 1, 3, ..., 19; B 2, 4, ..., 20


def test_a_vehicle_that_starts_sending_joins_the_end_of_the_round():
    # A alone takes 1-4; from 5 on A and B alternate (A first: it was in the round), B's 2 packets
    # leave at 6 and 8, and A's last four at 9-12.
    got = deliveries(CellUplink(ONE_PACKET_PER_MS, 2, "equal"), [(0.0, 0, 10), (4.5, 1, 2)])
    assert got == {0: 12.0, 1: 8.0}


def test_proportional_fair_serves_a_vehicle_that_was_idle_first():
    sends = [(0.0, 0, 1000), (500.5, 1, 5)]
    pf = deliveries(CellUplink(ONE_PACKET_PER_MS, 2, "pf"), sends)
    equal = deliveries(CellUplink(ONE_PACKET_PER_MS, 2, "equal"), sends)
    assert pf[1] == 505.0  # B's average throughput is 0: it takes 501-505 at once
    assert equal[1] == 510.0  # round robin: 502, 504, ..., 510
    assert pf[0] == equal[0] == 1005.0  # the cell is work-conserving either way


def test_proportional_fair_shares_equally_over_a_long_backlog():
    cell = CellUplink(ONE_PACKET_PER_MS, 3, "pf", pf_window_ms=50.0)
    for vehicle in range(3):
        cell.link(vehicle).send(0.0, 3000 * PACKET_BYTES)
    cell.advance(lambda: 1500.5)  # half way: opportunities 1-1500 handed out
    left = [cell.backlog_packets(vehicle) for vehicle in range(3)]
    assert sum(left) == 9000 - 1500
    assert max(left) - min(left) <= 1


def test_the_pf_averages_survive_hours_of_backlog():
    cell = CellUplink(ONE_PACKET_PER_MS, 2, "pf", pf_window_ms=10.0)
    for vehicle in range(2):
        cell.link(vehicle).send(0.0, 20_000 * PACKET_BYTES)
    cell.advance(lambda: 39_000.5)  # exp(39000 / 10) would overflow without rescaling
    assert [cell.backlog_packets(vehicle) for vehicle in range(2)] == [500, 500]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["pf", "equal"]),
       st.lists(st.tuples(st.floats(0, 200), st.integers(0, 2), st.integers(1, 30)), min_size=1, max_size=25))
def test_any_scheduler_keeps_each_vehicle_fifo_and_the_cell_work_conserving(scheduler, sends):
    sends = sorted(sends, key=lambda send: send[0])
    schedule = DeliverySchedule(np.array([2, 2, 5, 7, 8, 13, 14, 20]))
    got = deliveries(CellUplink(schedule, 3, scheduler), sends)
    assert len(got) == len(sends)
    for vehicle in range(3):
        times = [got[number] for number, send in enumerate(sends) if send[1] == vehicle]
        assert times == sorted(times)
    # Work-conserving: the whole backlog is gone when one FIFO link carrying it all is done.
    fifo = TraceLink(schedule)
    last = max(fifo.send(time_ms, packets * PACKET_BYTES).delivered_ms for time_ms, _, packets in sends)
    assert max(got.values()) == last


def test_a_send_must_not_skip_the_cells_advance():
    cell = CellUplink(ONE_PACKET_PER_MS, 2, "equal")
    cell.link(0).send(0.0, 10 * PACKET_BYTES)
    with pytest.raises(ValueError, match="advance"):
        cell.link(1).send(5.0, PACKET_BYTES)


def test_a_full_vehicle_buffer_refuses_the_message():
    cell = CellUplink(ONE_PACKET_PER_MS, 2, "equal", queue_limit_bytes=3 * PACKET_BYTES)
    assert cell.link(0).send(0.0, 2 * PACKET_BYTES).accepted
    assert not cell.link(0).send(0.0, 2 * PACKET_BYTES).accepted
    assert cell.link(1).send(0.0, 2 * PACKET_BYTES).accepted  # another vehicle's buffer is its own


def test_per_vehicle_uplinks_are_private_copies_of_the_traces():
    other = DeliverySchedule(np.array([2]))
    links = private_links([ONE_PACKET_PER_MS, other], 3)
    assert [link.schedule for link in links] == [ONE_PACKET_PER_MS, other, ONE_PACKET_PER_MS]
    assert links[0].send(0.0, 5 * PACKET_BYTES).delivered_ms == links[2].send(0.0, 5 * PACKET_BYTES).delivered_ms == 5.0


@pytest.mark.parametrize("scheduler, vehicles, message", [
    ("per-vehicle", 2, "unknown cell scheduler"),
    ("pf", 0, "at least one vehicle"),
])
def test_bad_cells_are_refused(scheduler, vehicles, message):
    with pytest.raises(ValueError, match=message):
        CellUplink(ONE_PACKET_PER_MS, vehicles, scheduler)
