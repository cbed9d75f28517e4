"""Cellular bandwidth traces: Mahimahi and two-column formats, statistics, synthetic generators.

Mahimahi: one integer per line, a millisecond at which one 1500-byte packet may leave the
bottleneck; a repeated line means several packets in that millisecond; the trace loops with a
period equal to its last timestamp. Two-column: `seconds Mbps` per line, the capacity from that
second until the next line (the last line lasts as long as the spacing before it, or 1 s).
Two-column traces become Mahimahi opportunities spread evenly within each second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avcloud.errors import DataError
from avcloud.link import BITS_PER_PACKET, DeliverySchedule

_DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRACE_NAME = "synthetic-lte-uplink.up"
# The bundled trace is markov_lte_trace(*DEFAULT_TRACE_ARGS), written with write_mahimahi.
DEFAULT_TRACE_ARGS = (1, 150.0, 10.0)  # seed, duration_s, mean_mbps
_PACKETS_PER_MBIT_SECOND = 1e6 / BITS_PER_PACKET  # packets per second at 1 Mbps


@dataclass(frozen=True)
class Trace:
    """A bandwidth trace as Mahimahi delivery opportunities (sorted int64 milliseconds)."""

    name: str
    opportunities_ms: np.ndarray

    @property
    def schedule(self) -> DeliverySchedule:
        return DeliverySchedule(self.opportunities_ms)

    @property
    def duration_s(self) -> float:
        return float(self.opportunities_ms[-1]) / 1000.0

    @property
    def mean_mbps(self) -> float:
        return self.opportunities_ms.size * BITS_PER_PACKET / (float(self.opportunities_ms[-1]) * 1000.0)

    def per_second_mbps(self) -> np.ndarray:
        """Capacity of each second of the trace; an opportunity at ms t counts in second ceil(t/1000) - 1."""
        seconds = max(1, math.ceil(self.duration_s))
        bins = np.clip((self.opportunities_ms - 1) // 1000, 0, seconds - 1)
        return np.bincount(bins, minlength=seconds) * BITS_PER_PACKET / 1e6

    def stats(self) -> dict[str, float]:
        per_second = self.per_second_mbps()
        p10, p50, p90 = np.percentile(per_second, [10, 50, 90])
        return {
            "duration_s": self.duration_s,
            "packets": int(self.opportunities_ms.size),
            "mean_mbps": self.mean_mbps,
            "p10_mbps": float(p10),
            "p50_mbps": float(p50),
            "p90_mbps": float(p90),
            "min_mbps": float(per_second.min()),
            "max_mbps": float(per_second.max()),
            "seconds_at_zero": int(np.count_nonzero(per_second == 0)),
        }


def _check_opportunities(opportunities_ms: np.ndarray, source: str) -> np.ndarray:
    opportunities_ms = np.asarray(opportunities_ms, dtype=np.int64).ravel()
    if opportunities_ms.size == 0:
        raise DataError(f"{source}: trace has no delivery opportunities")
    if opportunities_ms[0] < 0:
        raise DataError(f"{source}: negative timestamp {int(opportunities_ms[0])}")
    if opportunities_ms[-1] <= 0:
        raise DataError(f"{source}: the last timestamp must be positive (it is the loop period)")
    return opportunities_ms


def load_trace(path: str | Path) -> Trace:
    """Read a Mahimahi or two-column trace (detected from the first data line); DataError names file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text trace file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if "#" not in text:
        # Fast path for the common case, a clean Mahimahi file: one integer per line.
        tokens = text.split()
        if tokens and len(tokens) == sum(1 for line in text.splitlines() if line.strip()):
            try:
                values = np.array(tokens).astype(np.int64)
            except ValueError:
                values = None
            if values is not None and values[0] >= 0 and np.all(np.diff(values) >= 0):
                return Trace(name=path.name, opportunities_ms=_check_opportunities(values, str(path)))
    rows: list[tuple[int, list[str]]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            rows.append((line_number, stripped.split()))
    if not rows:
        raise DataError(f"{path}: empty trace (no data lines)")
    columns = len(rows[0][1])
    if columns == 1:
        opportunities = _parse_mahimahi(path, rows)
    elif columns == 2:
        seconds, mbps = _parse_two_column(path, rows)
        opportunities = two_column_to_opportunities(seconds, mbps)
    else:
        raise DataError(
            f"{path}: line {rows[0][0]}: expected one integer (Mahimahi) or 'seconds Mbps', got {columns} fields"
        )
    return Trace(name=path.name, opportunities_ms=_check_opportunities(opportunities, str(path)))


def _parse_mahimahi(path: Path, rows: list[tuple[int, list[str]]]) -> np.ndarray:
    values = np.empty(len(rows), dtype=np.int64)
    previous = -1
    for i, (line_number, fields) in enumerate(rows):
        if len(fields) != 1 or not fields[0].isdigit():
            raise DataError(f"{path}: line {line_number}: expected one non-negative integer (ms), got '{' '.join(fields)}'")
        value = int(fields[0])
        if value < previous:
            raise DataError(f"{path}: line {line_number}: timestamp {value} ms goes back (previous {previous} ms)")
        values[i] = previous = value
    return values


def _parse_two_column(path: Path, rows: list[tuple[int, list[str]]]) -> tuple[np.ndarray, np.ndarray]:
    seconds = np.empty(len(rows))
    mbps = np.empty(len(rows))
    for i, (line_number, fields) in enumerate(rows):
        try:
            if len(fields) != 2:
                raise ValueError
            seconds[i], mbps[i] = float(fields[0]), float(fields[1])
        except ValueError:
            raise DataError(f"{path}: line {line_number}: expected 'seconds Mbps', got '{' '.join(fields)}'") from None
        if not (math.isfinite(seconds[i]) and math.isfinite(mbps[i])) or mbps[i] < 0 or seconds[i] < 0:
            raise DataError(f"{path}: line {line_number}: seconds and Mbps must be finite and non-negative")
        if i and seconds[i] <= seconds[i - 1]:
            raise DataError(f"{path}: line {line_number}: time {fields[0]} s does not increase")
    return seconds, mbps


def two_column_to_opportunities(seconds: Sequence[float], mbps: Sequence[float]) -> np.ndarray:
    """Mahimahi opportunities of a piecewise-constant capacity, spread evenly within each second.

    Fractional packets carry over to the next second so the total matches the capacity. The
    trace ends where the last line's interval ends (its length is the spacing before it, or 1 s);
    one opportunity sits at the very end, if none does, so the loop period is the full duration.
    """
    seconds = np.asarray(seconds, dtype=float)
    mbps = np.asarray(mbps, dtype=float)
    last_length_s = float(seconds[-1] - seconds[-2]) if len(seconds) > 1 else 1.0
    end_s = float(seconds[-1]) + last_length_s
    total_seconds = math.ceil(end_s - 1e-9)
    starts_s = np.arange(total_seconds, dtype=float)
    # Capacity of each whole second: time-weighted mean of the segments overlapping it.
    boundaries = np.append(seconds, end_s)
    rate_per_second = np.zeros(total_seconds)
    for k in range(len(seconds)):
        lo, hi = boundaries[k], boundaries[k + 1]
        overlap = np.clip(np.minimum(starts_s + 1, hi) - np.maximum(starts_s, lo), 0, None)
        rate_per_second += overlap * mbps[k]
    return per_second_to_opportunities(rate_per_second)


def per_second_to_opportunities(mbps_per_second: Sequence[float]) -> np.ndarray:
    """Opportunities for a capacity given per whole second, evenly spread within each second."""
    rates = np.asarray(mbps_per_second, dtype=float)
    exact_totals = np.cumsum(rates * _PACKETS_PER_MBIT_SECOND)
    totals = np.floor(exact_totals + 1e-9).astype(np.int64)
    counts = np.diff(np.concatenate([[0], totals]))
    pieces = []
    for second, count in enumerate(counts):
        if count > 0:
            # Evenly spaced, the last one closing the second: (k*1000, (k+1)*1000].
            pieces.append(second * 1000 + (np.arange(1, count + 1) * 1000) // count)
    duration_ms = len(rates) * 1000
    opportunities = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if opportunities.size == 0 or opportunities[-1] != duration_ms:
        opportunities = np.append(opportunities, duration_ms)
    return opportunities.astype(np.int64)


def write_mahimahi(path: str | Path, opportunities_ms: np.ndarray) -> Path:
    path = Path(path)
    opportunities_ms = _check_opportunities(opportunities_ms, str(path))
    if np.any(np.diff(opportunities_ms) < 0):
        raise ValueError("opportunities must be sorted")
    path.write_text("\n".join(map(str, opportunities_ms.tolist())) + "\n")
    return path


def write_two_column(path: str | Path, mbps_per_second: Sequence[float], step_s: float = 1.0) -> Path:
    """`seconds Mbps` lines, one per step."""
    path = Path(path)
    lines = [f"{k * step_s:g} {rate:.6g}" for k, rate in enumerate(np.asarray(mbps_per_second, dtype=float))]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- generators


def constant_trace(mbps: float, duration_s: float) -> np.ndarray:
    """A fixed-rate link: packets evenly spaced over the whole duration."""
    if mbps <= 0 or duration_s <= 0:
        raise ValueError("a constant trace needs a positive rate and duration")
    duration_ms = round(duration_s * 1000)
    count = max(1, round(mbps * _PACKETS_PER_MBIT_SECOND * duration_ms / 1000))
    return ((np.arange(1, count + 1) * duration_ms) // count).astype(np.int64)


def step_trace(levels_mbps: Sequence[float], step_s: float) -> np.ndarray:
    """Piecewise-constant capacity: each level lasts step_s seconds (a whole number)."""
    if step_s <= 0 or round(step_s) != step_s:
        raise ValueError("step_s must be a positive whole number of seconds")
    per_second = np.repeat(np.asarray(levels_mbps, dtype=float), int(step_s))
    return per_second_to_opportunities(per_second)


# Regimes of the LTE-like uplink: typical capacity (Mbps) and mean stay (s).
_LTE_REGIMES = (
    ("good", 17.0, 6.0),
    ("fair", 9.0, 7.0),
    ("poor", 3.5, 4.0),
    ("fade", 0.03, 1.5),
)


def markov_lte_trace(
    seed: int,
    duration_s: float = 150.0,
    mean_mbps: float = 10.0,
    fade_rate_per_min: float = 1.0,
) -> np.ndarray:
    """A Markov-modulated LTE-like uplink: regimes (good, fair, poor, deep fade) with seconds-long
    stays, log-normal fluctuation within a regime every 100 ms, Poisson packet arrivals per ms.
    Scaled so its mean is close to mean_mbps."""
    rng = np.random.default_rng([seed, 0x17E])
    step_ms = 100
    steps = int(math.ceil(duration_s * 1000 / step_ms))
    names = [regime[0] for regime in _LTE_REGIMES]
    levels = np.array([regime[1] for regime in _LTE_REGIMES])
    stays_s = np.array([regime[2] for regime in _LTE_REGIMES])
    fade = names.index("fade")
    rate_mbps = np.empty(steps)
    state = 1
    remaining_steps = 0
    log_jitter = 0.0
    for step in range(steps):
        if remaining_steps <= 0:
            # Next regime: deep fades at the requested rate, else a neighbouring regime.
            if state != fade and rng.random() < fade_rate_per_min / 60.0 * stays_s[state] * 1.5:
                state = fade
            else:
                choices = [s for s in range(fade) if s != state] if state != fade else [1, 2]
                state = int(rng.choice(choices))
            remaining_steps = max(1, int(rng.exponential(stays_s[state]) * 1000 / step_ms))
        remaining_steps -= 1
        log_jitter = 0.85 * log_jitter + rng.normal(0.0, 0.18)
        rate_mbps[step] = levels[state] * math.exp(log_jitter)
    # Scale to the requested mean; cap bursts (LTE uplinks rarely exceed ~2.5x their mean for long).
    for _ in range(3):
        rate_mbps = np.minimum(rate_mbps * (mean_mbps / rate_mbps.mean()), 2.5 * mean_mbps)
    per_ms = np.repeat(rate_mbps * _PACKETS_PER_MBIT_SECOND / 1000.0, step_ms)[: int(round(duration_s * 1000))]
    counts = rng.poisson(per_ms)
    opportunities = np.repeat(np.arange(1, counts.size + 1, dtype=np.int64), counts)
    if opportunities.size == 0 or opportunities[-1] != counts.size:
        opportunities = np.append(opportunities, counts.size)
    return opportunities


def default_trace_path() -> Path:
    """The bundled synthetic LTE-like uplink trace (Mahimahi format)."""
    return _DATA_DIR / DEFAULT_TRACE_NAME
