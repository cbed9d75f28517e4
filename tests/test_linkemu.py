"""The link emulator releases bytes exactly at the trace's opportunities (Mahimahi semantics)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from avcloud.link import PACKET_BYTES, DeliverySchedule, TraceLink
from avcloud.linkemu import LinkEmulator, fixed_rate_schedule


class Sink:
    """A TCP server that records (arrival time, byte count) of everything it receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(connection)
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.arrivals.append((time.monotonic(), len(data)))

    def received_bytes(self) -> int:
        return sum(size for _, size in self.arrivals)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.listener.close()


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# Known opportunities, several sharing a millisecond, gaps, period 40 ms (loops).
TRACE_MS = np.array([2, 2, 3, 7, 7, 7, 11, 18, 18, 25, 31, 40])


def test_burst_follows_the_analytic_schedule_within_1ms_and_loops():
    schedule = DeliverySchedule(TRACE_MS)
    sink = Sink()
    packets = 30  # more than two periods of this trace, so the schedule must loop
    with LinkEmulator(("127.0.0.1", sink.port), uplink=schedule, queue_bytes=10_000_000) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        time.sleep(0.05)
        car.sendall(b"x" * (packets * PACKET_BYTES))
        assert wait_until(lambda: sink.received_bytes() == packets * PACKET_BYTES, 5.0)
        releases = list(emulator.uplink.releases)
        car.close()
    sink.close()

    # The bytes reached the emulator within a millisecond of the send; allow that slack on both ends.
    first_index = schedule.first_index_at_or_after(releases[0].scheduled_ms - 0.5)
    expected_ms = [schedule.time_ms(first_index + k) for k in range(packets)]
    assert [release.size_bytes for release in releases] == [PACKET_BYTES] * packets
    assert [release.scheduled_ms for release in releases] == expected_ms
    # The analytic model fed the time the bytes reached the bottleneck gives the same delivery.
    analytic = TraceLink(schedule).send(releases[0].queued_since_ms, packets * PACKET_BYTES)
    assert abs(analytic.delivered_ms - releases[-1].scheduled_ms) <= 1.0
    # Really released on time, not just scheduled: typically within 1 ms of the trace time. The
    # test machine is shared, so late thread wake-ups are tolerated, within bounds.
    lateness_ms = np.array([release.actual_ms - release.scheduled_ms for release in releases])
    assert np.all(lateness_ms >= 0)
    assert np.median(lateness_ms) <= 1.0, lateness_ms
    assert lateness_ms.max() < 50.0, lateness_ms


def test_propagation_delay_is_added_after_the_bottleneck():
    sink = Sink()
    with LinkEmulator(("127.0.0.1", sink.port), uplink=fixed_rate_schedule(120.0), delay_ms=60.0) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        time.sleep(0.05)
        sent_s = time.monotonic()
        car.sendall(b"y" * 1000)
        assert wait_until(lambda: sink.received_bytes() == 1000, 3.0)
        elapsed_ms = (sink.arrivals[-1][0] - sent_s) * 1000.0
        car.close()
    sink.close()
    assert 60.0 <= elapsed_ms < 90.0


def test_full_queue_stops_reading_from_the_car_and_recovers():
    # One opportunity every 100 ms: 15 kB/s. The car writes far more than the queue holds.
    schedule = DeliverySchedule(np.array([100]))
    sink = Sink()
    queue_bytes = 20 * PACKET_BYTES
    with LinkEmulator(("127.0.0.1", sink.port), uplink=schedule, queue_bytes=queue_bytes) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        car.setblocking(False)
        written = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                written += car.send(b"z" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        stats = emulator.stats()
        car.close()
    sink.close()
    # Bounded: the emulator never held more than the queue plus one read, the rest stayed with the car.
    assert stats["uplink_peak_queued_bytes"] < queue_bytes + 65536
    assert stats["uplink_bytes_in"] < written
    assert sink.received_bytes() <= 11 * PACKET_BYTES


def test_cloud_unreachable_refuses_the_car_and_downlink_passes_replies():
    # Nobody listens upstream: the car's connection is closed at once, as a dead network would.
    closed_port = socket.create_server(("127.0.0.1", 0))
    port = closed_port.getsockname()[1]
    closed_port.close()
    with LinkEmulator(("127.0.0.1", port), uplink=fixed_rate_schedule(12.0)) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        car.settimeout(2.0)
        assert car.recv(10) == b""
        car.close()
        assert wait_until(lambda: emulator.stats()["upstream_failures"] >= 1, 1.0)

    # Replies travel back through the downlink, here at a fixed rate.
    echo = socket.create_server(("127.0.0.1", 0))

    def serve_echo() -> None:
        connection, _ = echo.accept()
        data = connection.recv(100)
        connection.sendall(data[::-1])
        connection.close()

    thread = threading.Thread(target=serve_echo, daemon=True)
    thread.start()
    with LinkEmulator(("127.0.0.1", echo.getsockname()[1]), uplink=fixed_rate_schedule(12.0),
                      downlink=fixed_rate_schedule(12.0)) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        car.settimeout(2.0)
        car.sendall(b"abc")
        assert car.recv(10) == b"cba"
        car.close()
    echo.close()


def test_fixed_rate_schedule_has_the_asked_rate():
    assert fixed_rate_schedule(12.0).mean_mbps() == pytest.approx(12.0)
    assert fixed_rate_schedule(100.0).mean_mbps() == pytest.approx(100.0, rel=1e-3)
    with pytest.raises(ValueError):
        fixed_rate_schedule(0.0)


SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


@pytest.mark.skipif(not (SHARED_TRACES / "ATT-LTE-driving-2016.up").is_file(), reason="shared traces not present")
def test_measured_cellular_trace_schedule_is_followed():
    from datasets.traces import load_trace

    schedule = load_trace(SHARED_TRACES / "ATT-LTE-driving-2016.up").schedule
    sink = Sink()
    packets = 40
    with LinkEmulator(("127.0.0.1", sink.port), uplink=schedule, queue_bytes=10_000_000) as emulator:
        car = socket.create_connection(("127.0.0.1", emulator.port))
        time.sleep(0.05)
        car.sendall(b"x" * (packets * PACKET_BYTES))
        assert wait_until(lambda: sink.received_bytes() == packets * PACKET_BYTES, 20.0)
        releases = list(emulator.uplink.releases)
        car.close()
    sink.close()
    first_index = schedule.first_index_at_or_after(releases[0].scheduled_ms - 0.5)
    # Packets are released one opportunity each; several opportunities in one millisecond may
    # carry bytes that arrived in one release, so compare the per-packet times.
    released_ms = [release.scheduled_ms for release in releases for _ in range(release.size_bytes // PACKET_BYTES)]
    assert released_ms == [schedule.time_ms(first_index + k) for k in range(packets)]
