"""Profile tables and utility curves (TURBO's model).

An option has a transport size S (megabits), a cloud runtime t (ms) and a utility u (mAP).
It meets the deadline iff the uplink gives it at least its critical bandwidth
b_c = S / (SLO - t - RTT); see `avcloud.types.critical_bandwidth_mbps`. A service's utility
curve is the staircase of its non-dominated options: sorted by b_c, utility strictly increasing.

Profile table columns (CSV or Parquet; read by `avcloud.profile_format`): `Model`, `Network Transport Size [Mb]`, `Runtime [ms]`,
`Utility`, optional `Service` (camera name; empty = every service) and `Window` (int; empty or
-1 = the whole scene). When several rows name the same `Model` for a service and window, the
most specific wins: a row for this service beats a row for every service, and among those a
row for this window beats a whole-scene row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from avcloud.errors import DataError
from avcloud.profile_format import (
    MODEL_COLUMN,
    PROFILE_COLUMNS,
    RUNTIME_COLUMN,
    SERVICE_COLUMN,
    SIZE_COLUMN,
    UTILITY_COLUMN,
    WINDOW_COLUMN,
    read_table_records,
)
from avcloud.types import Option, Service, critical_bandwidth_mbps

REQUIRED_COLUMNS = PROFILE_COLUMNS
WHOLE_SCENE = -1


@dataclass(frozen=True)
class ProfileRow:
    """One row of a profile table. `service` None applies to every service."""

    option: Option
    service: str | None
    window: int
    where: str  # "line 7" (CSV) or "row 6" (Parquet), for error messages


@dataclass(frozen=True)
class CurveStep:
    """One step of a service's utility curve: reachable from `critical_bandwidth_mbps` upwards."""

    option: Option
    critical_bandwidth_mbps: float
    utility: float


class ProfileTable:
    """The options of every service (and window) as measured by the profiler."""

    def __init__(self, rows: Sequence[ProfileRow], source: str = "profile") -> None:
        if not rows:
            raise DataError(f"{source}: the profile table has no rows")
        self.rows = tuple(rows)
        self.source = source
        self._check_duplicates()

    def _check_duplicates(self) -> None:
        seen: dict[tuple[str, str | None, int], str] = {}
        for row in self.rows:
            key = (row.option.name, row.service, row.window)
            if key in seen:
                raise DataError(
                    f"{self.source} {row.where}: column '{MODEL_COLUMN}': '{row.option.name}' repeats "
                    f"{seen[key]} for the same service and window"
                )
            seen[key] = row.where

    @property
    def windows(self) -> list[int]:
        """Window indices that have their own rows (the whole scene, -1, is not listed)."""
        return sorted({row.window for row in self.rows if row.window != WHOLE_SCENE})

    @property
    def service_names(self) -> list[str]:
        """Services named in the `Service` column, in order of first appearance."""
        return list(dict.fromkeys(row.service for row in self.rows if row.service is not None))

    def options(self, service: str | None = None, window: int | None = None) -> tuple[Option, ...]:
        """The options of one service in one window (None: the rows for every service / whole scene).

        Raises DataError if the result has no on-car fallback (a row of size 0).
        """
        window = WHOLE_SCENE if window is None else int(window)
        best: dict[str, tuple[tuple[int, int], int, Option]] = {}
        for position, row in enumerate(self.rows):
            if row.service is not None and row.service != service:
                continue
            if row.window != WHOLE_SCENE and row.window != window:
                continue
            specificity = (int(row.service is not None), int(row.window != WHOLE_SCENE))
            current = best.get(row.option.name)
            if current is None or specificity > current[0]:
                first_position = position if current is None else current[1]
                best[row.option.name] = (specificity, first_position, row.option)
        options = tuple(option for _, _, option in sorted(best.values(), key=lambda entry: entry[1]))
        who = f"service '{service}'" if service is not None else "every service"
        when = f" in window {window}" if window != WHOLE_SCENE else ""
        if not options:
            raise DataError(f"{self.source}: no rows for {who}{when}")
        if not any(option.is_fallback for option in options):
            raise DataError(
                f"{self.source}: no on-car fallback (a row with '{SIZE_COLUMN}' = 0) for {who}{when}"
            )
        return options

    def services(
        self,
        names: Sequence[str],
        window: int | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> tuple[Service, ...]:
        """One Service per name, with its options for this window and its weight (default 1)."""
        weights = dict(weights or {})
        unknown = set(weights) - set(names)
        if unknown:
            raise DataError(f"weights given for services not asked for: {', '.join(sorted(unknown))}")
        return tuple(
            Service(name=name, options=self.options(name, window), weight=float(weights.get(name, 1.0)))
            for name in names
        )


def utility_curve(options: Sequence[Option], rtt_ms: float, slo_ms: float) -> list[CurveStep]:
    """The staircase of non-dominated options: sorted by critical bandwidth, utility strictly rising.

    Options that can never meet the SLO are dropped; among options with equal critical bandwidth
    and utility the first in table order is kept.
    """
    steps = []
    for position, option in enumerate(options):
        bandwidth_mbps = critical_bandwidth_mbps(option.size_mbit, option.runtime_ms, rtt_ms, slo_ms)
        if math.isfinite(bandwidth_mbps):
            steps.append((bandwidth_mbps, -option.utility, position, option))
    steps.sort()
    curve: list[CurveStep] = []
    for bandwidth_mbps, _, _, option in steps:
        if not curve or option.utility > curve[-1].utility:
            curve.append(CurveStep(option, bandwidth_mbps, option.utility))
    return curve


def best_step_within(curve: Sequence[CurveStep], bandwidth_mbps: float) -> CurveStep | None:
    """The most useful step reachable with this much bandwidth (None if not even the first)."""
    reachable = None
    for step in curve:
        if step.critical_bandwidth_mbps > bandwidth_mbps:
            break
        reachable = step
    return reachable


def load_profile_table(path: str | Path) -> ProfileTable:
    """Read a profile table from CSV or Parquet (by extension), validating every row."""
    path = Path(path)
    rows = [_parse_row(record, where, path) for where, record in read_table_records(path, REQUIRED_COLUMNS)]
    return ProfileTable(rows, source=str(path))


def _parse_row(record: Mapping[str, object], where: str, path: Path) -> ProfileRow:
    def fail(column: str, problem: str) -> DataError:
        return DataError(f"{path} {where}: column '{column}': {problem}")

    def number(column: str, minimum: float | None) -> float:
        raw = record.get(column)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise fail(column, "empty")
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise fail(column, f"not a number ({raw!r})") from None
        if not math.isfinite(value):
            raise fail(column, f"not a finite number ({raw!r})")
        if minimum is not None and value < minimum:
            raise fail(column, f"must be >= {minimum:g} (got {value:g})")
        return value

    name = record.get(MODEL_COLUMN)
    if not isinstance(name, str) or not name.strip():
        raise fail(MODEL_COLUMN, "empty")
    option = Option(
        name=name.strip(),
        size_mbit=number(SIZE_COLUMN, 0.0),
        runtime_ms=number(RUNTIME_COLUMN, 0.0),
        utility=number(UTILITY_COLUMN, 0.0),
    )
    service = record.get(SERVICE_COLUMN)
    if service is not None and not isinstance(service, str):
        raise fail(SERVICE_COLUMN, f"not a name ({service!r})")
    service = service.strip() if service and service.strip() else None
    window = WHOLE_SCENE
    raw_window = record.get(WINDOW_COLUMN)
    if raw_window is not None and not (isinstance(raw_window, str) and not raw_window.strip()):
        window_value = number(WINDOW_COLUMN, WHOLE_SCENE)
        if window_value != int(window_value):
            raise fail(WINDOW_COLUMN, f"not an integer ({raw_window!r})")
        window = int(window_value)
    return ProfileRow(option=option, service=service, window=window, where=where)
