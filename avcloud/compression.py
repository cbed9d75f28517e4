"""TURBO's compression configuration space, encoded and decoded with OpenCV.

A configuration is `{model}-imgcomp{X}-inpcomp{Y}` with X, Y in 50, 75, 90, 95 (JPEG quality),
PNG or None:
- image compression (`imgcompX`): the full camera frame is encoded; the cloud resizes it to
  the model input after decoding;
- input compression (`inpcompY`): the frame is first resized to the model's input size, then
  encoded, so the payload is much smaller but the cloud sees only model-sized pixels;
- `imgcompNone-inpcompNone`: the raw full frame (uncompressed BGR bytes).
At most one of X, Y is not None. An optional extra downscale factor (suffix `-down{F}`, F an
integer >= 2) shrinks the image by F before encoding, beyond TURBO's space.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import cv2
import numpy as np

from avcloud.errors import UserError

CODECS: tuple[str, ...] = ("50", "75", "90", "95", "PNG", "None")
JPEG_QUALITIES = ("50", "75", "90", "95")
PNG_COMPRESSION_LEVEL = 1  # fast: PNG is lossless at any level, only size/time change
_NAME_PATTERN = re.compile(r"^(?P<model>.+?)-imgcomp(?P<image>[^-]+)-inpcomp(?P<input>[^-]+)(?:-down(?P<down>\d+))?$")


class UndecodableImage(ValueError):
    """A payload that does not decode to an image of the announced codec and size."""


@dataclass(frozen=True)
class CompressionConfig:
    image_codec: str = "None"
    input_codec: str = "None"
    downscale: int = 1

    def __post_init__(self) -> None:
        for field_name in ("image_codec", "input_codec"):
            value = getattr(self, field_name)
            if value not in CODECS:
                raise UserError(f"{field_name} '{value}' is not one of {', '.join(CODECS)}")
        if self.image_codec != "None" and self.input_codec != "None":
            raise UserError(
                f"imgcomp{self.image_codec}-inpcomp{self.input_codec}: at most one of image and input "
                "compression may be set"
            )
        if not isinstance(self.downscale, int) or self.downscale < 1:
            raise UserError(f"downscale {self.downscale!r} must be an integer >= 1")

    @property
    def name(self) -> str:
        suffix = f"-down{self.downscale}" if self.downscale > 1 else ""
        return f"imgcomp{self.image_codec}-inpcomp{self.input_codec}{suffix}"

    @property
    def resizes_to_model_input(self) -> bool:
        return self.input_codec != "None"

    @property
    def codec(self) -> str:
        """The one active codec ("None" = raw)."""
        return self.input_codec if self.input_codec != "None" else self.image_codec

    @classmethod
    def parse(cls, text: str) -> CompressionConfig:
        """Parse the compression part of a name, e.g. 'imgcompNone-inpcomp75' (or 'inpcomp75')."""
        if "imgcomp" in text and "inpcomp" in text:
            return parse_configuration_name(f"model-{text}")[1]
        short = re.fullmatch(r"(imgcomp|inpcomp)([^-]+)(?:-down(\d+))?", text)
        if short is None:
            raise UserError(f"codec '{text}' is not like 'inpcomp75', 'imgcompPNG' or 'imgcompNone-inpcomp50'")
        kind, codec, down = short.groups()
        if codec not in CODECS:
            raise UserError(f"codec '{text}': '{codec}' is not one of {', '.join(CODECS)}")
        downscale = int(down) if down else 1
        if kind == "imgcomp":
            return cls(image_codec=codec, downscale=downscale)
        return cls(input_codec=codec, downscale=downscale)


def configuration_name(model: str, config: CompressionConfig) -> str:
    return f"{model}-{config.name}"


@functools.lru_cache(maxsize=4096)  # every replayed car of a fleet reads the same few names
def parse_configuration_name(name: str) -> tuple[str, CompressionConfig]:
    """'avd-cloud-l-imgcompNone-inpcomp75' -> ('avd-cloud-l', CompressionConfig('None', '75'))."""
    match = _NAME_PATTERN.match(name)
    if match is None:
        raise UserError(f"configuration name '{name}' is not like '{{model}}-imgcomp{{X}}-inpcomp{{Y}}'")
    for part in ("image", "input"):
        if match[part] not in CODECS:
            raise UserError(f"configuration name '{name}': '{match[part]}' is not one of {', '.join(CODECS)}")
    downscale = int(match["down"]) if match["down"] else 1
    return match["model"], CompressionConfig(match["image"], match["input"], downscale)


@dataclass(frozen=True)
class EncodedImage:
    payload: bytes
    codec: str  # "jpeg", "png" or "raw"
    width: int  # of the encoded image
    height: int
    source_width: int  # of the camera frame it came from
    source_height: int
    encode_ms: float

    @property
    def size_bytes(self) -> int:
        return len(self.payload)

    @property
    def size_mbit(self) -> float:
        return len(self.payload) * 8 / 1e6


def encode_image(image_bgr: np.ndarray, codec: str) -> tuple[bytes, str]:
    """Encode with one of CODECS; returns the payload and the wire codec name."""
    if codec == "None":
        return np.ascontiguousarray(image_bgr).tobytes(), "raw"
    if codec == "PNG":
        ok, encoded = cv2.imencode(".png", image_bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION_LEVEL])
        wire_codec = "png"
    elif codec in JPEG_QUALITIES:
        ok, encoded = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(codec)])
        wire_codec = "jpeg"
    else:
        raise UserError(f"codec '{codec}' is not one of {', '.join(CODECS)}")
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {image_bgr.shape} image as {codec}")
    return encoded.tobytes(), wire_codec


def resize_image(image_bgr: np.ndarray, target_wh: tuple[int, int]) -> np.ndarray:
    """Resize for a model input: halve while still twice the target, then one bilinear step.

    A bilinear halving is exactly a 2x2 box average, so the chain anti-aliases like an area
    filter (within about 40 dB PSNR of INTER_AREA) at 5-8x less CPU: INTER_AREA at the
    non-integer ratios of camera frames to model inputs costs 4-12 ms per image.
    """
    target_width, target_height = target_wh
    height, width = image_bgr.shape[:2]
    image = image_bgr
    while width >= 2 * target_width and height >= 2 * target_height:
        width, height = width // 2, height // 2
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if (width, height) != (target_width, target_height):
        image = cv2.resize(image, (target_width, target_height), interpolation=cv2.INTER_LINEAR)
    return image


def encode_for_model(
    image_bgr: np.ndarray, config: CompressionConfig, model_input_wh: tuple[int, int]
) -> EncodedImage:
    """Prepare one camera frame for a cloud model: resize (input compression) and/or encode."""
    started = time.perf_counter()
    source_height, source_width = image_bgr.shape[:2]
    image = image_bgr
    if config.resizes_to_model_input:
        image = resize_image(image, model_input_wh)
    if config.downscale > 1:
        height, width = image.shape[:2]
        target = (max(1, width // config.downscale), max(1, height // config.downscale))
        image = resize_image(image, target)
    payload, wire_codec = encode_image(image, config.codec)
    encode_ms = (time.perf_counter() - started) * 1000.0
    return EncodedImage(payload, wire_codec, image.shape[1], image.shape[0], source_width, source_height, encode_ms)


def decode_image(payload: bytes, codec: str, width: int, height: int) -> np.ndarray:
    """Decode a payload back to BGR uint8 [height, width, 3]; UndecodableImage if it is not one."""
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"image size {width}x{height} is not positive")
    if codec == "raw":
        expected = width * height * 3
        if len(payload) != expected:
            raise UndecodableImage(f"raw payload has {len(payload)} bytes, {width}x{height} BGR needs {expected}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(height, width, 3)
    if codec not in ("jpeg", "png"):
        raise UndecodableImage(f"unknown codec '{codec}' (expected jpeg, png or raw)")
    image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR) if payload else None
    if image is None:
        raise UndecodableImage(f"payload of {len(payload)} bytes is not a decodable {codec} image")
    if image.shape[1] != width or image.shape[0] != height:
        raise UndecodableImage(f"{codec} image is {image.shape[1]}x{image.shape[0]}, expected {width}x{height}")
    return image
