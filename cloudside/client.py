"""A minimal synchronous client of the cloud service, for probes, tests and benchmarks.

The car's own transport (with its link emulator and deadlines) lives in `onboard`; this one
only speaks the protocol: one DEALER, optional CurveZMQ keys, request in, reply out.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import zmq

from avcloud import keys
from avcloud.protocol import ReplyHeader, RequestHeader, decode_reply, encode_request, ping_request


class CloudClient:
    def __init__(self, address: str, vehicle: str = "probe", client_secret_key: str | Path | None = None,
                 server_public_key: bytes | str | Path | None = None, context: zmq.Context | None = None) -> None:
        self.vehicle = vehicle
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.linger = 0
        if client_secret_key is not None:
            if server_public_key is None:
                raise ValueError("a Curve client needs the server's public key")
            if not isinstance(server_public_key, bytes):
                server_public_key = keys.load_public_key(server_public_key)
            keys.configure_curve_client(self.socket, keys.load_keypair(client_secret_key), server_public_key)
        self.socket.connect(address)
        self._request_ids = itertools.count()

    def next_request_id(self) -> int:
        return next(self._request_ids)

    def send(self, header: RequestHeader, payload: bytes | memoryview) -> None:
        self.socket.send_multipart(encode_request(header, payload), copy=False)

    def send_frames(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (tests of malformed input)."""
        self.socket.send_multipart(frames)

    def receive(self, timeout_ms: float) -> tuple[ReplyHeader, np.ndarray] | None:
        """The next reply, or None if none arrives within timeout_ms."""
        if not self.socket.poll(timeout_ms):
            return None
        return decode_reply(self.socket.recv_multipart())

    def infer(self, payload: bytes | memoryview, *, task: str, model: str, codec: str,
              shape: tuple[int, int, int], budget_ms: float, frame: int = 0,
              frame_shape: tuple[int, int] | None = None, timeout_ms: float = 5000.0
              ) -> tuple[ReplyHeader, np.ndarray] | None:
        """Send one request and wait for its reply (replies to other requests are skipped)."""
        request_id = self.next_request_id()
        self.send(RequestHeader(vehicle=self.vehicle, request_id=request_id, task=task, frame=frame, model=model,
                                codec=codec, shape=shape, budget_ms=budget_ms, frame_shape=frame_shape), payload)
        return self._receive_matching(request_id, timeout_ms)

    def ping(self, timeout_ms: float = 1000.0) -> ReplyHeader | None:
        request_id = self.next_request_id()
        self.socket.send_multipart(ping_request(self.vehicle, request_id))
        reply = self._receive_matching(request_id, timeout_ms)
        return reply[0] if reply is not None else None

    def _receive_matching(self, request_id: int, timeout_ms: float) -> tuple[ReplyHeader, np.ndarray] | None:
        give_up_at = time.monotonic() + timeout_ms / 1000.0
        while (remaining_ms := (give_up_at - time.monotonic()) * 1000.0) > 0:
            reply = self.receive(remaining_ms)
            if reply is None:
                return None
            if reply[0].request_id == request_id:
                return reply
        return None

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
