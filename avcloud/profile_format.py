"""The profile table and the detection cache on disk: one reader and writer for both formats.

Profile table (written by the profiler, read by the optimizer and the replay): CSV or Parquet,
one row per configuration (and optionally per service and window): `Model` (configuration
name), `Network Transport Size [Mb]`, `Runtime [ms]`, `Utility` (mAP in [0, 1]), optional
`Service`, `Window`, `Encode [ms]` and `Runtime spread [ms]`. The meaning of the rows (options,
utility curves) is `optimizer.curves`'s; this module only reads and writes them.

Detection cache (`detections.parquet` beside the table): one row per (frame_index, camera,
config): `size_bytes` of the encoded payload and `detections`, float32 [N, 6] row-major bytes
in full-image pixels. Ground truth (`ground_truth.parquet`) has the same layout.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from avcloud.errors import DataError
from avcloud.types import DETECTION_COLUMNS, GroundTruth, empty_detections

MODEL_COLUMN = "Model"
SIZE_COLUMN = "Network Transport Size [Mb]"
RUNTIME_COLUMN = "Runtime [ms]"
UTILITY_COLUMN = "Utility"
SERVICE_COLUMN = "Service"
WINDOW_COLUMN = "Window"
ENCODE_COLUMN = "Encode [ms]"
RUNTIME_SPREAD_COLUMN = "Runtime spread [ms]"  # P90 - P10 of the repeated timings
PROFILE_COLUMNS = (MODEL_COLUMN, SIZE_COLUMN, RUNTIME_COLUMN, UTILITY_COLUMN)
GROUND_TRUTH_NAME = "ground_truth.parquet"


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def read_table_records(path: str | Path, required_columns: Sequence[str] = PROFILE_COLUMNS
                       ) -> list[tuple[str, dict[str, object]]]:
    """Rows of a CSV or Parquet table (by extension) as (where, record) pairs, where is "line 7"
    (CSV) or "row 6" (Parquet) for error messages. DataError (one line) if it cannot be read or
    lacks a required column."""
    path = Path(path)
    if is_parquet(path):
        try:
            table = pq.read_table(path)
        except OSError as error:
            raise DataError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
        except pa.ArrowException as error:
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        _check_columns(path, table.column_names, required_columns)
        return [(f"row {index}", record) for index, record in enumerate(table.to_pylist())]
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            _check_columns(path, reader.fieldnames or [], required_columns)
            records = []
            for record in reader:
                if None in record:
                    raise DataError(f"{path} line {reader.line_num}: more fields than the header has")
                records.append((f"line {reader.line_num}", record))
            return records
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None


def _check_columns(path: Path, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [column for column in required if column not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a table atomically: Parquet by extension, else a plain CSV like TURBO's
    experiment_model_info.csv (header unquoted)."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".partial")
    if is_parquet(path):
        pq.write_table(table, temporary)
    else:
        with temporary.open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(table.column_names)
            writer.writerows(zip(*(table[name].to_pylist() for name in table.column_names), strict=True))
    os.replace(temporary, path)


def detections_from_bytes(data: bytes) -> np.ndarray:
    if not data:
        return empty_detections()
    return np.frombuffer(data, dtype=np.float32).reshape(-1, DETECTION_COLUMNS)


class DetectionCache:
    """Per-frame detections of every configuration, loaded once into dicts for fast lookup."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            table = pq.read_table(self.path, columns=["frame_index", "camera", "config", "size_bytes", "detections"])
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"{self.path}: cannot read the detection cache ({error})") from None
        columns = table.to_pydict()
        self._detections: dict[tuple[int, str, str], np.ndarray] = {}
        self._size_bytes: dict[tuple[int, str, str], int] = {}
        for frame_index, camera, config, size_bytes, data in zip(
            columns["frame_index"], columns["camera"], columns["config"], columns["size_bytes"],
            columns["detections"], strict=True,
        ):
            key = (int(frame_index), camera, config)
            self._detections[key] = detections_from_bytes(data)
            self._size_bytes[key] = int(size_bytes)
        self.configs: list[str] = sorted(set(columns["config"]))
        self.frame_indices: list[int] = sorted(set(int(index) for index in columns["frame_index"]))
        self.cameras: list[str] = sorted(set(columns["camera"]))
        self._ground_truth: dict[tuple[int, str], GroundTruth] | None = None

    def detections(self, frame_index: int, camera: str, config: str) -> np.ndarray:
        try:
            return self._detections[(frame_index, camera, config)]
        except KeyError:
            raise KeyError(f"no detections cached for frame {frame_index}, camera {camera}, config {config}") from None

    def size_bytes(self, frame_index: int, camera: str, config: str) -> int:
        try:
            return self._size_bytes[(frame_index, camera, config)]
        except KeyError:
            raise KeyError(f"no size cached for frame {frame_index}, camera {camera}, config {config}") from None

    def ground_truth(self, frame_index: int, camera: str) -> GroundTruth:
        """Labels of that image, from ground_truth.parquet beside the cache."""
        if self._ground_truth is None:
            self._ground_truth = read_ground_truth(self.path.parent / GROUND_TRUTH_NAME)
        return self._ground_truth[(frame_index, camera)]


def read_ground_truth(path: Path) -> dict[tuple[int, str], GroundTruth]:
    try:
        columns = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read ground truth ({error})") from None
    result = {}
    for frame_index, camera, data in zip(columns["frame_index"], columns["camera"], columns["detections"], strict=True):
        rows = detections_from_bytes(data)
        result[(int(frame_index), camera)] = GroundTruth(rows[:, :4].copy(), rows[:, 5].astype(np.int32))
    return result
