"""Who is sending: CurveZMQ authentication that names the vehicle behind each connection.

The ZAP handler (pyzmq's ThreadAuthenticator) admits only public keys of the allow-list and
gives each connection the ZAP User-Id of the allow-list file its key came from
(`cars/car-1.key` -> "car-1"). ZeroMQ attaches that User-Id to every message of the connection,
so the service reads the sender's identity from the message itself (`vehicle_of`), not from
what its header claims.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85


class VehicleAuthenticator(ThreadAuthenticator):
    """Admits the allow-listed keys; a connection's User-Id is its vehicle's name."""

    def __init__(self, context: zmq.Context, public_keys_by_vehicle: Mapping[str, bytes],
                 log: logging.Logger | None = None) -> None:
        super().__init__(context, log=log)
        self._vehicles_by_key = {public: vehicle for vehicle, public in public_keys_by_vehicle.items()}

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, z85_public_key: bytes) -> bool:
        """ZAP credentials check: the key is on the allow-list."""
        return z85_public_key in self._vehicles_by_key

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._vehicles_by_key[z85.encode(client_public_key)]


def vehicle_of(frame: Any) -> str | None:
    """The authenticated vehicle of a received message frame (zmq.Frame), None without one."""
    try:
        user_id = frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None
    return user_id or None
