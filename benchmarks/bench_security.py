"""Security benchmark: the cloud service against authorised but hostile vehicles, on loopback.
Prints (or writes) JSON.

    .venv/bin/python benchmarks/bench_security.py [--quick] [--out FILE.json]

Sections (the service runs in this process; every client runs in a separate process, so the
service's memory is this process's and the clients do not compete for its GIL):
- bombs: PNG and JPEG decompression bombs (4096^2, 8192^2, 16384^2 pixels), each sent with a
  matching request shape and with a shape that lies, while car-2 sends ordinary 640x480 JPEGs:
  peak RSS growth of the service, worker time per bomb, car-2's on-time rate with and without
  the bombs. `reference_unchecked_decode` decodes the same bombs with OpenCV in a child process,
  as the service did before reading headers.
- flood: CurveZMQ, one worker, an emulated 10 ms/image model (capacity 100 requests/s). car-1
  sends 2 requests every 100 ms (200 ms budget; 20% of the worker); car-2 floods at 10x its
  fair rate (500/s, 150 ms budgets). car-1's on-time rate alone, flooded, and flooded with the
  fair share off (the service before the fair share).
- impersonation: car-2's key sends requests claiming to be car-1: rejected and counted
  (avcloud_cloud_identity_mismatches_total), car-1 unaffected.
- fuzz: malformed messages of every class (seeded), each answered or dropped by rule; the
  service's RSS growth.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import platform
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import zmq

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchjson import write_report  # noqa: E402

from avcloud import keys  # noqa: E402
from avcloud.protocol import RequestHeader, decode_reply, encode_request  # noqa: E402
from cloudside.config import CloudConfig  # noqa: E402
from cloudside.service import CloudService  # noqa: E402

BOMB_SIDES = (4096, 8192, 16384)


def quiet(line: str) -> None:
    pass


def in_child_process(function, *args):
    """Run a client in a fresh process and return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


def reset_peak_rss() -> bool:
    """Start a new peak (VmHWM) measurement (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def metric(service: CloudService, name: str, **labels) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- payloads


def png_bomb(side: int) -> bytes:
    """A valid grey PNG of zeros, side x side pixels: a few hundred KB, side^2 bytes decoded
    (x3 as the BGR image the service decodes to)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def jpeg_bomb(side: int) -> bytes:
    """An 8x8 JPEG whose frame header claims side x side pixels (the decoder allocates them all)."""
    import cv2

    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def ordinary_jpeg() -> bytes:
    import cv2

    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8) // 32 * 32
    return cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


# ---------------------------------------------------------------- clients (run in child processes)


class Vehicle:
    """One DEALER with its own key (or none), sending requests and timing their replies."""

    def __init__(self, context: zmq.Context, address: str, name: str, key_dir: str | None, server_key: str | None,
                 claimed: str | None = None) -> None:
        self.name = name
        self.claimed = claimed or name
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndhwm = self.socket.rcvhwm = 100_000
        if key_dir is not None:
            pair = keys.load_keypair(Path(key_dir) / f"{name}.key_secret")
            keys.configure_curve_client(self.socket, pair, keys.load_public_key(server_key))
        self.socket.connect(address)
        self.ids = itertools.count()
        self.pending: dict[int, tuple[float, float]] = {}  # request id -> (sent, budget s)
        self.counts = {"sent": 0, "on_time": 0}
        self.statuses: dict[str, int] = {}
        self.round_trips_ms: list[float] = []

    def send(self, model: str, codec: str, shape: tuple[int, int, int], payload: bytes, budget_ms: float) -> int:
        request_id = next(self.ids)
        header = RequestHeader(vehicle=self.claimed, request_id=request_id, task="FRONT", frame=request_id,
                               model=model, codec=codec, shape=shape, budget_ms=budget_ms)
        self.socket.send_multipart(encode_request(header, payload), copy=False)
        self.pending[request_id] = (time.perf_counter(), budget_ms / 1000.0)
        self.counts["sent"] += 1
        return request_id

    def receive_ready(self) -> list:
        replies = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return replies
            header = decode_reply(frames)[0]
            sent = self.pending.pop(header.request_id, None)
            if sent is None:
                continue
            round_trip_s = time.perf_counter() - sent[0]
            self.statuses[header.status] = self.statuses.get(header.status, 0) + 1
            if header.status == "ok":
                self.round_trips_ms.append(round_trip_s * 1000.0)
                self.counts["on_time"] += round_trip_s <= sent[1]
            replies.append(header)

    def report(self) -> dict:
        sent = self.counts["sent"]
        trips = sorted(self.round_trips_ms)
        return {"vehicle": self.name, "claimed": self.claimed, "sent": sent, "on_time": self.counts["on_time"],
                "on_time_rate": round(self.counts["on_time"] / sent, 4) if sent else None,
                "statuses": dict(sorted(self.statuses.items())), "no_reply": len(self.pending),
                "round_trip_ms_p50": round(trips[len(trips) // 2], 2) if trips else None,
                "round_trip_ms_p99": round(trips[int(len(trips) * 0.99)], 2) if trips else None}


def drive(address: str, schedules: list[dict], duration_s: float, key_dir: str | None = None,
          server_key: str | None = None) -> list[dict]:
    """Each schedule: {name, claimed?, period_ms, burst, budget_ms, model, codec, shape, payload}.
    Sends on schedule for duration_s, then waits for what is in flight; one report per vehicle."""
    context = zmq.Context()
    vehicles = [Vehicle(context, address, spec["name"], key_dir, server_key, spec.get("claimed"))
                for spec in schedules]
    poller = zmq.Poller()
    for vehicle in vehicles:
        poller.register(vehicle.socket, zmq.POLLIN)
    time.sleep(0.5)  # CurveZMQ handshakes
    start = time.perf_counter()
    next_send = [start + spec.get("offset_ms", 0.0) / 1000.0 for spec in schedules]
    stop_at = start + duration_s
    drain_until = stop_at + max(spec["budget_ms"] for spec in schedules) / 1000.0 + 2.0
    while True:
        now = time.perf_counter()
        for index, (vehicle, spec) in enumerate(zip(vehicles, schedules, strict=True)):
            while next_send[index] <= now < stop_at:
                for _ in range(spec.get("burst", 1)):
                    vehicle.send(spec["model"], spec["codec"], tuple(spec["shape"]), spec["payload"], spec["budget_ms"])
                next_send[index] += spec["period_ms"] / 1000.0
        if now >= stop_at and (now >= drain_until or not any(v.pending for v in vehicles)):
            break
        wake = min([t for t in next_send if t < stop_at] or [drain_until])
        for socket, _ in poller.poll(max(0.0, min((wake - time.perf_counter()) * 1000.0, 20.0))):
            for vehicle in vehicles:
                if vehicle.socket is socket:
                    vehicle.receive_ready()
    reports = [vehicle.report() for vehicle in vehicles]
    for vehicle in vehicles:
        vehicle.socket.close(linger=0)
    context.term()
    return reports


def send_bombs(address: str, bombs: list[tuple[str, int, bytes, tuple[int, int, int]]]) -> list[dict]:
    """Each bomb once, waiting for its reply."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(address)
    results = []
    for request_id, (codec, side, payload, shape) in enumerate(bombs):
        header = RequestHeader(vehicle="car-1", request_id=request_id, task="FRONT", frame=0, model="decoding",
                               codec=codec, shape=shape, budget_ms=60_000)
        started = time.perf_counter()
        socket.send_multipart(encode_request(header, payload))
        reply = decode_reply(socket.recv_multipart())[0] if socket.poll(120_000) else None
        results.append({
            "codec": codec, "declared_side": side, "payload_bytes": len(payload), "request_shape": list(shape),
            "status": reply.status if reply else "no reply", "reason": reply.reason if reply else None,
            "server_decode_ms": round(reply.timings.decode_ms, 3) if reply else None,
            "server_total_ms": round(reply.timings.total_ms, 3) if reply else None,
            "round_trip_ms": round((time.perf_counter() - started) * 1000.0, 3)})
        time.sleep(0.2)
    socket.close()
    context.term()
    return results


def bombs_while_driving(address: str, bombs: list, schedule: dict, duration_s: float) -> dict:
    """car-2 drives its schedule while car-1's bombs go out from a second process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        bombing = pool.apply_async(send_bombs, (address, bombs))
        reports = drive(address, [schedule], duration_s)
        return {"bombs": bombing.get(300), "car_2": reports[0]}


def unchecked_decode(payload: bytes) -> dict:
    """What decoding the bomb costs when nobody reads its header first (run in a child process)."""
    import resource

    import cv2

    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"decode_ms": round(elapsed_ms, 1), "peak_rss_growth_mb": round((after_kb - before_kb) / 1024.0, 1),
            "decoded_shape": list(image.shape) if image is not None else None}


def fuzz(address: str, count: int, seed: int) -> dict:
    """`count` malformed messages of every class, one at a time; counts the answered ones."""
    rng = np.random.default_rng(seed)
    valid = {"v": 1, "type": "infer", "vehicle": "car-9", "request_id": 1, "task": "FRONT", "frame": 1,
             "model": "decoding", "codec": "raw", "shape": [2, 2, 3], "budget_ms": 500.0}
    png_header = png_bomb(16)[:33]
    jpeg_header = jpeg_bomb(16)

    def mutated() -> dict:
        data = dict(valid)
        field = str(rng.choice(list(valid)))
        choice = int(rng.integers(7))
        data[field] = [None, -1, 2**70, "x" * 200, [], {"a": 1}, 1e308][choice]
        if rng.random() < 0.3:
            del data[str(rng.choice(list(valid)))]
        return data

    classes = {
        "random bytes": lambda: [rng.bytes(int(rng.integers(0, 200))), rng.bytes(int(rng.integers(0, 50)))],
        "json not an object": lambda: [json.dumps([1, 2, 3]).encode(), b"x"],
        "wrong version": lambda: [json.dumps({**valid, "v": int(rng.integers(2, 9))}).encode(), bytes(12)],
        "mutated fields": lambda: [json.dumps(mutated()).encode(), bytes(12)],
        "raw size mismatch": lambda: [json.dumps(valid).encode(), bytes(int(rng.integers(1, 40)))],
        "frame count": lambda: [json.dumps(valid).encode()] * int(rng.choice([1, 3, 4])),
        "huge header": lambda: [b" " * 5000, b"x"],
        "garbage image": lambda: [json.dumps({**valid, "codec": str(rng.choice(["jpeg", "png"])),
                                              "shape": [8, 8, 3]}).encode(), rng.bytes(int(rng.integers(1, 300)))],
        "image header lies": lambda: [json.dumps({**valid, "codec": "png", "shape": [8, 8, 3]}).encode(),
                                      png_header + rng.bytes(20)],
        "truncated jpeg": lambda: [json.dumps({**valid, "codec": "jpeg", "shape": [16, 16, 3]}).encode(),
                                   jpeg_header[: int(rng.integers(2, len(jpeg_header)))]],
        "bad utf-8": lambda: [b'{"v":1,"type":"\xff\xfe"}', b"x"],
        "deep json": lambda: [b"[" * 2000 + b"]" * 2000, b"x"],
        "nan budget": lambda: [json.dumps(valid).replace("500.0", "NaN").encode(), bytes(12)],
        "unknown model": lambda: [json.dumps({**valid, "model": "yolo"}).encode(), bytes(12)],
        "empty payload": lambda: [json.dumps(valid).encode(), b""],
    }
    names = sorted(classes)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(address)
    answered = 0
    statuses: dict[str, int] = {}
    unanswered: dict[str, int] = {}
    started = time.perf_counter()
    for index in range(count):
        name = names[index % len(names)]
        socket.send_multipart(classes[name]())
        if socket.poll(5000):
            header = decode_reply(socket.recv_multipart())[0]
            answered += 1
            statuses[header.status] = statuses.get(header.status, 0) + 1
        else:
            unanswered[name] = unanswered.get(name, 0) + 1
    elapsed_s = time.perf_counter() - started
    socket.close()
    context.term()
    return {"messages": count, "classes": names, "answered": answered, "statuses": statuses,
            "unanswered_by_class": unanswered, "elapsed_s": round(elapsed_s, 2)}


# ---------------------------------------------------------------- sections


def bombs_section(duration_s: float, include_reference: bool) -> dict:
    ordinary = ordinary_jpeg()
    schedule = {"name": "car-2", "period_ms": 50.0, "budget_ms": 200.0, "model": "decoding", "codec": "jpeg",
                "shape": (480, 640, 3), "payload": ordinary}
    bombs = []
    for side in BOMB_SIDES:
        for codec, payload in (("png", png_bomb(side)), ("jpeg", jpeg_bomb(side))):
            bombs.append((codec, side, payload, (side, side, 3)))  # the shape matches the image
            bombs.append((codec, side, payload, (480, 640, 3)))  # the shape lies
    config = CloudConfig.model_validate({
        "bind": "tcp://127.0.0.1:0", "http_port": None, "max_batch_size": 1,
        "models": [{"name": "decoding", "simulated_runtime_ms": 5.0, "simulated_decode": True}]})
    with CloudService(config, insecure=True, announce=quiet) as service:
        alone = drive(service.address, [schedule], duration_s)[0]
        gc.collect()
        rss_before = rss_mb()
        peak_measured = reset_peak_rss()
        worker_before = metric(service, "avcloud_cloud_worker_seconds_total", vehicle="car-1")
        during = bombs_while_driving(service.address, bombs, schedule, max(duration_s, 0.25 * len(bombs) + 1))
        worker_s = metric(service, "avcloud_cloud_worker_seconds_total", vehicle="car-1") - worker_before
        peak_growth = peak_rss_mb() - rss_before if peak_measured else None
        refused = metric(service, "avcloud_cloud_unsafe_images_total", vehicle="car-1", model="decoding")
        expected_after = service.expected_ms("decoding", 1)
    result = {
        "model": "emulated 5 ms/image, decodes payloads (real OpenCV decode)",
        "max_image_pixels": config.max_image_pixels,
        "bombs": during["bombs"], "bombs_refused_before_decoding": int(refused),
        "worker_ms_total_for_bombs": round(worker_s * 1000.0, 3),
        "worker_ms_per_bomb": round(worker_s * 1000.0 / len(bombs), 3),
        "service_peak_rss_growth_mb": round(peak_growth, 1) if peak_growth is not None else None,
        "expected_runtime_ms_after": round(expected_after, 3),
        "car_2_alone": alone, "car_2_during_bombs": during["car_2"],
        "car_2_on_time_ratio": (round(during["car_2"]["on_time_rate"] / alone["on_time_rate"], 4)
                                if alone["on_time_rate"] else None),
    }
    if include_reference:
        result["reference_unchecked_decode"] = {
            f"{codec} {side}x{side}": in_child_process(unchecked_decode, payload)
            for side in BOMB_SIDES[:2] for codec, payload in (("png", png_bomb(side)), ("jpeg", jpeg_bomb(side)))}
    return result


def secure_config(key_root: Path, **changes) -> CloudConfig:
    fields = {"bind": "tcp://127.0.0.1:0", "http_port": None, "max_batch_size": 1,
              "models": [{"name": "emulated", "simulated_runtime_ms": 10.0, "simulated_decode": False}],
              "security": {"server_secret_key": str(key_root / "server" / "cloud.key_secret"),
                           "allowlist_dir": str(key_root / "allowed")}}
    fields.update(changes)
    return CloudConfig.model_validate(fields)


def make_keys(key_root: Path) -> None:
    keys.generate_keypair("cloud", key_root / "server")
    for car in ("car-1", "car-2"):
        keys.generate_keypair(car, key_root / "cars", allowlist_dir=key_root / "allowed")


def flood_section(duration_s: float, key_root: Path) -> dict:
    good = {"name": "car-1", "period_ms": 100.0, "burst": 2, "budget_ms": 200.0, "model": "emulated",
            "codec": "raw", "shape": (4, 4, 3), "payload": bytes(48)}
    flood = {"name": "car-2", "period_ms": 2.0, "budget_ms": 150.0, "model": "emulated", "codec": "raw",
             "shape": (4, 4, 3), "payload": bytes(48), "offset_ms": 1.0}
    runs = {}
    for label, schedules, changes in (
            ("alone", [good], {}),
            ("flooded", [good, flood], {}),
            ("flooded_fair_share_off", [good, flood], {"fair_share": False, "per_vehicle_queue_limit": None})):
        with CloudService(secure_config(key_root, **changes), announce=quiet) as service:
            reports = in_child_process(drive, service.address, schedules, duration_s, str(key_root / "cars"),
                                       str(key_root / "server" / "cloud.key"))
            runs[label] = {"vehicles": reports,
                           "worker_s_by_vehicle": {car: round(metric(service, "avcloud_cloud_worker_seconds_total",
                                                                     vehicle=car), 3) for car in ("car-1", "car-2")}}
    alone_rate = runs["alone"]["vehicles"][0]["on_time_rate"]
    return {
        "model": "emulated 10 ms/image (sleep), 1 worker: capacity 100 requests/s; CurveZMQ on",
        "car_1": "2 requests every 100 ms, budget 200 ms (20% of the worker)",
        "car_2": "one request every 2 ms (500/s = 10x a fair share of 50/s), budget 150 ms",
        "duration_s": duration_s, "runs": runs,
        "car_1_on_time_ratio_flooded": round(runs["flooded"]["vehicles"][0]["on_time_rate"] / alone_rate, 4),
        "car_1_on_time_ratio_fair_share_off": round(
            runs["flooded_fair_share_off"]["vehicles"][0]["on_time_rate"] / alone_rate, 4),
    }


def impersonation_section(duration_s: float, key_root: Path) -> dict:
    good = {"name": "car-1", "period_ms": 100.0, "burst": 2, "budget_ms": 200.0, "model": "emulated",
            "codec": "raw", "shape": (4, 4, 3), "payload": bytes(48)}
    impostor = {"name": "car-2", "claimed": "car-1", "period_ms": 10.0, "budget_ms": 200.0, "model": "emulated",
                "codec": "raw", "shape": (4, 4, 3), "payload": bytes(48), "offset_ms": 5.0}
    with CloudService(secure_config(key_root, per_vehicle_queue_limit=16), announce=quiet) as service:
        reports = in_child_process(drive, service.address, [good, impostor], duration_s, str(key_root / "cars"),
                                   str(key_root / "server" / "cloud.key"))
        counted = {car: metric(service, "avcloud_cloud_identity_mismatches_total", vehicle=car)
                   for car in ("car-1", "car-2")}
    return {"car_1": reports[0], "car_2_claiming_car_1": reports[1],
            "identity_mismatches_counted": {car: int(value) for car, value in counted.items()}}


def fuzz_section(count: int) -> dict:
    config = CloudConfig.model_validate({
        "bind": "tcp://127.0.0.1:0", "http_port": None, "queue_limit": 1000,
        "models": [{"name": "decoding", "simulated_runtime_ms": 1.0, "simulated_decode": True}]})
    with CloudService(config, insecure=True, announce=quiet) as service:
        in_child_process(fuzz, service.address, 300, 1)  # warm-up: caches and allocator pools settle
        gc.collect()
        before = rss_mb()
        result = in_child_process(fuzz, service.address, count, 2)
        gc.collect()
        after = rss_mb()
        still_ready = service.ready
    return {**result, "service_rss_mb_before": round(before, 1), "service_rss_mb_after": round(after, 1),
            "service_rss_growth_mb": round(after - before, 2), "service_ready_after": still_ready}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="short run (about a minute)")
    parser.add_argument("--sections", default="bombs,flood,impersonation,fuzz",
                        help="comma-separated subset of bombs,flood,impersonation,fuzz")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    duration_s = 3.0 if args.quick else 10.0
    report: dict = {
        "benchmark": "security",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0],
                    "note": "CPU only, loopback; shared machine, timings are indicative"},
    }
    with tempfile.TemporaryDirectory(prefix="avcloud-bench-keys-") as scratch:
        key_root = Path(scratch)
        make_keys(key_root)
        if "bombs" in sections:
            report["bombs"] = bombs_section(duration_s, include_reference=not args.quick)
        if "flood" in sections:
            report["flood"] = flood_section(duration_s, key_root)
        if "impersonation" in sections:
            report["impersonation"] = impersonation_section(duration_s, key_root)
        if "fuzz" in sections:
            report["fuzz"] = fuzz_section(1000 if args.quick else 5000)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
