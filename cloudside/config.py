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


class RayConfig(pydantic.BaseModel):
    """`engine: ray`: model replicas as a Ray Serve deployment behind a deadline-aware dispatcher."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    # Ray cluster to join: null = $RAY_ADDRESS when set (e.g. "auto" or "ray://head:10001"),
    # else start a local Ray instance in this process (and stop it on shutdown).
    address: str | None = None
    # CPUs a local Ray instance may schedule on (null: all of this machine's).
    num_cpus: float | None = pydantic.Field(None, gt=0)
    # Serve application name (one per service; several services can share a Ray cluster).
    app_name: str = pydantic.Field("avcloud", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # Replica count: fixed when min == max, else autoscaled between them (queue depth and
    # deadline slack, see cloudside.autoscaling). initial: the count to start with.
    min_replicas: int = pydantic.Field(1, ge=1, le=1024)
    max_replicas: int = pydantic.Field(1, ge=1, le=1024)
    initial_replicas: int | None = pydantic.Field(None, ge=1, le=1024)
    # Ray resources each replica reserves. num_gpus "auto": 1 when the cluster has GPUs, else 0.
    replica_num_cpus: float = pydantic.Field(1.0, ge=0)
    replica_num_gpus: float | Literal["auto"] = "auto"
    # How requests reach replicas. edf: our dispatcher sends a request to a replica only when
    # that replica can finish it before its deadline, earliest deadline first across the
    # fleet, and each replica runs the EDF queue and batching. serve: plain Ray Serve (its
    # own router and FIFO @serve.batch queue, no deadlines): a baseline for benchmarks.
    dispatch: Literal["edf", "serve"] = "edf"
    # A replica is sent more work only while the work it already holds is expected to take
    # less than this; the rest waits at the dispatcher in deadline order (fleet-wide EDF).
    dispatch_ahead_ms: float = pydantic.Field(50.0, ge=0)
    # A replica holding a request this long past its expected finish is treated as hung: its
    # requests are re-dispatched (or answered expired) and it gets no more work until it answers.
    # One that answers after all was slow: it gets twice the time from then on (at most 16x).
    hang_timeout_ms: float = pydantic.Field(2000.0, gt=0)
    # Ray Serve's health check of each replica (a replica whose worker is stuck fails it and
    # is replaced).
    health_check_period_s: float = pydantic.Field(2.0, gt=0)
    health_check_timeout_s: float = pydantic.Field(5.0, gt=0)
    # Autoscaling (min_replicas < max_replicas): the replicas are sized so that their busy
    # time plus the waiting work spread over its deadline slack stays at this utilization.
    target_utilization: float = pydantic.Field(0.7, gt=0, le=1)
    upscale_delay_s: float = pydantic.Field(2.0, ge=0)
    downscale_delay_s: float = pydantic.Field(10.0, ge=0)
    # Seconds of replica metrics the autoscaler averages over.
    look_back_period_s: float = pydantic.Field(2.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _replica_bounds(self) -> RayConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) is outside "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        if isinstance(self.replica_num_gpus, float) and self.replica_num_gpus < 0:
            raise ValueError("replica_num_gpus must be >= 0 or 'auto'")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


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
    # threads: worker threads in this process (`workers` of them, one per GPU); ray: model
    # replicas as a Ray Serve deployment (see `ray`), behind the same ZeroMQ front end.
    engine: Literal["threads", "ray"] = "threads"
    workers: int = pydantic.Field(1, ge=1, le=64)
    # Time reserved for the reply's trip back: server deadline = arrival + budget - this.
    downlink_allowance_ms: float = pydantic.Field(0.0, ge=0)
    # On shutdown, queued work may finish for this long; what is left is answered `expired`.
    shutdown_grace_ms: float = pydantic.Field(2000.0, ge=0)
    warmup_iterations: int = pydantic.Field(2, ge=0)
    security: SecurityConfig = SecurityConfig()
    ray: RayConfig = RayConfig()

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
