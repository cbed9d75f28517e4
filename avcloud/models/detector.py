"""A loaded detector: card + backend + the pre/post-processing of the zoo's conventions.

`detect` takes any BGR image (a full camera frame or an already model-sized input), resizes it
to the model input if needed, runs the backend, drops low-score rows, maps class indices to
Waymo ObjectType values and scales boxes to the requested output size (by default the size of
the image given). Side cameras (1920x886) are stretched to the 3:2 input, as in training.
"""

from __future__ import annotations

import numpy as np

from avcloud.compression import resize_image
from avcloud.errors import DataError
from avcloud.models.backends import InferenceBackend, open_backend
from avcloud.models.cards import ModelCard
from avcloud.types import DETECTION_COLUMNS, empty_detections


def model_input_from_image(image_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    """Resize a BGR uint8 image to the model's input size, as input compression does."""
    height, width = image_bgr.shape[:2]
    if (width, height) == card.input_wh:
        return image_bgr
    return resize_image(image_bgr, card.input_wh)


def normalise_to_chw(model_input_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    pixels = model_input_bgr[:, :, ::-1] if card.channel_order == "rgb" else model_input_bgr
    mean = np.asarray(card.mean, dtype=np.float32)
    inverse_std = 1.0 / np.asarray(card.std, dtype=np.float32)
    return ((pixels.astype(np.float32) - mean) * inverse_std).transpose(2, 0, 1)


def raw_output_rows(raw_output: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split a backend output of shape [B, K, 6] (or [K, 6] when B == 1) into per-image rows."""
    if raw_output.ndim == 2 and batch_size == 1 and raw_output.shape[1] == DETECTION_COLUMNS:
        return [raw_output]
    if raw_output.ndim == 3 and raw_output.shape[0] == batch_size and raw_output.shape[2] == DETECTION_COLUMNS:
        return list(raw_output)
    raise DataError(
        f"model output has shape {list(raw_output.shape)}; the zoo's convention is [N, 6] or [B, N, 6] "
        "(x1, y1, x2, y2, score, class)"
    )


class Detector:
    """One model ready to run. Build with `Detector.load(name_or_card, backend)`."""

    def __init__(self, card: ModelCard, backend: InferenceBackend) -> None:
        self.card = card
        self.backend = backend
        self._class_lookup = card.waymo_class_lookup()
        lookup_size = max(self._class_lookup) + 1
        # Vectorised class mapping; -1 marks indices the card does not map (those rows are dropped).
        self._class_table = np.full(lookup_size, -1, dtype=np.int64)
        for index, waymo_value in self._class_lookup.items():
            self._class_table[index] = waymo_value

    @classmethod
    def load(cls, name_or_card: str | ModelCard, backend: str = "auto", num_threads: int | None = None) -> Detector:
        if isinstance(name_or_card, ModelCard):
            card = name_or_card
        else:
            from avcloud.models.zoo import get_card

            card = get_card(name_or_card)
        return cls(card, open_backend(card, backend, num_threads))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def warmup(self, iterations: int = 2) -> None:
        blank = np.zeros((self.card.input_height, self.card.input_width, 3), dtype=np.uint8)
        for _ in range(iterations):
            self.detect(blank)

    def detect(self, image_bgr: np.ndarray, output_size_wh: tuple[int, int] | None = None) -> np.ndarray:
        return self.detect_batch([image_bgr], [output_size_wh])[0]

    def detect_batch(
        self,
        images_bgr: list[np.ndarray],
        output_sizes_wh: list[tuple[int, int] | None] | None = None,
    ) -> list[np.ndarray]:
        if not images_bgr:
            return []
        if output_sizes_wh is None:
            output_sizes_wh = [None] * len(images_bgr)
        batch = np.stack([normalise_to_chw(model_input_from_image(image, self.card), self.card) for image in images_bgr])
        rows_per_image = raw_output_rows(np.asarray(self.backend.run(batch)), len(images_bgr))
        results = []
        for image, rows, output_size in zip(images_bgr, rows_per_image, output_sizes_wh, strict=True):
            if output_size is None:
                output_size = (image.shape[1], image.shape[0])
            results.append(self._postprocess(rows, output_size))
        return results

    def _postprocess(self, rows: np.ndarray, output_size_wh: tuple[int, int]) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        rows = rows[rows[:, 4] >= self.card.output.score_threshold]
        class_index = rows[:, 5].round().astype(np.int64)
        known = (class_index >= 0) & (class_index < self._class_table.size)
        rows, class_index = rows[known], class_index[known]
        waymo_class = self._class_table[class_index]
        rows, waymo_class = rows[waymo_class >= 0], waymo_class[waymo_class >= 0]
        if rows.shape[0] == 0:
            return empty_detections()
        if self.card.output.boxes == "normalized":
            scale_x, scale_y = float(output_size_wh[0]), float(output_size_wh[1])
        else:
            scale_x = output_size_wh[0] / self.card.input_width
            scale_y = output_size_wh[1] / self.card.input_height
        detections = np.empty((rows.shape[0], DETECTION_COLUMNS), dtype=np.float32)
        detections[:, [0, 2]] = np.clip(rows[:, [0, 2]] * scale_x, 0, output_size_wh[0])
        detections[:, [1, 3]] = np.clip(rows[:, [1, 3]] * scale_y, 0, output_size_wh[1])
        detections[:, 4] = rows[:, 4]
        detections[:, 5] = waymo_class
        order = np.argsort(-detections[:, 4], kind="stable")
        return detections[order]
