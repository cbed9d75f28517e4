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
- ray_engine (`engine: ray`, needs the optional extra `ray`; a local Ray instance on this
  machine's CPUs, replicas with emulated GPU time): on-time goodput at 1, 2 and 4 replicas
  (scaling efficiency against n x one replica), plain Ray Serve (its router and FIFO
  `@serve.batch`) against our EDF dispatch at 2x overload, the Ray hop's added round trip at
  low load (p50/p99 against the threaded engine), and replies when a replica is killed mid-load
  (none lost, none twice).
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
    return open_loop_counted(address, vehicles, rate_per_s, budgets_ms, duration_s, seed)["results"]


def open_loop_counted(address: str, vehicles: int, rate_per_s: float, budgets_ms: list[float], duration_s: float,
                      seed: int, model: str = "emulated") -> dict:
    """`open_loop_load`, also counting replies to requests already answered (`duplicates`) and
    requests never answered (`no_reply`, after waiting out the largest budget plus 2 s)."""
    rng = np.random.default_rng(seed)
    fleet = Fleet(address, vehicles)
    deadlines: dict[int, float] = {}
    results: list[tuple[str, bool]] = []
    start = time.perf_counter()
    next_send = start + rng.exponential(1.0 / rate_per_s)
    stop_at = start + duration_s
    drain_until = stop_at + max(budgets_ms) / 1000.0 + 2.0
    payload = bytes(48)
    answered: set[int] = set()
    duplicates = 0
    while True:
        now = time.perf_counter()
        if next_send <= now < stop_at:
            budget_ms = float(rng.choice(budgets_ms))
            request_id = fleet.send(int(rng.integers(vehicles)), model, "raw", (4, 4, 3), payload, budget_ms)
            deadlines[request_id] = now + budget_ms / 1000.0
            next_send += rng.exponential(1.0 / rate_per_s)
            continue
        if now >= stop_at and (not deadlines or now >= drain_until):
            break
        wake_at = next_send if now < stop_at else drain_until
        for _, header in fleet.replies(min((wake_at - now) * 1000.0, 50.0)):
            deadline = deadlines.pop(header.request_id, None)
            if deadline is not None:
                answered.add(header.request_id)
                results.append((header.status, header.status == "ok" and time.perf_counter() <= deadline))
            elif header.request_id in answered:
                duplicates += 1
    # Linger a little: a second reply to an answered request would show up now.
    linger_until = time.perf_counter() + 0.5
    while time.perf_counter() < linger_until:
        for _, header in fleet.replies(50.0):
            if header.request_id in answered:
                duplicates += 1
    no_reply = len(deadlines)
    results.extend(("no reply", False) for _ in deadlines)
    fleet.close()
    return {"results": results, "duplicates": duplicates, "no_reply": no_reply}


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


# ---------------------------------------------------------------- the Ray engine


def summarize(load: dict, duration_s: float) -> dict:
    statuses: dict[str, int] = {}
    for status, _ in load["results"]:
        statuses[status] = statuses.get(status, 0) + 1
    on_time = sum(1 for _, ok in load["results"] if ok)
    return {"requests": len(load["results"]), "statuses": statuses, "on_time": on_time,
            "goodput_rps": round(on_time / duration_s, 2), "no_reply": load["no_reply"],
            "duplicates": load["duplicates"]}


def ray_service_config(replicas: int, runtime_ms: float, dispatch: str = "edf", scheduler: str = "edf",
                       max_batch_size: int = 1, downlink_allowance_ms: float = 5.0) -> CloudConfig:
    return CloudConfig.model_validate({
        "bind": "tcp://127.0.0.1:0", "http_port": None, "engine": "ray", "scheduler": scheduler,
        "queue_limit": 1024, "per_vehicle_queue_limit": None, "max_batch_size": max_batch_size,
        "downlink_allowance_ms": downlink_allowance_ms,
        "models": [{"name": "emulated", "simulated_runtime_ms": runtime_ms, "simulated_decode": False}],
        "ray": {"min_replicas": replicas, "max_replicas": replicas, "replica_num_cpus": 0.1, "dispatch": dispatch}})


def ray_open_loop(config: CloudConfig, rate_per_s: float, budgets_ms: list[float], duration_s: float,
                  vehicles: int = 4, kill_after_s: float | None = None) -> dict:
    """Open-loop load from a child process against a Ray-engine service; optionally SIGKILL one
    replica's process `kill_after_s` into the run."""
    import signal

    with CloudService(config, insecure=True, announce=quiet) as service:
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            pending = pool.apply_async(open_loop_counted, (service.address, vehicles, rate_per_s, budgets_ms,
                                                           duration_s, 0))
            killed = None
            if kill_after_s is not None:
                victim = service.engine.replicas()[0]
                time.sleep(kill_after_s)
                os.kill(victim["pid"], signal.SIGKILL)
                killed = victim["replica"]
            load = pending.get()
        registry = service.metrics.registry
        # A killed replica shows up as "died" (Ray reports the actor dead) or "hung" (its calls
        # fail before Ray says so): both are counted.
        replica_failures = {reason: registry.get_sample_value("avcloud_cloud_replica_failures_total",
                                                              {"reason": reason}) or 0.0
                            for reason in ("died", "hung")}
        redispatched = {reason: registry.get_sample_value("avcloud_cloud_redispatched_total", {"reason": reason})
                        or 0.0 for reason in ("died", "hung", "given back")}
    summary = summarize(load, duration_s)
    if kill_after_s is not None:
        summary.update(killed_replica=killed, replica_failures=replica_failures, redispatched=redispatched)
    return summary


def closed_loop_round_trips(address: str, model: str, requests: int) -> list[float]:
    """One vehicle, one request in flight: client-side round trips in ms."""
    fleet = Fleet(address, 1)
    round_trips_ms = []
    for _ in range(requests):
        began = time.perf_counter()
        request_id = fleet.send(0, model, "raw", (4, 4, 3), bytes(48), 10_000.0)
        while True:
            replies = [header for _, header in fleet.replies(5000) if header.request_id == request_id]
            if replies:
                break
        round_trips_ms.append((time.perf_counter() - began) * 1000.0)
    fleet.close()
    return round_trips_ms


def ray_hop_latency(runtime_ms: float, requests: int) -> dict:
    """Round trips at low load (one request at a time) through the threaded engine and the Ray
    engine (one replica), same emulated model."""
    by_engine = {}
    for engine in ("threads", "ray"):
        if engine == "ray":
            config = ray_service_config(1, runtime_ms)
        else:
            config = CloudConfig.model_validate({
                "bind": "tcp://127.0.0.1:0", "http_port": None, "max_batch_size": 1,
                "models": [{"name": "emulated", "simulated_runtime_ms": runtime_ms, "simulated_decode": False}]})
        with CloudService(config, insecure=True, announce=quiet) as service:
            closed_loop_round_trips(service.address, "emulated", 20)  # warm up both paths
            round_trips_ms = in_child_process(closed_loop_round_trips, service.address, "emulated", requests)
        by_engine[engine] = {"p50_ms": round(percentile(round_trips_ms, 50), 2),
                             "p99_ms": round(percentile(round_trips_ms, 99), 2)}
    return {"model": f"emulated, {runtime_ms} ms per image", "requests": requests, **by_engine,
            "added_p50_ms": round(by_engine["ray"]["p50_ms"] - by_engine["threads"]["p50_ms"], 2),
            "added_p99_ms": round(by_engine["ray"]["p99_ms"] - by_engine["threads"]["p99_ms"], 2)}


def ray_engine(duration_s: float, quick: bool) -> dict:
    try:
        import ray
        from ray import serve
    except ImportError as error:
        return {"available": False, "reason": f"Ray Serve not installed ({error}): pip install -e '.[ray]'"}
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    report: dict = {"available": True, "ray": ray.__version__,
                    "cluster": "local Ray instance, 2 logical CPUs, no GPU; replicas reserve 0.1 CPU each and "
                               "emulate GPU time by sleeping"}
    try:
        # Scaling: each replica count offered 1.5x its capacity, budgets far above the runtime. 80 ms
        # per image keeps 4 replicas' load (75 requests/s) within what this 2-core machine's front
        # end, dispatcher and load generator handle; the FIFO/EDF runs below show that ceiling.
        runtime_ms = 80.0
        per_replica_rps = 1000.0 / runtime_ms
        scaling = {}
        for replicas in (1, 2, 4):
            scaling[replicas] = ray_open_loop(ray_service_config(replicas, runtime_ms), 1.5 * replicas * per_replica_rps,
                                              [400.0, 800.0], duration_s)
        one = scaling[1]["goodput_rps"]
        report["scaling"] = {
            "model": f"emulated, {runtime_ms} ms per image (sleep: emulated GPU time), max_batch_size 1",
            "offered": "1.5x the replicas' capacity, budgets 400 or 800 ms",
            "replicas": {str(n): {**result, "ideal_rps": round(n * one, 2),
                                  "efficiency": round(result["goodput_rps"] / (n * one), 3) if one else None}
                         for n, result in scaling.items()},
            "two_over_one": round(scaling[2]["goodput_rps"] / one, 2) if one else None,
        }
        # Plain Ray Serve FIFO against our EDF dispatch, 2x overload, same front end.
        runtime_ms = 20.0
        budgets_ms = [50.0, 100.0, 200.0, 400.0]
        offered_rps = 2.0 * 2 * 1000.0 / runtime_ms
        edf = ray_open_loop(ray_service_config(2, runtime_ms), offered_rps, budgets_ms, duration_s)
        fifo = ray_open_loop(ray_service_config(2, runtime_ms, dispatch="serve", scheduler="fifo"), offered_rps,
                             budgets_ms, duration_s)
        report["fifo_vs_edf"] = {
            "model": f"emulated, {runtime_ms} ms per image, 2 replicas, max_batch_size 1",
            "offered_rps": offered_rps, "overload": 2.0, "budgets_ms": budgets_ms,
            "edf_dispatch": edf, "ray_serve_fifo": fifo,
            "goodput_ratio_edf_over_fifo": (round(edf["goodput_rps"] / fifo["goodput_rps"], 2)
                                            if fifo["goodput_rps"] > 0 else None),
        }
        report["hop_latency"] = ray_hop_latency(runtime_ms=5.0, requests=100 if quick else 400)
        # A replica killed a third into the run: every request answered exactly once.
        report["replica_killed"] = {
            "model": "emulated, 20 ms per image, 3 replicas, ~2/3 of their capacity offered",
            **ray_open_loop(ray_service_config(3, 20.0), 100.0, [300.0, 1000.0], max(duration_s, 3.0),
                            kill_after_s=max(duration_s, 3.0) / 3),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="short run (a few seconds per section)")
    parser.add_argument("--sections", default="onboard,throughput,goodput,ray",
                        help="comma-separated subset of onboard,throughput,goodput,ray")
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
    if "ray" in sections:
        report["ray_engine"] = ray_engine(duration_s, args.quick)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
