"""A loaded detector: card + backend + the pre/post-processing of the card's conventions.

`detect` takes any BGR image (a full camera frame or an already model-sized input), resizes it
to the model input as the card says (stretch or letterbox), runs the backend, decodes the raw
outputs with the card's output convention, drops low-score rows and unmapped classes, maps
class indices to Waymo ObjectType values and scales boxes to the requested output size (by
default the size of the image given). With the default stretch resize, side cameras (1920x886)
are stretched to the model's input, as in training.
"""

from __future__ import annotations

import numpy as np

from avcloud.compression import resize_image
from avcloud.errors import DataError
from avcloud.models.backends import InferenceBackend, open_backend
from avcloud.models.cards import ModelCard
from avcloud.models.conventions import (
    PostProcessor,
    decode,
    keep_box_sizes,
    resize_for_model,
    rows_to_image,
    to_model_tensor,
)
from avcloud.types import DETECTION_COLUMNS


def model_input_from_image(image_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    """The BGR image at the model's input size (stretched or letterboxed, as the card says)."""
    return resize_for_model(image_bgr, card)[0]


def normalise_to_chw(model_input_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    """A model-sized BGR image as the model's input tensor (layout and dtype from the card)."""
    return to_model_tensor(model_input_bgr, card)


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


def _per_image(outputs: list[np.ndarray], batch_size: int, image: int) -> list[np.ndarray]:
    """One image's slice of every output (a single image's outputs are passed whole)."""
    if batch_size == 1:
        return [np.asarray(output) for output in outputs]
    sliced = []
    for output in outputs:
        output = np.asarray(output)
        if output.ndim == 0 or output.shape[0] != batch_size:
            raise DataError(f"model output has shape {list(output.shape)}; expected a batch axis of {batch_size}")
        sliced.append(output[image:image + 1])
    return sliced


class Detector:
    """One model ready to run. Build with `Detector.load(name_or_card, backend)`."""

    def __init__(self, card: ModelCard, backend: InferenceBackend) -> None:
        self.card = card
        self.backend = backend
        self._postprocess = PostProcessor(card)
        self._output_names = tuple(getattr(backend, "output_names", ()))
        # Extra passes of a multi-scale card: (card at that input size, smallest box kept).
        self._extra_passes = [
            (card.model_copy(update={"input_width": extra.input_width, "input_height": extra.input_height,
                                     "multi_scale": None}), extra.min_box_px)
            for extra in (card.multi_scale.passes if card.multi_scale else ())
        ]
        self._main_max_box_px = card.multi_scale.max_box_px if card.multi_scale else None

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
        inputs, transforms = [], []
        for image in images_bgr:
            model_input, transform = resize_for_model(image, self.card)
            inputs.append(to_model_tensor(model_input, self.card))
            transforms.append(transform)
        outputs = self.backend.run_outputs(np.stack(inputs))
        results = []
        for index, (image, transform, output_size) in enumerate(
                zip(images_bgr, transforms, output_sizes_wh, strict=True)):
            image_wh = (image.shape[1], image.shape[0])
            rows = decode(_per_image(outputs, len(images_bgr), index), self.card, self._output_names)
            if self._main_max_box_px is not None:
                rows = keep_box_sizes(rows, max_px=self._main_max_box_px)
            candidates = [rows_to_image(rows, transform)]
            for pass_card, min_box_px in self._extra_passes:
                pass_input, pass_transform = resize_for_model(image, pass_card)
                pass_outputs = self.backend.run_outputs(to_model_tensor(pass_input, pass_card)[None])
                pass_rows = keep_box_sizes(decode(pass_outputs, pass_card, self._output_names), min_px=min_box_px)
                candidates.append(rows_to_image(pass_rows, pass_transform))
            results.append(self._postprocess(np.concatenate(candidates), image_wh, output_size or image_wh))
        return results


__all__ = ["Detector", "model_input_from_image", "normalise_to_chw", "raw_output_rows", "resize_image"]
