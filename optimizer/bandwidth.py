"""Uplink bandwidth estimators over measured throughput samples (bytes / transfer time).

Samples are noisy and bursty: one transfer can see a burst far above the link's sustained rate,
or a stall near zero. All estimators share `observe(time_ms, throughput_mbps, transfer_ms=None)`
(the sample and, when known, how long the transfer it measured took) and `estimate_mbps()` (None
before the first sample).

- `EwmaEstimator`: exponentially weighted moving average (reacts fast, follows bursts).
- `HarmonicMeanEstimator`: harmonic mean of the last N samples (as in MPC/FESTIVE video
  streaming): dominated by the slow samples, so robust to bursts and cautious after stalls. A
  zero sample makes it 0 until it leaves the window.
- `QuantileForecaster`: a distribution of the next interval's throughput. Level = EWMA of
  log-throughput; the spread = the empirical distribution of that level's past one-step-ahead
  errors (in log space, so multiplicative: a link at 5 Mbps and one at 50 Mbps get the same
  relative uncertainty). The forecast samples are level * exp(error_i); quantiles come from them.
  Before two samples exist there are no errors to learn from and the forecast is the samples
  seen so far.

  Errors at the planning scale (`interval_ms`): the forecast is of the next interval's
  throughput (a frame interval: what a plan must carry), but a sample measures its own
  transfer, often far shorter on a fast link. Over a shorter span a link's throughput spreads
  wider (where its bursts fall matters more), so the error of a sample whose transfer took t
  < interval is shrunk by sqrt(t / interval), as the spread of a mean over t shrinks with
  independent increments. The level still takes the sample whole. On the measured traces this
  raised turbo-q's mAP and lowered its misses, though it leaves the forecast narrower than
  calibrated against the next interval: the link's own spread shrinks more slowly with the span
  than that law says (docs/BANDWIDTH.md has the measurements).

  Recalibration (`recalibrate=True`): every new sample is first scored against the forecast
  made before it, as the fraction of forecast values at or below it (its PIT value; uniform for
  a calibrated forecast). Once `MIN_CALIBRATION_SAMPLES` are kept, the forecast's level q is
  replaced by the level whose past coverage was q (quantile recalibration, Kuleshov et al.
  2018): if the link fell below the forecast's P10 a fifth of the time, the recalibrated P10
  is the raw forecast's P5 or so.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# Added before taking logs so that stalls (0 Mbps) stay finite: 10 kbit/s is "no link" here.
LOG_FLOOR_MBPS = 0.01
MIN_CALIBRATION_SAMPLES = 10
# The span the forecaster forecasts by default: a frame interval at 10 Hz.
DEFAULT_INTERVAL_MS = 100.0


def sorted_quantiles(sorted_values: np.ndarray, quantiles) -> np.ndarray:
    """np.quantile's default (linear) quantiles of an already sorted 1-D array, without its
    per-call overhead (the planners ask for them every frame)."""
    positions = np.asarray(quantiles, dtype=float) * (sorted_values.shape[0] - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, sorted_values.shape[0] - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (positions - lower)


class _SampleChecks:
    def __init__(self) -> None:
        self._last_time_ms = -math.inf

    def _check(self, time_ms: float, throughput_mbps: float) -> None:
        if not math.isfinite(time_ms):
            raise ValueError(f"sample time must be finite (got {time_ms!r})")
        if time_ms < self._last_time_ms:
            raise ValueError(f"samples must come in time order ({time_ms} < {self._last_time_ms})")
        if not (math.isfinite(throughput_mbps) and throughput_mbps >= 0):
            raise ValueError(f"throughput must be a finite number >= 0 (got {throughput_mbps!r})")
        self._last_time_ms = time_ms


class EwmaEstimator(_SampleChecks):
    """estimate <- alpha * sample + (1 - alpha) * estimate; the first sample seeds it."""

    def __init__(self, alpha: float = 0.3) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self._estimate_mbps: float | None = None

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self._check(time_ms, throughput_mbps)
        if self._estimate_mbps is None:
            self._estimate_mbps = float(throughput_mbps)
        else:
            self._estimate_mbps += self.alpha * (throughput_mbps - self._estimate_mbps)

    def estimate_mbps(self) -> float | None:
        return self._estimate_mbps


class HarmonicMeanEstimator(_SampleChecks):
    """Harmonic mean of the last `window` samples."""

    def __init__(self, window: int = 5) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._samples_mbps: deque[float] = deque(maxlen=window)

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self._check(time_ms, throughput_mbps)
        self._samples_mbps.append(float(throughput_mbps))

    def estimate_mbps(self) -> float | None:
        if not self._samples_mbps:
            return None
        if min(self._samples_mbps) == 0:
            return 0.0
        return len(self._samples_mbps) / sum(1.0 / sample for sample in self._samples_mbps)


class QuantileForecaster(_SampleChecks):
    """Forecast distribution of the next interval's throughput (see the module docstring).

    `window`: how many past one-step errors form the distribution; `alpha`: smoothing of the
    log-throughput level; `interval_ms`: the span the forecast is for (None: every error is
    taken whole). `estimate_mbps()` is the median forecast.
    """

    def __init__(self, window: int = 50, alpha: float = 0.3, recalibrate: bool = False,
                 calibration_window: int = 100, interval_ms: float | None = DEFAULT_INTERVAL_MS) -> None:
        super().__init__()
        if window < 2:
            raise ValueError("window must be at least 2")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if calibration_window < MIN_CALIBRATION_SAMPLES:
            raise ValueError(f"calibration_window must be at least {MIN_CALIBRATION_SAMPLES}")
        if interval_ms is not None and not (math.isfinite(interval_ms) and interval_ms > 0):
            raise ValueError("interval_ms must be a positive number or None")
        self.window = window
        self.interval_ms = interval_ms
        self.alpha = alpha
        self.recalibrate = recalibrate
        self._pit: deque[float] = deque(maxlen=calibration_window)
        self._level_log: float | None = None
        self._errors_log: deque[float] = deque(maxlen=window)
        self._recent_mbps: deque[float] = deque(maxlen=window)
        self._samples_cache: np.ndarray | None = None  # the forecast changes only with a new sample
        self._raw_cache: np.ndarray | None = None
        self._median_cache: float | None = None

    def observe(self, time_ms: float, throughput_mbps: float, transfer_ms: float | None = None) -> None:
        self._check(time_ms, throughput_mbps)
        raw = self._raw_samples() if self.recalibrate else np.zeros(0)
        if raw.shape[0] >= 2:  # how the forecast made before this sample fared
            below = np.searchsorted(raw, throughput_mbps, side="left")
            at_or_below = np.searchsorted(raw, throughput_mbps, side="right")
            self._pit.append(float(below + at_or_below) / (2.0 * raw.shape[0]))
        self._samples_cache = self._median_cache = self._raw_cache = None
        sample_log = math.log(throughput_mbps + LOG_FLOOR_MBPS)
        if self._level_log is None:
            self._level_log = sample_log
        else:
            self._errors_log.append((sample_log - self._level_log) * self._error_scale(transfer_ms))
            self._level_log += self.alpha * (sample_log - self._level_log)
        self._recent_mbps.append(float(throughput_mbps))

    def _error_scale(self, transfer_ms: float | None) -> float:
        """How much of a sample's error is the planning interval's: sqrt(t / interval) for a
        transfer shorter than the interval, else all of it (see the module docstring)."""
        if self.interval_ms is None or transfer_ms is None or not transfer_ms > 0:  # unknown (NaN too)
            return 1.0
        return min(1.0, math.sqrt(transfer_ms / self.interval_ms))

    def _raw_samples(self) -> np.ndarray:
        """The forecast before recalibration, sorted."""
        if self._raw_cache is None:
            if self._level_log is None:
                raw = np.zeros(0)
            elif len(self._errors_log) < 2:
                raw = np.asarray(self._recent_mbps, dtype=float)
            else:
                errors = np.asarray(self._errors_log, dtype=float)
                raw = np.maximum(np.exp(self._level_log + errors) - LOG_FLOOR_MBPS, 0.0)
            raw.sort()
            raw.setflags(write=False)
            self._raw_cache = raw
        return self._raw_cache

    def samples_mbps(self) -> np.ndarray:
        """Equally likely values of the next interval's throughput, in ascending order (empty
        before any sample); recalibrated when enabled and enough history is kept."""
        if self._samples_cache is None:
            raw = self._raw_samples()
            if self.recalibrate and len(self._pit) >= MIN_CALIBRATION_SAMPLES and raw.shape[0] >= 2:
                grid = (np.arange(raw.shape[0]) + 0.5) / raw.shape[0]
                levels = sorted_quantiles(np.sort(np.asarray(self._pit)), grid)
                calibrated = sorted_quantiles(raw, levels)
                calibrated.setflags(write=False)
                self._samples_cache = calibrated
            else:
                self._samples_cache = raw
        return self._samples_cache

    def pit_values(self) -> np.ndarray:
        """Where each recent sample fell in the forecast made before it (0 = below all of it);
        kept only when recalibrating."""
        return np.asarray(self._pit, dtype=float)

    def quantile_mbps(self, q: float) -> float | None:
        if not 0 <= q <= 1:
            raise ValueError("quantile must be in [0, 1]")
        samples = self.samples_mbps()
        if samples.shape[0] == 0:
            return None
        return float(sorted_quantiles(samples, (q,))[0])

    def estimate_mbps(self) -> float | None:
        if self._median_cache is None:
            self._median_cache = self.quantile_mbps(0.5)
        return self._median_cache

    def forecast(self) -> dict[str, float | None]:
        return {"p10": self.quantile_mbps(0.1), "p50": self.quantile_mbps(0.5), "p90": self.quantile_mbps(0.9)}
