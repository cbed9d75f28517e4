"""`avcloud cloud serve`: run the cloud inference service in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from rich.console import Console

from avcloud.config import parse_override


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cloud", help="the cloud inference service",
                                   description="The cloud inference service.")
    actions = parser.add_subparsers(dest="cloud_command", metavar="ACTION")
    actions.required = True

    serve = actions.add_parser(
        "serve", help="load the configured models and serve requests until SIGINT/SIGTERM",
        description="Load and warm up the configured models, then serve requests from allow-listed "
                    "vehicles over CurveZMQ until SIGINT/SIGTERM (graceful: queued work finishes or "
                    "is answered expired).")
    serve.add_argument("--config", type=Path, required=True, metavar="FILE", help="cloud.yaml")
    serve.add_argument("--insecure", action="store_true",
                       help="serve WITHOUT encryption or authentication (any client is served)")
    serve.add_argument("--bind", default=None, help="override the ZeroMQ bind address, e.g. tcp://0.0.0.0:5555")
    serve.add_argument("--http-port", type=int, default=None, help="override the health/metrics HTTP port")
    serve.add_argument("--scheduler", choices=("edf", "fifo"), default=None, help="override the scheduling policy")
    serve.add_argument("--engine", choices=("threads", "ray"), default=None,
                       help="what runs the models: worker threads here (threads) or Ray Serve replicas (ray; "
                            "joins $RAY_ADDRESS or ray.address when set, else starts a local Ray; needs the "
                            "optional extra ray)")
    serve.add_argument("-p", "--param", action="append", default=[], metavar="KEY:=VALUE",
                       help="override any config field, e.g. -p queue_limit:=64 (repeatable)")
    serve.set_defaults(handler=run_serve)

    ping = actions.add_parser(
        "ping", help="check that a service answers (and measure round trips)",
        description="Send ping requests to a running service and print round-trip times.")
    ping.add_argument("--address", default="tcp://127.0.0.1:5555", help="the service's ZeroMQ address")
    ping.add_argument("--key", type=Path, default=None, metavar="FILE",
                      help="this client's .key_secret file (omit for a service run with --insecure)")
    ping.add_argument("--server-key", type=Path, default=None, metavar="FILE", help="the service's .key file")
    ping.add_argument("--vehicle", default=None,
                      help="vehicle id to send; with CurveZMQ it must be the key's vehicle (default: the key "
                           "file's name, e.g. car-1 for car-1.key_secret; 'ping' without keys)")
    ping.add_argument("--count", type=int, default=3, help="pings to send")
    ping.add_argument("--timeout-ms", type=float, default=2000.0, help="wait this long for each reply")
    ping.set_defaults(handler=run_ping)


def run_serve(args: argparse.Namespace) -> int:
    # Imported here so `avcloud --help` does not pay for ZeroMQ, prometheus and the models.
    from cloudside.config import load_cloud_config
    from cloudside.service import CloudService

    overrides = dict(parse_override(text) for text in args.param)
    for key, value in (("bind", args.bind), ("http_port", args.http_port), ("scheduler", args.scheduler),
                       ("engine", args.engine)):
        if value is not None:
            overrides[key] = value
    config = load_cloud_config(args.config, overrides)
    console = Console(stderr=True, highlight=False)
    if args.insecure:
        console.rule("[bold red]INSECURE")
        console.print("[bold red]--insecure: CurveZMQ is OFF. Requests and results travel in clear text and "
                      "ANY client that reaches the bind address is served.")
        console.rule("[bold red]INSECURE")

    def announce(line: str) -> None:
        print(line, flush=True)

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    service = CloudService(config, insecure=args.insecure, announce=announce)
    try:
        service.start()
        for sig in previous:  # starting Ray (engine: ray) installs its own handlers: ours come first again
            signal.signal(sig, request_stop)
        while not stop_requested.wait(0.2):
            pass
        announce("stopping: no new requests; finishing or expiring queued work")
        service.stop()
        announce("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.stop()
    return 0


def run_ping(args: argparse.Namespace) -> int:
    import time

    from avcloud.errors import UserError
    from cloudside.client import CloudClient

    if (args.key is None) != (args.server_key is None):
        raise UserError("--key and --server-key go together (both for CurveZMQ, neither for --insecure services)")
    vehicle = args.vehicle
    if vehicle is None:
        vehicle = args.key.name.removesuffix(".key_secret") if args.key is not None else "ping"
    answered = 0
    with CloudClient(args.address, vehicle, args.key, args.server_key) as client:
        for _ in range(max(1, args.count)):
            started = time.perf_counter()
            reply = client.ping(timeout_ms=args.timeout_ms)
            if reply is None:
                print(f"no reply from {args.address} within {args.timeout_ms:.0f} ms")
                continue
            if reply.status != "ok":
                print(f"{reply.status} from {args.address}: {reply.reason}")
                continue
            answered += 1
            print(f"pong from {args.address}: {(time.perf_counter() - started) * 1000.0:.2f} ms")
    return 0 if answered else 1
