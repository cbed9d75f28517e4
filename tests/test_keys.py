"""CurveZMQ key files, the `avcloud keys` command and Curve socket settings."""

from __future__ import annotations

import argparse
import stat

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from avcloud import keys
from avcloud.commands import keys as keys_command
from avcloud.errors import UserError


def run_keys_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    keys_command.register(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_generate_writes_loadable_pair_with_private_secret(tmp_path):
    public_path, secret_path = keys.generate_keypair("car-1", tmp_path)
    assert public_path == tmp_path / "car-1.key" and secret_path == tmp_path / "car-1.key_secret"
    pair = keys.load_keypair(secret_path)
    assert len(pair.public) == 40 and len(pair.secret) == 40
    assert keys.load_public_key(public_path) == pair.public
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert pair.secret.decode() not in public_path.read_text()


def test_generate_refuses_to_overwrite_unless_forced(tmp_path):
    first = keys.load_public_key(keys.generate_keypair("cloud", tmp_path)[0])
    with pytest.raises(UserError, match="already exists"):
        keys.generate_keypair("cloud", tmp_path)
    second = keys.load_public_key(keys.generate_keypair("cloud", tmp_path, overwrite=True)[0])
    assert first != second


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65])
def test_bad_key_names_are_user_errors(tmp_path, name):
    with pytest.raises(UserError):
        keys.generate_keypair(name, tmp_path)


def test_loading_bad_files_is_a_user_error(tmp_path):
    public_path, _ = keys.generate_keypair("car", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        keys.load_public_key(tmp_path / "missing.key")
    with pytest.raises(UserError, match="no secret key"):
        keys.load_keypair(public_path)
    junk = tmp_path / "junk.key"
    junk.write_text("hello")
    with pytest.raises(UserError, match="not a CurveZMQ certificate"):
        keys.load_public_key(junk)


def test_allowlist_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        keys.allowlisted_public_keys(tmp_path / "nope")
    with pytest.raises(UserError, match="no \\*.key"):
        keys.allowlisted_public_keys(tmp_path)
    keys.generate_keypair("car-1", tmp_path)
    keys.generate_keypair("car-2", tmp_path)
    assert sorted(keys.allowlisted_public_keys(tmp_path)) == ["car-1", "car-2"]


def test_keys_command_generate_and_show(tmp_path, capsys):
    assert run_keys_command(["keys", "generate", "car-9", "--dir", str(tmp_path)]) == 0
    assert "car-9.key_secret" in capsys.readouterr().out
    with pytest.raises(UserError):
        run_keys_command(["keys", "generate", "car-9", "--dir", str(tmp_path)])
    assert run_keys_command(["keys", "show", str(tmp_path / "car-9.key")]) == 0
    assert capsys.readouterr().out.strip() == keys.load_public_key(tmp_path / "car-9.key").decode()


def test_generate_defaults_to_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path))
    public_path, _ = keys.generate_keypair("car-3")
    assert public_path.parent == tmp_path / "keys"


def test_curve_helpers_authenticate_allowlisted_client_only(tmp_path):
    server_dir, allow_dir, other_dir = tmp_path / "server", tmp_path / "allow", tmp_path / "other"
    keys.generate_keypair("cloud", server_dir)
    keys.generate_keypair("car-ok", allow_dir)
    keys.generate_keypair("car-bad", other_dir)
    context = zmq.Context()
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    sockets = []
    try:
        authenticator.configure_curve(domain="*", location=str(allow_dir))
        server = context.socket(zmq.ROUTER)
        sockets.append(server)
        keys.configure_curve_server(server, keys.load_server_keys(server_dir / "cloud.key_secret"))
        port = server.bind_to_random_port("tcp://127.0.0.1")

        def client(name, directory):
            pair, server_key = keys.load_client_keys(directory / f"{name}.key_secret", server_dir / "cloud.key")
            socket = context.socket(zmq.DEALER)
            sockets.append(socket)
            socket.linger = 0
            keys.configure_curve_client(socket, pair, server_key)
            socket.connect(f"tcp://127.0.0.1:{port}")
            return socket

        good, bad = client("car-ok", allow_dir), client("car-bad", other_dir)
        bad.send(b"from-bad")
        good.send(b"from-good")
        received = []
        poller = zmq.Poller()
        poller.register(server, zmq.POLLIN)
        while poller.poll(500):
            received.append(server.recv_multipart()[1])
        assert received == [b"from-good"]
    finally:
        for socket in sockets:
            socket.close(linger=0)
        authenticator.stop()
        context.term()
