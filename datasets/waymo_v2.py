"""Waymo Open Dataset v2 (Parquet components) with pyarrow.

A v2 dataset directory holds one Parquet file per segment and component:
`camera_image/<segment>.parquet` (JPEG per frame and camera), `camera_box/<segment>.parquet`
(one row per 2D box) and optionally `camera_calibration/<segment>.parquet` (image sizes).
Images are read one row group at a time, and only the requested cameras are kept, so memory
stays bounded by a row group whatever the segment size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from avcloud.errors import DataError
from avcloud.types import GroundTruth
from datasets.scene import CameraImage, Scene, SceneFrame, frame_rate_from_timestamps, jpeg_size
from datasets.waymo_v1 import camera_name, camera_number

SEGMENT = "key.segment_context_name"
TIMESTAMP = "key.frame_timestamp_micros"
CAMERA = "key.camera_name"
OBJECT_ID = "key.camera_object_id"
IMAGE = "[CameraImageComponent].image"
BOX_CENTER_X = "[CameraBoxComponent].box.center.x"
BOX_CENTER_Y = "[CameraBoxComponent].box.center.y"
BOX_SIZE_X = "[CameraBoxComponent].box.size.x"
BOX_SIZE_Y = "[CameraBoxComponent].box.size.y"
BOX_TYPE = "[CameraBoxComponent].type"
CALIBRATION_WIDTH = "[CameraCalibrationComponent].width"
CALIBRATION_HEIGHT = "[CameraCalibrationComponent].height"
_EMPTY_TRUTH = GroundTruth(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))


def list_segments(root: str | Path) -> list[str]:
    return sorted(path.stem for path in (Path(root) / "camera_image").glob("*.parquet"))


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def _require_columns(parquet: pq.ParquetFile, path: Path, columns: Sequence[str]) -> None:
    names = set(parquet.schema_arrow.names)
    missing = [column for column in columns if column not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")


class WaymoV2Scene(Scene):
    """One segment of a Waymo v2 dataset directory."""

    format = "waymo-v2"

    def __init__(self, root: str | Path, segment: str | None = None, row_group_cache: int = 2) -> None:
        self.root = Path(root)
        segments = list_segments(self.root)
        if not segments:
            raise DataError(f"{self.root}: not a Waymo v2 directory (no camera_image/*.parquet)")
        if segment is None:
            if len(segments) > 1:
                raise DataError(f"{self.root}: holds {len(segments)} segments ({', '.join(segments[:3])}, ...); choose one")
            segment = segments[0]
        elif segment not in segments:
            raise DataError(f"{self.root}: no segment '{segment}' in camera_image/")
        self.name = segment
        self.image_path = self.root / "camera_image" / f"{segment}.parquet"
        self._images = _open_parquet(self.image_path)
        _require_columns(self._images, self.image_path, (TIMESTAMP, CAMERA, IMAGE))
        # Keys of every row, per row group (only the two small key columns are read).
        self._row_group_keys: list[tuple[np.ndarray, np.ndarray]] = []
        all_timestamps = []
        camera_numbers: set[int] = set()
        for group in range(self._images.num_row_groups):
            keys = self._images.read_row_group(group, columns=[TIMESTAMP, CAMERA])
            timestamps = keys.column(TIMESTAMP).to_numpy().astype(np.int64)
            cameras = keys.column(CAMERA).to_numpy().astype(np.int64)
            self._row_group_keys.append((timestamps, cameras))
            all_timestamps.append(timestamps)
            camera_numbers.update(np.unique(cameras).tolist())
        timestamps = np.unique(np.concatenate(all_timestamps)) if all_timestamps else np.zeros(0, np.int64)
        if timestamps.size == 0:
            raise DataError(f"{self.image_path}: no image rows")
        self._timestamps = timestamps
        self.num_frames = int(timestamps.size)
        self.frame_rate_hz = frame_rate_from_timestamps(timestamps.tolist())
        self.cameras = tuple(camera_name(number) for number in sorted(camera_numbers))
        self._boxes = self._read_boxes()
        self._sizes = self._read_sizes()
        self._cache: OrderedDict[tuple[int, frozenset[int] | None], dict[tuple[int, int], bytes]] = OrderedDict()
        self._cache_size = row_group_cache

    def _read_boxes(self) -> dict[tuple[int, int], GroundTruth]:
        path = self.root / "camera_box" / f"{self.name}.parquet"
        if not path.exists():
            return {}
        parquet = _open_parquet(path)
        columns = (TIMESTAMP, CAMERA, BOX_CENTER_X, BOX_CENTER_Y, BOX_SIZE_X, BOX_SIZE_Y, BOX_TYPE)
        _require_columns(parquet, path, columns)
        table = parquet.read(columns=list(columns))
        if table.num_rows == 0:
            return {}
        timestamps = table.column(TIMESTAMP).to_numpy().astype(np.int64)
        cameras = table.column(CAMERA).to_numpy().astype(np.int64)
        cx, cy = table.column(BOX_CENTER_X).to_numpy(), table.column(BOX_CENTER_Y).to_numpy()
        sx, sy = table.column(BOX_SIZE_X).to_numpy(), table.column(BOX_SIZE_Y).to_numpy()
        boxes = np.stack([cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2], axis=1).astype(np.float32)
        types = table.column(BOX_TYPE).to_numpy().astype(np.int32)
        order = np.lexsort((cameras, timestamps))
        keys = np.stack([timestamps[order], cameras[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
        ends = np.r_[starts[1:], len(order)]
        grouped = {}
        for start, end in zip(starts, ends, strict=True):
            rows = order[start:end]
            grouped[(int(keys[start, 0]), int(keys[start, 1]))] = GroundTruth(boxes[rows], types[rows])
        return grouped

    def _read_sizes(self) -> dict[int, tuple[int, int]]:
        path = self.root / "camera_calibration" / f"{self.name}.parquet"
        if not path.exists():
            return {}
        parquet = _open_parquet(path)
        if not {CAMERA, CALIBRATION_WIDTH, CALIBRATION_HEIGHT} <= set(parquet.schema_arrow.names):
            return {}
        table = parquet.read(columns=[CAMERA, CALIBRATION_WIDTH, CALIBRATION_HEIGHT])
        return {
            int(camera): (int(width), int(height))
            for camera, width, height in zip(
                table.column(CAMERA).to_pylist(), table.column(CALIBRATION_WIDTH).to_pylist(),
                table.column(CALIBRATION_HEIGHT).to_pylist(), strict=True,
            )
        }

    def _row_group_images(self, group: int, camera_numbers: frozenset[int] | None) -> dict[tuple[int, int], bytes]:
        key = (group, camera_numbers)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._images.read_row_group(group, columns=[TIMESTAMP, CAMERA, IMAGE])
        if camera_numbers is not None:
            wanted = pa.array(sorted(camera_numbers), type=table.schema.field(CAMERA).type)
            table = table.filter(pc.is_in(table.column(CAMERA), value_set=wanted))
        images = {
            (int(timestamp), int(camera)): image
            for timestamp, camera, image in zip(
                table.column(TIMESTAMP).to_numpy(), table.column(CAMERA).to_numpy(),
                table.column(IMAGE).to_pylist(), strict=True,
            )
        }
        self._cache[key] = images
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return images

    def _groups_with(self, timestamp: int) -> list[int]:
        return [group for group, (timestamps, _) in enumerate(self._row_group_keys)
                if timestamps.size and timestamps.min() <= timestamp <= timestamps.max() and np.any(timestamps == timestamp)]

    def _scene_frame(self, index: int, camera_numbers: frozenset[int] | None) -> SceneFrame:
        timestamp = int(self._timestamps[index])
        cameras: dict[str, CameraImage] = {}
        found: dict[int, bytes] = {}
        for group in self._groups_with(timestamp):
            for (row_timestamp, number), image in self._row_group_images(group, camera_numbers).items():
                if row_timestamp == timestamp:
                    found[number] = image
        for number in sorted(found):
            image = found[number]
            width, height = self._sizes.get(number) or jpeg_size(image)
            truth = self._boxes.get((timestamp, number), _EMPTY_TRUTH)
            cameras[camera_name(number)] = CameraImage(camera_name(number), width, height, image, truth)
        return SceneFrame(index=index, timestamp_micros=timestamp, cameras=cameras)

    def frames(self, cameras: Sequence[str] | None = None) -> Iterator[SceneFrame]:
        wanted = self._check_cameras(cameras)
        numbers = None if wanted is None else frozenset(camera_number(name) for name in wanted)
        for index in range(self.num_frames):
            yield self._scene_frame(index, numbers)

    def frame(self, index: int) -> SceneFrame:
        return self._scene_frame(self._check_index(index), None)


def write_v2_scene(scene: Scene, out_dir: str | Path, frames_per_row_group: int = 10) -> Path:
    """Write any scene as a Waymo v2 directory (camera_image, camera_box, camera_calibration)."""
    out_dir = Path(out_dir)
    for component in ("camera_image", "camera_box", "camera_calibration"):
        (out_dir / component).mkdir(parents=True, exist_ok=True)
    segment = scene.name
    image_schema = pa.schema([
        (SEGMENT, pa.string()), (TIMESTAMP, pa.int64()), (CAMERA, pa.int8()), (IMAGE, pa.binary()),
    ])
    box_columns: dict[str, list] = {name: [] for name in (
        SEGMENT, TIMESTAMP, CAMERA, OBJECT_ID, BOX_CENTER_X, BOX_CENTER_Y, BOX_SIZE_X, BOX_SIZE_Y, BOX_TYPE)}
    sizes: dict[int, tuple[int, int]] = {}
    with pq.ParquetWriter(out_dir / "camera_image" / f"{segment}.parquet", image_schema) as writer:
        batch: dict[str, list] = {name: [] for name in image_schema.names}
        for frame in scene.frames():
            for name, image in frame.cameras.items():
                number = camera_number(name)
                sizes[number] = (image.width, image.height)
                batch[SEGMENT].append(segment)
                batch[TIMESTAMP].append(frame.timestamp_micros)
                batch[CAMERA].append(number)
                batch[IMAGE].append(image.jpeg_bytes)
                truth = image.ground_truth
                for k, (box, object_type) in enumerate(zip(truth.boxes_xyxy.astype(np.float64), truth.classes, strict=True)):
                    box_columns[SEGMENT].append(segment)
                    box_columns[TIMESTAMP].append(frame.timestamp_micros)
                    box_columns[CAMERA].append(number)
                    box_columns[OBJECT_ID].append(f"{frame.index}-{name}-{k}")
                    box_columns[BOX_CENTER_X].append((box[0] + box[2]) / 2)
                    box_columns[BOX_CENTER_Y].append((box[1] + box[3]) / 2)
                    box_columns[BOX_SIZE_X].append(box[2] - box[0])
                    box_columns[BOX_SIZE_Y].append(box[3] - box[1])
                    box_columns[BOX_TYPE].append(int(object_type))
            if (frame.index + 1) % frames_per_row_group == 0:
                writer.write_table(pa.table(batch, schema=image_schema))
                batch = {name: [] for name in image_schema.names}
        if batch[SEGMENT]:
            writer.write_table(pa.table(batch, schema=image_schema))
    box_schema = pa.schema([
        (SEGMENT, pa.string()), (TIMESTAMP, pa.int64()), (CAMERA, pa.int8()), (OBJECT_ID, pa.string()),
        (BOX_CENTER_X, pa.float64()), (BOX_CENTER_Y, pa.float64()), (BOX_SIZE_X, pa.float64()),
        (BOX_SIZE_Y, pa.float64()), (BOX_TYPE, pa.int8()),
    ])
    pq.write_table(pa.table(box_columns, schema=box_schema), out_dir / "camera_box" / f"{segment}.parquet")
    calibration = pa.table({
        SEGMENT: [segment] * len(sizes),
        CAMERA: pa.array(sorted(sizes), type=pa.int8()),
        CALIBRATION_WIDTH: pa.array([sizes[n][0] for n in sorted(sizes)], type=pa.int32()),
        CALIBRATION_HEIGHT: pa.array([sizes[n][1] for n in sorted(sizes)], type=pa.int32()),
    })
    pq.write_table(calibration, out_dir / "camera_calibration" / f"{segment}.parquet")
    return out_dir
