"""The car's connection to the cloud service: one ZeroMQ DEALER socket (see docs/PROTOCOL.md).

Never blocks the daemon: sends are non-blocking and fail (return False) when the cloud is not
connected (ZMQ_IMMEDIATE: nothing is queued for a peer that is not there) or the high-water mark
is reached, so memory stays bounded during an outage. ZeroMQ reconnects by itself when a TCP
connection drops; `reset()` builds a fresh socket for the case where the connection looks alive
but nothing comes back (the daemon calls it after repeated timeouts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq

from avcloud.keys import configure_curve_client, load_client_keys

RECONNECT_INTERVAL_MS = 100


class CloudTransport:
    """DEALER client of the cloud service; CurveZMQ unless `insecure`."""

    def __init__(self, context: zmq.Context, endpoint: str, client_secret_key: Path | None = None,
                 server_public_key: Path | None = None, insecure: bool = False,
                 high_water_mark: int = 16) -> None:
        self.context = context
        self.endpoint = endpoint
        self.insecure = insecure
        self.high_water_mark = high_water_mark
        self._keys = None
        if not insecure:
            if client_secret_key is None or server_public_key is None:
                raise ValueError("a secure transport needs client_secret_key and server_public_key")
            self._keys = load_client_keys(client_secret_key, server_public_key)
        self.socket: zmq.Socket = self._open()
        self.resets = 0
        self.send_failures = 0

    def _open(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, self.high_water_mark)
        sock.setsockopt(zmq.RCVHWM, self.high_water_mark * 4)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_INTERVAL_MS * 5)
        if self._keys is not None:
            client_keys, server_public = self._keys
            configure_curve_client(sock, client_keys, server_public)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list[Any]) -> bool:
        """Hand a request to the socket without waiting; False if it cannot take it now."""
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.send_failures += 1
            return False

    def receive(self) -> list[Any] | None:
        """One reply's frames, or None if none is waiting."""
        try:
            return self.socket.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None

    def reset(self) -> None:
        """Drop the socket (and whatever it had queued) and connect a fresh one."""
        self.socket.close(linger=0)
        self.socket = self._open()
        self.resets += 1

    def close(self) -> None:
        self.socket.close(linger=0)
