"""A client written only from docs/PROTOCOL.md (plain pyzmq + json + numpy, no avcloud client
code) talks to the real service: the page is enough to interoperate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zmq
import zmq.auth

from cloudside.config import CloudConfig
from cloudside.service import CloudService


@pytest.fixture()
def secure_service(tmp_path):
    for directory in ("server", "cars", "car-7"):
        (tmp_path / directory).mkdir()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path / "server", "cloud")
    car_public, _ = zmq.auth.create_certificates(tmp_path / "car-7", "car-7")
    shutil.copy(car_public, tmp_path / "cars")  # the allow-list holds public keys only
    config = CloudConfig.model_validate({
        "bind": "tcp://127.0.0.1:0", "http_port": None,
        "models": [{"name": "avd-cloud-m", "simulated_runtime_ms": 2, "simulated_decode": False}],
        "security": {"server_secret_key": server_secret, "allowlist_dir": str(tmp_path / "cars")}})
    with CloudService(config, announce=lambda line: None) as service:
        yield service, server_public, tmp_path / "car-7" / "car-7.key_secret"


def test_hand_written_client_round_trip(secure_service):
    service, server_public_file, client_secret_file = secure_service
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        client_public, client_secret = zmq.auth.load_certificate(client_secret_file)
        dealer.curve_publickey, dealer.curve_secretkey = client_public, client_secret
        dealer.curve_serverkey = zmq.auth.load_certificate(server_public_file)[0]
        dealer.connect(service.address)

        header = {"v": 1, "type": "infer", "vehicle": "car-7", "request_id": "r-1", "task": "FRONT", "frame": 17,
                  "model": "avd-cloud-m", "codec": "raw", "shape": [2, 3, 3], "budget_ms": 500.0,
                  "frame_shape": [20, 30], "some_future_field": True}
        dealer.send_multipart([json.dumps(header).encode("utf-8"), bytes(18)])
        ping = {"v": 1, "type": "ping", "vehicle": "car-7", "request_id": 99}
        dealer.send_multipart([json.dumps(ping).encode("utf-8")])

        replies = {}
        for _ in range(2):
            assert dealer.poll(3000), "no reply"
            frames = dealer.recv_multipart()
            assert len(frames) == 2
            reply = json.loads(frames[0].decode("utf-8"))
            rows = np.frombuffer(frames[1], dtype="<f4").reshape(reply["count"], 6)
            replies[reply["request_id"]] = (reply, rows)

        result, rows = replies["r-1"]
        assert result["v"] == 1 and result["type"] == "result" and result["status"] == "ok"
        assert result["reason"] is None and result["late"] is False
        assert (result["vehicle"], result["task"], result["frame"], result["model"]) == (
            "car-7", "FRONT", 17, "avd-cloud-m")
        assert set(result["timings_ms"]) == {"queue", "decode", "inference", "total"}
        assert result["timings_ms"]["inference"] >= 2.0 and rows.shape == (0, 6)
        pong, body = replies[99]
        assert pong["type"] == "pong" and pong["status"] == "ok" and body.size == 0

        dealer.send_multipart([json.dumps({**header, "v": 2}).encode("utf-8"), bytes(18)])
        assert dealer.poll(3000)
        error = json.loads(dealer.recv_multipart()[0])
        assert error["status"] == "error" and "version 2" in error["reason"] and error["request_id"] == "r-1"
    finally:
        dealer.close(linger=0)
        context.term()
