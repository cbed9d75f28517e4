"""Runtime benchmark: onboard per-frame overhead, cloud service throughput/latency, and goodput
of deadline-aware scheduling versus FIFO under overload. Prints (or writes) JSON.

    .venv/bin/python benchmarks/bench_runtime.py [--quick] [--out FILE.json]

Sections:
- onboard_overhead: `measure_onboard_overhead(frames)` from benchmarks/runtime_onboard.py
  (owned by the onboard side) when present.
- cloud_throughput: N emulated vehicles (one DEALER each, closed loop with `--in-flight`
  requests each, driven from a separate process) against an in-process service on loopback, with the smallest
  zoo cloud model on onnxruntime when available, else an emulated model (recorded).
- deadline_goodput: open-loop arrivals at 2x the service's capacity, mixed budgets, an
  emulated model (sleep = emulated GPU time, so the comparison does not depend on CPU load);
  goodput = `ok` replies received before the client's own deadline, per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import zmq

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchjson import write_report  # noqa: E402

from avcloud.protocol import RequestHeader, decode_reply, encode_request  # noqa: E402
from cloudside.config import CloudConfig  # noqa: E402
from cloudside.service import CloudService  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def quiet(line: str) -> None:
    pass


# ---------------------------------------------------------------- onboard overhead


def onboard_overhead(frames: int) -> dict:
    module_path = REPO_ROOT / "benchmarks" / "runtime_onboard.py"
    if not module_path.is_file():
        return {"available": False, "reason": "benchmarks/runtime_onboard.py not present"}
    spec = importlib.util.spec_from_file_location("runtime_onboard", module_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        result = module.measure_onboard_overhead(frames)
    except Exception as error:  # report, do not hide, a broken section
        return {"available": False, "reason": f"{type(error).__name__}: {error}"}
    return {"available": True, "frames": frames, **result}


# ---------------------------------------------------------------- cloud throughput


def pick_cloud_model(name: str | None = None) -> tuple[dict, str, np.ndarray | None, bytes | None]:
    """The named (default: smallest) zoo cloud model with a JPEG payload of its input size, else
    an emulated model."""
    try:
        from avcloud.compression import encode_image
        from avcloud.models import list_cards

        cards = [card for card in list_cards() if card.place == "cloud" and card.onnx_path.is_file()
                 and (name is None or card.name == name)]
    except Exception:  # noqa: BLE001 - no zoo: fall back to emulation
        cards = []
    if cards:
        card = min(cards, key=lambda c: c.input_width * c.input_height)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (card.input_height, card.input_width, 3), dtype=np.uint8)
        image = (image // 32 * 32).astype(np.uint8)  # fewer distinct values: a realistic JPEG size
        payload, _ = encode_image(image, "90")
        return {"name": card.name, "backend": "onnxruntime"}, f"zoo model {card.name} (onnxruntime CPU)", image, payload
    entry = {"name": "emulated", "simulated_runtime_ms": 20.0, "simulated_decode": False}
    return entry, "emulated model, 20 ms per image (emulated GPU time)", None, None


class Fleet:
    """N emulated vehicles, one DEALER each, driven from one thread with a poller (so the load
    generator does not fight the service for the GIL; it runs in its own process)."""

    def __init__(self, address: str, vehicles: int) -> None:
        self.context = zmq.Context()
        self.sockets = []
        self.poller = zmq.Poller()
        for _ in range(vehicles):
            socket = self.context.socket(zmq.DEALER)
            socket.linger = 0
            socket.connect(address)
            self.poller.register(socket, zmq.POLLIN)
            self.sockets.append(socket)
        self.request_ids = itertools.count()

    def send(self, vehicle: int, model: str, codec: str, shape: tuple[int, int, int], payload: bytes,
             budget_ms: float) -> int:
        request_id = next(self.request_ids)
        header = RequestHeader(vehicle=f"car-{vehicle}", request_id=request_id, task="FRONT", frame=request_id,
                               model=model, codec=codec, shape=tuple(shape), budget_ms=budget_ms)
        self.sockets[vehicle].send_multipart(encode_request(header, payload), copy=False)
        return request_id

    def replies(self, timeout_ms: float) -> list[tuple[int, object]]:
        """(vehicle index, reply header) of every reply ready within timeout_ms."""
        ready = []
        for socket, _ in self.poller.poll(max(0.0, timeout_ms)):
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ready.append((self.sockets.index(socket), decode_reply(frames)[0]))
        return ready

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()


def closed_loop_load(address: str, vehicles: int, model: str, codec: str, shape: tuple[int, int, int],
                     payload: bytes, in_flight: int, duration_s: float) -> dict:
    """Each vehicle keeps in_flight requests outstanding for duration_s; client-side latencies."""
    fleet = Fleet(address, vehicles)
    sent_at: dict[int, float] = {}
    latencies_ms: list[float] = []
    statuses: dict[str, int] = {}
    started = time.perf_counter()
    stop_at = started + duration_s
    for vehicle in range(vehicles):
        for _ in range(in_flight):
            sent_at[fleet.send(vehicle, model, codec, shape, payload, 60_000.0)] = time.perf_counter()
    while sent_at and time.perf_counter() < stop_at + 30:
        for vehicle, header in fleet.replies(100):
            began = sent_at.pop(header.request_id, None)
            if began is None:
                continue
            statuses[header.status] = statuses.get(header.status, 0) + 1
            if header.status == "ok":
                latencies_ms.append((time.perf_counter() - began) * 1000.0)
            if time.perf_counter() < stop_at:
                sent_at[fleet.send(vehicle, model, codec, shape, payload, 60_000.0)] = time.perf_counter()
    elapsed_s = time.perf_counter() - started
    fleet.close()
    return {"elapsed_s": elapsed_s, "latencies_ms": latencies_ms, "statuses": statuses}


def in_child_process(function, *args):
    """Run a load generator in a fresh process and return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def cloud_throughput(duration_s: float, vehicle_counts: list[int], in_flight: int, max_batch_size: int,
                     model: str | None = None) -> dict:
    entry, description, image, payload = pick_cloud_model(model)
    if payload is None:
        shape, codec, payload = (4, 4, 3), "raw", bytes(48)
    else:
        shape, codec = image.shape, "jpeg"
    config = CloudConfig.model_validate({
        "bind": "tcp://127.0.0.1:0", "http_port": None, "models": [entry], "max_batch_size": max_batch_size,
        "queue_limit": 4096, "warmup_iterations": 2})
    levels = []
    with CloudService(config, insecure=True, announce=quiet) as service:
        runner = service.runners[entry["name"]]
        for vehicles in vehicle_counts:
            load = in_child_process(closed_loop_load, service.address, vehicles, entry["name"], codec,
                                    tuple(shape), payload, in_flight, duration_s)
            latencies_ms = load["latencies_ms"]
            levels.append({
                "vehicles": vehicles, "in_flight_per_vehicle": in_flight, "elapsed_s": round(load["elapsed_s"], 3),
                "ok_replies": len(latencies_ms), "statuses": load["statuses"],
                "throughput_rps": round(len(latencies_ms) / load["elapsed_s"], 2),
                "latency_ms_p50": percentile(latencies_ms, 50), "latency_ms_p99": percentile(latencies_ms, 99),
            })
    return {"model": description, "backend": runner.backend_name, "payload_bytes": len(payload),
            "image_shape": list(shape), "max_batch_size": max_batch_size,
            "clients": "emulated vehicles: one DEALER each, driven from a separate process", "levels": levels}


# ---------------------------------------------------------------- goodput under overload


def open_loop_load(address: str, vehicles: int, rate_per_s: float, budgets_ms: list[float], duration_s: float,
                   seed: int) -> list[tuple[str, bool]]:
    """Poisson arrivals at rate_per_s in total, spread over the vehicles, budgets drawn from
    budgets_ms; returns (status, on time by the client's own clock) per request."""
    rng = np.random.default_rng(seed)
    fleet = Fleet(address, vehicles)
    deadlines: dict[int, float] = {}
    results: list[tuple[str, bool]] = []
    start = time.perf_counter()
    next_send = start + rng.exponential(1.0 / rate_per_s)
    stop_at = start + duration_s
    drain_until = stop_at + max(budgets_ms) / 1000.0 + 2.0
    payload = bytes(48)
    while True:
        now = time.perf_counter()
        if next_send <= now < stop_at:
            budget_ms = float(rng.choice(budgets_ms))
            request_id = fleet.send(int(rng.integers(vehicles)), "emulated", "raw", (4, 4, 3), payload, budget_ms)
            deadlines[request_id] = now + budget_ms / 1000.0
            next_send += rng.exponential(1.0 / rate_per_s)
            continue
        if now >= stop_at and (not deadlines or now >= drain_until):
            break
        wake_at = next_send if now < stop_at else drain_until
        for _, header in fleet.replies(min((wake_at - now) * 1000.0, 50.0)):
            deadline = deadlines.pop(header.request_id, None)
            if deadline is not None:
                results.append((header.status, header.status == "ok" and time.perf_counter() <= deadline))
    results.extend(("no reply", False) for _ in deadlines)
    fleet.close()
    return results


def deadline_goodput(duration_s: float, runtime_ms: float, overload: float, vehicles: int,
                     budgets_ms: list[float], queue_limit: int, max_batch_size: int,
                     downlink_allowance_ms: float) -> dict:
    capacity_rps = 1000.0 / runtime_ms
    offered_rps = overload * capacity_rps
    by_policy = {}
    for policy in ("edf", "fifo"):
        config = CloudConfig.model_validate({
            "bind": "tcp://127.0.0.1:0", "http_port": None, "scheduler": policy, "queue_limit": queue_limit,
            "max_batch_size": max_batch_size, "downlink_allowance_ms": downlink_allowance_ms,
            "models": [{"name": "emulated", "simulated_runtime_ms": runtime_ms, "simulated_decode": False}]})
        with CloudService(config, insecure=True, announce=quiet) as service:
            results = in_child_process(open_loop_load, service.address, vehicles, offered_rps, budgets_ms,
                                       duration_s, 0)
        statuses: dict[str, int] = {}
        for status, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        on_time = sum(1 for _, ok in results if ok)
        by_policy[policy] = {"requests": len(results), "statuses": statuses, "on_time": on_time,
                             "goodput_rps": round(on_time / duration_s, 2)}
    fifo_goodput = by_policy["fifo"]["goodput_rps"]
    return {
        "model": f"emulated, {runtime_ms} ms per image (emulated GPU time: sleep, no CPU)",
        "capacity_rps": capacity_rps, "offered_rps": offered_rps, "overload": overload, "vehicles": vehicles,
        "budgets_ms": budgets_ms, "queue_limit": queue_limit, "max_batch_size": max_batch_size,
        "downlink_allowance_ms": downlink_allowance_ms,
        "duration_s": duration_s, "edf": by_policy["edf"], "fifo": by_policy["fifo"],
        "goodput_ratio_edf_over_fifo": (round(by_policy["edf"]["goodput_rps"] / fifo_goodput, 2)
                                         if fifo_goodput > 0 else None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="short run (a few seconds per section)")
    parser.add_argument("--sections", default="onboard,throughput,goodput",
                        help="comma-separated subset of onboard,throughput,goodput")
    parser.add_argument("--in-flight", type=int, default=1, help="outstanding requests per vehicle (throughput)")
    parser.add_argument("--model", default=None, help="zoo cloud model for the throughput section "
                        "(default: the smallest; an emulated model when the zoo has none)")
    parser.add_argument("--downlink-allowance-ms", type=float, default=5.0,
                        help="the service's downlink_allowance_ms in the goodput section: time kept for the "
                             "reply to reach the client (loopback plus the client waking up on a busy machine)")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    duration_s = 2.0 if args.quick else 8.0
    report: dict = {
        "benchmark": "runtime",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0],
                    "note": "CPU only; shared machine, figures are indicative"},
    }
    if "onboard" in sections:
        report["onboard_overhead"] = onboard_overhead(frames=50 if args.quick else 300)
    if "throughput" in sections:
        report["cloud_throughput"] = cloud_throughput(duration_s, [1, 4, 16], args.in_flight, max_batch_size=8,
                                                      model=args.model)
    if "goodput" in sections:
        report["deadline_goodput"] = deadline_goodput(
            duration_s=duration_s, runtime_ms=10.0, overload=2.0, vehicles=4,
            budgets_ms=[50.0, 100.0, 200.0, 400.0], queue_limit=256, max_batch_size=1,
            downlink_allowance_ms=args.downlink_allowance_ms)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
