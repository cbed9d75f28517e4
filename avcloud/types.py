"""Domain types shared by every package: cameras, object classes, allocation options.

Detections everywhere are float32 arrays of shape [N, 6]: x1, y1, x2, y2, score, class
(class is an ObjectType value), in pixels of the image they refer to. Ground-truth
boxes are float32 [K, 4] x1, y1, x2, y2 plus an int array of ObjectType values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

DETECTION_COLUMNS = 6


class WaymoCamera(IntEnum):
    """Camera names and numbers as in the Waymo Open Dataset schema."""

    UNKNOWN = 0
    FRONT = 1
    FRONT_LEFT = 2
    FRONT_RIGHT = 3
    SIDE_LEFT = 4
    SIDE_RIGHT = 5


class ObjectType(IntEnum):
    """Object classes as in the Waymo Open Dataset schema (Label.Type)."""

    UNKNOWN = 0
    VEHICLE = 1
    PEDESTRIAN = 2
    SIGN = 3
    CYCLIST = 4


ALL_CAMERAS: tuple[str, ...] = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT")


def empty_detections() -> np.ndarray:
    return np.zeros((0, DETECTION_COLUMNS), dtype=np.float32)


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth 2D boxes of one camera image."""

    boxes_xyxy: np.ndarray  # float32 [K, 4]
    classes: np.ndarray  # int32 [K], ObjectType values

    def __len__(self) -> int:
        return int(self.boxes_xyxy.shape[0])


def critical_bandwidth_mbps(size_mbit: float, runtime_ms: float, rtt_ms: float, slo_ms: float) -> float:
    """Lowest uplink bandwidth at which an option's result is back before the deadline.

    Remote latency = runtime + RTT + size / bandwidth <= SLO, so
    b_c = size / (SLO - runtime - RTT). Zero-size options (the on-car fallback) need no
    bandwidth; an option whose runtime plus RTT already exceeds the SLO can never make it.
    """
    if size_mbit == 0:
        return 0.0
    slack_s = (slo_ms - runtime_ms - rtt_ms) / 1000.0
    if slack_s <= 0:
        return math.inf
    return size_mbit / slack_s


@dataclass(frozen=True)
class Option:
    """One configuration of a perception service: a cloud model x compression, or the fallback."""

    name: str
    size_mbit: float
    runtime_ms: float
    utility: float

    @property
    def is_fallback(self) -> bool:
        return self.size_mbit == 0


@dataclass(frozen=True)
class Service:
    """A perception service (one camera) and its configuration options."""

    name: str
    options: tuple[Option, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class AllocationProblem:
    """One frame's allocation: pick one option per service within the uplink budget."""

    services: tuple[Service, ...]
    budget_mbps: float
    rtt_ms: float
    slo_ms: float


@dataclass
class Allocation:
    """The chosen option per service, with its weighted utility and bandwidth."""

    choices: dict[str, str]
    utility: float
    bandwidth_mbps: dict[str, float]
    solve_us: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def total_bandwidth_mbps(self) -> float:
        return float(sum(self.bandwidth_mbps.values()))
