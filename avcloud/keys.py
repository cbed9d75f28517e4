"""CurveZMQ key pairs, allow-list directories and socket security settings.

Layout (the one `zmq.auth.create_certificates` writes): `DIR/NAME.key` holds the public key,
`DIR/NAME.key_secret` holds both keys (mode 0600); share only the `.key` file. The cloud
service has one key pair of its own and an allow-list directory of vehicles' `.key` files (public
keys only: it refuses a directory holding a secret); the file's name is the vehicle's identity.
A vehicle has its own key pair and the cloud's `.key` file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from avcloud.errors import UserError
from avcloud.paths import cache_dir

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class KeyPair:
    """Z85-encoded Curve25519 keys (40 bytes each)."""

    public: bytes
    secret: bytes


def default_key_dir() -> Path:
    return cache_dir() / "keys"


def check_key_name(name: str) -> str:
    if not _KEY_NAME.match(name) or name.endswith(PUBLIC_SUFFIX):
        raise UserError(f"key name '{name}' must be 1-64 characters of letters, digits, '_', '-', '.' "
                        "and must not start with a dot")
    return name


def generate_keypair(name: str, directory: str | Path | None = None, overwrite: bool = False,
                     allowlist_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600 from the start).

    Returns (public_path, secret_path). Refuses to replace an existing pair unless overwrite.
    With `allowlist_dir`, also copies the public key there (never the secret) as NAME.key, which
    lets that vehicle in under the name NAME; DIR must then be another directory.
    """
    check_key_name(name)
    directory = Path(directory) if directory is not None else default_key_dir()
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    allowed_path = Path(allowlist_dir) / f"{name}{PUBLIC_SUFFIX}" if allowlist_dir is not None else None
    if allowed_path is not None and _same_directory(directory, allowed_path.parent):
        raise UserError(f"{allowed_path.parent}: the allow-list directory must not hold secret keys; "
                        "generate the pair in another directory")
    for path in (public_path, secret_path, allowed_path):
        if path is not None and not overwrite and path.exists():
            raise UserError(f"{path}: a key named '{name}' already exists (use --force to replace it)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A private (0700) scratch directory beside the target: the secret is never readable by
        # others, not even between its creation and the chmod.
        scratch = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory))
        try:
            written_public, written_secret = zmq.auth.create_certificates(scratch, name)
            Path(written_secret).chmod(0o600)
            Path(written_public).chmod(0o644)
            os.replace(written_secret, secret_path)
            os.replace(written_public, public_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if allowed_path is not None:
            allowed_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(public_path, allowed_path)
            allowed_path.chmod(0o644)
    except OSError as error:
        raise UserError(f"{directory}: cannot write keys ({error.strerror or error})") from None
    return public_path, secret_path


def _same_directory(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve()
    except OSError:
        return False


def load_public_key(path: str | Path) -> bytes:
    """The public key in a `.key` or `.key_secret` file."""
    public, _ = _load_certificate(path)
    return public


def load_keypair(secret_path: str | Path) -> KeyPair:
    """Both keys from a `.key_secret` file."""
    public, secret = _load_certificate(secret_path)
    if not secret:
        raise UserError(f"{secret_path}: holds no secret key (pass the .key_secret file, not the .key file)")
    return KeyPair(public=public, secret=secret)


def load_server_keys(secret_path: str | Path) -> KeyPair:
    """The cloud service's own key pair."""
    return load_keypair(secret_path)


def load_client_keys(secret_path: str | Path, server_public_path: str | Path) -> tuple[KeyPair, bytes]:
    """A vehicle's key pair and the public key of the server it talks to."""
    return load_keypair(secret_path), load_public_key(server_public_path)


def allowlisted_public_keys(allowlist_dir: str | Path) -> dict[str, bytes]:
    """Public keys in an allow-list directory, by file stem (the vehicle's name). The directory
    must hold at least one, must hold no secret key, and no key twice."""
    allowlist_dir = Path(allowlist_dir)
    if not allowlist_dir.is_dir():
        raise UserError(f"{allowlist_dir}: allow-list directory does not exist")
    secrets = sorted(path.name for path in allowlist_dir.glob(f"*{SECRET_SUFFIX}"))
    keys: dict[str, bytes] = {}
    for path in sorted(allowlist_dir.glob(f"*{PUBLIC_SUFFIX}")):
        public, secret = _load_certificate(path)
        if secret:
            secrets.append(path.name)
        keys[path.stem] = public
    if secrets:
        raise UserError(f"{allowlist_dir}: allow-list directory holds secret keys ({', '.join(secrets[:3])}"
                        f"{', ...' if len(secrets) > 3 else ''}); it takes public .key files only: keep each "
                        "secret with its owner and copy only NAME.key here")
    if not keys:
        raise UserError(f"{allowlist_dir}: allow-list directory holds no *{PUBLIC_SUFFIX} public keys")
    names_by_key: dict[bytes, str] = {}
    for name, public in keys.items():
        if public in names_by_key:
            raise UserError(f"{allowlist_dir}: {names_by_key[public]}{PUBLIC_SUFFIX} and {name}{PUBLIC_SUFFIX} hold "
                            "the same key; a key identifies one vehicle")
        names_by_key[public] = name
    return keys


def configure_curve_server(socket: zmq.Socket, server_keys: KeyPair) -> None:
    """Make a socket a CurveZMQ server. Call before bind; pair it with an authenticator
    (`zmq.auth.thread.ThreadAuthenticator.configure_curve`) to enforce the allow-list."""
    socket.curve_secretkey = server_keys.secret
    socket.curve_publickey = server_keys.public
    socket.curve_server = True


def configure_curve_client(socket: zmq.Socket, client_keys: KeyPair, server_public_key: bytes) -> None:
    """Make a socket a CurveZMQ client of the server with this public key. Call before connect."""
    socket.curve_secretkey = client_keys.secret
    socket.curve_publickey = client_keys.public
    socket.curve_serverkey = server_public_key


def _load_certificate(path: str | Path) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: key file does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a CurveZMQ certificate ({error})") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise UserError(f"{path}: not a CurveZMQ certificate (keys must be 40 Z85 characters)")
    return public, secret
