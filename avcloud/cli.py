"""The `avcloud` command line. Each subcommand lives in avcloud/commands/<name>.py and
exposes `register(subparsers)`, which adds its parser and sets `handler` to a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from avcloud import __version__
from avcloud.errors import Terminated, UserError

# One line per subcommand module; adding a command is one module and one line here.
COMMAND_MODULES: tuple[str, ...] = (
    "avcloud.commands.solve",
    "avcloud.commands.demo",
    "avcloud.commands.allocation_demo",
    "avcloud.commands.keys",
    "avcloud.commands.cloud",
    "avcloud.commands.replay",
    "avcloud.commands.fleet",
    "avcloud.commands.models",
    "avcloud.commands.profile",
    "avcloud.commands.onboard",
    "avcloud.commands.linkemu",
    "avcloud.commands.play",
    "avcloud.commands.record",
    "avcloud.commands.dataset",
    "avcloud.commands.trace",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avcloud",
        description="Cloud-augmented perception for autonomous vehicles over cellular uplinks.",
    )
    parser.add_argument("--version", action="version", version=f"avcloud {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM ends a command the way Ctrl-C does: cleanups run, pools are shut down and children
    # reaped. Commands that serve until signalled install their own handlers on top.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"avcloud {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"avcloud {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"avcloud {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as error:
        # A file or folder the command could not read or write (a path under a file, a full
        # disk): one line naming it. Commands with long work check their outputs first.
        print(f"avcloud {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def describe_os_error(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


if __name__ == "__main__":
    sys.exit(main())
