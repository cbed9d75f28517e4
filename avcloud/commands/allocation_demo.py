"""`avcloud allocation-demo`: the allocator on a small built-in example, over a sweep of budgets.

The example profile is ILLUSTRATIVE: plausible sizes, runtimes and utilities made up for the
demo, not measurements. Real profiles come from `avcloud profile` (profiler) runs.
"""

from __future__ import annotations

import argparse

from avcloud.errors import UserError
from avcloud.types import ALL_CAMERAS, AllocationProblem, Option, Service

DEMO_RTT_MS = 20.0
DEMO_SLO_MS = 150.0
DEMO_BUDGETS_MBPS = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

# Illustrative numbers only. (model, runtime ms, utility gain over the on-car model)
# Option names are short so that the sweep fits a terminal: S/M/L = small/medium/large model.
_CLOUD_MODELS = (("S", 35.0, 0.08), ("M", 55.0, 0.14), ("L", 90.0, 0.19))
# (codec, transport size Mb, utility factor: heavier compression loses some accuracy)
_CODECS = (("j50", 0.65, 0.80), ("j90", 1.60, 0.95), ("png", 10.0, 1.0))
# Per camera: on-car utility and how much the cloud helps (front cameras see more objects).
_CAMERAS = {
    "FRONT": (0.42, 1.00),
    "FRONT_LEFT": (0.38, 0.85),
    "FRONT_RIGHT": (0.38, 0.85),
    "SIDE_LEFT": (0.30, 0.60),
    "SIDE_RIGHT": (0.30, 0.60),
}


def example_services() -> tuple[Service, ...]:
    """Five cameras, each with the on-car fallback plus 3 cloud models x 3 codecs (illustrative)."""
    services = []
    for camera in ALL_CAMERAS:
        onboard_utility, cloud_gain_factor = _CAMERAS[camera]
        options = [Option("car", 0.0, 0.0, onboard_utility)]
        for model, runtime_ms, gain in _CLOUD_MODELS:
            for codec, size_mbit, codec_factor in _CODECS:
                utility = onboard_utility + gain * cloud_gain_factor * codec_factor
                options.append(Option(f"{model}.{codec}", size_mbit, runtime_ms, round(utility, 4)))
        services.append(Service(camera, tuple(options)))
    return tuple(services)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "allocation-demo",
        help="the allocator alone on a built-in illustrative profile, over a sweep of budgets",
        description="Solve the per-frame allocation for five cameras over a sweep of uplink budgets "
        "(built-in illustrative profile; numbers are not measurements).",
    )
    parser.add_argument(
        "--budgets-mbps", default=",".join(f"{b:g}" for b in DEMO_BUDGETS_MBPS), help="comma-separated budgets"
    )
    parser.add_argument("--rtt-ms", type=float, default=DEMO_RTT_MS)
    parser.add_argument("--slo-ms", type=float, default=DEMO_SLO_MS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from optimizer.allocators import get_allocator

    try:
        budgets_mbps = [float(text) for text in args.budgets_mbps.split(",") if text.strip()]
    except ValueError:
        raise UserError(f"--budgets-mbps: not a list of numbers ({args.budgets_mbps!r})") from None
    if not budgets_mbps or any(not (0 <= b < float("inf")) for b in budgets_mbps):
        raise UserError("--budgets-mbps needs finite budgets >= 0")
    services = example_services()
    methods = {name: get_allocator(name) for name in ("exact", "equal", "naive", "onboard")}
    table = Table(
        title=f"Allocation per uplink budget, RTT {args.rtt_ms:g} ms, SLO {args.slo_ms:g} ms\n"
        "(illustrative profile, not measurements)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("Mbps", justify="right")
    for service in services:
        table.add_column("".join(word[0] for word in service.name.split("_")))
    table.add_column("used", justify="right")
    table.add_column("exact", justify="right")
    table.add_column("equal", justify="right")
    table.add_column("car", justify="right")
    for budget_mbps in budgets_mbps:
        problem = AllocationProblem(services, budget_mbps, args.rtt_ms, args.slo_ms)
        results = {name: allocator.solve(problem) for name, allocator in methods.items()}
        best = results["exact"]
        table.add_row(
            f"{budget_mbps:g}",
            *(best.choices[service.name] for service in services),
            f"{best.total_bandwidth_mbps:.1f}",
            f"{best.utility:.3f}",
            f"{results['equal'].utility:.3f}",
            f"{results['onboard'].utility:.3f}",
        )
    naive = results["naive"]
    console = Console()
    console.print(table)
    console.print(
        "Columns F..SR: each camera's choice (car = on-car model; S/M/L = small/medium/large cloud "
        "model; j50/j90 = JPEG quality 50/90, png). exact/equal/car: total utility of the exact optimum, the "
        "equal-split baseline and on-car only."
    )
    console.print(
        f"Naive cloud (most accurate option everywhere) needs {naive.total_bandwidth_mbps:.1f} Mbps "
        f"for utility {naive.utility:.3f}, whatever the uplink. Utility = sum of per-camera mAP."
    )
    return 0
