"""TURBO's compression space: names, encode/decode round trips, sizes, garbage payloads."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from avcloud.compression import (
    CODECS,
    CompressionConfig,
    UndecodableImage,
    configuration_name,
    decode_image,
    encode_for_model,
    parse_configuration_name,
)
from avcloud.errors import UserError


@functools.lru_cache(maxsize=4)
def camera_frame(width: int = 1920, height: int = 1280) -> np.ndarray:
    """A frame with smooth structure plus sensor-like noise, so codecs behave as on real images."""
    rng = np.random.default_rng(7)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    base = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), axis=2)
    base[300:500, 400:900] = (30, 30, 200)
    # A tiled noise patch: realistic codec behaviour without drawing millions of normals.
    patch = rng.normal(0, 4, (64, 64, 3)).astype(np.float32)
    noise = np.tile(patch, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    frame = np.clip(base + noise, 0, 255).astype(np.uint8)
    frame.setflags(write=False)
    return frame


@pytest.mark.parametrize(
    ("name", "model", "image_codec", "input_codec", "downscale"),
    [
        ("avd-cloud-l-imgcompNone-inpcomp75", "avd-cloud-l", "None", "75", 1),
        ("edd7x-imgcompPNG-inpcompNone", "edd7x", "PNG", "None", 1),
        ("avd-onboard-imgcompNone-inpcompNone", "avd-onboard", "None", "None", 1),
        ("m-imgcomp90-inpcompNone-down2", "m", "90", "None", 2),
    ],
)
def test_configuration_names_round_trip(name, model, image_codec, input_codec, downscale):
    parsed_model, config = parse_configuration_name(name)
    assert parsed_model == model
    assert config == CompressionConfig(image_codec, input_codec, downscale)
    assert configuration_name(parsed_model, config) == name


@pytest.mark.parametrize(
    "bad_name",
    ["avd-cloud-l", "avd-cloud-l-imgcomp80-inpcompNone", "x-imgcomp50-inpcomp75", "x-imgcompjpeg-inpcompNone", ""],
)
def test_bad_configuration_names_are_user_errors(bad_name):
    with pytest.raises(UserError):
        parse_configuration_name(bad_name)


def test_short_codec_names_parse():
    assert CompressionConfig.parse("inpcomp50") == CompressionConfig("None", "50")
    assert CompressionConfig.parse("imgcompPNG") == CompressionConfig("PNG", "None")
    assert CompressionConfig.parse("imgcompNone-inpcompNone") == CompressionConfig()
    with pytest.raises(UserError, match="codec 'inpcomp51'"):
        CompressionConfig.parse("inpcomp51")


def test_input_compression_resizes_to_the_model_input_then_encodes():
    frame = camera_frame()
    encoded = encode_for_model(frame, CompressionConfig("None", "75"), (576, 384))
    assert (encoded.codec, encoded.width, encoded.height) == ("jpeg", 576, 384)
    assert (encoded.source_width, encoded.source_height) == (1920, 1280)
    assert encoded.encode_ms > 0
    decoded = decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height)
    assert decoded.shape == (384, 576, 3)


def test_jpeg50_input_compression_is_tens_of_times_smaller_than_raw():
    frame = camera_frame()
    raw = encode_for_model(frame, CompressionConfig(), (1152, 768))
    jpeg50 = encode_for_model(frame, CompressionConfig("None", "50"), (1152, 768))
    image90 = encode_for_model(frame, CompressionConfig("90", "None"), (1152, 768))
    assert raw.size_bytes == 1920 * 1280 * 3
    assert raw.size_mbit == pytest.approx(58.98, abs=0.01)  # TURBO's raw-frame row
    assert raw.size_bytes / jpeg50.size_bytes > 20
    assert jpeg50.size_bytes < image90.size_bytes < raw.size_bytes


def test_jpeg_quality_orders_size_and_fidelity():
    frame = camera_frame(640, 480)
    sizes, errors = [], []
    for quality in ("50", "75", "90", "95"):
        encoded = encode_for_model(frame, CompressionConfig(quality, "None"), (320, 240))
        decoded = decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height)
        sizes.append(encoded.size_bytes)
        errors.append(float(np.abs(decoded.astype(int) - frame.astype(int)).mean()))
    assert sizes == sorted(sizes)
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("config", [CompressionConfig(), CompressionConfig("PNG", "None")])
def test_raw_and_png_are_lossless(config):
    frame = camera_frame(320, 200)
    encoded = encode_for_model(frame, config, (64, 64))
    assert encoded.codec == ("raw" if config.codec == "None" else "png")
    assert np.array_equal(decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height), frame)


def test_downscale_shrinks_the_encoded_image():
    frame = camera_frame(640, 480)
    encoded = encode_for_model(frame, CompressionConfig("90", "None", downscale=2), (100, 100))
    assert (encoded.width, encoded.height) == (320, 240)


def test_image_and_input_compression_together_is_rejected():
    with pytest.raises(UserError, match="at most one"):
        CompressionConfig("50", "75")
    with pytest.raises(UserError):
        CompressionConfig("JPEG", "None")
    assert "None" in CODECS


@pytest.mark.parametrize(
    ("payload", "codec", "width", "height"),
    [
        (b"not an image at all", "jpeg", 10, 10),
        (b"", "png", 10, 10),
        (bytes(299), "raw", 10, 10),
        (bytes(300), "webp", 10, 10),
        (bytes(300), "raw", 0, 10),
    ],
)
def test_garbage_payloads_raise_undecodable_image(payload, codec, width, height):
    with pytest.raises(UndecodableImage):
        decode_image(payload, codec, width, height)


def test_decoded_size_must_match_the_announced_size():
    frame = camera_frame(64, 48)
    encoded = encode_for_model(frame, CompressionConfig("75", "None"), (64, 48))
    with pytest.raises(UndecodableImage, match="expected 32x48"):
        decode_image(encoded.payload, "jpeg", 32, 48)
    assert issubclass(UndecodableImage, ValueError)
