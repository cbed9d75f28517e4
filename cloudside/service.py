"""The cloud inference service: a CurveZMQ ROUTER front end in front of an engine that runs the
models (`cloudside.engine`).

Threads:
- I/O loop: owns the ROUTER socket (ZeroMQ sockets are not thread-safe). Receives requests
  zero-copy, validates them, answers what can be answered at once (errors, rejections,
  pongs, requests already too late) and hands the rest to the engine. Forwards the replies
  that engine threads push to it over inproc PUSH/PULL sockets (`ReplyChannel`).
- The engine's own threads: `engine: threads` (default), worker threads that take decisions
  from the EDF queue and run batches (`cloudside.engine.ThreadEngine`); `engine: ray`, a
  dispatcher that sends requests to Ray Serve replicas (`cloudside.ray_engine.RayEngine`).
- HTTP: /healthz, /readyz, /metrics.

Embeddable: `CloudService(config).start()` ... `.stop()`, or as a context manager.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from avcloud import keys
from avcloud.clock import Clock, WallClock
from avcloud.errors import ConfigError
from avcloud.protocol import (
    ERROR,
    EXPIRED,
    OK,
    PING,
    REJECTED,
    ProtocolError,
    ReplyHeader,
    RequestHeader,
    ServerTimings,
    decode_request,
    encode_reply,
    reply_to,
)
from cloudside.auth import VehicleAuthenticator, vehicle_of
from cloudside.config import CloudConfig
from cloudside.engine import Engine, ThreadEngine, expiry_reason
from cloudside.health import HealthServer, ServiceMetrics
from cloudside.image_header import UnsafeImage, read_image_header
from cloudside.runners import ModelRunner
from cloudside.scheduler import PendingRequest, RequestQueue

logger = logging.getLogger("avcloud.cloud")

# Messages handled per poll round before replies get their turn, so neither side starves.
_MESSAGES_PER_ROUND = 64
_POLL_MS = 50
# Hard memory guard: frames this large make ZeroMQ drop the connection instead of buffering.
_HARD_FRAME_LIMIT_BYTES = 64 * 1024 * 1024
# Metrics keep at most this many vehicle label values; later ones are counted as "(other)".
_MAX_VEHICLE_LABELS = 1000
_UNKNOWN = "(unknown)"
_MISMATCH_LOG_INTERVAL_MS = 10_000.0


class ReplyChannel:
    """Hands finished replies from any thread to the I/O loop, which owns the ROUTER socket: each
    sending thread gets its own inproc PUSH socket (ZeroMQ sockets are not thread-safe)."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self._context = context
        self._endpoint = endpoint
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def send(self, frames: list[Any]) -> None:
        socket = getattr(self._local, "socket", None)
        if socket is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("reply channel closed")
                socket = self._context.socket(zmq.PUSH)
                socket.linger = 1000
                socket.connect(self._endpoint)
                self._sockets.append(socket)
            self._local.socket = socket
        socket.send_multipart(frames, copy=False)

    def close(self) -> None:
        """Close every thread's socket (their threads have stopped sending)."""
        with self._lock:
            self._closed = True
            for socket in self._sockets:
                socket.close(linger=1000)
            self._sockets = []


def build_engine(config: CloudConfig, runners: dict[str, ModelRunner] | None = None,
                 clock: Clock | None = None) -> Engine:
    """The engine `config.engine` names: worker threads here, or Ray Serve replicas."""
    if config.engine == "ray":
        if runners is not None:
            raise ValueError("engine: ray builds its runners in its replicas; runners= is for engine: threads")
        try:
            from cloudside.ray_engine import RayEngine
        except ImportError as error:
            raise ConfigError(f"engine: ray needs Ray Serve, which this Python lacks ({error}); install the "
                              "optional extra: pip install -c requirements.lock -e '.[ray]'") from None
        return RayEngine(config, clock=clock)
    return ThreadEngine(config, runners=runners, clock=clock)


class CloudService:
    """One inference service. `start()` loads and warms the models (or starts the engine's
    replicas), binds, and serves in threads."""

    def __init__(self, config: CloudConfig, insecure: bool = False,
                 runners: dict[str, ModelRunner] | None = None, clock: Clock | None = None,
                 announce: Callable[[str], None] | None = None, engine: Engine | None = None) -> None:
        self.config = config
        self.insecure = insecure
        self.clock = clock or WallClock()
        self.metrics = ServiceMetrics()
        self._announce = announce or logger.info
        self.engine: Engine = engine if engine is not None else build_engine(config, runners, self.clock)
        self._max_image_pixels = {entry.name: entry.max_image_pixels or config.max_image_pixels
                                  for entry in config.models}
        self._allowlist: dict[str, bytes] = {}  # vehicle name -> public key (CurveZMQ on)
        self.server_public_key: bytes | None = None
        self.address: str | None = None
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._reply_receiver: zmq.Socket | None = None
        self._replies: ReplyChannel | None = None
        self._authenticator: VehicleAuthenticator | None = None
        self._health: HealthServer | None = None
        self._io_thread: threading.Thread | None = None
        self._reply_endpoint = f"inproc://cloud-replies-{id(self)}"
        self._started = False
        self._stopped = False
        self._ready = False
        self._draining = False
        self._io_failed = False  # the I/O loop died of a bug: unhealthy
        self._io_stop = threading.Event()
        self._io_ready = threading.Event()
        self._served_models: set[str] = set()
        self._vehicle_labels: set[str] = set()
        self._mismatch_logged_ms: dict[str, float] = {}  # by authenticated vehicle (bounded by the allow-list)

    # ------------------------------------------------------------ lifecycle

    @property
    def http_port(self) -> int | None:
        return self._health.port if self._health is not None else None

    @property
    def runners(self) -> dict[str, ModelRunner]:
        """The models' runners in this process (engine: threads; empty for engine: ray)."""
        return dict(getattr(self.engine, "runners", {}))

    @property
    def queue(self) -> RequestQueue:
        """The engine's queue of admitted requests (both engines admit through one)."""
        return self.engine.queue

    @property
    def busy_workers(self) -> int:
        """Workers running a batch (or answering expired requests) right now (engine: threads)."""
        return int(getattr(self.engine, "busy_workers", 0))

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining and self.engine.ready

    @property
    def healthy(self) -> bool:
        return not self._io_failed and self.engine.healthy

    def __enter__(self) -> CloudService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> CloudService:
        if self._started or self._stopped:
            raise RuntimeError("a CloudService starts once; make a new one")
        server_keys = self._check_security()
        if self.config.http_port is not None:
            try:
                self._health = HealthServer(self.config.http_host, self.config.http_port, self.metrics,
                                            is_healthy=lambda: self.healthy, is_ready=lambda: self.ready)
            except OSError as error:
                raise ConfigError(f"http_port {self.config.http_port}: cannot listen "
                                  f"({error.strerror or error})") from None
            self._health.start()
        self._started = True
        try:
            self.engine.load(self._announce)
            self._served_models = set(self.engine.model_names)
            self._open_sockets(server_keys)
            self._io_thread = threading.Thread(target=self._io_loop, name="cloud-io", daemon=True)
            self._io_thread.start()
            self._io_ready.wait(5)
            self.engine.start(self)
        except BaseException:
            self.engine.close()
            self._close_everything()
            self._started = False
            self._stopped = True
            raise
        self._ready = True
        self.metrics.ready.set(1)
        http = f", http://{self.config.http_host}:{self.http_port}" if self._health else ""
        self._announce(f"READY: serving {', '.join(self.engine.model_names)} on {self.address}{http} "
                       f"(scheduler {self.config.scheduler}, engine {self.engine.name}, "
                       f"{'INSECURE' if self.insecure else 'CurveZMQ'})")
        return self

    def stop(self, grace_ms: float | None = None) -> None:
        """Stop accepting, let queued work finish for up to grace_ms, answer the rest `expired`."""
        if not self._started:
            return
        grace_ms = self.config.shutdown_grace_ms if grace_ms is None else grace_ms
        self._draining = True
        self.metrics.ready.set(0)
        try:
            leftovers = self.engine.stop(grace_ms)
            for request in leftovers:
                self.reply(request, reply_to(request.header, EXPIRED,
                                             "service shutting down before the request could run",
                                             self.timings(request)))
        finally:
            self.engine.close()
            self._close_everything()
            self._started = False
            self._stopped = True

    def _close_everything(self) -> None:
        """Close what is open, in dependency order; safe to call more than once."""
        self._io_stop.set()
        if self._io_thread is not None:
            self._io_thread.join(timeout=10)
            self._io_thread = None
        else:  # never started serving: the sockets are still ours to close
            for socket in (self._router, self._reply_receiver):
                if socket is not None:
                    socket.close(linger=0)
        self._router = self._reply_receiver = None
        if self._replies is not None:
            self._replies.close()
            self._replies = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._health is not None:
            self._health.stop()
            self._health = None
        self._ready = False

    def _check_security(self) -> keys.KeyPair | None:
        security = self.config.security
        if self.insecure:
            self._announce(f"WARNING: INSECURE MODE (--insecure): CurveZMQ encryption and authentication "
                           f"are OFF; anyone who can reach {self.config.bind} is served")
            return None
        if not security.configured:
            missing = " and ".join(f"security.{name}" for name in ("server_secret_key", "allowlist_dir")
                                   if getattr(security, name) is None)
            raise ConfigError(
                f"no CurveZMQ keys configured ({missing} not set); refusing to start. "
                "Generate them with `avcloud keys generate`, or pass --insecure")
        server_keys = keys.load_server_keys(security.server_secret_key)
        self._allowlist = keys.allowlisted_public_keys(security.allowlist_dir)
        self.server_public_key = server_keys.public
        self._announce(f"CurveZMQ on: {len(self._allowlist)} allow-listed vehicle key(s) in {security.allowlist_dir}; "
                       "a request's vehicle is its key's name")
        return server_keys

    def _open_sockets(self, server_keys: keys.KeyPair | None) -> None:
        self._context = zmq.Context()
        if server_keys is not None:
            self._authenticator = VehicleAuthenticator(self._context, self._allowlist,
                                                       log=logging.getLogger("avcloud.cloud.auth"))
            self._authenticator.start()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.linger = 500
        self._router.maxmsgsize = max(_HARD_FRAME_LIMIT_BYTES, 4 * self.config.max_payload_bytes)
        if server_keys is not None:
            keys.configure_curve_server(self._router, server_keys)
        bind = self.config.bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = bind[:-2] + ":*"
        try:
            self._router.bind(bind)
        except zmq.ZMQError as error:
            self._router.close(linger=0)
            raise ConfigError(f"bind {self.config.bind}: {error}") from None
        self.address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._reply_receiver = self._context.socket(zmq.PULL)
        self._reply_receiver.bind(self._reply_endpoint)
        self._replies = ReplyChannel(self._context, self._reply_endpoint)

    # ------------------------------------------------------------ estimates and timings

    def expected_ms(self, model: str, batch_size: int) -> float:
        return self.engine.expected_ms(model, batch_size)

    def timings(self, request: PendingRequest, taken_ms: float | None = None, decode_ms: float = 0.0,
                 inference_ms: float = 0.0) -> ServerTimings:
        now_ms = self.clock.now_ms()
        queue_ms = (taken_ms if taken_ms is not None else now_ms) - request.arrival_ms
        return ServerTimings(queue_ms=max(0.0, queue_ms), decode_ms=decode_ms, inference_ms=inference_ms,
                             total_ms=max(0.0, now_ms - request.arrival_ms))

    # ------------------------------------------------------------ I/O loop

    def _io_loop(self) -> None:
        router, replies = self._router, self._reply_receiver
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        self._io_ready.set()
        try:
            while not self._io_stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if replies in events:
                    self._forward_replies()
                if router in events:
                    for _ in range(_MESSAGES_PER_ROUND):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            self._handle_message(frames)
                        except Exception as error:  # a bug must cost one request, not the service
                            logger.exception("request handling failed")
                            self._reply_now(frames[0].bytes, ReplyHeader(
                                status=ERROR, reason=f"internal: {type(error).__name__}"),
                                self._sender_of(frames))
            # Stopping: workers are done; pass on the replies still in flight, read nothing new.
            while replies.poll(_POLL_MS):
                self._forward_replies()
        except Exception:
            self._io_failed = True
            logger.exception("cloud I/O loop failed")
        finally:
            replies.close(linger=0)
            router.close()

    def _forward_replies(self) -> None:
        for _ in range(_MESSAGES_PER_ROUND):
            try:
                frames = self._reply_receiver.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._router.send_multipart(frames, copy=False)
            except zmq.ZMQError as error:  # peer gone or its queue full: the reply is lost, not us
                logger.debug("reply dropped: %s", error)

    def _reply_now(self, identity: bytes, header: ReplyHeader, vehicle: str | None) -> None:
        """Answer from the I/O thread itself (no detections: only non-ok replies and pongs);
        `vehicle` is who is accounted for it (the key's vehicle, else what the header claims)."""
        self._count(header, vehicle)
        try:
            self._router.send_multipart([identity, *encode_reply(header)], copy=False)
        except zmq.ZMQError as error:
            logger.debug("reply dropped: %s", error)

    def _sender_of(self, frames: list[Any]) -> str | None:
        """The authenticated vehicle of a message (CurveZMQ on), else None."""
        if self.insecure or len(frames) < 2:
            return None
        return vehicle_of(frames[1])

    def _handle_message(self, frames: list[Any]) -> None:
        arrival_ms = self.clock.now_ms()
        identity = frames[0].bytes
        sender = self._sender_of(frames)
        try:
            header, payload = decode_request(frames[1:])
        except ProtocolError as error:
            self._reply_now(identity, ReplyHeader(status=ERROR, reason=error.reason, request_id=error.request_id,
                                                  vehicle=error.vehicle), sender or error.vehicle)
            return
        if sender is not None and header.vehicle != sender:
            # The key says who sends; a header naming another vehicle is refused and counted, so
            # one vehicle can neither spend another's share nor have its requests blamed on it.
            self.metrics.identity_mismatches.labels(self._vehicle_label(sender)).inc()
            self._warn_identity_mismatch(sender, header.vehicle)
            self._reply_now(identity, reply_to(header, REJECTED, f"vehicle '{header.vehicle}' is not this "
                                               f"connection's vehicle ('{sender}', from its key)"), sender)
            return
        vehicle = sender if sender is not None else header.vehicle
        if header.kind == PING:
            total_ms = self.clock.now_ms() - arrival_ms
            self._reply_now(identity, reply_to(header, OK, timings=ServerTimings(total_ms=total_ms)), vehicle)
            return
        if header.model not in self._served_models:
            self._reply_now(identity, reply_to(header, REJECTED, f"unknown model '{header.model}' "
                                               f"(serving: {', '.join(self.engine.model_names)})"), vehicle)
            return
        if payload.nbytes > self.config.max_payload_bytes:
            self._reply_now(identity, reply_to(header, REJECTED, f"payload is {payload.nbytes} bytes, over the "
                                               f"limit of {self.config.max_payload_bytes}"), vehicle)
            return
        refusal = self._check_image(header, payload)
        if refusal is not None:
            self.metrics.unsafe_images.labels(self._vehicle_label(vehicle), header.model).inc()
            self._reply_now(identity, reply_to(header, *refusal, ServerTimings(
                total_ms=self.clock.now_ms() - arrival_ms)), vehicle)
            return
        if self._draining:
            self._reply_now(identity, reply_to(header, REJECTED, "service shutting down"), vehicle)
            return
        deadline_ms = arrival_ms + header.budget_ms - self.config.downlink_allowance_ms
        request = PendingRequest(identity=identity, header=header, payload=payload, arrival_ms=arrival_ms,
                                 deadline_ms=deadline_ms, vehicle=vehicle)
        if self.config.scheduler == "edf":
            needed_ms = self.expected_ms(header.model, 1)
            if deadline_ms - arrival_ms < needed_ms:
                self._reply_now(identity, reply_to(header, EXPIRED, expiry_reason(
                    deadline_ms - arrival_ms, header.model, needed_ms), self.timings(request)), vehicle)
                return
        refused = self.engine.submit(request)
        if refused is not None:
            self._reply_now(identity, reply_to(header, REJECTED, refused, self.timings(request)), vehicle)

    def _warn_identity_mismatch(self, sender: str, claimed: str) -> None:
        """One log line per sender per 10 s at most: a flood of them must not flood the log."""
        now_ms = self.clock.now_ms()
        last_ms = self._mismatch_logged_ms.get(sender)
        if last_ms is None or now_ms - last_ms >= _MISMATCH_LOG_INTERVAL_MS:
            self._mismatch_logged_ms[sender] = now_ms
            logger.warning("vehicle %r sent a request claiming to be %r: rejected (all such requests are counted in "
                           "avcloud_cloud_identity_mismatches_total)", sender, claimed)

    def _check_image(self, header: RequestHeader, payload: Any) -> tuple[str, str] | None:
        """(status, reason) refusing an image before anything decodes it, or None to accept it:
        larger than the model takes, or (encoded images the model decodes) a header that is
        malformed or names other dimensions than the request."""
        height, width = header.height, header.width
        limit = self._max_image_pixels.get(header.model, self.config.max_image_pixels)
        if width * height > limit:
            return REJECTED, (f"image {width}x{height} is {width * height / 1e6:.1f} Mpx, over {header.model}'s "
                              f"limit of {limit / 1e6:.1f} Mpx (max_image_pixels)")
        if header.codec == "raw" or not self.engine.decodes_images(header.model):
            return None
        try:
            image = read_image_header(payload, header.codec)
        except UnsafeImage as error:
            return ERROR, f"undecodable image: {error}"
        if (image.width, image.height) != (width, height):
            return ERROR, (f"undecodable image: its {header.codec} header says {image.width}x{image.height}, "
                           f"the request's shape {width}x{height}")
        return None

    # ------------------------------------------------------------ replies from the engine

    def reply(self, request: PendingRequest, header: ReplyHeader, detections: np.ndarray | None = None) -> None:
        """Count and send the reply to an accepted request (any thread; the I/O loop forwards it)."""
        self._count(header, request.accounted_vehicle)
        replies = self._replies
        if replies is None:
            logger.debug("reply to %r dropped: service closed", header.request_id)
            return
        replies.send([request.identity, *encode_reply(header, detections)])

    def vehicle_label(self, vehicle: str | None) -> str:
        return self._vehicle_label(vehicle)

    # ------------------------------------------------------------ metrics

    def _vehicle_label(self, vehicle: str | None) -> str:
        if not vehicle:
            return _UNKNOWN
        if vehicle not in self._vehicle_labels:
            if len(self._vehicle_labels) >= _MAX_VEHICLE_LABELS:
                return "(other)"
            self._vehicle_labels.add(vehicle)
        return vehicle

    def _count(self, header: ReplyHeader, vehicle: str | None) -> None:
        """Count a reply under the vehicle it is accounted to (not what its header echoes)."""
        vehicle = self._vehicle_label(vehicle)
        model = header.model if header.model in self._served_models else _UNKNOWN
        if header.kind == "pong":
            model = "(ping)"
        self.metrics.requests.labels(vehicle, model, header.status).inc()
        if header.status == EXPIRED or (header.status == OK and header.late):
            self.metrics.deadline_misses.labels(vehicle, model).inc()
