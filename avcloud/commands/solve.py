"""`avcloud solve`: solve allocation instances (JSON lines) or one allocation from a profile table.

Instance line: {"budget_mbps": B, "rtt_ms": r, "slo_ms": s, "services": [{"name": str,
"weight": float (default 1), "options": [{"name", "size_mbit", "runtime_ms", "utility"}, ...]}]}.
An option with size_mbit 0 is the on-car fallback. Output line: {"utility", "choices",
"bandwidth_mbps", "solve_us"}, plus "fractional" and "relaxation_utility" for --method lp.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from avcloud.errors import DataError, UserError
from avcloud.types import ALL_CAMERAS, Allocation, AllocationProblem, Option, Service
from optimizer.allocators import ALLOCATORS, get_allocator
from optimizer.problem import check_services


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class OptionRecord(_Strict):
    name: str = Field(min_length=1)
    size_mbit: float = Field(ge=0)
    runtime_ms: float = Field(ge=0)
    utility: float


class ServiceRecord(_Strict):
    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=0)
    options: list[OptionRecord] = Field(min_length=1)


class InstanceRecord(_Strict):
    budget_mbps: float = Field(ge=0)
    rtt_ms: float = Field(ge=0)
    slo_ms: float = Field(gt=0)
    services: list[ServiceRecord] = Field(min_length=1)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "solve",
        help="solve allocation instances (JSONL) or one allocation from a profile table",
        description="Choose one option per service (cloud model x compression, or the on-car fallback) "
        "so that the critical bandwidths fit the budget and the weighted utility is maximal.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--instances", type=Path, metavar="FILE.jsonl", help="one problem per line")
    source.add_argument("--profile", type=Path, metavar="FILE", help="profile table (CSV or Parquet)")
    parser.add_argument("--method", default="exact", help=f"one of: {', '.join(ALLOCATORS)} (default exact)")
    parser.add_argument("--out", type=Path, metavar="FILE.jsonl", help="with --instances: write here, not stdout")
    parser.add_argument("--budget-mbps", type=float, help="with --profile: uplink budget")
    parser.add_argument("--rtt-ms", type=float, help="with --profile: round-trip time")
    parser.add_argument("--slo-ms", type=float, help="with --profile: deadline per frame")
    cameras = parser.add_mutually_exclusive_group()
    cameras.add_argument("--cameras", help="with --profile: comma-separated service names")
    cameras.add_argument("--services", type=int, metavar="N", help="with --profile: this many services")
    parser.add_argument("--window", type=int, help="with --profile: use this window's rows")
    parser.add_argument("--json", action="store_true", help="with --profile: print JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    allocator = get_allocator(args.method)
    if args.instances is not None:
        return _run_instances(args, allocator)
    return _run_profile(args, allocator)


def allocation_record(allocation: Allocation, method: str) -> dict[str, Any]:
    """The JSON output for one allocation (the CLI contract)."""
    record: dict[str, Any] = {
        "utility": allocation.utility,
        "choices": allocation.choices,
        "bandwidth_mbps": allocation.bandwidth_mbps,
        "solve_us": allocation.solve_us,
    }
    if method == "lp":
        record["fractional"] = bool(allocation.extra["fractional"])
        record["relaxation_utility"] = float(allocation.extra["relaxation_utility"])
    if "within_budget" in allocation.extra:
        record["within_budget"] = bool(allocation.extra["within_budget"])
    return record


def read_instances(path: Path) -> list[AllocationProblem]:
    """Parse and validate every line; DataError names the file, line and field."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    problems = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            problems.append(parse_instance(line, f"{path} line {line_number}"))
    if not problems:
        raise DataError(f"{path}: no instances")
    return problems


def parse_instance(line: str, where: str) -> AllocationProblem:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        record = InstanceRecord.model_validate(data)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise DataError(f"{where}: field '{field}': {first['msg']}") from None
    services = tuple(
        Service(
            name=service.name,
            weight=service.weight,
            options=tuple(Option(o.name, o.size_mbit, o.runtime_ms, o.utility) for o in service.options),
        )
        for service in record.services
    )
    try:
        check_services(services)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    return AllocationProblem(services, record.budget_mbps, record.rtt_ms, record.slo_ms)


def _run_instances(args: argparse.Namespace, allocator) -> int:
    for flag, value in (("--budget-mbps", args.budget_mbps), ("--rtt-ms", args.rtt_ms), ("--slo-ms", args.slo_ms),
                        ("--cameras", args.cameras), ("--services", args.services), ("--window", args.window)):
        if value is not None:
            raise UserError(f"{flag} goes with --profile; each instance line carries its own")
    if args.json:
        raise UserError("--json goes with --profile; --instances always writes JSON lines")
    problems = read_instances(args.instances)
    target = f"--out {args.out}" if args.out is not None else "standard output"
    try:
        output = args.out.open("wb") if args.out is not None else sys.stdout.buffer
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot write ({error.strerror or error})") from None
    written = 0
    try:
        for problem in problems:
            allocation = allocator.solve(problem)
            output.write((json.dumps(allocation_record(allocation, args.method)) + "\n").encode())
            output.flush()  # line by line: a write error leaves only whole lines behind
            written += 1
        if output is not sys.stdout.buffer:
            output.close()
    except OSError as error:
        if output is not sys.stdout.buffer:
            _cut_back(output, written)
        raise UserError(f"{target}: cannot write ({error.strerror or error}); {written} of {len(problems)} "
                        "allocation(s) were written before") from None
    return 0


def _cut_back(output, whole_lines: int) -> None:
    """Close a failed output file, cutting off a partly written last line where possible."""
    import contextlib

    with contextlib.suppress(OSError, ValueError):
        output.close()
    with contextlib.suppress(OSError, ValueError):
        path = Path(output.name)
        if path.is_file():
            data = path.read_bytes()
            keep = 0
            for _ in range(whole_lines):
                keep = data.index(b"\n", keep) + 1
            os.truncate(path, keep)


def _run_profile(args: argparse.Namespace, allocator) -> int:
    from optimizer.curves import load_profile_table

    for flag, value, strictly_positive in (
        ("--budget-mbps", args.budget_mbps, False),
        ("--rtt-ms", args.rtt_ms, False),
        ("--slo-ms", args.slo_ms, True),
    ):
        if value is None:
            raise UserError(f"--profile needs {flag}")
        if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
            raise UserError(f"{flag} must be a finite number {'> 0' if strictly_positive else '>= 0'}")
    if args.out is not None:
        raise UserError("--out goes with --instances; use --json to print the allocation as JSON")
    table = load_profile_table(args.profile)
    names = _service_names(args, table.service_names)
    services = table.services(names, window=args.window)
    problem = AllocationProblem(services, args.budget_mbps, args.rtt_ms, args.slo_ms)
    allocation = allocator.solve(problem)
    if args.json:
        print(json.dumps(allocation_record(allocation, args.method)))
        return 0
    print_allocation(problem, allocation, args.method)
    return 0


def _service_names(args: argparse.Namespace, table_names: list[str]) -> list[str]:
    if args.cameras:
        names = [name.strip() for name in args.cameras.split(",") if name.strip()]
        if not names:
            raise UserError("--cameras needs at least one name")
        return names
    known = table_names or list(ALL_CAMERAS)
    if args.services is None:
        return known
    if args.services < 1:
        raise UserError("--services must be at least 1")
    extra = [f"SERVICE_{index}" for index in range(len(known) + 1, args.services + 1)]
    return (known + extra)[: args.services]


def print_allocation(problem: AllocationProblem, allocation: Allocation, method: str) -> None:
    from rich.console import Console
    from rich.table import Table

    by_name = {service.name: service for service in problem.services}
    table = Table(
        title=f"allocation ({method}): budget {problem.budget_mbps:g} Mbps, RTT {problem.rtt_ms:g} ms, "
        f"SLO {problem.slo_ms:g} ms"
    )
    table.add_column("service")
    table.add_column("choice")
    table.add_column("utility", justify="right")
    table.add_column("weight", justify="right")
    table.add_column("critical Mbps", justify="right")
    for name, choice in allocation.choices.items():
        service = by_name[name]
        option = next(o for o in service.options if o.name == choice)
        table.add_row(
            name,
            choice + (" (on-car)" if option.is_fallback else ""),
            f"{option.utility:.4f}",
            f"{service.weight:g}",
            f"{allocation.bandwidth_mbps[name]:.2f}",
        )
    table.add_section()
    table.add_row(
        "total", "", f"{allocation.utility:.4f}", "", f"{allocation.total_bandwidth_mbps:.2f}", style="bold"
    )
    table.caption = f"solved in {allocation.solve_us:.0f} us"
    if method == "lp":
        table.caption += (
            f"; LP relaxation {allocation.extra['relaxation_utility']:.4f}"
            f" ({'fractional' if allocation.extra['fractional'] else 'integral'})"
        )
    Console().print(table)
