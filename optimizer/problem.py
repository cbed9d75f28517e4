"""Rules every allocator shares: what a valid problem is, the budget tolerance, and how a
choice of one option per service becomes an `Allocation`.

Budget tolerance: a set of choices fits the budget B iff
    sum of critical bandwidths <= B * (1 + 1e-12) + 1e-12.
Sums of the same floats in a different order differ in the last bits, so a budget that is
exactly the sum of some critical bandwidths must count as feasible in every method (the exact
solver, the cvxpy programs and the baselines all use `budget_limit_mbps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from avcloud.errors import DataError
from avcloud.types import Allocation, AllocationProblem, Service

BUDGET_RELATIVE_TOLERANCE = 1e-12
BUDGET_ABSOLUTE_TOLERANCE_MBPS = 1e-12


def budget_limit_mbps(budget_mbps: float) -> float:
    """The largest total critical bandwidth that still counts as within `budget_mbps`."""
    return budget_mbps * (1.0 + BUDGET_RELATIVE_TOLERANCE) + BUDGET_ABSOLUTE_TOLERANCE_MBPS


def check_link(budget_mbps: float, rtt_ms: float, slo_ms: float) -> None:
    if not (math.isfinite(budget_mbps) and budget_mbps >= 0):
        raise DataError(f"budget_mbps must be a finite number >= 0 (got {budget_mbps!r})")
    if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
        raise DataError(f"rtt_ms must be a finite number >= 0 (got {rtt_ms!r})")
    if not (math.isfinite(slo_ms) and slo_ms > 0):
        raise DataError(f"slo_ms must be a finite number > 0 (got {slo_ms!r})")


# The last few service tuples found valid, held by reference: a tuple of frozen services cannot
# change, and the car plans with the same one every frame.
_VALID_SERVICES: list[tuple[Service, ...]] = []
_VALID_SERVICES_KEPT = 8


def check_services(services: Sequence[Service]) -> None:
    """Raise DataError naming the service/option if the services cannot form a problem."""
    if any(services is valid for valid in _VALID_SERVICES):
        return
    _check_services(services)
    if isinstance(services, tuple):
        _VALID_SERVICES.append(services)
        del _VALID_SERVICES[:-_VALID_SERVICES_KEPT]


def _is_finite_number(value) -> bool:
    """A finite real number: what a weight, size, runtime or utility must be (math.isfinite of
    anything else raises TypeError, not the one-line error)."""
    return isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)


def _check_services(services: Sequence[Service]) -> None:
    if not services:
        raise DataError("a problem needs at least one service")
    names = set()
    for service in services:
        if service.name in names:
            raise DataError(f"service '{service.name}' appears twice")
        names.add(service.name)
        if not (_is_finite_number(service.weight) and service.weight >= 0):
            raise DataError(f"service '{service.name}': weight must be a finite number >= 0")
        option_names = set()
        for option in service.options:
            where = f"service '{service.name}' option '{option.name}'"
            if option.name in option_names:
                raise DataError(f"{where} appears twice")
            option_names.add(option.name)
            if not (_is_finite_number(option.size_mbit) and option.size_mbit >= 0):
                raise DataError(f"{where}: size_mbit must be a finite number >= 0")
            if not (_is_finite_number(option.runtime_ms) and option.runtime_ms >= 0):
                raise DataError(f"{where}: runtime_ms must be a finite number >= 0")
            if not _is_finite_number(option.utility):
                raise DataError(f"{where}: utility must be a finite number")
        if not any(option.is_fallback for option in service.options):
            raise DataError(f"service '{service.name}' has no on-car fallback (an option with size_mbit 0)")


def check_problem(problem: AllocationProblem) -> None:
    check_link(problem.budget_mbps, problem.rtt_ms, problem.slo_ms)
    check_services(problem.services)


def critical_bandwidths_mbps(service: Service, rtt_ms: float, slo_ms: float) -> np.ndarray:
    """Critical bandwidth of every option of a service, vectorised (inf where the SLO is out of reach).

    Same arithmetic as `avcloud.types.critical_bandwidth_mbps`, so the two agree bit for bit.
    """
    sizes_mbit = np.fromiter((option.size_mbit for option in service.options), float, len(service.options))
    runtimes_ms = np.fromiter((option.runtime_ms for option in service.options), float, len(service.options))
    return critical_bandwidths_from_arrays(sizes_mbit, runtimes_ms, rtt_ms, slo_ms)


def critical_bandwidths_from_arrays(
    sizes_mbit: np.ndarray, runtimes_ms: np.ndarray, rtt_ms: float, slo_ms: float
) -> np.ndarray:
    slack_s = (slo_ms - runtimes_ms - rtt_ms) / 1000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        bandwidths_mbps = np.where(slack_s > 0, sizes_mbit / slack_s, math.inf)
    bandwidths_mbps[sizes_mbit == 0] = 0.0
    return bandwidths_mbps


def fallback_index(service: Service) -> int:
    """The on-car fallback of a service: the most useful size-0 option (first on ties)."""
    best = -1
    for index, option in enumerate(service.options):
        if option.is_fallback and (best < 0 or option.utility > service.options[best].utility):
            best = index
    if best < 0:
        raise DataError(f"service '{service.name}' has no on-car fallback (an option with size_mbit 0)")
    return best


def allocation_from_indices(
    services: Sequence[Service],
    option_indices: Sequence[int],
    bandwidths_mbps: Sequence[float],
    solve_us: float = 0.0,
    extra: dict[str, object] | None = None,
) -> Allocation:
    """An Allocation from one chosen option index per service; utility is the weighted total,
    summed in service order so that every method reports the same number for the same choices."""
    choices: dict[str, str] = {}
    bandwidth_by_service: dict[str, float] = {}
    utility = 0.0
    for service, index, bandwidth_mbps in zip(services, option_indices, bandwidths_mbps, strict=True):
        option = service.options[index]
        choices[service.name] = option.name
        bandwidth_by_service[service.name] = float(bandwidth_mbps)
        utility += service.weight * option.utility
    return Allocation(
        choices=choices,
        utility=utility,
        bandwidth_mbps=bandwidth_by_service,
        solve_us=solve_us,
        extra=dict(extra or {}),
    )


STREAM_VIEW_DEADLINES_KEPT = 1024


class StreamRateServices:
    """The services as a camera that sends every frame sees them (`PolicySpec.stream_rate_cap`).

    TURBO's critical bandwidth, size / (SLO - RTT - runtime), lets an upload take its whole slack.
    When that slack is longer than the frame interval, the camera's next frame is ready before the
    upload ends and queues behind it: a stream that sends every frame needs size / interval. Here
    each option's size is scaled so that its critical bandwidth is size / min(slack, interval), so
    every allocator plans with the stream's rate unchanged. One services tuple per (RTT, SLO) is
    kept, so the solver's caches keyed by the tuple stay warm.
    """

    def __init__(self, services: Sequence[Service], frame_interval_ms: float) -> None:
        if not (math.isfinite(frame_interval_ms) and frame_interval_ms > 0):
            raise DataError(f"frame_interval_ms must be a finite number > 0 (got {frame_interval_ms!r})")
        self.services = tuple(services)
        self.frame_interval_ms = frame_interval_ms
        self._by_deadline: dict[tuple[float, float], tuple[Service, ...]] = {}

    def at(self, rtt_ms: float, slo_ms: float) -> tuple[Service, ...]:
        key = (rtt_ms, slo_ms)
        capped = self._by_deadline.get(key)
        if capped is None:
            capped = tuple(Service(service.name, tuple(self._capped(option, rtt_ms, slo_ms) for option in service.options),
                                   service.weight) for service in self.services)
            # RTT and SLO are planned in 5 ms steps: a car uses a handful, a fleet in one cell
            # hundreds (queueing behind the cell's other cars inflates the RTT it measures).
            if len(self._by_deadline) >= STREAM_VIEW_DEADLINES_KEPT:
                self._by_deadline.clear()
            self._by_deadline[key] = capped
        return capped

    def _capped(self, option, rtt_ms: float, slo_ms: float):
        slack_ms = slo_ms - rtt_ms - option.runtime_ms
        if option.is_fallback or slack_ms <= self.frame_interval_ms:
            return option
        return type(option)(option.name, option.size_mbit * slack_ms / self.frame_interval_ms, option.runtime_ms,
                            option.utility)


# Cars with the same profile (a replay's policies, a fleet's vehicles) share one stream view, so
# they plan with the same services tuples and the solver's per-options caches serve them all.
_STREAM_VIEWS: dict[tuple[int, float], StreamRateServices] = {}
_STREAM_VIEWS_KEPT = 64


def shared_stream_rate_services(services: tuple[Service, ...], frame_interval_ms: float) -> StreamRateServices:
    """The `StreamRateServices` of these services (by identity) and frame interval, made once."""
    key = (id(services), frame_interval_ms)
    view = _STREAM_VIEWS.get(key)
    if view is None or view.services is not services:
        view = StreamRateServices(services, frame_interval_ms)
        if len(_STREAM_VIEWS) >= _STREAM_VIEWS_KEPT:
            _STREAM_VIEWS.clear()
        _STREAM_VIEWS[key] = view  # holds the tuple, so its id cannot be reused while kept
    return view
