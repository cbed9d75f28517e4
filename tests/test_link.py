"""The Mahimahi uplink model: delivery times computed by hand for small traces."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avcloud.link import PACKET_BYTES, DeliverySchedule, TraceLink, packets_for


def one_packet_per_ms() -> DeliverySchedule:
    return DeliverySchedule(np.array([1]))  # 12 Mbps: the "1" trace of the Mahimahi docs


def test_a_constant_12_mbps_link_delivers_ten_packets_in_ten_ms():
    link = TraceLink(one_packet_per_ms())
    transfer = link.send(0, 10 * PACKET_BYTES)
    assert transfer.packets == 10
    assert transfer.delivered_ms == 10  # opportunities at 1, 2, ..., 10 ms


def test_messages_queue_fifo_behind_each_other():
    link = TraceLink(one_packet_per_ms())
    first = link.send(0, 3 * PACKET_BYTES)
    second = link.send(0, 1)
    assert (first.delivered_ms, second.delivered_ms) == (3, 4)


def test_idle_opportunities_are_lost():
    link = TraceLink(one_packet_per_ms())
    link.send(0, PACKET_BYTES)
    later = link.send(100, PACKET_BYTES)
    assert later.delivered_ms == 100


def test_the_trace_loops_with_its_last_timestamp_as_period():
    schedule = DeliverySchedule(np.array([5, 5, 20]))
    assert [schedule.time_ms(i) for i in range(6)] == [5, 5, 20, 25, 25, 40]
    assert schedule.packets_between(0, 20_000) == 2999  # the opportunity at exactly 20 s is outside
    assert schedule.capacity_mbps(1, 20_001) == pytest.approx(3 * PACKET_BYTES * 8 / 20 / 1000)


def test_drop_tail_queue_rejects_what_does_not_fit():
    link = TraceLink(one_packet_per_ms(), queue_limit_bytes=5 * PACKET_BYTES)
    assert link.send(0, 4 * PACKET_BYTES).accepted
    rejected = link.send(0, 2 * PACKET_BYTES)
    assert not rejected.accepted and math.isinf(rejected.delivered_ms)
    assert link.send(3, 2 * PACKET_BYTES).accepted  # by then 3 of the 4 packets have left


def test_a_rotated_schedule_is_the_same_loop_seen_from_a_later_start():
    schedule = DeliverySchedule(np.array([1, 1, 3, 7, 7, 10]))
    assert schedule.rotated(0).opportunities_ms.tolist() == [1, 1, 3, 7, 7, 10]
    later = schedule.rotated(5)  # moved back to 3, the last time before 5 that holds an opportunity
    assert later.opportunities_ms.tolist() == [4, 4, 7, 8, 8, 10]
    assert (later.period_ms, later.count_per_period) == (10, 6)
    # Every opportunity of the original after time 3 is one of the rotated loop 3 ms earlier.
    original = schedule.time_ms(np.arange(schedule.first_index_at_or_after(4), 40))
    np.testing.assert_array_equal(later.time_ms(np.arange(original.size)), original - 3)
    assert schedule.rotated(13).opportunities_ms.tolist() == later.opportunities_ms.tolist()  # mod the period


def test_bad_traces_are_refused():
    with pytest.raises(ValueError):
        DeliverySchedule(np.array([], dtype=np.int64))
    with pytest.raises(ValueError):
        DeliverySchedule(np.array([3, 2]))
    with pytest.raises(ValueError):
        DeliverySchedule(np.array([0, 0]))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=30).map(sorted).filter(lambda ts: ts[-1] > 0),
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6000)), min_size=1, max_size=10),
)
def test_matches_a_packet_by_packet_simulation(timestamps, sends):
    """Reference: walk the opportunities one by one and hand each to the oldest waiting packet."""
    schedule = DeliverySchedule(np.array(timestamps))
    link = TraceLink(schedule)
    sends = sorted(sends)
    queue: list[tuple[int, int]] = []  # (message index, enqueue ms) per packet
    for index, (time_ms, size_bytes) in enumerate(sends):
        queue.extend((index, time_ms) for _ in range(packets_for(size_bytes)))
    expected = {}
    opportunity = 0
    for message_index, enqueue_ms in queue:
        while schedule.time_ms(opportunity) < enqueue_ms:
            opportunity += 1
        expected[message_index] = schedule.time_ms(opportunity)
        opportunity += 1
    for index, (time_ms, size_bytes) in enumerate(sends):
        assert link.send(time_ms, size_bytes).delivered_ms == expected[index]
