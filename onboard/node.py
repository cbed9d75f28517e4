"""The live onboard node: ROS 2 style lifecycle around the `OnboardAgent`, wired to real sockets.

Lifecycle: unconfigured -> (configure) -> inactive -> (activate) -> active -> (deactivate) ->
inactive -> (shutdown) -> finalized. `configure` loads the profile table and the fallback model,
warms up the solver, and opens the sockets; `activate` starts the event loop (in the calling
thread with `spin()`, or a background thread with `start()`).

The loop polls the camera SUB socket, the cloud DEALER socket and a wake-up pipe (written when
a fallback inference finishes), with a timeout set by the agent's next deadline, so results
are published at their deadline without busy waiting. Logs are one JSON object per line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from avcloud.clock import Clock, WallClock
from avcloud.errors import ConfigError
from avcloud.types import Service
from onboard.daemon import FallbackDetector, FrameEncoder, OnboardAgent
from onboard.measurement import BandwidthEstimator
from onboard.params import OnboardParams
from onboard.planning import AllocationPlanner, build_planner, onboard_only_services
from onboard.topics import (
    TopicMessageError,
    TopicMonitor,
    decode_camera_frame,
    encode_detection_result,
    encode_heartbeat,
    topic_name,
)
from onboard.transport import CloudTransport

UNCONFIGURED, INACTIVE, ACTIVE, FINALIZED = "unconfigured", "inactive", "active", "finalized"
MAX_POLL_MS = 100.0


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "node": record.name,
                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def structured_logger(name: str, stream: Any = None) -> logging.Logger:
    logger = logging.getLogger(f"avcloud.onboard.{name}")
    if not logger.handlers:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonLogFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class OnboardNode:
    """One onboard daemon. Parts can be injected (tests); by default they are built from params."""

    def __init__(self, params: OnboardParams, clock: Clock | None = None, context: zmq.Context | None = None,
                 services: tuple[Service, ...] | None = None, planner: AllocationPlanner | None = None,
                 fallback: FallbackDetector | None = None, encoder: FrameEncoder | None = None,
                 estimator: BandwidthEstimator | None = None, decoder: Any = None,
                 log_stream: Any = None) -> None:
        self.params = params
        self.clock = clock or WallClock()
        self.context = context or zmq.Context.instance()
        self.state = UNCONFIGURED
        self.log = structured_logger(params.node_name, log_stream)
        self._services = services
        self._planner = planner
        self._fallback = fallback
        self._encoder = encoder
        self._estimator = estimator
        self.decoder = decoder
        self.agent: OnboardAgent | None = None
        self.transport: CloudTransport | None = None
        self.camera_socket: zmq.Socket | None = None
        self.output_socket: zmq.Socket | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.encode_executor: ThreadPoolExecutor | None = None
        self.monitor: TopicMonitor | None = None
        self.bad_camera_messages = 0
        self._camera_topics: dict[bytes, str] = {}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_heartbeat_ms = 0.0

    # ------------------------------------------------------------ lifecycle transitions

    def _event(self, event: str, **fields: Any) -> None:
        self.log.info(event, extra={"fields": fields})

    def _require(self, *states: str) -> None:
        if self.state not in states:
            raise RuntimeError(f"node is {self.state}; this transition needs {' or '.join(states)}")

    def configure(self) -> None:
        self._require(UNCONFIGURED)
        params = self.params
        services = self._services or self._load_services()
        policy = params.policy_spec()
        frame_interval_ms = 1000.0 / params.camera_rate_hz
        planner = self._planner or build_planner(services, policy, frame_interval_ms)
        warm_started = time.perf_counter()
        planner.plan(policy.initial_estimate_mbps, params.rtt_ms, params.slo_ms, ())  # warm up the solver
        solver_warmup_ms = (time.perf_counter() - warm_started) * 1000.0
        fallback = self._fallback
        if fallback is None:
            from onboard.inference import load_fallback

            fallback = load_fallback(params.onboard_model, params.onboard_backend, params.onboard_threads)
        encoder = self._encoder
        if encoder is None:
            from onboard.inference import CompressionEncoder

            encoder = CompressionEncoder()
        if self.decoder is None:
            from onboard.inference import CameraDecoder

            self.decoder = CameraDecoder(params.onboard_model)
            for service in services:  # model cards are read now, not on the first frame
                for option in service.options:
                    self.decoder.needed_size_wh(option.name)
        self.transport = CloudTransport(self.context, params.endpoints.cloud, params.security.client_secret_key,
                                        params.security.server_public_key, params.security.insecure,
                                        params.send_high_water_mark)
        self.camera_socket = self.context.socket(zmq.SUB)
        self.camera_socket.setsockopt(zmq.LINGER, 0)
        self.camera_socket.setsockopt(zmq.RCVHWM, 4 * len(params.cameras))
        for camera in params.cameras:
            name = topic_name(params.topics.camera, camera)
            self._camera_topics[name.encode()] = camera
            self.camera_socket.setsockopt(zmq.SUBSCRIBE, name.encode())
        self.camera_socket.connect(params.endpoints.cameras)
        self.output_socket = self.context.socket(zmq.PUB)
        self.output_socket.setsockopt(zmq.LINGER, 0)
        self.output_socket.setsockopt(zmq.SNDHWM, 1000)
        try:
            self.output_socket.bind(params.endpoints.outputs)
        except zmq.ZMQError as error:
            raise ConfigError(f"endpoints.outputs: cannot bind {params.endpoints.outputs} ({error})") from None
        self.executor = ThreadPoolExecutor(max_workers=params.fallback_workers, thread_name_prefix="fallback")
        if params.encode_workers > 0:
            self.encode_executor = ThreadPoolExecutor(max_workers=params.encode_workers, thread_name_prefix="encode")
        self.monitor = TopicMonitor({name.decode(): params.camera_rate_hz for name in self._camera_topics},
                                    params.dead_after_periods)
        self.agent = OnboardAgent.for_policy(
            policy, services, params.slo_ms, params.rtt_ms, self.clock, planner=planner, estimator=self._estimator,
            fallback=fallback, fallback_name=params.onboard_model, executor=self.executor, encoder=encoder,
            link=self.transport, publish=self._publish, vehicle=params.vehicle,
            reconnect_after_timeouts=params.reconnect_after_timeouts,
            min_reconnect_interval_ms=params.min_reconnect_interval_ms, wake=self._wake,
            publish_guard_ms=params.publish_guard_ms, encode_executor=self.encode_executor, log_event=self._event,
            log_replies=params.log_replies, frame_interval_ms=frame_interval_ms,
        )
        self.state = INACTIVE
        self._event("configured", cameras=params.cameras, policy=policy.to_json_dict(), cloud=params.endpoints.cloud,
                    outputs=params.endpoints.outputs, solver_warmup_ms=round(solver_warmup_ms, 2))

    def _load_services(self) -> tuple[Service, ...]:
        params = self.params
        if params.profile_path is None:
            return onboard_only_services(params.cameras, params.onboard_model)
        from optimizer.curves import load_profile_table

        return load_profile_table(params.profile_path).services(params.cameras)

    def activate(self) -> None:
        self._require(INACTIVE)
        # Long-lived start-up objects (modules, models, parameters) leave the collector's view, so
        # a full collection in the middle of a frame does not scan them: with a large heap that
        # pause reached 80 ms and pushed results past their deadline.
        gc.freeze()
        self.state = ACTIVE
        self._stop.clear()
        self._event("activated")

    def deactivate(self) -> None:
        self._require(ACTIVE)
        self.stop()
        self.state = INACTIVE
        self._event("deactivated")

    def shutdown(self) -> None:
        if self.state == FINALIZED:
            return
        if self.state == ACTIVE:
            self.stop()
        for sock in (self.camera_socket, self.output_socket):
            if sock is not None:
                sock.close(linger=0)
        if self.transport is not None:
            self.transport.close()
        for executor in (self.executor, self.encode_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_read)
        os.close(self._wake_write)
        self.state = FINALIZED
        self._event("finalized", **(self.agent.status() if self.agent else {}))

    @property
    def outputs_endpoint(self) -> str:
        """The bound outputs endpoint (resolves a `tcp://127.0.0.1:*` wildcard port)."""
        assert self.output_socket is not None, "configure() the node first"
        return self.output_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------ running

    def start(self) -> OnboardNode:
        """configure (if needed), activate, and spin in a background thread."""
        if self.state == UNCONFIGURED:
            self.configure()
        self.activate()
        self._thread = threading.Thread(target=self.spin, name=f"{self.params.node_name}-spin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler or another thread)."""
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
            self._thread = None

    def spin(self) -> None:
        while not self._stop.is_set() and self.state == ACTIVE:
            self.spin_once()

    def spin_once(self) -> None:
        assert self.agent is not None and self.transport is not None and self.camera_socket is not None
        now_ms = self.clock.now_ms()
        timeout_ms = min(MAX_POLL_MS, self.agent.next_wakeup_ms() - now_ms, self._next_heartbeat_ms - now_ms)
        poller = zmq.Poller()
        poller.register(self.camera_socket, zmq.POLLIN)
        cloud_socket = self.transport.socket
        poller.register(cloud_socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        ready = dict(poller.poll(max(0.0, math.ceil(timeout_ms))))
        if ready.get(self._wake_read):
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
        if ready.get(cloud_socket):
            self._drain_replies(cloud_socket)
        if ready.get(self.camera_socket):
            self._drain_cameras()
        self.agent.step()
        if self.clock.now_ms() >= self._next_heartbeat_ms:
            self._heartbeat()

    def _drain_replies(self, cloud_socket: zmq.Socket) -> None:
        for _ in range(1000):
            if cloud_socket is not self.transport.socket:
                return  # reset while draining
            frames = self.transport.receive()
            if frames is None:
                return
            self.agent.on_reply(frames)

    def _drain_cameras(self) -> None:
        for _ in range(100):
            try:
                frames = self.camera_socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            camera = self._camera_topics.get(frames[0]) if frames else None
            if camera is None:
                continue
            try:
                message = decode_camera_frame(frames)
                full_size_wh = (message.width, message.height)
                # Decode only as finely as this frame's allocated configuration needs.
                choice = self.agent.allocation_for(message.frame_index).choices.get(camera, self.params.onboard_model)
                option = self.agent.options[camera].get(choice)
                if option is None or option.is_fallback:
                    choice = self.params.onboard_model
                image = self.decoder.decode(message.jpeg, full_size_wh, choice)
                if image is None:
                    raise TopicMessageError("camera message: body is not a decodable JPEG")
            except TopicMessageError as error:
                self.bad_camera_messages += 1
                self._event("bad_camera_message", topic=frames[0].decode(errors="replace"), reason=str(error))
                continue
            self.monitor.update(frames[0].decode(), self.clock.now_ms())
            self.agent.on_camera_frame(message.frame_index, camera, image, message.capture_ms, full_size_wh)
            # Replies must not wait behind a burst of camera frames: their deadlines are running.
            self._drain_replies(self.transport.socket)

    def _publish(self, result) -> None:
        name = topic_name(self.params.topics.detections, result.camera)
        # PUB never blocks; a slow subscriber loses messages, the node keeps its deadlines.
        with contextlib.suppress(zmq.Again):
            self.output_socket.send_multipart(encode_detection_result(name, result), flags=zmq.NOBLOCK)

    def _heartbeat(self) -> None:
        now_ms = self.clock.now_ms()
        self._next_heartbeat_ms = now_ms + self.params.heartbeat_period_ms
        status = {"node": self.params.node_name, "state": self.state, "time_ms": round(now_ms, 1),
                  "dead_topics": self.monitor.dead_topics(now_ms), "bad_camera_messages": self.bad_camera_messages,
                  "transport_resets": self.transport.resets, **self.agent.status()}
        with contextlib.suppress(zmq.Again):
            self.output_socket.send_multipart(encode_heartbeat(self.params.topics.heartbeat, status),
                                              flags=zmq.NOBLOCK)

    def _wake(self) -> None:
        # A full pipe means a wake-up is already pending; a closed one means we are shutting down.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"w")


def run_until_signalled(node: OnboardNode, on_ready: Callable[[], None] | None = None) -> None:
    """configure + activate + spin in this thread until SIGINT/SIGTERM, then shut down cleanly."""
    import signal

    def request_stop(signum, frame) -> None:
        node.stop()  # spin() returns; shutdown follows below

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.configure()
        node.activate()
        if on_ready is not None:
            on_ready()
        node.spin()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        node.shutdown()
