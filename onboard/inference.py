"""The node's real camera decoder, fallback detector and frame encoder (kernel models and codecs).

Decoding a full 1920x1280 JPEG costs more than everything else the daemon does per camera, and
most configurations never need the full resolution: the fallback and every `inpcomp`
configuration resize to a model input first. The decoder therefore asks libjpeg for a 1/2, 1/4
or 1/8 scale image (DCT scaling, much cheaper) whenever that is still at least as large as the
model inputs the frame needs; `imgcomp` and raw configurations get the full image.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from avcloud.compression import encode_for_model, parse_configuration_name
from avcloud.errors import UserError
from avcloud.models import Detector, get_card
from onboard.daemon import EncodedFrame

# cv2 flags for libjpeg's scaled decoding, by scale denominator.
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


def load_fallback(model_name: str, backend: str = "auto", num_threads: int | None = None
                  ) -> Callable[[np.ndarray, tuple[int, int]], np.ndarray]:
    """The on-car detector: (image_bgr, full_size_wh) -> float32 [N, 6] in full-image pixels (warmed up)."""
    detector = Detector.load(model_name, backend=backend, num_threads=num_threads)
    detector.warmup()

    def detect(image_bgr: np.ndarray, full_size_wh: tuple[int, int]) -> np.ndarray:
        return detector.detect(image_bgr, output_size_wh=full_size_wh)

    return detect


class ModelInputs:
    """Model input sizes (width, height) from the zoo's cards, cached; None for unknown models."""

    def __init__(self, known: dict[str, tuple[int, int]] | None = None) -> None:
        self._sizes: dict[str, tuple[int, int] | None] = dict(known or {})

    def size_wh(self, model: str) -> tuple[int, int] | None:
        if model not in self._sizes:
            try:
                card = get_card(model)
                self._sizes[model] = (card.input_width, card.input_height)
            except UserError:
                self._sizes[model] = None
        return self._sizes[model]


class CameraDecoder:
    """Decodes camera JPEGs at the smallest libjpeg scale the frame's models still get full detail from."""

    def __init__(self, fallback_model: str, model_inputs: ModelInputs | None = None) -> None:
        self.model_inputs = model_inputs or ModelInputs()
        self.fallback_model = fallback_model
        self._needs: dict[str, tuple[int, int] | None] = {}

    def needed_size_wh(self, configuration: str) -> tuple[int, int] | None:
        """Smallest image (width, height) this configuration and the fallback can use; None: full size."""
        if configuration not in self._needs:
            sizes = [self.model_inputs.size_wh(self.fallback_model)]
            if configuration != self.fallback_model:
                try:
                    model, config = parse_configuration_name(configuration)
                except UserError:
                    model, config = None, None
                if config is None or not config.resizes_to_model_input:
                    sizes.append(None)  # imgcomp / raw / unknown: the full frame is sent
                else:
                    sizes.append(self.model_inputs.size_wh(model))
            self._needs[configuration] = None if any(size is None for size in sizes) else (
                max(size[0] for size in sizes), max(size[1] for size in sizes))
        return self._needs[configuration]

    def decode(self, jpeg: bytes | memoryview, full_size_wh: tuple[int, int], configuration: str) -> np.ndarray | None:
        needed = self.needed_size_wh(configuration)
        scale = 1
        if needed is not None:
            for candidate in (8, 4, 2):
                if full_size_wh[0] // candidate >= needed[0] and full_size_wh[1] // candidate >= needed[1]:
                    scale = candidate
                    break
        return cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), _REDUCED_FLAGS[scale])


class CompressionEncoder:
    """Encodes a camera image for a configuration `{model}-imgcomp{X}-inpcomp{Y}` (avcloud.compression).

    The cloud model's input size, needed for input compression, comes from its model card.
    """

    def __init__(self, model_input_wh: dict[str, tuple[int, int]] | None = None) -> None:
        self.model_inputs = ModelInputs(model_input_wh)
        self._parsed: dict[str, tuple] = {}

    def __call__(self, image_bgr: np.ndarray, configuration: str, full_size_wh: tuple[int, int]) -> EncodedFrame:
        parsed = self._parsed.get(configuration)
        if parsed is None:
            parsed = self._parsed[configuration] = parse_configuration_name(configuration)
        model, config = parsed
        input_wh = self.model_inputs.size_wh(model)
        if input_wh is None:
            raise UserError(f"configuration '{configuration}': unknown model '{model}'")
        encoded = encode_for_model(image_bgr, config, input_wh)
        return EncodedFrame(model=model, codec=encoded.codec, payload=encoded.payload,
                            shape_hw=(encoded.height, encoded.width),
                            frame_shape_hw=(full_size_wh[1], full_size_wh[0]), encode_ms=encoded.encode_ms)
