"""Synthetic driving scenes in the exact Waymo v1 format, for the demo and the tests.

No Waymo data can be downloaded here, so the embedded default scene is rendered: a straight
urban road seen from the five Waymo cameras of a car driving along it at 10 Hz. The world
(road, buildings, traffic, pedestrians, cyclists, signs) is a pure function of the seed and
every object moves along it consistently over time, so consecutive frames form a segment.
Objects are drawn as projected 3D geometry (perspective is exact), at distances from a few
metres to several hundred, so many of them are only a few pixels tall: the regime where
resolution and compression decide whether a detector finds them. Labels are the projected
extent of what was drawn, clipped to the image; objects smaller than MIN_BOX_PX, or with less
than MIN_VISIBLE_FRACTION of their pixels left uncovered by nearer objects, are not labelled.

World frame: x forward along the road, y to the left, z up, metres. The car drives on the
right-hand side in the +x direction.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from avcloud.errors import UserError
from avcloud.paths import cache_dir
from avcloud.types import ALL_CAMERAS, GroundTruth, ObjectType

FRAME_RATE_HZ = 10.0
DEFAULT_FRAMES = 200
DEFAULT_SEED = 0
# The world is laid out for this long a drive (2 minutes), so any frame of a segment sees the same world.
MAX_FRAMES = 1200
MIN_BOX_PX = 4.0
# Waymo camera resolutions (width, height) and a focal length close to the real intrinsics.
CAMERA_SIZES: dict[str, tuple[int, int]] = {
    "FRONT": (1920, 1280),
    "FRONT_LEFT": (1920, 1280),
    "FRONT_RIGHT": (1920, 1280),
    "SIDE_LEFT": (1920, 886),
    "SIDE_RIGHT": (1920, 886),
}
FOCAL_PX = 2060.0
CAMERA_YAW_RAD: dict[str, float] = {
    "FRONT": 0.0,
    "FRONT_LEFT": math.radians(45.0),
    "FRONT_RIGHT": math.radians(-45.0),
    "SIDE_LEFT": math.radians(90.0),
    "SIDE_RIGHT": math.radians(-90.0),
}
CAMERA_HEIGHT_M = 2.1
NEAR_M = 1.0
MAX_RANGE_M = 420.0
LANE_WIDTH_M = 3.6
_SCENE_NAME_PREFIX = "avcloud-synthetic"


# ----------------------------------------------------------------------------- world


@dataclass(eq=False)  # identity-hashed: per-world tables are cached by object
class World:
    """Everything in a synthetic segment: layout, lighting, and per-object parameter dicts."""

    seed: int
    ego_y_m: float
    ego_speed_mps: float
    ego_speed_amplitude_mps: float
    ego_speed_omega: float
    ego_speed_phase: float
    road_half_m: float  # kerb to centre line: traffic lanes, median half, parking lane
    traffic_half_m: float  # centre line to the outer edge of the traffic lanes
    parking_m: float  # width of the parking lane along each kerb (0: no parking)
    sidewalk_m: float
    lanes_per_direction: int
    # Lighting: a global gain on every colour, a haze colour and visibility distance.
    gain: float
    gain_flicker: float
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    ground_colour: np.ndarray
    road_colour: np.ndarray
    sidewalk_colour: np.ndarray
    haze_colour: np.ndarray
    visibility_m: float
    sun_direction: np.ndarray
    noise_sigma: float
    crosswalks_x: np.ndarray
    buildings: list[dict] = field(default_factory=list)
    vehicles: list[dict] = field(default_factory=list)
    pedestrians: list[dict] = field(default_factory=list)
    cyclists: list[dict] = field(default_factory=list)
    signs: list[dict] = field(default_factory=list)
    trees: list[dict] = field(default_factory=list)

    def ego_x_m(self, time_s: float) -> float:
        # Integral of speed = mean + amplitude * sin(omega t + phase).
        return self.ego_speed_mps * time_s - self.ego_speed_amplitude_mps / self.ego_speed_omega * (
            math.cos(self.ego_speed_omega * time_s + self.ego_speed_phase) - math.cos(self.ego_speed_phase)
        )


_VEHICLE_KINDS = (
    # name, length, width, height, weight
    ("car", (4.2, 4.8), (1.75, 1.9), (1.4, 1.55), 0.45),
    ("suv", (4.6, 5.1), (1.9, 2.05), (1.7, 1.9), 0.25),
    ("van", (5.0, 6.0), (1.95, 2.1), (2.1, 2.6), 0.12),
    ("truck", (7.0, 11.0), (2.4, 2.55), (3.0, 3.8), 0.1),
    ("bus", (11.0, 13.0), (2.5, 2.6), (3.0, 3.3), 0.08),
)
_BODY_COLOURS_BGR = np.array(
    [
        (235, 235, 235), (30, 30, 30), (150, 150, 150), (190, 190, 195), (40, 40, 170),
        (150, 80, 30), (60, 110, 40), (30, 170, 230), (20, 60, 120), (120, 120, 60),
        (90, 40, 100), (200, 190, 160), (70, 70, 80), (25, 25, 120), (160, 120, 80),
    ],
    dtype=np.float64,
)
_CLOTHES_BGR = np.array(
    [
        (40, 40, 40), (200, 200, 200), (150, 60, 20), (30, 30, 160), (50, 120, 50), (30, 140, 200),
        (120, 60, 120), (90, 90, 90), (20, 50, 90), (180, 150, 110), (60, 40, 30), (10, 200, 230),
    ],
    dtype=np.float64,
)
_SKIN_BGR = np.array([(150, 180, 225), (110, 140, 190), (70, 95, 140), (45, 65, 100), (130, 165, 210)], dtype=np.float64)
_BUILDING_BGR = np.array(
    [
        (170, 180, 190), (120, 130, 150), (90, 100, 140), (150, 150, 150), (110, 120, 110),
        (180, 170, 150), (70, 80, 110), (200, 200, 195), (100, 90, 80), (140, 160, 190),
    ],
    dtype=np.float64,
)
_SIGN_KINDS = ("stop", "yield", "speed", "info", "street", "warning")


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 12.0) -> np.ndarray:
    colour = palette[rng.integers(len(palette))] + rng.normal(0.0, jitter, 3)
    return np.clip(colour, 0, 255)


@functools.lru_cache(maxsize=8)
def build_world(seed: int, duration_s: float = MAX_FRAMES / FRAME_RATE_HZ) -> World:
    """The world of segment `seed`; the same seed always gives the same world."""
    rng = np.random.default_rng([seed, 0xA5C10D])
    lanes = int(rng.integers(1, 4))
    median_m = float(rng.choice([0.0, 0.0, 1.0, 2.5]))
    traffic_half_m = lanes * LANE_WIDTH_M + median_m / 2
    sidewalk_m = float(rng.uniform(2.5, 5.0))
    parking_m = 2.5 if rng.random() < 0.75 else 0.0
    road_half_m = traffic_half_m + parking_m
    ego_lane = int(rng.integers(0, lanes))
    ego_y_m = -(median_m / 2 + (ego_lane + 0.5) * LANE_WIDTH_M)
    ego_speed_mps = float(rng.uniform(5.0, 13.0))
    amplitude = float(rng.uniform(0.0, min(3.0, ego_speed_mps * 0.4)))
    omega = float(rng.uniform(0.2, 0.6))

    # Lighting: bright day, overcast, low sun, dusk.
    mood = int(rng.integers(0, 4))
    gain = [1.0, 0.85, 0.95, 0.6][mood] * float(rng.uniform(0.9, 1.1))
    sky_top = np.array([[225, 140, 70], [175, 165, 160], [215, 160, 110], [120, 70, 60]][mood], float)
    sky_horizon = np.array([[245, 215, 185], [205, 200, 195], [170, 200, 235], [130, 130, 190]][mood], float)
    sky_top += rng.normal(0, 8, 3)
    sky_horizon += rng.normal(0, 8, 3)
    haze_colour = sky_horizon * 0.9
    visibility_m = float(rng.uniform(600.0, 2500.0)) * (0.5 if mood == 1 else 1.0)
    sun_azimuth = rng.uniform(0, 2 * math.pi)
    sun_elevation = rng.uniform(0.2, 1.1)
    sun_direction = np.array(
        [math.cos(sun_azimuth) * math.cos(sun_elevation), math.sin(sun_azimuth) * math.cos(sun_elevation),
         math.sin(sun_elevation)]
    )
    road_grey = rng.uniform(70, 110)
    world = World(
        seed=seed,
        ego_y_m=ego_y_m,
        ego_speed_mps=ego_speed_mps,
        ego_speed_amplitude_mps=amplitude,
        ego_speed_omega=omega,
        ego_speed_phase=float(rng.uniform(0, 2 * math.pi)),
        road_half_m=road_half_m,
        traffic_half_m=traffic_half_m,
        parking_m=parking_m,
        sidewalk_m=sidewalk_m,
        lanes_per_direction=lanes,
        gain=gain,
        gain_flicker=float(rng.uniform(0.0, 0.08)),
        sky_top=np.clip(sky_top, 0, 255),
        sky_horizon=np.clip(sky_horizon, 0, 255),
        ground_colour=np.clip(np.array([60, 110, 90], float) + rng.normal(0, 20, 3), 0, 255),
        road_colour=np.clip(np.array([road_grey, road_grey, road_grey + 4]) + rng.normal(0, 4, 3), 0, 255),
        sidewalk_colour=np.clip(np.array([165, 170, 175], float) + rng.normal(0, 12, 3), 0, 255),
        haze_colour=haze_colour,
        visibility_m=visibility_m,
        sun_direction=sun_direction,
        noise_sigma=float(rng.uniform(3.5, 6.5)),
        crosswalks_x=np.sort(rng.uniform(-50, 900, int(rng.integers(1, 5)))),
    )
    x_min = -150.0
    x_max = world.ego_x_m(duration_s) + MAX_RANGE_M + 100
    _place_buildings(world, rng, x_min, x_max)
    _place_vehicles(world, rng, x_min, x_max, duration_s, median_m, ego_lane)
    _place_people(world, rng, x_min, x_max)
    _place_signs(world, rng, x_min, x_max)
    return world


def _place_buildings(world: World, rng: np.random.Generator, x_min: float, x_max: float) -> None:
    density = rng.uniform(0.5, 1.0)
    for side in (1.0, -1.0):
        x = x_min + rng.uniform(0, 10)
        while x < x_max:
            length = float(rng.uniform(8, 35))
            if rng.random() < density:
                floors = int(rng.integers(2, 13)) if rng.random() < 0.8 else int(rng.integers(2, 4))
                world.buildings.append(
                    {
                        "x0": x,
                        "x1": x + length,
                        "y": side * (world.road_half_m + world.sidewalk_m + rng.uniform(0.0, 6.0)),
                        "side": side,
                        "depth": float(rng.uniform(10, 25)),
                        "height": floors * float(rng.uniform(3.0, 3.6)),
                        "floors": floors,
                        "colour": _pick(rng, _BUILDING_BGR, 15),
                        "window_colour": np.clip(
                            np.array([90, 70, 50], float) + rng.normal(0, 25, 3), 0, 255
                        ),
                        "window_columns": max(1, int(length / rng.uniform(2.2, 4.0))),
                        "window_fill": float(rng.uniform(0.35, 0.7)),
                    }
                )
            x += length + float(rng.uniform(0, 12))
        # Rows further back fill the horizon of the side cameras.
        for row in range(2):
            x = x_min - 300 + rng.uniform(0, 40)
            while x < x_max + 300:
                length = float(rng.uniform(20, 70))
                if rng.random() < 0.7:
                    floors = int(rng.integers(3, 25))
                    world.buildings.append(
                        {
                            "x0": x,
                            "x1": x + length,
                            "y": side * (world.road_half_m + world.sidewalk_m + 35 + row * 60 + rng.uniform(0, 25)),
                            "side": side,
                            "depth": float(rng.uniform(15, 40)),
                            "height": floors * 3.3,
                            "floors": floors,
                            "colour": _pick(rng, _BUILDING_BGR, 20),
                            "window_colour": np.array([90.0, 70.0, 50.0]),
                            "window_columns": max(1, int(length / 3.0)),
                            "window_fill": 0.5,
                        }
                    )
                x += length + float(rng.uniform(0, 30))
    # Street trees between the kerb and the buildings: unlabelled clutter.
    tree_spacing_m = rng.uniform(8, 40)
    for side in (1.0, -1.0):
        x = x_min + rng.uniform(0, tree_spacing_m)
        while x < x_max:
            if rng.random() < 0.8:
                world.trees.append(
                    {
                        "x": x,
                        "y": side * (world.road_half_m + world.sidewalk_m - rng.uniform(0.3, 1.0)),
                        "height": float(rng.uniform(4, 9)),
                        "crown": np.clip(np.array([50, 110, 60], float) + rng.normal(0, 18, 3), 0, 255),
                        "crown_ratio": float(rng.uniform(0.3, 0.45)),
                    }
                )
            x += tree_spacing_m * float(rng.uniform(0.7, 1.3))


def _vehicle_params(rng: np.random.Generator) -> dict:
    weights = np.array([k[4] for k in _VEHICLE_KINDS])
    kind = _VEHICLE_KINDS[int(rng.choice(len(_VEHICLE_KINDS), p=weights / weights.sum()))]
    name, length, width, height, _ = kind
    colour = _pick(rng, _BODY_COLOURS_BGR, 10)
    if name == "bus" and rng.random() < 0.5:
        colour = np.array([30, 180, 230], float)
    return {
        "kind": name,
        "length": float(rng.uniform(*length)),
        "width": float(rng.uniform(*width)),
        "height": float(rng.uniform(*height)),
        "colour": colour,
        "glass": np.clip(np.array([70, 55, 45], float) + rng.normal(0, 12, 3), 0, 255),
    }


def _place_vehicles(
    world: World, rng: np.random.Generator, x_min: float, x_max: float, duration_s: float, median_m: float,
    ego_lane: int,
) -> None:
    traffic_density = rng.uniform(0.4, 1.0)  # fraction of a lane's slots occupied
    # The ego's speed oscillates, so it drifts by up to this much relative to its lane's traffic.
    ego_wander_m = 2 * world.ego_speed_amplitude_mps / world.ego_speed_omega
    for direction in (1.0, -1.0):
        for lane in range(world.lanes_per_direction):
            y = -direction * (median_m / 2 + (lane + 0.5) * LANE_WIDTH_M)
            is_ego_lane = direction > 0 and lane == ego_lane
            if is_ego_lane:
                speed = world.ego_speed_mps
            elif direction > 0:
                speed = max(0.0, world.ego_speed_mps + rng.uniform(-4, 5))
            else:
                speed = -rng.uniform(6, 15)
            # Oncoming traffic sweeps through the whole stretch: place it further out.
            span_min = x_min - (abs(speed) * duration_s if direction < 0 else 0)
            span_max = x_max + (abs(speed) * duration_s if direction < 0 else 0)
            x = span_min + rng.uniform(0, 20)
            while x < span_max:
                params = _vehicle_params(rng)
                gap = params["length"] + rng.uniform(6, 40) / traffic_density
                # Keep the ego's own lane clear around the ego (its speed wanders by a few metres).
                clear = is_ego_lane and -25.0 - ego_wander_m < x < 20.0 + ego_wander_m
                if not clear and rng.random() < traffic_density:
                    params.update({"x0": x, "y": y + rng.uniform(-0.3, 0.3), "speed": speed, "heading": direction})
                    world.vehicles.append(params)
                x += gap
    # Parked cars in the parking lanes along the kerbs.
    if world.parking_m > 0:
        for side in (1.0, -1.0):
            x = x_min + rng.uniform(0, 10)
            occupancy = rng.uniform(0.4, 0.9)
            while x < x_max:
                params = _vehicle_params(rng)
                if params["kind"] in ("car", "suv", "van") and rng.random() < occupancy:
                    y = side * (world.traffic_half_m + world.parking_m / 2 + rng.uniform(-0.15, 0.15))
                    params.update({"x0": x, "y": y, "speed": 0.0, "heading": -side if rng.random() < 0.8 else side})
                    world.vehicles.append(params)
                x += params["length"] + rng.uniform(1.0, 12.0)


def _place_people(world: World, rng: np.random.Generator, x_min: float, x_max: float) -> None:
    people_per_100m = rng.uniform(5, 24)
    count = int((x_max - x_min) / 100 * people_per_100m)
    for _ in range(count):
        side = 1.0 if rng.random() < 0.5 else -1.0
        walking = rng.random() < 0.75
        world.pedestrians.append(
            {
                "x0": float(rng.uniform(x_min, x_max)),
                "y": side * (world.road_half_m + rng.uniform(0.4, world.sidewalk_m - 0.3)),
                "speed": float(rng.choice([-1, 1]) * rng.uniform(0.8, 1.7)) if walking else 0.0,
                "height": float(rng.uniform(1.05, 1.95) if rng.random() < 0.1 else rng.uniform(1.5, 1.95)),
                "shirt": _pick(rng, _CLOTHES_BGR),
                "pants": _pick(rng, _CLOTHES_BGR),
                "skin": _pick(rng, _SKIN_BGR, 6),
                "hair": np.clip(np.array([30, 35, 45], float) + rng.normal(0, 20, 3), 0, 255),
                "phase": float(rng.uniform(0, 2 * math.pi)),
                "bulk": float(rng.uniform(0.85, 1.25)),
            }
        )
    # People crossing at the crosswalks.
    for crossing_x in world.crosswalks_x:
        for _ in range(int(rng.integers(0, 4))):
            world.pedestrians.append(
                {
                    "x0": float(crossing_x + rng.uniform(-1.5, 1.5)),
                    "y": float(rng.uniform(-world.road_half_m, world.road_half_m)),
                    "speed": 0.0,
                    "cross_speed": float(rng.choice([-1, 1]) * rng.uniform(0.9, 1.5)),
                    "height": float(rng.uniform(1.5, 1.9)),
                    "shirt": _pick(rng, _CLOTHES_BGR),
                    "pants": _pick(rng, _CLOTHES_BGR),
                    "skin": _pick(rng, _SKIN_BGR, 6),
                    "hair": np.clip(np.array([30, 35, 45], float) + rng.normal(0, 20, 3), 0, 255),
                    "phase": float(rng.uniform(0, 2 * math.pi)),
                    "bulk": float(rng.uniform(0.85, 1.25)),
                }
            )
    cyclists_per_100m = rng.uniform(0.3, 2.5)
    for _ in range(int((x_max - x_min) / 100 * cyclists_per_100m)):
        direction = 1.0 if rng.random() < 0.6 else -1.0
        edge = world.traffic_half_m - 0.7
        y = -direction * edge if rng.random() < 0.8 else -direction * (world.road_half_m + 1.0)
        world.cyclists.append(
            {
                "x0": float(rng.uniform(x_min, x_max)),
                "y": y,
                "speed": direction * float(rng.uniform(3.0, 7.0)),
                "frame_colour": _pick(rng, _BODY_COLOURS_BGR, 20),
                "shirt": _pick(rng, _CLOTHES_BGR),
                "pants": _pick(rng, _CLOTHES_BGR),
                "skin": _pick(rng, _SKIN_BGR, 6),
                "helmet": _pick(rng, _CLOTHES_BGR),
                "height": float(rng.uniform(1.6, 1.85)),
                "phase": float(rng.uniform(0, 2 * math.pi)),
            }
        )


def _place_signs(world: World, rng: np.random.Generator, x_min: float, x_max: float) -> None:
    for side in (1.0, -1.0):
        x = x_min + rng.uniform(0, 30)
        while x < x_max:
            kind = _SIGN_KINDS[int(rng.integers(len(_SIGN_KINDS)))]
            # Right-side signs face oncoming ego traffic (-x), left-side ones the other way,
            # some are turned towards the road.
            facing = rng.random()
            if facing < 0.7:
                normal = (-1.0, 0.0) if side < 0 else (1.0, 0.0)
            elif facing < 0.85:
                normal = (-1.0, 0.0)
            else:
                normal = (0.0, -side)
            size = float(rng.uniform(0.6, 0.95)) * (1.6 if kind == "street" else 1.0)
            world.signs.append(
                {
                    "x": x,
                    "y": side * (world.road_half_m + rng.uniform(0.3, 0.8)),
                    "normal": np.array([normal[0], normal[1], 0.0]),
                    "kind": kind,
                    "size": size,
                    "mount_m": float(rng.uniform(1.9, 2.6)),
                }
            )
            x += float(rng.uniform(15, 70))


# ----------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class PinholeCamera:
    width: int
    height: int
    position: np.ndarray  # world metres
    yaw_rad: float
    focal_px: float
    cx: float
    cy: float

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points [..., 3] -> camera coordinates [..., 3] (right, down, forward)."""
        delta = points - self.position
        cos_yaw, sin_yaw = math.cos(self.yaw_rad), math.sin(self.yaw_rad)
        right = delta[..., 0] * sin_yaw - delta[..., 1] * cos_yaw
        forward = delta[..., 0] * cos_yaw + delta[..., 1] * sin_yaw
        return np.stack([right, -delta[..., 2], forward], axis=-1)

    def project(self, camera_points: np.ndarray) -> np.ndarray:
        depth = camera_points[..., 2]
        u = self.cx + self.focal_px * camera_points[..., 0] / depth
        v = self.cy + self.focal_px * camera_points[..., 1] / depth
        return np.stack([u, v], axis=-1)


def _clip_near(camera_points: np.ndarray) -> np.ndarray:
    """Clip a convex polygon (camera coordinates) to depth >= NEAR_M (Sutherland-Hodgman)."""
    depth = camera_points[:, 2]
    if np.all(depth >= NEAR_M):
        return camera_points
    if np.all(depth < NEAR_M):
        return camera_points[:0]
    clipped = []
    count = len(camera_points)
    for i in range(count):
        current, following = camera_points[i], camera_points[(i + 1) % count]
        current_in, following_in = current[2] >= NEAR_M, following[2] >= NEAR_M
        if current_in:
            clipped.append(current)
        if current_in != following_in:
            fraction = (NEAR_M - current[2]) / (following[2] - current[2])
            clipped.append(current + fraction * (following - current))
    return np.array(clipped)


# ----------------------------------------------------------------------------- drawing


class _Canvas:
    """An image plus the camera, lighting and haze that every colour goes through."""

    def __init__(self, world: World, camera: PinholeCamera, gain: float) -> None:
        self.world = world
        self.camera = camera
        self.gain = gain
        self.image = np.empty((camera.height, camera.width, 3), dtype=np.uint8)
        self._haze = tuple(float(c) for c in world.haze_colour)
        # Which object owns each pixel, at half resolution: labels keep only objects left visible.
        # Drawing calls use 1/4-pixel fixed point (shift 2); shift 3 on the same numbers halves them.
        self.owner = np.zeros(((camera.height + 1) // 2, (camera.width + 1) // 2), dtype=np.uint16)
        self.object_id = 0
        self.tracking = False

    def colour(self, bgr: np.ndarray, distance_m: float, shade: float = 1.0) -> tuple[float, float, float]:
        # Called thousands of times per image: plain floats, no numpy temporaries.
        haze = 1.0 - math.exp(-distance_m / self.world.visibility_m)
        lit = shade * self.gain * (1.0 - haze)
        fog = self.gain * haze
        b, g, r = bgr
        hb, hg, hr = self._haze
        return (min(255.0, max(0.0, b * lit + hb * fog)), min(255.0, max(0.0, g * lit + hg * fog)),
                min(255.0, max(0.0, r * lit + hr * fog)))

    def shade(self, normal: np.ndarray) -> float:
        return 0.72 + 0.38 * max(0.0, float(np.dot(normal, self.world.sun_direction)))

    def fill_world_polygon(self, world_points: np.ndarray, colour, antialias: bool = True) -> np.ndarray | None:
        """Clip, project and fill a convex world polygon; returns its pixel vertices or None."""
        camera_points = _clip_near(self.camera.to_camera(world_points))
        if len(camera_points) < 3:
            return None
        pixels = self.camera.project(camera_points)
        self.fill_pixels(pixels, colour, antialias)
        return pixels

    def fill_pixels(self, pixels: np.ndarray, colour, antialias: bool = True) -> None:
        fixed = np.round(np.clip(pixels, -4e6, 4e6) * 4).astype(np.int32)
        cv2.fillPoly(self.image, [fixed], colour, lineType=cv2.LINE_AA if antialias else cv2.LINE_8, shift=2)
        if self.tracking:
            cv2.fillPoly(self.owner, [fixed], self.object_id, lineType=cv2.LINE_8, shift=3)

    def circle(self, center: tuple[float, float], radius: float, colour) -> None:
        """A filled disc (pixel units)."""
        center_fixed = (round(center[0] * 4), round(center[1] * 4))
        radius_fixed = max(1, round(radius * 4))
        cv2.circle(self.image, center_fixed, radius_fixed, colour, -1, cv2.LINE_AA, 2)
        if self.tracking:
            cv2.circle(self.owner, center_fixed, radius_fixed, self.object_id, -1, cv2.LINE_8, 3)

    def ellipse(self, center: tuple[float, float], axes: tuple[float, float], start_deg: float, end_deg: float,
                colour, thickness_px: int = -1) -> None:
        """An ellipse arc, filled (thickness -1) or stroked (pixel units)."""
        center_fixed = (round(center[0] * 4), round(center[1] * 4))
        axes_fixed = (max(1, round(axes[0] * 4)), max(1, round(axes[1] * 4)))
        cv2.ellipse(self.image, center_fixed, axes_fixed, 0, start_deg, end_deg, colour, thickness_px, cv2.LINE_AA, 2)
        if self.tracking:
            owner_thickness = thickness_px if thickness_px < 0 else max(1, round(thickness_px / 2))
            cv2.ellipse(self.owner, center_fixed, axes_fixed, 0, start_deg, end_deg, self.object_id, owner_thickness,
                        cv2.LINE_8, 3)

    def polyline(self, points: np.ndarray, colour, thickness_px: int) -> None:
        """A closed stroked polygon (pixel units)."""
        fixed = np.round(points * 4).astype(np.int32)
        cv2.polylines(self.image, [fixed], True, colour, thickness_px, cv2.LINE_AA, 2)
        if self.tracking:
            cv2.polylines(self.owner, [fixed], True, self.object_id, max(1, round(thickness_px / 2)), cv2.LINE_8, 3)

    def fill_world_quads(self, quads: np.ndarray, colours: Sequence) -> None:
        """Many small quads [N, 4, 3] at once; quads reaching behind the near plane are skipped."""
        if len(quads) == 0:
            return
        camera_points = self.camera.to_camera(quads)
        keep = np.all(camera_points[..., 2] >= NEAR_M, axis=1)
        if not np.any(keep):
            return
        pixels = self.camera.project(camera_points[keep])
        fixed = np.round(np.clip(pixels, -4e6, 4e6) * 4).astype(np.int32)
        if isinstance(colours, tuple):
            cv2.fillPoly(self.image, list(fixed), colours, lineType=cv2.LINE_AA, shift=2)
            return
        for polygon, colour in zip(fixed, [c for c, k in zip(colours, keep, strict=True) if k], strict=True):
            cv2.fillPoly(self.image, [polygon], colour, lineType=cv2.LINE_AA, shift=2)


def _face_points(corners: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear points on a world quad (corners p00, p10, p11, p01) at face coordinates uv [..., 2]."""
    u = uv[..., 0:1]
    v = uv[..., 1:2]
    p00, p10, p11, p01 = corners
    return (1 - u) * (1 - v) * p00 + u * (1 - v) * p10 + u * v * p11 + (1 - u) * v * p01


def _box_faces(center: np.ndarray, length: float, width: float, z0: float, z1: float, heading: float):
    """The four vertical faces of an axis-aligned (heading +-x) box: name -> (corners, outward normal).

    Corners are ordered bottom-left, bottom-right, top-right, top-left as seen from outside.
    """
    hx, hy = length / 2, width / 2
    x, y = center[0], center[1]
    front_x = x + heading * hx
    rear_x = x - heading * hx

    def quad(a, b):
        return np.array([[a[0], a[1], z0], [b[0], b[1], z0], [b[0], b[1], z1], [a[0], a[1], z1]])

    left_y = y + heading * hy  # the vehicle's own left
    right_y = y - heading * hy
    return {
        "front": (quad((front_x, right_y), (front_x, left_y)), np.array([heading, 0.0, 0.0])),
        "rear": (quad((rear_x, left_y), (rear_x, right_y)), np.array([-heading, 0.0, 0.0])),
        "left": (quad((front_x, left_y), (rear_x, left_y)), np.array([0.0, heading, 0.0])),
        "right": (quad((rear_x, right_y), (front_x, right_y)), np.array([0.0, -heading, 0.0])),
    }


def _visible(normal: np.ndarray, face_center: np.ndarray, camera: PinholeCamera) -> bool:
    return float(np.dot(normal, camera.position - face_center)) > 0


def _bbox(points: list[np.ndarray]) -> np.ndarray | None:
    if not points:
        return None
    stacked = np.concatenate(points, axis=0)
    return np.array([stacked[:, 0].min(), stacked[:, 1].min(), stacked[:, 0].max(), stacked[:, 1].max()])


def _draw_ground(canvas: _Canvas, ego_x: float) -> None:
    world, camera, image = canvas.world, canvas.camera, canvas.image
    horizon = int(np.clip(round(camera.cy), 0, camera.height))
    rows = np.linspace(0.0, 1.0, max(horizon, 1))[:, None]
    sky = (world.sky_top * (1 - rows) + world.sky_horizon * rows) * canvas.gain
    image[:horizon] = np.clip(sky, 0, 255).astype(np.uint8)[:, None, :]
    image[horizon:] = canvas.colour(world.ground_colour, 400.0)
    far, near = ego_x + 1500.0, ego_x - 1500.0
    half, walk = world.road_half_m, world.sidewalk_m
    for y0, y1, colour in (
        (half, half + walk + 8, world.sidewalk_colour),
        (-half - walk - 8, -half, world.sidewalk_colour),
        (-half, half, world.road_colour),
    ):
        quad = np.array([[near, y0, 0], [far, y0, 0], [far, y1, 0], [near, y1, 0]], dtype=float)
        canvas.fill_world_polygon(quad, canvas.colour(colour, 60.0), antialias=False)
    # Lane markings: dashed between lanes, solid at the edges and the centre; only nearby.
    median_half = world.traffic_half_m - world.lanes_per_direction * LANE_WIDTH_M
    start = math.floor((ego_x - 40) / 12.0) * 12.0
    dash_lines = [sign * (median_half + i * LANE_WIDTH_M)
                  for i in range(1, world.lanes_per_direction) for sign in (1.0, -1.0)]
    edge = world.traffic_half_m
    solid_lines = [edge - 0.1, -edge + 0.1, median_half + 0.1, -median_half - 0.1, half - 0.1, -half + 0.1]
    paint = canvas.colour(np.array([225.0, 230.0, 235.0]), 40.0, 0.95)
    marks = [
        _ground_quads(np.arange(start, ego_x + 260, 12.0), 3.5, dash_lines, 0.16),
        _ground_quads(np.arange(start, ego_x + 400, 6.0), 6.0, solid_lines, 0.16),
    ]
    crossings = [x for x in world.crosswalks_x if ego_x - 40 < x < ego_x + 300]
    if crossings:
        # Zebra stripes run along the road, 0.5 m wide every metre across it.
        stripe_y = np.arange(-half + 0.4, half - 0.4, 1.0) + 0.25
        marks.append(_ground_quads(np.array(crossings) - 2.0, 4.0, stripe_y.tolist(), 0.5))
    canvas.fill_world_quads(np.concatenate(marks), paint)


def _ground_quads(starts_x: np.ndarray, length_m: float, centres_y: Sequence[float], width_m: float) -> np.ndarray:
    """Flat painted quads [N, 4, 3] on the road: every start x along each line centred at y."""
    x0, y = np.meshgrid(np.asarray(starts_x, dtype=float), np.asarray(centres_y, dtype=float), indexing="ij")
    x0, y = x0.ravel(), y.ravel()
    x1 = x0 + length_m
    low, high = y - width_m / 2, y + width_m / 2
    z = np.full_like(x0, 0.01)
    return np.stack([np.stack([x0, low, z], -1), np.stack([x1, low, z], -1), np.stack([x1, high, z], -1),
                     np.stack([x0, high, z], -1)], axis=1)


def _draw_building(canvas: _Canvas, building: dict, distance_m: float) -> None:
    camera = canvas.camera
    side = building["side"]
    y_front = building["y"]
    y_back = y_front + side * building["depth"]
    x0, x1, height = building["x0"], building["x1"], building["height"]
    faces = [
        # facade faces the road; its outward normal points to -side.
        (np.array([[x0, y_front, 0], [x1, y_front, 0], [x1, y_front, height], [x0, y_front, height]], float),
         np.array([0.0, -side, 0.0]), True),
        (np.array([[x0, y_back, 0], [x0, y_front, 0], [x0, y_front, height], [x0, y_back, height]], float),
         np.array([-1.0, 0.0, 0.0]), False),
        (np.array([[x1, y_front, 0], [x1, y_back, 0], [x1, y_back, height], [x1, y_front, height]], float),
         np.array([1.0, 0.0, 0.0]), False),
    ]
    for corners, normal, is_facade in faces:
        if not _visible(normal, corners.mean(axis=0), camera):
            continue
        colour = canvas.colour(building["colour"], distance_m, canvas.shade(normal))
        if canvas.fill_world_polygon(corners, colour, antialias=False) is None:
            continue
        if not is_facade or distance_m > 260:
            continue
        columns, floors = building["window_columns"], building["floors"]
        u0 = (np.arange(columns) + 0.5 - building["window_fill"] / 2) / columns
        u1 = u0 + building["window_fill"] / columns
        v0 = (np.arange(floors) + 0.3) / floors
        v1 = v0 + 0.45 / floors
        uu0, vv0 = np.meshgrid(u0, v0)
        uu1, vv1 = np.meshgrid(u1, v1)
        # Facade corners run x0 -> x1, so face u follows x.
        uv = np.stack(
            [np.stack([uu0, vv0], -1), np.stack([uu1, vv0], -1), np.stack([uu1, vv1], -1), np.stack([uu0, vv1], -1)],
            axis=2,
        ).reshape(-1, 4, 2)
        quads = _face_points(corners, uv)
        window = canvas.colour(building["window_colour"], distance_m)
        canvas.fill_world_quads(quads, window)


# Decorations of vehicle faces in face coordinates (u across, v up) and colour role.
_REAR_DECOR = (
    ((0.06, 0.45, 0.22, 0.62), "tail"),
    ((0.78, 0.45, 0.94, 0.62), "tail"),
    ((0.38, 0.22, 0.62, 0.36), "plate"),
    ((0.0, 0.0, 1.0, 0.16), "bumper"),
)
_FRONT_DECOR = (
    ((0.05, 0.5, 0.23, 0.66), "head"),
    ((0.77, 0.5, 0.95, 0.66), "head"),
    ((0.3, 0.35, 0.7, 0.6), "grille"),
    ((0.0, 0.0, 1.0, 0.16), "bumper"),
)
_CABIN_GLASS = ((0.08, 0.1, 0.92, 0.9), "glass")


def _draw_vehicle(canvas: _Canvas, vehicle: dict, center: np.ndarray, distance_m: float) -> np.ndarray | None:
    camera = canvas.camera
    heading = vehicle["heading"]
    length, width, height = vehicle["length"], vehicle["width"], vehicle["height"]
    kind = vehicle["kind"]
    boxy = kind in ("van", "truck", "bus")
    body_top = height * (0.92 if boxy else 0.55)
    drawn: list[np.ndarray] = []
    colours = {
        "glass": canvas.colour(vehicle["glass"], distance_m),
        "tail": canvas.colour(np.array([30.0, 30.0, 200.0]), distance_m),
        "head": canvas.colour(np.array([200.0, 235.0, 245.0]), distance_m),
        "plate": canvas.colour(np.array([225.0, 225.0, 225.0]), distance_m),
        "bumper": canvas.colour(np.array([35.0, 35.0, 38.0]), distance_m),
        "grille": canvas.colour(np.array([25.0, 25.0, 25.0]), distance_m),
        "wheel": canvas.colour(np.array([20.0, 20.0, 22.0]), distance_m),
    }
    ground_clearance = 0.25
    boxes = [(center, length, width, ground_clearance, body_top, "body")]
    if not boxy:
        cabin_center = center - np.array([heading * length * 0.06, 0.0, 0.0])
        boxes.append((cabin_center, length * 0.55, width * 0.86, body_top, height, "cabin"))
    else:
        boxes.append((center, length, width * 0.98, body_top, height, "roof"))
    # Wheels first (they sit below the body, partly hidden by it).
    for face_name in ("left", "right"):
        corners, normal = _box_faces(center, length, width, 0.0, ground_clearance + 0.45, heading)[face_name]
        if not _visible(normal, corners.mean(axis=0), camera):
            continue
        for u_center in (0.18, 0.82) if length < 7 else (0.12, 0.3, 0.85):
            quad = _face_points(corners, np.array([[u_center - 0.07, 0], [u_center + 0.07, 0], [u_center + 0.07, 1],
                                                   [u_center - 0.07, 1]]))
            pixels = canvas.fill_world_polygon(quad, colours["wheel"])
            if pixels is not None:
                drawn.append(pixels)
    for box_center, box_length, box_width, z0, z1, part in boxes:
        for face_name, (corners, normal) in _box_faces(box_center, box_length, box_width, z0, z1, heading).items():
            if not _visible(normal, corners.mean(axis=0), camera):
                continue
            shade = canvas.shade(normal)
            pixels = canvas.fill_world_polygon(corners, canvas.colour(vehicle["colour"], distance_m, shade))
            if pixels is None:
                continue
            drawn.append(pixels)
            if distance_m > 180:
                continue
            decorations: tuple = ()
            if part == "body":
                decorations = {"rear": _REAR_DECOR, "front": _FRONT_DECOR}.get(face_name, ())
            elif part == "cabin":
                decorations = (_CABIN_GLASS,)
            elif part == "roof" and face_name in ("left", "right"):
                decorations = tuple(
                    ((u, 0.2, u + 0.8 / max(2, int(box_length / 1.4)), 0.85), "glass")
                    for u in np.linspace(0.05, 0.95, max(2, int(box_length / 1.4)), endpoint=False)
                )
            elif part == "roof" and face_name == "front":
                decorations = (((0.05, 0.25, 0.95, 0.9), "glass"),)
            for (u0, v0, u1, v1), role in decorations:
                quad = _face_points(corners, np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]]))
                canvas.fill_world_polygon(quad, colours[role])
    # Roof of the top box, visible from the raised camera when the vehicle is lower than it.
    top_z = height
    if top_z < CAMERA_HEIGHT_M:
        top_center, top_length, top_width = boxes[-1][0], boxes[-1][1], boxes[-1][2]
        hx, hy = top_length / 2, top_width / 2
        roof = np.array([[top_center[0] - hx, top_center[1] - hy, top_z], [top_center[0] + hx, top_center[1] - hy, top_z],
                         [top_center[0] + hx, top_center[1] + hy, top_z], [top_center[0] - hx, top_center[1] + hy, top_z]])
        pixels = canvas.fill_world_polygon(roof, canvas.colour(vehicle["colour"], distance_m, 1.1))
        if pixels is not None:
            drawn.append(pixels)
    return _bbox(drawn)


def _billboard(camera: PinholeCamera, foot: np.ndarray, height_m: float) -> tuple[float, float, float] | None:
    """Pixel column, foot row and pixel height of an upright object at `foot`, or None if behind."""
    points = camera.to_camera(np.array([foot, foot + np.array([0.0, 0.0, height_m])]))
    if np.any(points[:, 2] < NEAR_M):
        return None
    pixels = camera.project(points)
    return float(pixels[0, 0]), float(pixels[0, 1]), float(pixels[0, 1] - pixels[1, 1])


def _rect(canvas: _Canvas, x0: float, y0: float, x1: float, y1: float, colour) -> None:
    canvas.fill_pixels(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), colour)


def _draw_pedestrian(canvas: _Canvas, person: dict, foot: np.ndarray, time_s: float, distance_m: float):
    placed = _billboard(canvas.camera, foot, person["height"])
    if placed is None:
        return None
    u, v_foot, height_px = placed
    if height_px < 2:
        return None
    walking = person["speed"] != 0.0 or person.get("cross_speed", 0.0) != 0.0
    stride = 0.16 * math.sin(time_s * 7.0 + person["phase"]) if walking else 0.0
    half_width = 0.13 * height_px * person["bulk"]
    head_r = 0.065 * height_px
    top = v_foot - height_px
    colour = functools.partial(canvas.colour, distance_m=distance_m)
    hip = v_foot - 0.47 * height_px
    shoulder = top + 2 * head_r + 0.02 * height_px
    leg_w = 0.07 * height_px
    # Legs, spread by the stride.
    for direction in (-1.0, 1.0):
        foot_u = u + direction * (0.04 * height_px + stride * height_px * direction)
        canvas.fill_pixels(
            np.array([[u + direction * 0.02 * height_px - leg_w / 2, hip], [u + direction * 0.02 * height_px + leg_w / 2, hip],
                      [foot_u + leg_w / 2, v_foot], [foot_u - leg_w / 2, v_foot]]),
            colour(person["pants"]),
        )
    _rect(canvas, u - half_width, shoulder, u + half_width, hip + 0.03 * height_px, colour(person["shirt"]))
    # Arms.
    arm_swing = -stride * 0.6 * height_px
    for direction in (-1.0, 1.0):
        canvas.fill_pixels(
            np.array([[u + direction * half_width, shoulder], [u + direction * (half_width + 0.05 * height_px), shoulder],
                      [u + direction * (half_width + 0.03 * height_px) + arm_swing * direction, hip],
                      [u + direction * (half_width - 0.02 * height_px) + arm_swing * direction, hip]]),
            colour(person["shirt"], shade=0.85),
        )
    canvas.circle((u, top + head_r), head_r, colour(person["skin"]))
    _rect(canvas, u - head_r, top, u + head_r, top + head_r * 0.7, colour(person["hair"]))
    extent = half_width + 0.05 * height_px + abs(arm_swing)
    legs = 0.04 * height_px + abs(stride) * height_px + leg_w / 2
    reach = max(extent, legs)
    return np.array([u - reach, top, u + reach, v_foot])


def _draw_cyclist(canvas: _Canvas, cyclist: dict, foot: np.ndarray, time_s: float, distance_m: float):
    camera = canvas.camera
    placed = _billboard(camera, foot, cyclist["height"])
    if placed is None:
        return None
    u, v_foot, height_px = placed
    if height_px < 2:
        return None
    # Apparent length: full bike length seen side-on, handlebar width seen end-on.
    view = foot - camera.position
    view_xy = view[:2] / max(1e-6, float(np.hypot(view[0], view[1])))
    side_on = abs(view_xy[1])  # bike heading is +-x
    px_per_m = height_px / cyclist["height"]
    half_length_px = 0.5 * px_per_m * (1.75 * side_on + 0.6 * (1 - side_on))
    wheel_r = 0.34 * px_per_m
    colour = functools.partial(canvas.colour, distance_m=distance_m)
    wheel_rx = max(1.0, wheel_r * side_on + 0.06 * px_per_m * (1 - side_on))
    direction = 1.0 if cyclist["speed"] * (1 if camera.to_camera(foot + np.array([1.0, 0, 0]))[0]
                                            > camera.to_camera(foot)[0] else -1) > 0 else -1.0
    wheel_dx = (half_length_px - wheel_rx) * side_on
    tyre_px = max(1, round(0.08 * px_per_m))
    for dx in (-wheel_dx, wheel_dx):
        canvas.ellipse((u + dx, v_foot - wheel_r), (wheel_rx, wheel_r), 0, 360, colour(np.array([25.0, 25.0, 25.0])),
                       tyre_px)
    frame_pts = np.array([[u - wheel_dx, v_foot - wheel_r], [u, v_foot - wheel_r * 1.1], [u + wheel_dx, v_foot - wheel_r],
                          [u + 0.6 * wheel_dx, v_foot - 2.3 * wheel_r], [u - 0.3 * wheel_dx, v_foot - 2.2 * wheel_r]])
    canvas.polyline(frame_pts, colour(cyclist["frame_colour"]), max(1, round(0.05 * px_per_m)))
    # Rider: legs to the pedals, torso leaning forward, head with helmet.
    pedal = 0.15 * px_per_m * math.sin(time_s * 6.0 + cyclist["phase"])
    seat_v = v_foot - 2.3 * wheel_r
    hip_u = u - 0.3 * wheel_dx
    for sign in (-1.0, 1.0):
        knee = (hip_u + 0.25 * px_per_m * side_on * direction, seat_v + 0.2 * px_per_m + sign * pedal * 0.5)
        canvas.fill_pixels(np.array([[hip_u - 0.05 * px_per_m, seat_v], [hip_u + 0.05 * px_per_m, seat_v],
                                     [knee[0] + 0.05 * px_per_m, knee[1]], [knee[0] - 0.05 * px_per_m, knee[1]]]),
                           colour(cyclist["pants"]))
    torso_top = v_foot - height_px + 0.24 * px_per_m
    lean = 0.25 * px_per_m * side_on * direction
    torso_half = 0.2 * px_per_m * (1 - 0.4 * side_on)
    canvas.fill_pixels(np.array([[hip_u - torso_half, seat_v], [hip_u + torso_half, seat_v],
                                 [hip_u + lean + torso_half, torso_top], [hip_u + lean - torso_half, torso_top]]),
                       colour(cyclist["shirt"]))
    head_r = 0.11 * px_per_m
    head_u = hip_u + lean * 1.1
    canvas.circle((head_u, torso_top - head_r), head_r, colour(cyclist["skin"]))
    canvas.ellipse((head_u, torso_top - head_r * 1.3), (head_r * 1.15, head_r * 0.8), 180, 360, colour(cyclist["helmet"]))
    top = min(v_foot - height_px, torso_top - 2.2 * head_r)
    # Tyres are stroked: half their width reaches outside the wheel ellipse.
    left = min(u - half_length_px - tyre_px / 2, hip_u - torso_half, head_u - head_r * 1.2, hip_u + lean - torso_half)
    right = max(u + half_length_px + tyre_px / 2, hip_u + torso_half, head_u + head_r * 1.2, hip_u + lean + torso_half)
    return np.array([left, top, right, v_foot + tyre_px / 2])


def _draw_tree(canvas: _Canvas, tree: dict, foot: np.ndarray, distance_m: float) -> None:
    placed = _billboard(canvas.camera, foot, tree["height"])
    if placed is None:
        return
    u, v_foot, height_px = placed
    if height_px < 2:
        return
    trunk_half = 0.025 * height_px
    crown_r = tree["crown_ratio"] * height_px
    _rect(canvas, u - trunk_half, v_foot - height_px + crown_r, u + trunk_half, v_foot,
          canvas.colour(np.array([40.0, 60.0, 80.0]), distance_m))
    center = (u, v_foot - height_px + crown_r)
    canvas.ellipse(center, (crown_r, crown_r * 0.9), 0, 360, canvas.colour(tree["crown"], distance_m))
    # A lit patch on the sun side of the crown.
    canvas.ellipse((center[0] - crown_r / 4, center[1] - crown_r / 4), (crown_r / 2, crown_r * 0.4), 0, 360,
                   canvas.colour(tree["crown"], distance_m, 1.2))


def _sign_outline(kind: str) -> np.ndarray:
    if kind == "stop":
        angles = np.radians(22.5 + 45.0 * np.arange(8))
        return 0.5 + 0.5 * np.stack([np.cos(angles), np.sin(angles)], -1)
    if kind == "yield":
        return np.array([[0.0, 1.0], [1.0, 1.0], [0.5, 0.05]])
    if kind == "warning":
        return np.array([[0.5, 0.0], [1.0, 0.5], [0.5, 1.0], [0.0, 0.5]])
    return np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])


_SIGN_STYLE = {
    # kind: (plate colour, inner colour, inner scale)
    "stop": ((30, 30, 200), (235, 235, 235), 0.45),
    "yield": ((235, 235, 235), (40, 40, 210), 0.6),
    "speed": ((40, 40, 40), (235, 235, 235), 0.88),
    "info": ((170, 90, 20), (235, 235, 235), 0.5),
    "street": ((60, 120, 20), (230, 230, 230), 0.3),
    "warning": ((20, 20, 20), (30, 200, 240), 0.86),
}


def _draw_sign(canvas: _Canvas, sign: dict, distance_m: float) -> np.ndarray | None:
    camera = canvas.camera
    normal = sign["normal"]
    size = sign["size"]
    plate_height = size * (0.35 if sign["kind"] == "street" else 1.0)
    base = np.array([sign["x"], sign["y"], 0.0])
    colour = functools.partial(canvas.colour, distance_m=distance_m)
    # Pole: a thin quad facing the camera.
    to_camera = camera.position[:2] - base[:2]
    across = np.array([-to_camera[1], to_camera[0], 0.0]) / max(1e-6, float(np.hypot(*to_camera)))
    pole_top = sign["mount_m"] + plate_height
    pole = np.array([base - 0.04 * across, base + 0.04 * across, base + 0.04 * across + [0, 0, pole_top],
                     base - 0.04 * across + [0, 0, pole_top]])
    sign_id, canvas.object_id = canvas.object_id, 0  # the pole is not part of the labelled plate
    canvas.fill_world_polygon(pole, colour(np.array([110.0, 110.0, 115.0])))
    canvas.object_id = sign_id
    # Plate corners: u runs to the plate's right as seen from its front.
    plate_right = np.array([normal[1], -normal[0], 0.0])
    center = base + np.array([0.0, 0.0, sign["mount_m"] + plate_height / 2]) + normal * 0.05
    half_u, half_v = size / 2, plate_height / 2
    corners = np.array([center - half_u * plate_right - [0, 0, half_v], center + half_u * plate_right - [0, 0, half_v],
                        center + half_u * plate_right + [0, 0, half_v], center - half_u * plate_right + [0, 0, half_v]])
    outline = _sign_outline(sign["kind"])
    outline_world = _face_points(corners, np.column_stack([outline[:, 0], 1 - outline[:, 1]]))
    front = _visible(normal, center, camera)
    if not front:
        canvas.fill_world_polygon(outline_world, colour(np.array([150.0, 150.0, 150.0]), shade=0.8))
        return None
    plate_colour, inner_colour, inner_scale = _SIGN_STYLE[sign["kind"]]
    pixels = canvas.fill_world_polygon(outline_world, colour(np.array(plate_colour, float), shade=canvas.shade(normal)))
    if pixels is None:
        return None
    inner = 0.5 + (outline - 0.5) * inner_scale
    if sign["kind"] == "street":
        inner = np.array([[0.1, 0.35], [0.9, 0.35], [0.9, 0.65], [0.1, 0.65]])
    elif sign["kind"] == "stop":
        inner = np.array([[0.15, 0.42], [0.85, 0.42], [0.85, 0.58], [0.15, 0.58]])
    elif sign["kind"] == "yield":
        inner = 0.5 + (outline - np.array([0.5, 0.7])) * inner_scale + np.array([0.0, 0.2])
    inner_world = _face_points(corners, np.column_stack([inner[:, 0], 1 - inner[:, 1]]))
    canvas.fill_world_polygon(inner_world, colour(np.array(inner_colour, float)))
    if sign["kind"] == "speed":
        digits = np.array([[0.25, 0.45], [0.75, 0.45], [0.75, 0.8], [0.25, 0.8]])
        canvas.fill_world_polygon(_face_points(corners, np.column_stack([digits[:, 0], 1 - digits[:, 1]])),
                                  colour(np.array([30.0, 30.0, 30.0])))
    return pixels.min(axis=0).tolist() + pixels.max(axis=0).tolist()


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=4)
def _noise_bank(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative parts of a fixed noise field (std about 8), a bit wider than the image.

    Pixel noise plus two blurred octaves: the blurred part stands in for the fine surface
    texture of real scenes, which is what keeps real camera frames from compressing to nothing
    at low JPEG qualities.
    """
    rng = np.random.default_rng(12345)
    shape = (height, width + 64, 3)
    noise = np.zeros(shape, dtype=np.float32)
    for blur_px, weight in ((0.0, 0.45), (0.8, 0.6), (2.0, 0.66)):
        layer = rng.normal(0.0, 8.0, shape).astype(np.float32)
        if blur_px:
            layer = cv2.GaussianBlur(layer, (0, 0), blur_px)
            layer *= 8.0 / float(layer.std())
        noise += weight * layer
    return np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8)


def _add_sensor_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    positive, negative = _noise_bank(image.shape[0], image.shape[1])
    offset = int(rng.integers(0, 64))
    scale = sigma / 8.0
    width = image.shape[1]
    pos = positive[:, offset:offset + width]
    neg = negative[:, offset:offset + width]
    if rng.random() < 0.5:
        pos, neg = neg, pos
    image = cv2.addWeighted(image, 1.0, pos, scale, 0.0)
    return cv2.addWeighted(image, 1.0, neg, -scale, 0.0)


def camera_model(world: World, camera: str, time_s: float) -> PinholeCamera:
    if camera not in CAMERA_SIZES:
        raise UserError(f"unknown camera '{camera}' (expected one of {', '.join(ALL_CAMERAS)})")
    width, height = CAMERA_SIZES[camera]
    # Small pitch bounces from the road surface move the horizon by a few pixels.
    bounce_px = 4.0 * math.sin(time_s * 3.1 + world.seed) + 2.0 * math.sin(time_s * 7.3)
    return PinholeCamera(
        width=width,
        height=height,
        position=np.array([world.ego_x_m(time_s), world.ego_y_m, CAMERA_HEIGHT_M]),
        yaw_rad=CAMERA_YAW_RAD[camera],
        focal_px=FOCAL_PX,
        cx=width / 2.0,
        cy=height * (0.47 if height > 1000 else 0.5) + bounce_px,
    )


@functools.lru_cache(maxsize=8)
def _static_tables(world: World) -> dict[str, tuple[list[dict], np.ndarray]]:
    """Per kind: the items and a [N, 6] table x0, y, z, speed_x, radius, cross_speed for culling."""
    tables = {}

    def table(kind, items, row):
        tables[kind] = (items, np.array([row(item) for item in items], dtype=float).reshape(-1, 6))

    table("building", world.buildings, lambda b: (
        (b["x0"] + b["x1"]) / 2, b["y"] + b["side"] * b["depth"] / 2, b["height"] / 2, 0.0,
        math.hypot(b["x1"] - b["x0"], b["depth"], b["height"]) / 2, 0.0))
    table("vehicle", world.vehicles, lambda v: (v["x0"], v["y"], v["height"] / 2, v["speed"], v["length"] / 2 + 1.0, 0.0))
    table("pedestrian", world.pedestrians, lambda p: (p["x0"], p["y"], 0.0, p["speed"], 1.0, p.get("cross_speed", 0.0)))
    table("cyclist", world.cyclists, lambda c: (c["x0"], c["y"], 0.0, c["speed"], 1.5, 0.0))
    table("sign", world.signs, lambda g: (g["x"], g["y"], 2.0, 0.0, 1.5, 0.0))
    table("tree", world.trees, lambda t: (t["x"], t["y"], 0.0, 0.0, t["height"] * 0.5, 0.0))
    return tables


def _positions(world: World, time_s: float):
    """(kind, items, centres [N, 3], radii [N]) of every object at time_s."""
    for kind, (items, table) in _static_tables(world).items():
        centers = table[:, 0:3].copy()
        centers[:, 0] += table[:, 3] * time_s
        crossing = table[:, 5] != 0
        if np.any(crossing):
            # People on a crosswalk walk back and forth across the road.
            span = 2 * world.road_half_m + 4
            travelled = np.mod(table[crossing, 1] + world.road_half_m + 2 + table[crossing, 5] * time_s, 2 * span)
            centers[crossing, 1] = -world.road_half_m - 2 + np.where(travelled < span, travelled, 2 * span - travelled)
        yield kind, items, centers, table[:, 4]


def _in_view(camera: PinholeCamera, centers: np.ndarray, radii: np.ndarray) -> list[tuple[int, float]]:
    """Indices and ground distances of objects within range and (with a margin for size) the field of view."""
    if len(centers) == 0:
        return []
    forward = np.array([math.cos(camera.yaw_rad), math.sin(camera.yaw_rad)])
    delta = centers[:, :2] - camera.position[:2]
    distance = np.hypot(delta[:, 0], delta[:, 1])
    depth = delta @ forward
    lateral = delta[:, 0] * forward[1] - delta[:, 1] * forward[0]
    half_fov = math.atan2(camera.width / 2, camera.focal_px)
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.arcsin(np.minimum(1.0, radii / np.maximum(distance, 1e-9)))
    bearing = np.abs(np.arctan2(lateral, depth))
    keep = (distance <= MAX_RANGE_M + radii) & (depth >= -radii) & (
        (distance <= radii) | (bearing <= half_fov + margin + 0.02)
    )
    return [(int(i), float(distance[i])) for i in np.flatnonzero(keep)]


def render_camera(seed: int, frame_index: int, camera: str) -> tuple[np.ndarray, GroundTruth]:
    """Render one camera image (BGR uint8 at the camera's Waymo resolution) and its exact labels."""
    time_s = frame_index / FRAME_RATE_HZ
    if not 0 <= frame_index < MAX_FRAMES:
        raise UserError(f"synthetic frame index {frame_index} out of range (segments have at most {MAX_FRAMES} frames)")
    world = build_world(int(seed))
    cam = camera_model(world, camera, time_s)
    gain = world.gain * (1.0 + world.gain_flicker * math.sin(time_s * 0.7 + seed))
    canvas = _Canvas(world, cam, gain)
    ego_x = float(cam.position[0])
    _draw_ground(canvas, ego_x)

    # Collect everything in range and in front of the camera (vectorised per kind), draw far to near.
    drawables: list[tuple[float, str, dict, np.ndarray]] = []
    for kind, items, centers, radii in _positions(world, time_s):
        for index, distance in _in_view(cam, centers, radii):
            drawables.append((distance, kind, items[index], centers[index]))

    # Buildings are never between the camera and the road users (they stand behind the
    # sidewalks), so they are drawn first; road users are then sorted by distance.
    drawables.sort(key=lambda entry: (entry[1] != "building", -entry[0]))
    labelled: list[tuple[np.ndarray, int, int, int]] = []  # box, class, owner id, its pixels when drawn
    next_id = 1
    for distance, kind, item, center in drawables:
        # Buildings stand behind every road user; from trees on, track who owns each pixel.
        canvas.tracking = kind != "building"
        canvas.object_id = 0
        if kind == "building":
            _draw_building(canvas, item, distance)
            continue
        if kind == "tree":
            _draw_tree(canvas, item, center, distance)
            continue
        canvas.object_id = next_id
        next_id += 1
        if kind == "vehicle":
            box = _draw_vehicle(canvas, item, center, distance)
            object_type = ObjectType.VEHICLE
        elif kind == "pedestrian":
            box = _draw_pedestrian(canvas, item, center, time_s, distance)
            object_type = ObjectType.PEDESTRIAN
        elif kind == "cyclist":
            box = _draw_cyclist(canvas, item, center, time_s, distance)
            object_type = ObjectType.CYCLIST
        else:
            box = _draw_sign(canvas, item, distance)
            object_type = ObjectType.SIGN
        if box is not None:
            box = np.asarray(box, dtype=np.float64)
            labelled.append((box, int(object_type), canvas.object_id, _owned_pixels(canvas.owner, box, canvas.object_id)))

    image = canvas.image
    rng = np.random.default_rng([seed, frame_index, _CAMERA_INDEX[camera]])
    image = _add_sensor_noise(image, world.noise_sigma, rng)
    return image, _labels(labelled, canvas.owner, next_id, cam.width, cam.height)


# Share of an object's own pixels that must stay uncovered by nearer objects for it to be labelled.
MIN_VISIBLE_FRACTION = 0.1


def _owned_pixels(owner: np.ndarray, box: np.ndarray, object_id: int) -> int:
    """Half-resolution pixels of the owner map inside box (full-resolution xyxy) that belong to object_id."""
    height, width = owner.shape
    x1, y1 = max(0, int(box[0] // 2)), max(0, int(box[1] // 2))
    x2, y2 = min(width, int(box[2] // 2) + 1), min(height, int(box[3] // 2) + 1)
    if x2 <= x1 or y2 <= y1:
        return 0
    return int(np.count_nonzero(owner[y1:y2, x1:x2] == object_id))


def _labels(
    labelled: list[tuple[np.ndarray, int, int, int]], owner: np.ndarray, id_count: int, width: int, height: int
) -> GroundTruth:
    """Clip boxes to the image; drop tiny ones and those (mostly) hidden behind nearer objects."""
    visible = np.bincount(owner.ravel(), minlength=id_count)
    kept_boxes: list[np.ndarray] = []
    kept_classes: list[int] = []
    for box, object_type, object_id, drawn_pixels in labelled:
        x1, x2 = max(0.0, box[0]), min(float(width), box[2])
        y1, y2 = max(0.0, box[1]), min(float(height), box[3])
        if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
            continue
        if drawn_pixels > 0:
            if visible[object_id] < MIN_VISIBLE_FRACTION * drawn_pixels:
                continue
        else:
            # Too small to register at half resolution: hidden if something nearer covers its centre.
            row = min(owner.shape[0] - 1, int((y1 + y2) / 4))
            column = min(owner.shape[1] - 1, int((x1 + x2) / 4))
            if owner[row, column] not in (0, object_id):
                continue
        kept_boxes.append(np.array([x1, y1, x2, y2]))
        kept_classes.append(object_type)
    boxes = np.array(kept_boxes, dtype=np.float32).reshape(-1, 4)
    return GroundTruth(boxes_xyxy=boxes, classes=np.array(kept_classes, dtype=np.int32))


_CAMERA_INDEX = {name: index for index, name in enumerate(ALL_CAMERAS)}


# ----------------------------------------------------------------------------- segments

# Bump when the renderer changes, so a cached default scene is regenerated.
SYNTHETIC_VERSION = 3


def scene_name(seed: int) -> str:
    return f"{_SCENE_NAME_PREFIX}-v{SYNTHETIC_VERSION}-seed{seed}"


def camera_intrinsics(camera: str) -> tuple[float, ...]:
    """Waymo-style intrinsic vector (f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3) of a synthetic camera."""
    width, height = CAMERA_SIZES[camera]
    return (FOCAL_PX, FOCAL_PX, width / 2.0, height * (0.47 if height > 1000 else 0.5), 0.0, 0.0, 0.0, 0.0, 0.0)


def encode_synthetic_frame(seed: int, frame_index: int, cameras: Sequence[str], jpeg_quality: int = 95) -> bytes:
    """One serialised Waymo v1 Frame of segment `seed`: every camera rendered, JPEG-encoded, labelled."""
    from datasets.waymo_v1 import CameraRecord, encode_frame

    records = {}
    for camera in cameras:
        image, ground_truth = render_camera(seed, frame_index, camera)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {camera} frame {frame_index}")
        height, width = image.shape[:2]
        records[camera] = CameraRecord(jpeg.tobytes(), width, height, ground_truth)
    timestamp_micros = FIRST_TIMESTAMP_MICROS + round(frame_index * 1e6 / FRAME_RATE_HZ)
    return encode_frame(
        scene_name(seed), timestamp_micros, records,
        intrinsics={camera: camera_intrinsics(camera) for camera in cameras},
        label_id_prefix=f"{frame_index}-",
    )


# Waymo timestamps are microseconds since the epoch; start the synthetic ones at a fixed instant.
FIRST_TIMESTAMP_MICROS = 1_700_000_000_000_000


def _encode_task(task: tuple[int, int, tuple[str, ...], int]) -> bytes:
    return encode_synthetic_frame(*task)


def write_synthetic_scene(
    out_path: str | Path,
    seed: int = DEFAULT_SEED,
    frames: int = DEFAULT_FRAMES,
    cameras: Sequence[str] = ALL_CAMERAS,
    jpeg_quality: int = 95,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Render a synthetic segment and write it as a Waymo v1 tfrecord (atomically: temp file, then rename)."""
    from datasets.tfrecord import TFRecordWriter

    cameras = tuple(cameras)
    for camera in cameras:
        if camera not in CAMERA_SIZES:
            raise UserError(f"unknown camera '{camera}' (expected some of {', '.join(ALL_CAMERAS)})")
    if not 1 <= frames <= MAX_FRAMES:
        raise UserError(f"frames must be within 1..{MAX_FRAMES} (got {frames})")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"jpeg quality must be within 1..100 (got {jpeg_quality})")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    tasks = [(int(seed), index, cameras, int(jpeg_quality)) for index in range(frames)]
    descriptor, temp_name = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".partial", dir=out_path.parent)
    os.close(descriptor)
    os.chmod(temp_name, 0o644)  # mkstemp makes it private; the scene is ordinary data
    try:
        with TFRecordWriter(temp_name) as writer, _ProgressBar(progress, frames, out_path.name) as advance:
            if workers > 1 and frames > 1:
                import multiprocessing

                # spawn, not fork: callers may hold thread pools (torch, onnxruntime, OpenCV) that
                # do not survive a fork.
                context = multiprocessing.get_context("spawn")
                with context.Pool(workers) as pool:
                    for record in pool.imap(_encode_task, tasks, chunksize=1):
                        writer.write(record)
                        advance()
            else:
                for task in tasks:
                    writer.write(_encode_task(task))
                    advance()
        os.replace(temp_name, out_path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return out_path


class _ProgressBar:
    """A rich progress bar when asked for, else nothing; yields a function that advances it."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            transient=True,
        )
        self._progress.start()
        task = self._progress.add_task(f"rendering {self.label}", total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def default_scene_path(progress: bool = True) -> Path:
    """The default 20 s, 5-camera synthetic segment (seed 0), generated into the cache on first use."""
    path = cache_dir() / "scenes" / f"{scene_name(DEFAULT_SEED)}-{DEFAULT_FRAMES}f.tfrecord"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (profiler, replay, tests): one renders, the others wait.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, the atomic rename still keeps the file whole
            pass
        if not path.exists():
            write_synthetic_scene(path, seed=DEFAULT_SEED, frames=DEFAULT_FRAMES, cameras=ALL_CAMERAS,
                                  progress=progress)
    return path
