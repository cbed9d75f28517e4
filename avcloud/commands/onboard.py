"""`avcloud onboard --params-file onboard.yaml [-p key:=value ...]`: run the onboard daemon."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "onboard", help="run the onboard daemon (fallback model, allocation, cloud offload, merge)",
        description="Run the onboard node: subscribes to camera topics, runs the fallback detector, allocates "
                    "the uplink every frame, streams frames to the cloud service and publishes one result per "
                    "camera per frame. Prints READY when active; SIGINT/SIGTERM shut it down cleanly.")
    parser.add_argument("--params-file", type=Path, default=None, help="YAML params (docs/examples/onboard.yaml)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY:=VALUE",
                        help="override a parameter, ROS 2 style, e.g. -p slo_ms:=150 (repeatable)")
    parser.set_defaults(handler=run_onboard)


def run_onboard(args: argparse.Namespace) -> int:
    from onboard.node import OnboardNode, run_until_signalled
    from onboard.params import load_params

    params = load_params(args.params_file, args.param)
    node = OnboardNode(params)

    def announce() -> None:
        print(f"READY onboard {params.node_name} cameras={params.endpoints.cameras} "
              f"outputs={params.endpoints.outputs} cloud={params.endpoints.cloud}", flush=True)

    run_until_signalled(node, announce)
    print("stopped", flush=True)
    return 0
