"""Onboard per-frame overhead, model inference excluded: solve + compress + serialize + send.

    .venv/bin/python benchmarks/runtime_onboard.py [--quick] [--frames N] [--compression input|image]
        [--images scene|noise] [--out FILE.json]

Five Waymo-sized camera frames (1920x1280 / 1920x886; by default one frame of the default
synthetic scene, also measured on high-entropy noise as a worst case) go through the real `OnboardAgent` each
frame: the exact allocator over a TURBO-like option table, OpenCV compression as allocated, the
protocol's serialization and a real ZeroMQ DEALER send to a ROUTER (in another process) on
loopback that answers at once. The fallback model is a no-op (its inference is not overhead).
Camera JPEGs are decoded as the node decodes them (`onboard.inference.CameraDecoder`: reduced
libjpeg scale when the allocated configuration allows) but that decode is reported on its own,
not in the overhead (it is the camera input). Replies are handled between frames and timed
separately. Figures are per frame for all cameras, in ms.

`measure_onboard_overhead(frames)` is imported by benchmarks/bench_runtime.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchjson import write_report

from avcloud.clock import WallClock  # noqa: E402
from avcloud.protocol import OK, ReplyHeader, ServerTimings, decode_request, encode_reply  # noqa: E402
from avcloud.types import ALL_CAMERAS, Option, Service  # noqa: E402
from onboard.daemon import OnboardAgent  # noqa: E402
from onboard.inference import CameraDecoder, CompressionEncoder, ModelInputs  # noqa: E402
from onboard.measurement import LinkMeasurement  # noqa: E402
from onboard.planning import build_planner  # noqa: E402
from onboard.transport import CloudTransport  # noqa: E402
from optimizer.policies import get_policy  # noqa: E402

TARGET_P99_MS = 15.0
CLOUD_MODEL = "avd-cloud-m"
MODEL_INPUT_WH = (768, 512)  # avd-cloud-m's card
CAMERA_WH = {"FRONT": (1920, 1280), "FRONT_LEFT": (1920, 1280), "FRONT_RIGHT": (1920, 1280),
             "SIDE_LEFT": (1920, 886), "SIDE_RIGHT": (1920, 886)}


def option_table(compression: str) -> tuple[Option, ...]:
    """TURBO-like options: the fallback plus one cloud model at several qualities."""
    fallback = Option("avd-onboard", 0.0, 0.0, 0.30)
    if compression == "input":
        names = [(f"{CLOUD_MODEL}-imgcompNone-inpcomp{q}", size) for q, size in
                 (("50", 0.4), ("75", 0.6), ("90", 1.0), ("95", 1.4))]
    else:
        names = [(f"{CLOUD_MODEL}-imgcomp{q}-inpcompNone", size) for q, size in
                 (("50", 1.9), ("75", 2.8), ("90", 5.1), ("95", 6.8))]
    return (fallback,) + tuple(Option(name, size, 50.0, 0.5 + 0.02 * rank)
                               for rank, (name, size) in enumerate(names))


def scene_images(frame_index: int = 100) -> dict[str, np.ndarray]:
    """One frame of every camera of the default synthetic scene (seed 0), rendered directly."""
    from datasets.synthetic import render_camera

    return {camera: render_camera(0, frame_index, camera)[0] for camera in CAMERA_WH}


def noise_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Smooth noise with edges: a high-entropy worst case (JPEG-95 at 768x512 is ~290 KB, more
    than twice a scene frame's), which makes the encoder's entropy coding slower."""
    import cv2

    rng = np.random.default_rng(seed)
    images = {}
    for camera, (width, height) in CAMERA_WH.items():
        small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        noise = rng.normal(0, 3, image.shape)
        images[camera] = np.clip(image + noise, 0, 255).astype(np.uint8)
    return images


class InlineExecutor(Executor):
    def submit(self, fn, *args, **kwargs):
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def answer_requests(endpoint_queue, stop_event) -> None:
    """A ROUTER on loopback that answers every request at once with an empty `ok` reply.

    Runs in its own process so it never competes with the measured code for the GIL."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    endpoint_queue.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while not stop_event.is_set():
        if not sock.poll(50):
            continue
        identity, *frames = sock.recv_multipart()
        header, _ = decode_request(frames)
        reply = ReplyHeader(status=OK, request_id=header.request_id, vehicle=header.vehicle, task=header.task,
                            frame=header.frame, model=header.model, timings=ServerTimings(total_ms=0.1))
        sock.send_multipart([identity, *encode_reply(reply)])
    sock.close(linger=0)
    context.term()


class AnsweringRouter:
    def __init__(self) -> None:
        fork = multiprocessing.get_context("fork")
        endpoints = fork.Queue()
        self._stop = fork.Event()
        self._process = fork.Process(target=answer_requests, args=(endpoints, self._stop), daemon=True)
        self._process.start()
        self.endpoint = endpoints.get(timeout=30)

    def close(self) -> None:
        self._stop.set()
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()


class Timed:
    """Wraps a callable and keeps the time of its calls since the last `take()`."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.elapsed_s = 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.elapsed_s += time.perf_counter() - started

    def take(self) -> float:
        elapsed, self.elapsed_s = self.elapsed_s, 0.0
        return elapsed * 1000.0


class TimedPlanner:
    def __init__(self, planner) -> None:
        self.timed = Timed(planner.plan)

    def plan(self, *args):
        return self.timed(*args)


class FixedEstimator:
    def __init__(self, mbps: float) -> None:
        self.mbps = mbps

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        pass

    def estimate_mbps(self) -> float:
        return self.mbps


def summary(values_ms: list[float]) -> dict[str, float]:
    values = np.asarray(values_ms)
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "mean": round(float(values.mean()), 3), "max": round(float(values.max()), 3)}


CAMERA_IMAGES = {"scene": scene_images, "noise": noise_images}


def measure_onboard_overhead(frames: int, compression: str = "input", encode_workers: int = 0,
                             image_set: str = "scene") -> dict:
    """Per-frame onboard overhead for 5 cameras; p50/p99/mean/max in ms, overall and per stage.

    The overhead of a frame runs from handing its first camera image to the agent until all five
    requests are on the socket. `encode_workers` > 0 compresses the cameras in parallel threads
    (node param `encode_workers`; the default 0 compresses inline); then `compress_ms` is CPU time
    summed over threads.
    """
    cameras = ALL_CAMERAS
    services = tuple(Service(camera, option_table(compression)) for camera in cameras)
    planner = TimedPlanner(build_planner(services, get_policy("turbo")))
    encoder = Timed(CompressionEncoder({CLOUD_MODEL: MODEL_INPUT_WH}))
    router = AnsweringRouter()  # forked before this process opens any ZeroMQ context
    context = zmq.Context()
    transport = CloudTransport(context, router.endpoint, insecure=True, high_water_mark=64)
    sent = Timed(transport.send)
    transport_send = transport.send
    transport.send = sent  # time serialization's hand-off to ZeroMQ together with the agent's bookkeeping
    clock = WallClock()
    encode_executor = ThreadPoolExecutor(encode_workers) if encode_workers > 0 else None
    wake = threading.Event()
    agent = OnboardAgent(
        services=services, slo_ms=10_000.0,  # generous: this measures cost, not the drop rule
        clock=clock, planner=planner,
        measurement=LinkMeasurement(FixedEstimator(1000.0), initial_rtt_ms=5.0),
        fallback=lambda image, full_size_wh: np.zeros((0, 6), np.float32), fallback_name="avd-onboard",
        executor=InlineExecutor(), encoder=encoder, link=transport, publish=lambda result: None,
        encode_executor=encode_executor, wake=wake.set,
    )
    import cv2

    jpegs = {camera: cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
             for camera, image in CAMERA_IMAGES[image_set]().items()}
    decoder = CameraDecoder("avd-onboard", ModelInputs({CLOUD_MODEL: MODEL_INPUT_WH, "avd-onboard": (384, 256)}))
    decodes_ms = []
    time.sleep(0.2)  # connected before the first send (ZMQ_IMMEDIATE drops sends to no peer)
    totals, solves, compressions, sends, replies_ms = [], [], [], [], []
    warmup = min(5, frames)
    try:
        for frame_index in range(frames + warmup):
            decode_started = time.perf_counter()
            allocation = agent.allocation_for(frame_index)
            solve_before_ms = planner.timed.take()
            images = {camera: decoder.decode(jpegs[camera], CAMERA_WH[camera], allocation.choices[camera])
                      for camera in cameras}
            decode_ms = (time.perf_counter() - decode_started) * 1000.0 - solve_before_ms
            sent_before = agent.counters.requests_sent
            started = time.perf_counter()
            for camera in cameras:
                agent.on_camera_frame(frame_index, camera, images[camera], full_size_wh=CAMERA_WH[camera])
            give_up = time.monotonic() + 5.0
            while agent.counters.requests_sent < sent_before + len(cameras) and time.monotonic() < give_up:
                wake.wait(0.05)  # parallel compression: the agent sends as each camera is ready
                wake.clear()
                agent.step()
            total_ms = (time.perf_counter() - started) * 1000.0 + solve_before_ms
            solve_ms, compress_ms, send_ms = planner.timed.take() + solve_before_ms, encoder.take(), sent.take()
            # Handle the replies (not part of the frame's critical path), timed on their own.
            # Until every request of the frame is answered: the agent's RTT pings are answered
            # too, and a reply left behind would hold its camera's next request back.
            reply_started = time.perf_counter()
            deadline = time.monotonic() + 2.0
            while agent.status()["in_flight"] and time.monotonic() < deadline:
                if transport.socket.poll(100):
                    agent.on_reply(transport.receive())
            reply_ms = (time.perf_counter() - reply_started) * 1000.0
            if frame_index >= warmup:
                totals.append(total_ms)
                solves.append(solve_ms)
                compressions.append(compress_ms)
                sends.append(send_ms)
                replies_ms.append(reply_ms)
                decodes_ms.append(decode_ms)
        sent_requests = agent.counters.requests_sent
    finally:
        transport.send = transport_send
        transport.close()
        router.close()
        if encode_executor is not None:
            encode_executor.shutdown()
        context.term()
    result = {
        "cameras": len(cameras),
        "compression": compression,
        "camera_images": image_set,
        "encode_workers": encode_workers,
        "image_sizes": {camera: list(size) for camera, size in CAMERA_WH.items()},
        "requests_sent": sent_requests,
        "per_frame_overhead_ms": summary(totals),
        "solve_ms": summary(solves),
        "compress_ms" if encode_workers == 0 else "compress_cpu_ms_all_threads": summary(compressions),
        "send_ms": summary(sends),
        "reply_wait_and_handling_ms": summary(replies_ms),
        "camera_decode_ms_not_in_overhead": summary(decodes_ms),
        "decoded_sizes": {camera: [int(images[camera].shape[1]), int(images[camera].shape[0])] for camera in cameras},
        "target_p99_ms": TARGET_P99_MS,
    }
    result["meets_target"] = result["per_frame_overhead_ms"]["p99"] <= TARGET_P99_MS
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="30 frames")
    parser.add_argument("--compression", choices=("input", "image", "both"), default="both")
    parser.add_argument("--encode-workers", type=int, default=0, help="parallel compression threads (0: inline)")
    parser.add_argument("--also-parallel", type=int, default=5, metavar="N",
                        help="also measure input compression with N parallel threads (0: skip)")
    parser.add_argument("--images", choices=tuple(CAMERA_IMAGES), default="scene",
                        help="camera frames: the default scene's (default) or high-entropy noise (worst case)")
    parser.add_argument("--out", type=Path, default=None, help="write JSON here (default: stdout)")
    args = parser.parse_args(argv)
    frames = 30 if args.quick else args.frames
    kinds = ("input", "image") if args.compression == "both" else (args.compression,)
    report = {f"{kind}_compression": measure_onboard_overhead(frames, kind, args.encode_workers, args.images)
              for kind in kinds}
    if args.also_parallel > 0 and "input" in kinds:
        report[f"input_compression_{args.also_parallel}_threads"] = measure_onboard_overhead(
            frames, "input", args.also_parallel, args.images)
    if "input" in kinds:
        worst = "noise" if args.images == "scene" else "scene"
        report[f"input_compression_{worst}_images"] = measure_onboard_overhead(frames, "input", 0, worst)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
