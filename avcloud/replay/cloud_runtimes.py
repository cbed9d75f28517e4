"""Cloud runtime models: how long the replayed cloud takes per configuration.

A real car's cloud is a GPU whose speed does not depend on what else the replaying machine is
doing, so the replay takes cloud runtimes from a declared model, chosen with `--cloud`:

- `reference` (the default): the table shipped in `avcloud/replay/clouds/reference-cpu.csv`,
  measured once on an idle 2-core reference machine with onnxruntime on one thread
  (`avcloud profile --cloud-table`); a model it does not list takes the profile's measured
  runtime, and the run says so.
- `measured`: the profile's robust runtime, a low percentile of repeated timings on this machine
  (it moves with this machine's load: for comparing with a live run here).
- `PATH.csv`: a table a user writes for their own device, with columns `Model` and
  `Runtime [ms]`; a row names a configuration (`avd-cloud-l-imgcomp90-inpcompNone`) or a whole
  model (`avd-cloud-l`), the configuration's row winning. TURBO's published runtimes
  (`shared/profiles/turbo_effdet_sizes_runtimes.csv`) are such a table for its EfficientDets.
- `scale:F` or `scale:MODEL=F,MODEL=F`: the measured runtimes times a factor (all models, or per
  model; models not named keep factor 1), e.g. a GPU a known number of times faster.

Both the car's planning (the options' runtimes) and the simulated cloud use the chosen runtimes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from avcloud.compression import parse_configuration_name
from avcloud.errors import DataError, UserError
from avcloud.profile_format import MODEL_COLUMN, RUNTIME_COLUMN, read_table_records
from avcloud.types import Service

DEFAULT_CLOUD = "reference"
REFERENCE_TABLE = Path(__file__).parent / "clouds" / "reference-cpu.csv"


@dataclass(frozen=True)
class CloudRuntimes:
    """Runtime per configuration name, and where each came from (for results.json)."""

    name: str
    runtime_ms: dict[str, float]
    source: dict[str, str]  # configuration -> "declared" | "measured" | "measured x F"

    def describe(self) -> dict:
        return {"cloud": self.name, "runtime_ms": {k: round(v, 3) for k, v in self.runtime_ms.items()},
                "source": self.source}


def check_cloud_choice(choice: str) -> None:
    """Validate a --cloud value before any work starts (one-line UserError)."""
    if choice in (DEFAULT_CLOUD, "measured"):
        return
    if choice.startswith("scale:"):
        _parse_scale(choice)
        return
    path = Path(choice)
    if path.suffix.lower() != ".csv":
        raise UserError(f"--cloud '{choice}': choose 'reference', 'measured', 'scale:F', "
                        "'scale:MODEL=F,...' or a CSV table of runtimes")
    if not path.is_file():
        raise UserError(f"--cloud {choice}: no such file")


def resolve_cloud(choice: str, measured_ms: Mapping[str, float]) -> CloudRuntimes:
    """Runtimes for every configuration in `measured_ms` (the profile's) under a --cloud choice."""
    check_cloud_choice(choice)
    if choice == "measured":
        return CloudRuntimes("measured", dict(measured_ms), {name: "measured" for name in measured_ms})
    if choice.startswith("scale:"):
        default_factor, factors = _parse_scale(choice)
        runtime, source = {}, {}
        for name, value in measured_ms.items():
            factor = factors.get(parse_configuration_name(name)[0], default_factor)
            runtime[name] = value * factor
            source[name] = f"measured x {factor:g}"
        return CloudRuntimes(choice, runtime, source)
    table_path = REFERENCE_TABLE if choice == DEFAULT_CLOUD else Path(choice)
    declared = read_runtime_table(table_path)
    runtime, source, missing = {}, {}, []
    for name, value in measured_ms.items():
        found = declared.get(name, declared.get(parse_configuration_name(name)[0]))
        if found is not None:
            runtime[name], source[name] = found, "declared"
        elif choice == DEFAULT_CLOUD:
            runtime[name], source[name] = value, "measured"
        else:
            missing.append(name)
    if missing:
        raise DataError(f"--cloud {choice}: no runtime for configuration {missing[0]} "
                        f"(add a row for it or for its model; {len(missing)} missing)")
    return CloudRuntimes(choice, runtime, source)


def read_runtime_table(path: Path) -> dict[str, float]:
    """`Model` -> `Runtime [ms]` from a CSV or Parquet table; the first row of a name wins."""
    table: dict[str, float] = {}
    for where, record in read_table_records(path, (MODEL_COLUMN, RUNTIME_COLUMN)):
        name = str(record.get(MODEL_COLUMN) or "").strip()
        try:
            value = float(record.get(RUNTIME_COLUMN))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(f"{path} {where}: column '{RUNTIME_COLUMN}': not a number") from None
        if not name or not math.isfinite(value) or value < 0:
            raise DataError(f"{path} {where}: needs a name and a finite runtime >= 0")
        table.setdefault(name, value)
    return table


def with_runtimes(services: Sequence[Service], cloud: CloudRuntimes) -> tuple[Service, ...]:
    """The services with every cloud option's runtime replaced by the cloud's (what the car plans with)."""
    return tuple(
        dataclasses.replace(service, options=tuple(
            option if option.is_fallback else dataclasses.replace(option, runtime_ms=cloud.runtime_ms[option.name])
            for option in service.options))
        for service in services)


def _parse_scale(choice: str) -> tuple[float, dict[str, float]]:
    body = choice[len("scale:"):]

    def factor(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--cloud {choice}: '{text}' is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--cloud {choice}: a factor must be a finite number > 0 (got {text})")
        return value

    if "=" not in body:
        return factor(body), {}
    factors = {}
    for part in body.split(","):
        model, separator, value = part.partition("=")
        if not separator or not model.strip():
            raise UserError(f"--cloud {choice}: '{part}' is not MODEL=FACTOR")
        factors[model.strip()] = factor(value.strip())
    return 1.0, factors
