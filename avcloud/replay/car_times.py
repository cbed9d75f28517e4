"""Car-side timing models: how long the replayed car takes to compress an image for each
configuration and to run its on-car fallback detector.

The replay's table should not move with the load of the machine that made the profile: a few
hundredths of a millisecond in these times shift which requests make their deadlines, and on the
default scene moved turbo-q by 0.4 points between two profiles of the same scene
(fallback 4.45 against 4.26 ms, encodes within 0.1 ms). So, as for the cloud
(avcloud/replay/cloud_runtimes.py), the replay takes them from a declared model, chosen with
`--car`:

- `reference` (the default): the table shipped in `avcloud/replay/cars/reference-cpu.csv`, the
  default profile's measurements on an idle 2-core reference machine (the mean `Encode [ms]` per
  configuration, and the on-car model's `Runtime [ms]`); a configuration it does not list keeps
  the profile's measured time, and the run says so;
- `measured`: the profile's own measurements;
- `PATH.csv` (or `.parquet`): a table with columns `Model`, `Encode [ms]` and, for the on-car
  configuration, `Runtime [ms]`; a profile's own `profile.csv` is one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from avcloud.errors import DataError, UserError
from avcloud.profile_format import ENCODE_COLUMN, MODEL_COLUMN, RUNTIME_COLUMN, read_table_records
from avcloud.types import Service

DEFAULT_CAR = "reference"
REFERENCE_TABLE = Path(__file__).parent / "cars" / "reference-cpu.csv"


@dataclass(frozen=True)
class CarTimes:
    """Encode time per cloud configuration and the on-car fallback's runtime, with where each came from."""

    name: str
    encode_ms: dict[str, float]
    fallback_runtime_ms: float
    source: dict[str, str]  # configuration (cloud ones and the fallback) -> "declared" | "measured"

    def describe(self) -> dict:
        return {"car": self.name, "encode_ms": {k: round(v, 3) for k, v in self.encode_ms.items()},
                "fallback_runtime_ms": round(self.fallback_runtime_ms, 3), "source": self.source}


def check_car_choice(choice: str) -> None:
    """Validate a --car value before any work starts (one-line UserError)."""
    if choice in (DEFAULT_CAR, "measured"):
        return
    path = Path(choice)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"--car '{choice}': choose 'reference', 'measured' or a CSV table of car-side times")
    if not path.is_file():
        raise UserError(f"--car {choice}: no such file")


def resolve_car(choice: str, measured_encode_ms: Mapping[str, float], fallback: str,
                measured_fallback_ms: float) -> CarTimes:
    """Car-side times for the configurations in `measured_encode_ms` and the on-car `fallback`
    (the profile's measurements) under a --car choice."""
    check_car_choice(choice)
    if choice == "measured":
        return CarTimes("measured", dict(measured_encode_ms), measured_fallback_ms,
                        {name: "measured" for name in (*measured_encode_ms, fallback)})
    table_path = REFERENCE_TABLE if choice == DEFAULT_CAR else Path(choice)
    encode_declared, runtime_declared = read_car_table(table_path)
    encode_ms, source, missing = {}, {}, []
    for name, value in measured_encode_ms.items():
        if name in encode_declared:
            encode_ms[name], source[name] = encode_declared[name], "declared"
        elif choice == DEFAULT_CAR:
            encode_ms[name], source[name] = value, "measured"
        else:
            missing.append(name)
    fallback_ms = runtime_declared.get(fallback)
    if fallback_ms is not None:
        source[fallback] = "declared"
    elif choice == DEFAULT_CAR:
        fallback_ms, source[fallback] = measured_fallback_ms, "measured"
    else:
        missing.append(f"{fallback} (its {RUNTIME_COLUMN})")
    if missing:
        raise DataError(f"--car {choice}: no time for configuration {missing[0]} "
                        f"(add a row for it; {len(missing)} missing)")
    return CarTimes(choice, encode_ms, fallback_ms, source)


def read_car_table(path: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(`Model` -> `Encode [ms]`, `Model` -> `Runtime [ms]`) from a CSV or Parquet table (the
    shipped reference, a user's, or a profile's own measurements); absent columns and empty cells
    are skipped, the mean of a configuration's rows is taken (a profile has one per camera)."""
    encode: dict[str, list[float]] = {}
    runtime: dict[str, list[float]] = {}
    for where, record in read_table_records(path, (MODEL_COLUMN,)):
        name = str(record.get(MODEL_COLUMN) or "").strip()
        if not name:
            raise DataError(f"{path} {where}: a row needs a name in column '{MODEL_COLUMN}'")
        for column, values in ((ENCODE_COLUMN, encode), (RUNTIME_COLUMN, runtime)):
            cell = record.get(column)
            if cell is None or str(cell).strip() == "":
                continue
            try:
                value = float(cell)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(f"{path} {where}: column '{column}': not a number") from None
            if not math.isfinite(value) or value < 0:
                raise DataError(f"{path} {where}: column '{column}': needs a finite time >= 0 (got {cell})")
            values.setdefault(name, []).append(value)
    return ({name: sum(v) / len(v) for name, v in encode.items()},
            {name: sum(v) / len(v) for name, v in runtime.items()})


def with_fallback_runtime(services: Sequence[Service], car: CarTimes) -> tuple[Service, ...]:
    """The services with the on-car option's runtime replaced by the car's."""
    return tuple(
        dataclasses.replace(service, options=tuple(
            dataclasses.replace(option, runtime_ms=car.fallback_runtime_ms) if option.is_fallback else option
            for option in service.options))
        for service in services)
