"""`avcloud linkemu`: run the trace-driven link emulator between the car and the cloud."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from avcloud.errors import UserError


def parse_tcp_endpoint(text: str, flag: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' or 'HOST:PORT' -> (host, port)."""
    address = text.removeprefix("tcp://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{flag} '{text}' must look like tcp://HOST:PORT")
    return host, int(port)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "linkemu", help="emulate a cellular link between car and cloud from bandwidth traces",
        description="Transparent TCP proxy (CurveZMQ passes through end to end) that releases uplink bytes only "
                    "at the trace's delivery opportunities (1500 bytes each, Mahimahi semantics, looping), adds "
                    "one-way delay in both directions, and stops reading from the car while its queue is full. "
                    "Prints READY when listening.")
    parser.add_argument("--uplink", type=Path, required=True, metavar="TRACE", help="uplink trace (Mahimahi or two-column)")
    downlink = parser.add_mutually_exclusive_group()
    downlink.add_argument("--downlink", type=Path, default=None, metavar="TRACE", help="downlink trace")
    downlink.add_argument("--downlink-mbps", type=float, default=None, help="fixed downlink rate (default unshaped)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay, each direction")
    parser.add_argument("--queue-bytes", type=int, default=1_000_000, help="bottleneck queue size per direction")
    parser.add_argument("--trace-start-unix", type=float, default=None, metavar="SECONDS",
                        help="wall-clock time (Unix seconds) of trace time 0 (default: when listening starts); "
                             "give `avcloud play --start-at-unix` the same value to align frames with the trace")
    parser.add_argument("--listen", default="tcp://127.0.0.1:5556", help="car side endpoint (the car connects here)")
    parser.add_argument("--upstream", default="tcp://127.0.0.1:5555", help="cloud service endpoint")
    parser.set_defaults(handler=run_linkemu)


def run_linkemu(args: argparse.Namespace) -> int:
    from avcloud.linkemu import LinkEmulator, fixed_rate_schedule
    from datasets.traces import load_trace

    listen_host, listen_port = parse_tcp_endpoint(args.listen, "--listen")
    upstream = parse_tcp_endpoint(args.upstream, "--upstream")
    if args.delay_ms < 0:
        raise UserError(f"--delay-ms must be >= 0, got {args.delay_ms}")
    if args.queue_bytes < 1500:
        raise UserError(f"--queue-bytes must be at least 1500, got {args.queue_bytes}")
    uplink = load_trace(args.uplink).schedule
    if args.downlink is not None:
        downlink = load_trace(args.downlink).schedule
    elif args.downlink_mbps is not None:
        if args.downlink_mbps <= 0:
            raise UserError(f"--downlink-mbps must be positive, got {args.downlink_mbps}")
        downlink = fixed_rate_schedule(args.downlink_mbps)
    else:
        downlink = None
    emulator = LinkEmulator(upstream, uplink, downlink, args.delay_ms, args.queue_bytes, listen_host, listen_port,
                            trace_start_unix_s=args.trace_start_unix)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            emulator.start()
        except OSError as error:
            raise UserError(f"--listen {args.listen}: cannot listen ({error.strerror or error})") from None
        print(f"READY linkemu {emulator.address} -> tcp://{upstream[0]}:{upstream[1]} "
              f"uplink {uplink.mean_mbps():.2f} Mbps mean, delay {args.delay_ms:g} ms", flush=True)
        while not stop_requested.wait(0.2):
            pass
        print(f"stopped: {emulator.stats()}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        emulator.stop()
    return 0
