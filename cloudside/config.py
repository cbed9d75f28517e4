"""The cloud service's configuration file (cloud.yaml), validated with pydantic.

Relative key paths resolve against the directory of the config file. See
docs/examples/cloud.yaml for an annotated example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from avcloud.config import load_config

SCHEDULERS = ("edf", "fifo")


class ModelEntry(pydantic.BaseModel):
    """One model the service serves."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = pydantic.Field(min_length=1, max_length=128)
    # Inference backend for zoo/registered models: auto, onnxruntime, tensorrt, torch.
    backend: str = "auto"
    num_threads: int | None = pydantic.Field(None, ge=1)
    # When set, the model is emulated: each batch sleeps this long per image (emulated GPU
    # time) and returns no detections. For tests and scheduling benchmarks.
    simulated_runtime_ms: float | None = pydantic.Field(None, ge=0)
    simulated_batch_overhead_ms: float = pydantic.Field(0.0, ge=0)
    # Whether an emulated model still decodes the payload (real CPU work, real decode errors).
    simulated_decode: bool = True
    # Largest image (width x height) this model takes; null: the service's max_image_pixels.
    max_image_pixels: int | None = pydantic.Field(None, ge=1)

    @property
    def simulated(self) -> bool:
        return self.simulated_runtime_ms is not None


class SecurityConfig(pydantic.BaseModel):
    """CurveZMQ: the service's own secret key file and the allow-list directory of vehicles' keys."""

    model_config = pydantic.ConfigDict(extra="forbid")

    server_secret_key: Path | None = None
    allowlist_dir: Path | None = None

    @property
    def configured(self) -> bool:
        return self.server_secret_key is not None and self.allowlist_dir is not None


class CloudConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    bind: str = pydantic.Field("tcp://127.0.0.1:5555", pattern=r"^(tcp|ipc|inproc)://.+")
    http_host: str = "127.0.0.1"
    # 0 picks a free port; null disables the health/metrics endpoint.
    http_port: int | None = pydantic.Field(8555, ge=0, le=65535)
    models: list[ModelEntry] = pydantic.Field(min_length=1)
    scheduler: Literal["edf", "fifo"] = "edf"
    queue_limit: int = pydantic.Field(256, ge=1, le=1_000_000)
    # Queued requests one vehicle may hold (null: no per-vehicle limit), so a flood cannot starve others.
    per_vehicle_queue_limit: int | None = pydantic.Field(64, ge=1)
    # Share worker time across vehicles (weighted fair queueing; EDF within a vehicle's share).
    fair_share: bool = True
    # A vehicle starting to send after a pause may get this much worker time ahead of vehicles
    # that kept the workers busy; vehicles this close to the least-served one compete by deadline.
    fair_share_slack_ms: float = pydantic.Field(100.0, ge=0)
    # Relative shares by vehicle name (default 1 each).
    vehicle_weights: dict[str, float] = pydantic.Field(default_factory=dict)
    # Largest image (width x height) any model takes unless its entry says otherwise. Checked
    # against the request's shape and the image's own header before anything is decoded.
    # Default: the largest Waymo camera frame, 1920 x 1280.
    max_image_pixels: int = pydantic.Field(1920 * 1280, ge=1)
    max_payload_bytes: int = pydantic.Field(16 * 1024 * 1024, ge=1)
    max_batch_size: int = pydantic.Field(8, ge=1, le=256)
    workers: int = pydantic.Field(1, ge=1, le=64)
    # Time reserved for the reply's trip back: server deadline = arrival + budget - this.
    downlink_allowance_ms: float = pydantic.Field(0.0, ge=0)
    # On shutdown, queued work may finish for this long; what is left is answered `expired`.
    shutdown_grace_ms: float = pydantic.Field(2000.0, ge=0)
    warmup_iterations: int = pydantic.Field(2, ge=0)
    security: SecurityConfig = SecurityConfig()

    @pydantic.field_validator("vehicle_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for vehicle, weight in value.items():
            if not weight > 0:
                raise ValueError(f"weight of '{vehicle}' must be positive, got {weight}")
        return value

    @pydantic.field_validator("models")
    @classmethod
    def _unique_model_names(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        names = [entry.name for entry in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique (repeated: {', '.join(duplicates)})")
        return value


def load_cloud_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CloudConfig:
    """Load cloud.yaml; key paths relative to the file's directory are made absolute."""
    config = load_config(CloudConfig, path, overrides)
    base = Path(path).resolve().parent
    security = config.security
    resolved = {
        name: (base / value if value is not None and not value.is_absolute() else value)
        for name, value in (("server_secret_key", security.server_secret_key),
                            ("allowlist_dir", security.allowlist_dir))
    }
    return config.model_copy(update={"security": security.model_copy(update=resolved)})
