"""`avcloud keys`: CurveZMQ key pairs for vehicles and the cloud service."""

from __future__ import annotations

import argparse
from pathlib import Path

from avcloud import keys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="generate and inspect CurveZMQ key pairs",
                                   description="CurveZMQ key pairs for vehicles and the cloud service.")
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.required = True

    generate = actions.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)",
        description="Write DIR/NAME.key (public key, share it) and DIR/NAME.key_secret (keep it, mode 0600). "
                    "To let a vehicle in, copy only its NAME.key into the service's allow-list directory "
                    "(--allow-into does that); the file name is the vehicle's identity. An allow-list "
                    "directory holding a secret key is refused.")
    generate.add_argument("name", metavar="NAME", help="key pair name, e.g. car-7 or cloud")
    generate.add_argument("--dir", type=Path, default=None,
                          help=f"output directory for the pair (default: {keys.default_key_dir()})")
    generate.add_argument("--allow-into", type=Path, default=None, metavar="ALLOWLIST_DIR",
                          help="also copy the public key into this allow-list directory (never the secret)")
    generate.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    generate.set_defaults(handler=run_generate)

    show = actions.add_parser("show", help="print the public key in a .key or .key_secret file")
    show.add_argument("path", type=Path, metavar="FILE")
    show.set_defaults(handler=run_show)


def run_generate(args: argparse.Namespace) -> int:
    public_path, secret_path = keys.generate_keypair(args.name, args.dir, overwrite=args.force,
                                                     allowlist_dir=args.allow_into)
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path}  (keep private)")
    if args.allow_into is not None:
        print(f"allowed:    {args.allow_into / public_path.name}  (vehicle '{args.name}')")
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(keys.load_public_key(args.path).decode("ascii"))
    return 0
