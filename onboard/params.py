"""The onboard node's parameters: a YAML params file plus ROS 2 style `-p key:=value` overrides.

Example: docs/examples/onboard.yaml. Every field has a default so a node can start from an
empty file. Relative paths in a file are relative to that file's directory; paths given only as
`-p` overrides without a file are relative to the current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from avcloud.config import apply_override, load_config, parse_override, validate
from avcloud.types import ALL_CAMERAS
from optimizer.policies import DEFAULT_POLICY, POLICIES, PolicySpec, get_policy


class TopicParams(pydantic.BaseModel):
    """Topic names; `{camera}` is replaced by each camera's name."""

    model_config = pydantic.ConfigDict(extra="forbid")

    camera: str = "/camera/{camera}/image"
    detections: str = "/perception/{camera}/detections"
    heartbeat: str = "/onboard/heartbeat"


class EndpointParams(pydantic.BaseModel):
    """ZeroMQ endpoints. The node connects to cameras and to the cloud, and binds its outputs."""

    model_config = pydantic.ConfigDict(extra="forbid")

    cameras: str = "tcp://127.0.0.1:5600"  # the player's (or the camera driver's) PUB socket
    outputs: str = "tcp://127.0.0.1:5601"  # this node's PUB socket (results, heartbeat)
    cloud: str = "tcp://127.0.0.1:5555"  # the cloud service's ROUTER, or the link emulator in front of it


class SecurityParams(pydantic.BaseModel):
    """CurveZMQ keys (see avcloud/keys.py); `insecure: true` talks to a service run with --insecure."""

    model_config = pydantic.ConfigDict(extra="forbid")

    insecure: bool = False
    client_secret_key: Path | None = None  # this vehicle's NAME.key_secret
    server_public_key: Path | None = None  # the cloud service's NAME.key


class OnboardParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    node_name: str = "avcloud_onboard"
    vehicle: str = pydantic.Field("car-0", min_length=1, max_length=128)
    cameras: list[str] = pydantic.Field(default_factory=lambda: list(ALL_CAMERAS), min_length=1)
    topics: TopicParams = pydantic.Field(default_factory=TopicParams)
    endpoints: EndpointParams = pydantic.Field(default_factory=EndpointParams)
    security: SecurityParams = pydantic.Field(default_factory=SecurityParams)

    # Allocation: options per camera come from the profile table (None: every camera on board).
    profile_path: Path | None = None
    # A named policy (optimizer/policies.py) decides planner, allocator, estimator and start value;
    # the fields below, when set, override the policy's.
    policy: str = DEFAULT_POLICY
    method: Literal["exact", "quantile"] | None = None  # planner: "exact" = point estimate
    allocator: str | None = None  # registry name in optimizer.allocators
    slo_ms: float = pydantic.Field(100.0, gt=0)
    # Stop waiting for the cloud this long before the deadline so the on-car result is out in time.
    publish_guard_ms: float = pydantic.Field(3.0, ge=0)
    rtt_ms: float = pydantic.Field(20.0, ge=0)  # prior for the network RTT until replies measure it
    initial_bandwidth_mbps: float | None = pydantic.Field(None, gt=0)
    estimator: Literal["ewma", "harmonic"] | None = None
    quantile_window: int | None = pydantic.Field(None, ge=2)  # forecast errors the quantile planner sees
    stale_after_ms: float | None = pydantic.Field(None, gt=0)  # no sample this long: re-discover
    max_discovery_wait_ms: float | None = pydantic.Field(None, gt=0)  # backoff of discovery that times out unanswered
    max_in_flight_per_camera: int | None = pydantic.Field(None, ge=1, le=8)  # 2: uploads overlap cloud runs
    stream_rate_cap: bool | None = None  # plan at size / min(slack, frame interval)
    success_horizon: bool | None = None  # quantile planner: success over the frames the deadline spans

    # On-car fallback detector (avcloud.models.Detector).
    onboard_model: str = "avd-onboard"
    onboard_backend: str = "auto"
    fallback_workers: int = pydantic.Field(2, ge=1, le=32)
    # Cameras compressed in parallel threads (0: inline in the event loop). Worth it on a car
    # computer with cores to spare; on a small shared CPU it only adds contention.
    encode_workers: int = pydantic.Field(0, ge=0, le=32)
    # Inference threads per fallback run; parallelism comes from fallback_workers (one camera each).
    onboard_threads: int | None = pydantic.Field(1, ge=1)

    # Transport and liveness.
    camera_rate_hz: float = pydantic.Field(10.0, gt=0)
    heartbeat_period_ms: float = pydantic.Field(1000.0, gt=0)
    dead_after_periods: float = pydantic.Field(3.0, gt=1)
    # A fresh cloud socket after this many consecutive timeouts with no reply at all for
    # min_reconnect_interval_ms (and at most once per that interval).
    reconnect_after_timeouts: int = pydantic.Field(3, ge=1)
    min_reconnect_interval_ms: float = pydantic.Field(1000.0, ge=0)
    send_high_water_mark: int = pydantic.Field(16, ge=1)
    # One `reply` log event per cloud reply with its timings (where a request's latency went).
    log_replies: bool = False

    @pydantic.field_validator("cameras")
    @classmethod
    def _cameras_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("camera names must be unique")
        return value

    @pydantic.field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy '{value}' (choose from {', '.join(POLICIES)})")
        if POLICIES[value].planner == "oracle":
            raise ValueError(f"policy '{value}' needs the future of the uplink: it runs only in a replay")
        return value

    def policy_spec(self) -> PolicySpec:
        """The named policy with this file's overrides applied."""
        overrides: dict[str, Any] = {}
        if self.method is not None:
            overrides["planner"] = "point" if self.method == "exact" else "quantile"
        for field, spec_field in (("allocator", "allocator"), ("estimator", "estimator"),
                                  ("initial_bandwidth_mbps", "initial_estimate_mbps"),
                                  ("quantile_window", "quantile_window"), ("stale_after_ms", "stale_after_ms"),
                                  ("max_discovery_wait_ms", "max_discovery_wait_ms"),
                                  ("max_in_flight_per_camera", "max_in_flight_per_camera"),
                                  ("stream_rate_cap", "stream_rate_cap"), ("success_horizon", "success_horizon")):
            if getattr(self, field) is not None:
                overrides[spec_field] = getattr(self, field)
        return get_policy(self.policy, overrides)

    @pydantic.model_validator(mode="after")
    def _policy_overrides_valid(self) -> OnboardParams:
        self.policy_spec()  # UserError (one line) for a bad override, e.g. an unknown allocator
        return self

    @pydantic.model_validator(mode="after")
    def _rtt_below_slo(self) -> OnboardParams:
        if self.rtt_ms >= self.slo_ms:  # as the replay checks its --rtt-ms and --slo-ms
            raise ValueError(f"rtt_ms {self.rtt_ms:g} must be below slo_ms {self.slo_ms:g}: no cloud result "
                             "could ever meet the deadline")
        return self

    @pydantic.model_validator(mode="after")
    def _keys_or_insecure(self) -> OnboardParams:
        security = self.security
        if not security.insecure and (security.client_secret_key is None or security.server_public_key is None):
            raise ValueError("security: set client_secret_key and server_public_key, or insecure: true")
        return self


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> OnboardParams:
    """Params from a YAML file (None: defaults) with `key:=value` overrides applied in order."""
    parsed = dict(parse_override(text) for text in overrides or [])
    if path is None:
        data: dict[str, Any] = {}
        for key, value in parsed.items():
            apply_override(data, key, value)
        return validate(OnboardParams, data, "parameters")
    params = load_config(OnboardParams, path, parsed)
    return resolve_paths(params, Path(path).resolve().parent)


def resolve_paths(params: OnboardParams, base: Path) -> OnboardParams:
    """Relative file paths in a params file are relative to the file's directory; `~` expands."""

    def resolved(value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        return value if value.is_absolute() else base / value

    security = params.security.model_copy(update={
        "client_secret_key": resolved(params.security.client_secret_key),
        "server_public_key": resolved(params.security.server_public_key)})
    return params.model_copy(update={"profile_path": resolved(params.profile_path), "security": security})
