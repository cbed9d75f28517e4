"""Model runners: what a worker calls to run one batch, and the running estimate of how long
that takes (the scheduler's basis for expiring and batching).

Each `run_batch` call is a pure function of its inputs, so runners can move behind another
serving engine without changing the scheduler.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from typing import Protocol

import numpy as np

from avcloud.clock import Clock, WallClock
from avcloud.types import empty_detections
from cloudside.config import ModelEntry


class ModelRunner(Protocol):
    name: str
    backend_name: str
    # Whether the worker must decode payloads into images before run_batch.
    decodes_images: bool

    def run_batch(self, images: list[np.ndarray],
                  output_sizes_wh: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Detections float32 [N, 6] per image, in pixels of output_sizes_wh (else the image size)."""
        ...

    def warmup(self) -> None: ...

    @property
    def expected_runtime_ms(self) -> float:
        """Current estimate of one single-image run (decode not included)."""
        ...


class RuntimeEstimate:
    """Running estimate of a model's batch runtime and per-image decode time (EWMA, thread-safe).

    Batch sizes never observed are extrapolated linearly from the nearest smaller observed
    size, which over-estimates (batching is sublinear), so the scheduler stays on the safe side.

    Robust: one observation counts for at most `outlier_factor` times the median of the recent
    ones (the last `window` raw observations; before three, the current estimate, at least
    1 ms), so no single pathological batch or decode can move the estimate far. A real, lasting
    slowdown moves the median within half a window, and the estimate follows.

    A too-high estimate would starve itself: every request would be expired unrun and no new
    observation could correct it. So once no batch has run for `stale_after_ms`, both the
    inference and the decode estimate fall back to the best time observed so far, which lets the
    next request run and refresh them.
    """

    def __init__(self, initial_ms_per_image: float, initial_batch_overhead_ms: float = 0.0,
                 smoothing: float = 0.2, stale_after_ms: float = 2000.0, clock: Clock | None = None,
                 outlier_factor: float = 3.0, window: int = 16) -> None:
        self._initial_ms_per_image = initial_ms_per_image
        self._initial_batch_overhead_ms = initial_batch_overhead_ms
        self._smoothing = smoothing
        self._stale_after_ms = stale_after_ms
        self._clock = clock or WallClock()
        self._outlier_factor = outlier_factor
        self._window = window
        self._batch_ms: dict[int, float] = {}
        self._best_batch_ms: dict[int, float] = {}
        self._recent_batch_ms: dict[int, deque[float]] = {}
        self._last_observed_ms = -math.inf
        self._decode_ms_per_image: float | None = None
        self._best_decode_ms_per_image = math.inf
        self._recent_decode_ms: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def _bounded(self, observed_ms: float, recent: deque[float], current_ms: float) -> float:
        """The observation, clipped to outlier_factor x the median of recent ones."""
        reference_ms = statistics.median(recent) if len(recent) >= 3 else current_ms
        recent.append(observed_ms)
        return min(observed_ms, self._outlier_factor * max(reference_ms, 1.0))

    def observe_batch(self, batch_size: int, runtime_ms: float) -> None:
        current_ms = self.inference_ms(batch_size)
        with self._lock:
            recent = self._recent_batch_ms.setdefault(batch_size, deque(maxlen=self._window))
            runtime_ms = self._bounded(runtime_ms, recent, current_ms)
            previous = self._batch_ms.get(batch_size)
            self._batch_ms[batch_size] = runtime_ms if previous is None else (
                previous + self._smoothing * (runtime_ms - previous))
            self._best_batch_ms[batch_size] = min(runtime_ms, self._best_batch_ms.get(batch_size, math.inf))
            self._last_observed_ms = self._clock.now_ms()

    def observe_decode(self, decode_ms_per_image: float) -> None:
        current_ms = self._decode_ms_per_image if self._decode_ms_per_image is not None else self.inference_ms(1)
        with self._lock:
            decode_ms_per_image = self._bounded(decode_ms_per_image, self._recent_decode_ms, current_ms)
            previous = self._decode_ms_per_image
            self._decode_ms_per_image = decode_ms_per_image if previous is None else (
                previous + self._smoothing * (decode_ms_per_image - previous))
            self._best_decode_ms_per_image = min(self._best_decode_ms_per_image, decode_ms_per_image)

    def _stale(self) -> bool:
        return self._clock.now_ms() - self._last_observed_ms > self._stale_after_ms

    def inference_ms(self, batch_size: int = 1) -> float:
        with self._lock:
            observed = self._best_batch_ms if self._stale() else self._batch_ms
            if batch_size in observed:
                return observed[batch_size]
            smaller = [size for size in observed if size < batch_size]
            if smaller:
                nearest = max(smaller)
                return observed[nearest] * batch_size / nearest
            larger = [size for size in observed if size > batch_size]
            if larger:
                nearest = min(larger)
                return observed[nearest] * batch_size / nearest
            return self._initial_batch_overhead_ms + self._initial_ms_per_image * batch_size

    def decode_ms(self, batch_size: int = 1) -> float:
        with self._lock:
            if self._decode_ms_per_image is None:
                return 0.0
            per_image = self._best_decode_ms_per_image if self._stale() else self._decode_ms_per_image
            return per_image * batch_size

    def expected_ms(self, batch_size: int = 1) -> float:
        """Decode plus inference time of a batch of this size."""
        return self.decode_ms(batch_size) + self.inference_ms(batch_size)


class SimulatedRunner:
    """Emulated GPU: a batch takes batch_overhead_ms + runtime_ms_per_image * size of wall time
    (sleeping, so it uses no CPU) and finds nothing. Runtimes come from a profile."""

    backend_name = "simulated"

    def __init__(self, name: str, runtime_ms_per_image: float, batch_overhead_ms: float = 0.0,
                 decodes_images: bool = True) -> None:
        self.name = name
        self.runtime_ms_per_image = runtime_ms_per_image
        self.batch_overhead_ms = batch_overhead_ms
        self.decodes_images = decodes_images

    def run_batch(self, images: list[np.ndarray],
                  output_sizes_wh: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
        if images:
            time.sleep((self.batch_overhead_ms + self.runtime_ms_per_image * len(images)) / 1000.0)
        return [empty_detections() for _ in images]

    def warmup(self) -> None:
        pass

    @property
    def expected_runtime_ms(self) -> float:
        return self.batch_overhead_ms + self.runtime_ms_per_image


class DetectorRunner:
    """A zoo or registered model (avcloud.models.Detector) on a real inference backend."""

    decodes_images = True

    def __init__(self, name: str, backend: str = "auto", num_threads: int | None = None,
                 warmup_iterations: int = 2) -> None:
        from avcloud.models import Detector  # heavy (onnxruntime); only when a real model is served

        self.name = name
        self.detector = Detector.load(name, backend=backend, num_threads=num_threads)
        self.backend_name = self.detector.backend_name
        self.warmup_iterations = warmup_iterations
        self._single_image_ms = float("nan")

    def run_batch(self, images: list[np.ndarray],
                  output_sizes_wh: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
        return self.detector.detect_batch(images, output_sizes_wh)

    def warmup(self) -> None:
        if self.warmup_iterations == 0:
            return
        self.detector.warmup(self.warmup_iterations)
        blank = np.zeros((self.detector.card.input_height, self.detector.card.input_width, 3), np.uint8)
        started = time.perf_counter()
        self.detector.detect(blank)
        self._single_image_ms = (time.perf_counter() - started) * 1000.0

    @property
    def expected_runtime_ms(self) -> float:
        # Before warm-up nothing is known; 0 never expires a request on a guess.
        return 0.0 if self._single_image_ms != self._single_image_ms else self._single_image_ms


def build_runner(entry: ModelEntry, warmup_iterations: int = 2) -> ModelRunner:
    """The runner a config entry asks for: emulated if simulated_runtime_ms is set, else real."""
    if entry.simulated:
        return SimulatedRunner(entry.name, float(entry.simulated_runtime_ms or 0.0),
                               entry.simulated_batch_overhead_ms, decodes_images=entry.simulated_decode)
    return DetectorRunner(entry.name, entry.backend, entry.num_threads, warmup_iterations)
