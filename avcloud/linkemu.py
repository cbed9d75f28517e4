"""Trace-driven link emulator: a transparent TCP proxy between the car and the cloud.

Why a byte-level proxy and not a ZeroMQ-level one: CurveZMQ encrypts every frame end to end,
so a proxy that parsed ZeroMQ messages would have to terminate the encryption. Forwarding the
TCP byte stream keeps the car <-> cloud security untouched; ZeroMQ reconnects through it as if
it were the network.

Semantics (Mahimahi's mm-link, see `avcloud.link`):
- uplink bytes (car -> cloud) from every connection join one FIFO bottleneck queue; each
  delivery opportunity of the uplink trace releases up to 1500 bytes; an opportunity that finds
  the queue empty is lost; the trace loops with its period;
- the downlink (cloud -> car) is a second such queue, drained by its own trace or by a fixed
  rate;
- both directions add a one-way propagation delay after the bottleneck;
- "drop when the queue is full" becomes backpressure on a byte stream: while a direction's queue
  holds `queue_bytes` or more, the proxy stops reading from the sender, so the sender's TCP
  window and then its ZeroMQ high-water mark fill up and the sender's own drop policy applies.

Trace time 0 is `start()`. Every release is logged with its scheduled (trace) time and the
time it really happened, so tests can compare the emulator to `TraceLink`'s analytic schedule.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from avcloud.link import PACKET_BYTES, DeliverySchedule

READ_CHUNK_BYTES = 65536
DEFAULT_QUEUE_BYTES = 1_000_000
_LOG_ENTRIES = 100_000


def fixed_rate_schedule(rate_mbps: float) -> DeliverySchedule:
    """A one-second looping schedule with `rate_mbps` worth of 1500-byte opportunities, spread evenly."""
    if rate_mbps <= 0:
        raise ValueError("a fixed-rate link needs a positive rate")
    packets_per_second = max(1, round(rate_mbps * 1e6 / (PACKET_BYTES * 8)))
    # Opportunity k at ceil((k + 1) * 1000 / n) ms: evenly spread, the last one at 1000 ms (the period).
    times_ms = np.ceil(np.arange(1, packets_per_second + 1) * 1000.0 / packets_per_second).astype(np.int64)
    return DeliverySchedule(times_ms)


@dataclass(frozen=True)
class Release:
    """One opportunity that carried bytes: when the trace said, and when the proxy really sent them."""

    scheduled_ms: float  # trace time of the opportunity (0 = emulator start)
    actual_ms: float  # when the bytes left the bottleneck, same time base
    size_bytes: int
    queued_since_ms: float = 0.0  # when the queue last went from empty to busy


class _Connection:
    """One car connection and its paired cloud connection."""

    def __init__(self, car: socket.socket, cloud: socket.socket) -> None:
        self.car = car
        self.cloud = cloud
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.car, self.cloud):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class _Direction:
    """One direction's bottleneck: FIFO byte queue -> trace opportunities -> delay line -> writer."""

    def __init__(self, name: str, schedule: DeliverySchedule | None, delay_ms: float, queue_bytes: int,
                 start_s: float, stopping: threading.Event) -> None:
        self.name = name
        self.schedule = schedule  # None: no bottleneck, bytes pass as soon as they arrive
        self.delay_ms = delay_ms
        self.queue_bytes = queue_bytes
        self._start_s = start_s
        self._stopping = stopping
        # Entries are (connection, bytes), or (connection, None) marking that the sender hung up.
        self._queue: collections.deque[tuple[_Connection, bytes | None]] = collections.deque()
        self._head_arrival_ms = 0.0  # when the bytes now at the head of the queue arrived
        self._queued_bytes = 0
        self._condition = threading.Condition()
        self._delay_line: collections.deque[tuple[float, _Connection, bytes | None]] = collections.deque()
        self._delay_condition = threading.Condition()
        self._next_index = 0
        self.releases: collections.deque[Release] = collections.deque(maxlen=_LOG_ENTRIES)
        self.bytes_in = 0
        self.bytes_out = 0
        self.peak_queued_bytes = 0
        self._threads = [
            threading.Thread(target=self._pump, name=f"linkemu-{name}-pump", daemon=True),
            threading.Thread(target=self._write_delayed, name=f"linkemu-{name}-delay", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        with self._condition:
            self._condition.notify_all()
        with self._delay_condition:
            self._delay_condition.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def now_ms(self) -> float:
        return (time.monotonic() - self._start_s) * 1000.0

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def wait_for_room(self) -> bool:
        """Block the reader while the queue is full (backpressure). False when stopping."""
        with self._condition:
            while self._queued_bytes >= self.queue_bytes and not self._stopping.is_set():
                self._condition.wait(0.1)
        return not self._stopping.is_set()

    def enqueue(self, connection: _Connection, data: bytes | None) -> None:
        with self._condition:
            if not self._queue:
                self._head_arrival_ms = self.now_ms()
            self._queue.append((connection, data))
            size_bytes = len(data) if data is not None else 0
            self._queued_bytes += size_bytes
            self.bytes_in += size_bytes
            self.peak_queued_bytes = max(self.peak_queued_bytes, self._queued_bytes)
            self._condition.notify_all()

    def _take(self, limit_bytes: int) -> list[tuple[_Connection, bytes | None]]:
        """Pop up to limit_bytes from the queue head; an end-of-stream marker (None) ends the take.

        Bytes of connections already closed are discarded without using the opportunity.
        """
        taken: list[tuple[_Connection, bytes | None]] = []
        with self._condition:
            while self._queue:
                connection, data = self._queue[0]
                if data is None:
                    self._queue.popleft()
                    taken.append((connection, None))
                    break
                if connection.closed:
                    self._queue.popleft()
                    self._queued_bytes -= len(data)
                    continue
                if limit_bytes <= 0:
                    break
                if len(data) <= limit_bytes:
                    self._queue.popleft()
                    part = data
                else:
                    part = data[:limit_bytes]
                    self._queue[0] = (connection, data[limit_bytes:])
                self._queued_bytes -= len(part)
                limit_bytes -= len(part)
                previous = taken[-1] if taken else None
                if previous is not None and previous[0] is connection and previous[1] is not None:
                    taken[-1] = (connection, previous[1] + part)
                else:
                    taken.append((connection, part))
            self._condition.notify_all()
        return taken

    def _head_is_end_of_stream(self) -> bool:
        with self._condition:
            return bool(self._queue) and self._queue[0][1] is None

    def _pump(self) -> None:
        while not self._stopping.is_set():
            with self._condition:
                while not self._queue and not self._stopping.is_set():
                    self._condition.wait(0.1)
                if self._stopping.is_set():
                    return
            if self.schedule is None or self._head_is_end_of_stream():
                scheduled_ms = self.now_ms()
                taken = self._take(max(self._queued_bytes, 1))
            else:
                # Opportunities that passed while the queue was empty are lost (mm-link).
                index = max(self._next_index, self.schedule.first_index_at_or_after(self._head_arrival_ms))
                scheduled_ms = float(self.schedule.time_ms(index))
                if not self._sleep_until(scheduled_ms):
                    return
                self._next_index = index + 1
                taken = self._take(PACKET_BYTES)
            if not taken:
                continue
            actual_ms = self.now_ms()
            size_bytes = sum(len(data) for _, data in taken if data is not None)
            if size_bytes:
                self.releases.append(Release(scheduled_ms, actual_ms, size_bytes, self._head_arrival_ms))
            due_ms = scheduled_ms + self.delay_ms
            with self._delay_condition:
                for connection, data in taken:
                    self._delay_line.append((due_ms, connection, data))
                self._delay_condition.notify_all()

    def _sleep_until(self, target_ms: float) -> bool:
        while not self._stopping.is_set():
            remaining_ms = target_ms - self.now_ms()
            if remaining_ms <= 0:
                return True
            time.sleep(min(remaining_ms, 100.0) / 1000.0)
        return False

    def _write_delayed(self) -> None:
        while not self._stopping.is_set():
            with self._delay_condition:
                while not self._delay_line and not self._stopping.is_set():
                    self._delay_condition.wait(0.1)
                if self._stopping.is_set():
                    return
                due_ms, connection, data = self._delay_line.popleft()
            if not self._sleep_until(due_ms):
                return
            if connection.closed:
                continue
            if data is None:  # the sender hung up and everything it sent before has been delivered
                connection.close()
                continue
            target = connection.cloud if self.name == "uplink" else connection.car
            try:
                target.sendall(data)
                self.bytes_out += len(data)
            except OSError:
                connection.close()


class LinkEmulator:
    """Proxy listening on `listen_host:listen_port` (0 = a free port) and forwarding to `upstream`.

    `uplink` shapes car -> cloud, `downlink` cloud -> car (None: not shaped). Use `start()` /
    `stop()` or a `with` block; `port` is the bound port once started.
    """

    def __init__(self, upstream: tuple[str, int], uplink: DeliverySchedule,
                 downlink: DeliverySchedule | None = None, delay_ms: float = 0.0,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, trace_start_unix_s: float | None = None) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        if queue_bytes < PACKET_BYTES:
            raise ValueError(f"queue_bytes must be at least one packet ({PACKET_BYTES} bytes)")
        self.upstream = upstream
        self.uplink_schedule = uplink
        self.downlink_schedule = downlink
        self.delay_ms = float(delay_ms)
        self.queue_bytes = int(queue_bytes)
        self.listen_host = listen_host
        self._requested_port = listen_port
        # Trace time 0 at this wall-clock time (None: at start()), so that another process (the
        # camera player) can start in step with the trace; earlier bytes wait for time 0.
        self.trace_start_unix_s = trace_start_unix_s
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._connections: list[_Connection] = []
        self._connections_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.uplink: _Direction | None = None
        self.downlink: _Direction | None = None
        self.connections_accepted = 0
        self.upstream_failures = 0
        self.port = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LinkEmulator:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self._requested_port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        start_s = time.monotonic()
        if self.trace_start_unix_s is not None:
            start_s += self.trace_start_unix_s - time.time()
        self.uplink = _Direction("uplink", self.uplink_schedule, self.delay_ms, self.queue_bytes,
                                 start_s, self._stopping)
        self.downlink = _Direction("downlink", self.downlink_schedule, self.delay_ms, self.queue_bytes,
                                   start_s, self._stopping)
        self.uplink.start()
        self.downlink.start()
        acceptor = threading.Thread(target=self._accept_loop, name="linkemu-accept", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        for thread in self._threads:
            thread.join(1.0)
        for direction in (self.uplink, self.downlink):
            if direction is not None:
                direction.join(1.0)

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """ZeroMQ endpoint of the car side."""
        return f"tcp://{self.listen_host}:{self.port}"

    def now_ms(self) -> float:
        """Trace time: milliseconds since start() (or since trace_start_unix_s; negative before it)."""
        assert self.uplink is not None, "start() the emulator first"
        return self.uplink.now_ms()

    def stats(self) -> dict[str, float]:
        assert self.uplink is not None and self.downlink is not None
        with self._connections_lock:
            open_connections = sum(not connection.closed for connection in self._connections)
        return {
            "connections_accepted": self.connections_accepted,
            "connections_open": open_connections,
            "upstream_failures": self.upstream_failures,
            "uplink_bytes_in": self.uplink.bytes_in,
            "uplink_bytes_out": self.uplink.bytes_out,
            "uplink_queued_bytes": self.uplink.queued_bytes,
            "uplink_peak_queued_bytes": self.uplink.peak_queued_bytes,
            "downlink_bytes_in": self.downlink.bytes_in,
            "downlink_bytes_out": self.downlink.bytes_out,
        }

    # ------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                car, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            car.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                cloud = socket.create_connection(self.upstream, timeout=1.0)
            except OSError:
                # Cloud unreachable: refuse the car like the network would, it will retry.
                self.upstream_failures += 1
                car.close()
                continue
            cloud.settimeout(None)
            cloud.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(car, cloud)
            self.connections_accepted += 1
            with self._connections_lock:
                self._connections = [c for c in self._connections if not c.closed] + [connection]
            for source, direction in ((car, self.uplink), (cloud, self.downlink)):
                thread = threading.Thread(target=self._read_loop, args=(connection, source, direction),
                                          name=f"linkemu-read-{direction.name}", daemon=True)
                thread.start()

    def _read_loop(self, connection: _Connection, source: socket.socket, direction: _Direction) -> None:
        while not connection.closed and direction.wait_for_room():
            try:
                data = source.recv(READ_CHUNK_BYTES)
            except OSError:
                data = b""
            if not data:
                # The sender hung up: the other side sees the connection drop once what the sender
                # wrote before has crossed the link.
                direction.enqueue(connection, None)
                return
            direction.enqueue(connection, data)
