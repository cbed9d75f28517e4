"""Detector runtime: backend selection and fallback, pre/post-processing, batching, torch parity."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest

from avcloud.errors import ConfigError
from avcloud.models import Detector, backends, get_card
from avcloud.types import ObjectType


@functools.lru_cache(maxsize=1)
def front_frame() -> np.ndarray:
    from datasets.synthetic import render_camera

    image, _ = render_camera(0, 30, "FRONT")
    image.setflags(write=False)
    return image


def test_cpu_backend_detects_in_full_image_pixels_with_waymo_classes():
    detector = Detector.load("avd-cloud-s", "onnxruntime")
    assert detector.backend_name == "onnxruntime[CPUExecutionProvider]"
    detections = detector.detect(front_frame())
    assert detections.dtype == np.float32 and detections.shape[1] == 6
    assert 0 < len(detections) <= 100
    assert np.all(detections[:, 4] >= detector.card.output.score_threshold)
    assert np.all(np.diff(detections[:, 4]) <= 0)  # best first
    assert set(detections[:, 5].astype(int)) <= {int(t) for t in ObjectType if t != ObjectType.UNKNOWN}
    assert np.all((detections[:, [0, 2]] >= 0) & (detections[:, [0, 2]] <= 1920))
    assert np.all((detections[:, [1, 3]] >= 0) & (detections[:, [1, 3]] <= 1280))


def test_output_size_rescales_boxes_from_a_model_sized_input():
    """The cloud decodes an input-compressed (model-sized) image and maps boxes to the camera frame."""
    import cv2

    detector = Detector.load("avd-cloud-s", "onnxruntime")
    model_sized = cv2.resize(front_frame(), detector.card.input_wh, interpolation=cv2.INTER_AREA)
    in_input_pixels = detector.detect(model_sized)
    in_frame_pixels = detector.detect(model_sized, output_size_wh=(1920, 1280))
    np.testing.assert_allclose(in_frame_pixels[:, [0, 2]], in_input_pixels[:, [0, 2]] * 1920 / 576, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(in_frame_pixels[:, [1, 3]], in_input_pixels[:, [1, 3]] * 1280 / 384, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(in_frame_pixels[:, 4:], in_input_pixels[:, 4:])


def test_batched_detection_equals_one_by_one():
    detector = Detector.load("avd-onboard", "onnxruntime")
    frame = front_frame()
    flipped = np.ascontiguousarray(frame[:, ::-1])
    batched = detector.detect_batch([frame, flipped])
    for image, result in zip([frame, flipped], batched, strict=True):
        np.testing.assert_allclose(result, detector.detect(image), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("requested", ["onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"])
def test_missing_gpu_provider_falls_back_to_cpu_with_a_warning(requested, monkeypatch, caplog):
    # Pretend this machine has no GPU stack whatever is installed, so the test means the same everywhere.
    monkeypatch.setattr(backends, "_available_ort_providers", lambda: ["CPUExecutionProvider"])

    def no_tensorrt(card, max_batch=8):
        raise backends.BackendUnavailable("tensorrt cannot be imported (No module named 'tensorrt')")

    monkeypatch.setattr(backends, "TensorRTBackend", no_tensorrt)
    with caplog.at_level(logging.INFO, logger="avcloud.models"):
        detector = Detector.load("avd-onboard", requested)
    assert detector.backend_name == "onnxruntime[CPUExecutionProvider]"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(requested in message and "falling back" in message for message in warnings)
    assert any("inference backend onnxruntime[CPUExecutionProvider]" in r.getMessage() for r in caplog.records)
    assert detector.detect(front_frame()).shape[1] == 6


def test_auto_picks_cpu_here_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="avcloud.models"):
        detector = Detector.load("avd-onboard", "auto")
    assert detector.backend_name.startswith(("onnxruntime", "tensorrt"))
    assert any(f"inference backend {detector.backend_name}" in r.getMessage() for r in caplog.records)


def test_real_tensorrt_absence_is_caught():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        with pytest.raises(backends.BackendUnavailable, match="tensorrt"):
            backends.TensorRTBackend(get_card("avd-onboard"))
    else:
        pytest.skip("tensorrt is installed here")


def test_torch_backend_matches_onnxruntime():
    frame = front_frame()
    by_onnx = Detector.load("avd-cloud-s", "onnxruntime").detect(frame)
    torch_detector = Detector.load("avd-cloud-s", "torch", num_threads=1)
    assert torch_detector.backend_name.startswith("torch[")
    by_torch = torch_detector.detect(frame)
    confident = by_onnx[:, 4] >= 0.2
    count = int(confident.sum())
    assert count > 0
    np.testing.assert_allclose(by_torch[:count], by_onnx[:count], rtol=1e-3, atol=0.5)


def test_torch_backend_without_torch_weights_falls_back(caplog):
    card = get_card("avd-onboard").model_copy(update={"torch": None})
    with caplog.at_level(logging.WARNING, logger="avcloud.models"):
        detector = Detector.load(card, "torch")
    assert detector.backend_name == "onnxruntime[CPUExecutionProvider]"
    assert any("ships no torch weights" in r.getMessage() for r in caplog.records)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown inference backend 'cuda'.*onnxruntime"):
        Detector.load("avd-onboard", "cuda")


def test_warmup_runs_the_model():
    detector = Detector.load("avd-onboard", "onnxruntime")
    detector.warmup()
    blank = detector.detect(np.zeros((886, 1920, 3), np.uint8))
    assert blank.shape[1] == 6
