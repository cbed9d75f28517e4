"""Pre- and post-processing of the card's conventions (see `avcloud.models.cards`).

Pre-processing turns a BGR uint8 image into the model's input tensor (stretch or letterbox
resize, channel order, normalisation, NCHW or NHWC, float32 or uint8) and records the
`InputTransform` that maps model-input pixels back to the image. Each output format has one
decoder from the graph's raw outputs (one image, batch axis removed) to candidate rows
[K, 6] = x1, y1, x2, y2, score, model class index in input pixels. `postprocess` then applies
what every format shares: score threshold, the rider merge, the class map to Waymo types, NMS
per Waymo type, the cap, and the mapping back to output pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from avcloud.compression import resize_image
from avcloud.errors import DataError
from avcloud.models.cards import ModelCard, OutputConvention
from avcloud.types import DETECTION_COLUMNS, ObjectType, empty_detections

# ----------------------------------------------------------------------------- input


@dataclass(frozen=True)
class InputTransform:
    """Model-input pixels -> image pixels: image = (input - pad) / scale, per axis."""

    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_image(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        boxes = np.array(boxes_xyxy, dtype=np.float32, copy=True)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - self.pad_x) / self.scale_x
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - self.pad_y) / self.scale_y
        return boxes


def resize_for_model(image_bgr: np.ndarray, card: ModelCard) -> tuple[np.ndarray, InputTransform]:
    """The BGR image at the model's input size (stretched or letterboxed) and how to map boxes back."""
    height, width = image_bgr.shape[:2]
    target_w, target_h = card.input_wh
    if (width, height) == (target_w, target_h):
        return image_bgr, InputTransform(1.0, 1.0)
    if card.resize == "stretch":
        return resize_image(image_bgr, (target_w, target_h)), InputTransform(target_w / width, target_h / height)
    scale = min(target_w / width, target_h / height)
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (target_w - inner_w) // 2, (target_h - inner_h) // 2
    canvas = np.full((target_h, target_w, 3), card.letterbox_fill, dtype=np.uint8)
    canvas[pad_y:pad_y + inner_h, pad_x:pad_x + inner_w] = resize_image(image_bgr, (inner_w, inner_h))
    return canvas, InputTransform(inner_w / width, inner_h / height, float(pad_x), float(pad_y))


def to_model_tensor(model_input_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    """One model-sized BGR image as the model's input tensor, without the batch axis."""
    pixels = model_input_bgr[:, :, ::-1] if card.channel_order == "rgb" else model_input_bgr
    if card.input_dtype == "uint8":
        tensor = np.ascontiguousarray(pixels, dtype=np.uint8)
    else:
        mean = np.asarray(card.mean, dtype=np.float32)
        inverse_std = 1.0 / np.asarray(card.std, dtype=np.float32)
        tensor = (pixels.astype(np.float32) - mean) * inverse_std
    return tensor if card.channels_last else tensor.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- decoders

Decoder = Callable[[Sequence[np.ndarray], ModelCard], np.ndarray]


def _rows(boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    rows = np.empty((len(scores), DETECTION_COLUMNS), dtype=np.float32)
    rows[:, :4] = boxes_xyxy
    rows[:, 4] = scores
    rows[:, 5] = classes
    return rows


def _scale_normalised(rows: np.ndarray, card: ModelCard) -> np.ndarray:
    rows[:, [0, 2]] *= card.input_width
    rows[:, [1, 3]] *= card.input_height
    return rows


def decode_xyxy_score_class(outputs: Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    rows = np.asarray(outputs[0], dtype=np.float32)
    if rows.ndim == 3 and rows.shape[0] == 1:
        rows = rows[0]
    if rows.ndim != 2 or rows.shape[1] != DETECTION_COLUMNS:
        raise DataError(
            f"model output has shape {list(np.shape(outputs[0]))}; the 'xyxy_score_class' convention is [N, 6] "
            "or [B, N, 6] (x1, y1, x2, y2, score, class)"
        )
    rows = rows.copy()
    return _scale_normalised(rows, card) if card.output.boxes == "normalized" else rows


def _candidates(card: ModelCard, boxes_xyxy: np.ndarray, class_scores: np.ndarray) -> np.ndarray:
    """Best class per candidate, kept if at or above the score threshold."""
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(classes)), classes]
    keep = scores >= card.output.score_threshold
    return _rows(boxes_xyxy[keep], scores[keep], classes[keep])


def decode_yolo(outputs: Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    head = np.asarray(outputs[0], dtype=np.float32)
    if head.ndim == 3 and head.shape[0] == 1:
        head = head[0]
    extra = 5 if card.output.objectness else 4
    layout = card.output.yolo_layout
    if layout == "auto" and head.ndim == 2:
        # N (one row per anchor point) is in the thousands, 4+C at most a few hundred.
        layout = "channels_first" if head.shape[0] < head.shape[1] else "channels_last"
    if head.ndim == 2 and layout == "channels_first":
        head = head.T
    if head.ndim != 2 or head.shape[1] <= extra:
        raise DataError(f"model output has shape {list(np.shape(outputs[0]))}; the 'yolo' convention is "
                        f"[1, {extra}+C, N] or [1, N, {extra}+C]")
    centre_x, centre_y, box_w, box_h = head[:, 0], head[:, 1], head[:, 2], head[:, 3]
    boxes = np.stack([centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2], axis=1)
    class_scores = head[:, extra:]
    if card.output.objectness:
        class_scores = class_scores * head[:, 4:5]
    rows = _candidates(card, boxes, class_scores)
    return _scale_normalised(rows, card) if card.output.boxes == "normalized" else rows


def _tf_roles(outputs: Sequence[np.ndarray], names: Sequence[str], card: ModelCard) -> dict[str, np.ndarray]:
    if card.output.tf_output_order is not None:
        if len(outputs) < len(card.output.tf_output_order):
            raise DataError(f"the card names {len(card.output.tf_output_order)} outputs, the graph has {len(outputs)}")
        return dict(zip(card.output.tf_output_order, outputs, strict=False))
    roles: dict[str, np.ndarray] = {}
    for output, name in zip(outputs, names, strict=True):
        lowered = name.lower()
        for role in ("num_detections", "boxes", "scores", "classes"):
            if role in lowered and role not in roles:
                roles[role] = output
                break
    missing = {"boxes", "scores", "classes"} - set(roles)
    if missing:
        raise DataError(f"outputs {list(names)}: cannot tell which is {', '.join(sorted(missing))} "
                        "(name them detection_boxes/_scores/_classes, or set output.tf_output_order)")
    return roles


def decode_tf_object_detection(outputs: Sequence[np.ndarray], card: ModelCard,
                               names: Sequence[str] = ()) -> np.ndarray:
    roles = _tf_roles(outputs, names or [f"output{i}" for i in range(len(outputs))], card)
    boxes = np.asarray(roles["boxes"], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(roles["scores"], dtype=np.float32).reshape(-1)
    classes = np.asarray(roles["classes"], dtype=np.float32).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise DataError(f"TF detection outputs disagree: {len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes")
    count = len(scores)
    if "num_detections" in roles:
        count = min(count, int(np.asarray(roles["num_detections"]).reshape(-1)[0]))
    y1, x1, y2, x2 = boxes[:count].T
    rows = _rows(np.stack([x1, y1, x2, y2], axis=1), scores[:count], classes[:count])
    return _scale_normalised(rows, card)


def decode_nanodet_gfl(outputs: Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    convention = card.output
    bins = convention.reg_max + 1
    arrays = [np.asarray(output, dtype=np.float32) for output in outputs]
    arrays = [array[0] if array.ndim == 3 and array.shape[0] == 1 else array for array in arrays]
    grids = [(card.input_height // stride, card.input_width // stride) for stride in convention.strides]
    cells = [rows * cols for rows, cols in grids]
    if len(arrays) == 1:
        merged = arrays[0]
        if merged.ndim != 2 or merged.shape[0] != sum(cells) or merged.shape[1] <= 4 * bins:
            raise DataError(f"model output has shape {list(merged.shape)}; a single NanoDet output is "
                            f"[1, {sum(cells)}, C + {4 * bins}] for strides {list(convention.strides)}")
        split = np.cumsum(cells)[:-1]
        levels = [(part[:, :-4 * bins], part[:, -4 * bins:]) for part in np.split(merged, split)]
    else:
        levels = []
        for count in cells:
            matching = [array for array in arrays if array.ndim == 2 and array.shape[0] == count]
            distributions = [array for array in matching if array.shape[1] == 4 * bins]
            scores = [array for array in matching if array.shape[1] != 4 * bins]
            if len(distributions) != 1 or len(scores) != 1:
                raise DataError(f"outputs {[list(a.shape) for a in arrays]}: no score map and {4 * bins}-bin "
                                f"distribution pair with {count} cells (strides {list(convention.strides)})")
            levels.append((scores[0], distributions[0]))
    rows = []
    for stride, (_grid_h, grid_w), (class_scores, distribution) in zip(convention.strides, grids, levels, strict=True):
        best = class_scores.max(axis=1)
        keep = np.flatnonzero(best >= convention.score_threshold)
        if keep.size == 0:
            continue
        logits = distribution[keep].reshape(-1, 4, bins)
        weights = np.exp(logits - logits.max(axis=2, keepdims=True))
        weights /= weights.sum(axis=2, keepdims=True)
        distances = (weights * np.arange(bins, dtype=np.float32)).sum(axis=2) * stride  # left, top, right, bottom
        centre_x = (keep % grid_w + convention.cell_offset) * stride
        centre_y = (keep // grid_w + convention.cell_offset) * stride
        boxes = np.stack([centre_x - distances[:, 0], centre_y - distances[:, 1],
                          centre_x + distances[:, 2], centre_y + distances[:, 3]], axis=1)
        rows.append(_candidates(card, boxes, class_scores[keep]))
    return np.concatenate(rows) if rows else np.zeros((0, DETECTION_COLUMNS), np.float32)


DECODERS: dict[str, Decoder] = {
    "xyxy_score_class": decode_xyxy_score_class,
    "yolo": decode_yolo,
    "tf_object_detection": decode_tf_object_detection,
    "nanodet_gfl": decode_nanodet_gfl,
}


def decode(outputs: Sequence[np.ndarray], card: ModelCard, names: Sequence[str] = ()) -> np.ndarray:
    """Candidate rows (input pixels, model class index) of one image's raw outputs."""
    if card.output.format == "tf_object_detection":
        return decode_tf_object_detection(outputs, card, names)
    return DECODERS[card.output.format](outputs, card)


# ----------------------------------------------------------------------------- post-processing


def nms_per_class(rows: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Rows kept by greedy NMS within each class (column 5), best first (OpenCV's batched NMS)."""
    if len(rows) <= 1:
        return rows
    boxes_xywh = np.column_stack([rows[:, 0], rows[:, 1], rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1]])
    keep = cv2.dnn.NMSBoxesBatched(boxes_xywh.astype(np.float64).tolist(), rows[:, 4].astype(float).tolist(),
                                   rows[:, 5].astype(np.int32).tolist(), 0.0, float(iou_threshold))
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    return rows[keep]


# A bicycle must score at least this to take a rider: weak bicycle candidates around a
# walker's legs would otherwise turn pedestrians into cyclists.
RIDER_BICYCLE_MIN_SCORE = 0.3


def merge_riders(rows: np.ndarray, card: ModelCard) -> np.ndarray:
    """Person-on-bicycle pairs -> one CYCLIST-class row (class 'bicycle', the union box).

    A person is a rider of a bicycle (scoring at least RIDER_BICYCLE_MIN_SCORE) when their
    boxes overlap horizontally by at least half of the narrower box, the person's top is above
    the bicycle's and the person's lower half reaches into it. Each bicycle takes the
    best-scoring such person; that person's own row is dropped and the pair scores the mean of
    the two. A bicycle without a rider keeps its box at half its score (Waymo does not label
    parked bicycles).
    """
    person, bicycle = card.class_index("person"), card.class_index("bicycle")
    is_person, is_bicycle = rows[:, 5] == person, rows[:, 5] == bicycle
    if not is_bicycle.any():
        return rows
    people = np.flatnonzero(is_person)
    people = people[np.argsort(-rows[people, 4], kind="stable")]
    taken = np.zeros(len(rows), dtype=bool)
    merged = rows.copy()
    for index in np.flatnonzero(is_bicycle):
        bx1, by1, bx2, by2 = rows[index, :4]
        rider = -1
        for candidate in people if rows[index, 4] >= RIDER_BICYCLE_MIN_SCORE else ():
            if taken[candidate]:
                continue
            px1, py1, px2, py2 = rows[candidate, :4]
            overlap_w = min(bx2, px2) - max(bx1, px1)
            narrower = max(1e-6, min(bx2 - bx1, px2 - px1))
            person_mid_y = (py1 + py2) / 2
            if overlap_w >= 0.5 * narrower and py1 < by1 and person_mid_y < by2 and py2 > by1 + 0.2 * (by2 - by1):
                rider = candidate
                break
        if rider < 0:
            merged[index, 4] = rows[index, 4] * 0.5
            continue
        taken[rider] = True
        merged[index, 0:2] = np.minimum(rows[index, 0:2], rows[rider, 0:2])
        merged[index, 2:4] = np.maximum(rows[index, 2:4], rows[rider, 2:4])
        merged[index, 4] = 0.5 * (rows[index, 4] + rows[rider, 4])
    return merged[~taken]


def rows_to_image(rows: np.ndarray, transform: InputTransform) -> np.ndarray:
    """Candidate rows with their boxes mapped from model-input pixels to image pixels."""
    mapped = np.array(rows, dtype=np.float32, copy=True)
    if len(mapped):
        mapped[:, :4] = transform.to_image(mapped[:, :4])
    return mapped


def keep_box_sizes(rows: np.ndarray, min_px: float = 0.0, max_px: float | None = None) -> np.ndarray:
    """Rows whose longer box side lies in [min_px, max_px] (the units of the rows' boxes)."""
    longer = np.maximum(rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1])
    keep = longer >= min_px
    if max_px is not None:
        keep &= longer <= max_px
    return rows[keep]


@dataclass
class PostProcessor:
    """The shared tail of every convention, built once per card; rows come in image pixels."""

    card: ModelCard

    def __post_init__(self) -> None:
        lookup = self.card.waymo_class_lookup()
        self._class_table = np.full(max(lookup) + 1, -1, dtype=np.int64)
        for index, waymo_value in lookup.items():
            self._class_table[index] = waymo_value

    def __call__(self, rows: np.ndarray, image_wh: tuple[int, int], output_size_wh: tuple[int, int]) -> np.ndarray:
        convention: OutputConvention = self.card.output
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, DETECTION_COLUMNS)
        rows = rows[rows[:, 4] >= convention.score_threshold]
        if convention.merge_riders and len(rows):
            rows = merge_riders(rows, self.card)
        class_index = np.rint(rows[:, 5]).astype(np.int64)
        known = (class_index >= 0) & (class_index < self._class_table.size)
        rows, class_index = rows[known], class_index[known]
        waymo_class = self._class_table[class_index]
        rows = rows[waymo_class >= 0].copy()
        rows[:, 5] = waymo_class[waymo_class >= 0]
        if len(rows) == 0:
            return empty_detections()
        nms_iou = convention.effective_nms_iou
        if nms_iou is not None:
            rows = nms_per_class(rows, nms_iou)
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        if convention.max_detections is not None:
            rows = rows[: convention.max_detections]
        scale_x, scale_y = output_size_wh[0] / image_wh[0], output_size_wh[1] / image_wh[1]
        detections = np.empty((len(rows), DETECTION_COLUMNS), dtype=np.float32)
        detections[:, [0, 2]] = np.clip(rows[:, [0, 2]] * scale_x, 0, output_size_wh[0])
        detections[:, [1, 3]] = np.clip(rows[:, [1, 3]] * scale_y, 0, output_size_wh[1])
        detections[:, 4:] = rows[:, 4:]
        return detections


__all__ = [
    "DECODERS",
    "InputTransform",
    "ObjectType",
    "PostProcessor",
    "decode",
    "keep_box_sizes",
    "merge_riders",
    "nms_per_class",
    "resize_for_model",
    "rows_to_image",
    "to_model_tensor",
]
