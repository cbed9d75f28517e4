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
    allow = tmp_path / "allow"
    with pytest.raises(UserError, match="does not exist"):
        keys.allowlisted_public_keys(allow)
    allow.mkdir()
    with pytest.raises(UserError, match="no \\*.key"):
        keys.allowlisted_public_keys(allow)
    keys.generate_keypair("car-1", tmp_path / "car-1", allowlist_dir=allow)
    keys.generate_keypair("car-2", tmp_path / "car-2", allowlist_dir=allow)
    assert sorted(keys.allowlisted_public_keys(allow)) == ["car-1", "car-2"]
    assert sorted(path.name for path in allow.iterdir()) == ["car-1.key", "car-2.key"]


def test_allowlist_refuses_a_directory_holding_secrets(tmp_path):
    # Issue 12: the quick start put every car's secret key into the cloud's allow-list directory.
    keys.generate_keypair("car-1", tmp_path)
    with pytest.raises(UserError, match="holds secret keys \\(car-1.key_secret\\)"):
        keys.allowlisted_public_keys(tmp_path)
    (tmp_path / "car-1.key_secret").rename(tmp_path / "elsewhere.key")  # a secret under a public name
    with pytest.raises(UserError, match="holds secret keys \\(elsewhere.key\\)"):
        keys.allowlisted_public_keys(tmp_path)


def test_allowlist_refuses_one_key_under_two_names(tmp_path):
    public_path, _ = keys.generate_keypair("car-1", tmp_path / "car-1", allowlist_dir=tmp_path / "allow")
    (tmp_path / "allow" / "car-9.key").write_bytes(public_path.read_bytes())
    with pytest.raises(UserError, match="car-1.key and car-9.key hold the same key"):
        keys.allowlisted_public_keys(tmp_path / "allow")


def test_generate_never_writes_a_secret_into_the_allowlist(tmp_path):
    with pytest.raises(UserError, match="must not hold secret keys"):
        keys.generate_keypair("car-1", tmp_path / "allow", allowlist_dir=tmp_path / "allow")
    assert not (tmp_path / "allow").exists()


def test_secret_is_never_readable_by_others_even_with_a_permissive_umask(tmp_path):
    import os

    previous = os.umask(0)
    try:
        public_path, secret_path = keys.generate_keypair("car-1", tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert sorted(path.name for path in tmp_path.iterdir()) == ["car-1.key", "car-1.key_secret"]  # no scratch


def test_keys_command_generate_and_show(tmp_path, capsys):
    assert run_keys_command(["keys", "generate", "car-9", "--dir", str(tmp_path),
                             "--allow-into", str(tmp_path / "allowed")]) == 0
    out = capsys.readouterr().out
    assert "car-9.key_secret" in out and str(tmp_path / "allowed" / "car-9.key") in out
    assert keys.allowlisted_public_keys(tmp_path / "allowed") == {"car-9": keys.load_public_key(tmp_path / "car-9.key")}
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
    keys.generate_keypair("car-ok", other_dir, allowlist_dir=allow_dir)
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

        good, bad = client("car-ok", other_dir), client("car-bad", other_dir)
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
