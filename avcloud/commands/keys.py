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
        "generate", help="write NAME.key (public) and NAME.key_secret (secret)",
        description="Write DIR/NAME.key (public key, share it) and DIR/NAME.key_secret (keep it). "
                    "To let a vehicle in, copy its NAME.key into the service's allow-list directory.")
    generate.add_argument("name", metavar="NAME", help="key pair name, e.g. car-7 or cloud")
    generate.add_argument("--dir", type=Path, default=None,
                          help=f"output directory (default: {keys.default_key_dir()})")
    generate.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    generate.set_defaults(handler=run_generate)

    show = actions.add_parser("show", help="print the public key in a .key or .key_secret file")
    show.add_argument("path", type=Path, metavar="FILE")
    show.set_defaults(handler=run_show)


def run_generate(args: argparse.Namespace) -> int:
    public_path, secret_path = keys.generate_keypair(args.name, args.dir, overwrite=args.force)
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path}  (keep private)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(keys.load_public_key(args.path).decode("ascii"))
    return 0
