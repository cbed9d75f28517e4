"""Clocks passed into logic so the same code runs in real time and in simulated time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> float: ...


class WallClock:
    """Monotonic real time in milliseconds."""

    def now_ms(self) -> float:
        return time.monotonic() * 1000.0


class SimulatedClock:
    """Time that moves only when told to; used by the replay and by tests."""

    def __init__(self, start_ms: float = 0.0) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> float:
        return self._now_ms

    def advance_to(self, time_ms: float) -> None:
        if time_ms < self._now_ms:
            raise ValueError(f"simulated time cannot go back ({time_ms} < {self._now_ms})")
        self._now_ms = time_ms
