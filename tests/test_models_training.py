"""The detector family's training path: targets, in-graph decoding, a few-step smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avcloud.models.centernet import OUTPUT_STRIDE


def test_targets_decode_back_to_the_boxes():
    from avcloud.training import _draw_targets

    boxes = np.array([[10.0, 20.0, 50.0, 44.0], [100.5, 8.0, 104.5, 20.0]], np.float32)
    classes = np.array([0, 2])
    heatmap, log_size, offset, mask = _draw_targets(boxes, classes, (32, 16), 4)
    assert heatmap.shape == (4, 16, 32) and mask.sum() == 2
    for (x1, y1, x2, y2), cls in zip(boxes, classes, strict=True):
        cell_x, cell_y = int((x1 + x2) / 2 / OUTPUT_STRIDE), int((y1 + y2) / 2 / OUTPUT_STRIDE)
        assert heatmap[cls, cell_y, cell_x] == 1.0
        centre_x = (cell_x + offset[0, cell_y, cell_x]) * OUTPUT_STRIDE
        centre_y = (cell_y + offset[1, cell_y, cell_x]) * OUTPUT_STRIDE
        width, height = np.exp(log_size[:, cell_y, cell_x]) * OUTPUT_STRIDE
        np.testing.assert_allclose([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2,
                                    centre_y + height / 2], [x1, y1, x2, y2], atol=1e-3)
    assert heatmap[1].max() == 0 and heatmap[3].max() == 0
    assert 0 < heatmap[0, 8, 6] < 1  # Gaussian falloff next to the centre


def test_in_graph_decoding_returns_peaks_as_xyxy_score_class():
    import torch

    from avcloud.models.centernet import CenterNetSpec, DecodedCenterNet

    class Known(torch.nn.Module):
        spec = CenterNetSpec(64, 32, 8, 8, 8)

        def forward(self, images):
            logits = torch.full((1, 4, 8, 16), -10.0)
            logits[0, 2, 3, 5] = 3.0  # one SIGN peak at cell (5, 3)
            logits[0, 2, 3, 6] = 1.0  # a weaker neighbour: suppressed by the 3x3 max-pool
            log_size = torch.zeros(1, 2, 8, 16)
            log_size[0, :, 3, 5] = torch.tensor([math.log(3.0), math.log(2.0)])
            offset = torch.zeros(1, 2, 8, 16)
            offset[0, :, 3, 5] = torch.tensor([0.5, 0.25])
            return logits + images.mean() * 0, log_size, offset

    rows = DecodedCenterNet(Known(), max_detections=5)(torch.zeros(1, 3, 32, 64))[0].numpy()
    assert rows.shape == (5, 6)
    centre_x, centre_y = 5.5 * OUTPUT_STRIDE, 3.25 * OUTPUT_STRIDE
    np.testing.assert_allclose(rows[0], [centre_x - 6, centre_y - 4, centre_x + 6, centre_y + 4,
                                         1 / (1 + math.exp(-3.0)), 2.0], rtol=1e-5)
    assert rows[1, 4] < 1e-3  # the neighbour is not a peak


def test_smoke_training_exports_a_valid_zoo_model(tmp_path, monkeypatch):
    from avcloud.models import Detector, load_card, validate_onnx
    from avcloud.training import PRESETS, train_model, training_pool

    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    preset = PRESETS["smoke"]
    pool = training_pool(preset, workers=1)
    assert len(pool) == 5 and sum(len(item.ground_truth) for item in pool) > 0
    losses = []
    card = train_model("avd-onboard", preset, pool, tmp_path / "zoo", steps=2,
                       report=lambda name, step, total, loss: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    loaded = load_card(tmp_path / "zoo" / "avd-onboard.yaml")
    assert loaded.name == card.name and loaded.place == "onboard"
    validate_onnx(loaded.onnx_path, loaded)
    detections = Detector.load(loaded, "onnxruntime").detect(np.zeros((1280, 1920, 3), np.uint8))
    assert detections.shape[1] == 6


def test_training_refuses_the_held_out_seed(tmp_path, monkeypatch):
    from dataclasses import replace

    from avcloud.errors import UserError
    from avcloud.training import PRESETS, training_pool

    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="held-out"):
        training_pool(replace(PRESETS["smoke"], pool_seeds=(0, 1)))


@pytest.mark.slow
def test_shipped_family_accuracy_grows_with_model_size():
    """The product's premise on held-out seed-0 frames: each bigger model is more accurate, and
    the on-car model misses the small objects that the largest cloud model finds."""
    from avcloud.training import evaluate_family

    report = evaluate_family(frames_per_camera=4)
    maps = [report[name]["map"] for name in ("avd-onboard", "avd-cloud-s", "avd-cloud-m", "avd-cloud-l")]
    assert maps == sorted(maps) and len(set(maps)) == 4
    assert report["avd-cloud-l"]["recall_by_size"]["<16px"] > 2 * report["avd-onboard"]["recall_by_size"]["<16px"]


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from avcloud.training import PRESETS, train_model, training_pool

    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    preset = PRESETS["smoke"]
    pool = training_pool(preset, workers=1)
    seen: list[int] = []

    def interrupt_at_three(name, step, total, loss):
        seen.append(step)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model("avd-onboard", preset, pool, tmp_path / "zoo", steps=4, report=interrupt_at_three,
                    checkpoint_every=2)
    assert (tmp_path / "zoo" / "avd-onboard.checkpoint").exists()
    resumed: list[int] = []
    train_model("avd-onboard", preset, pool, tmp_path / "zoo", steps=4,
                report=lambda name, step, total, loss: resumed.append(step), checkpoint_every=2)
    assert seen == [1, 2, 3] and resumed == [3, 4]
    assert not (tmp_path / "zoo" / "avd-onboard.checkpoint").exists()
    assert (tmp_path / "zoo" / "avd-onboard.onnx").exists()


def test_a_stride32_stage_added_to_trained_weights_starts_as_a_no_op(tmp_path):
    import torch

    from avcloud.errors import UserError
    from avcloud.models.centernet import CenterNetSpec, build_network
    from avcloud.training import load_initial_weights

    torch.manual_seed(0)
    without = build_network(CenterNetSpec(192, 128, 8, 16, 24)).eval()
    weights = tmp_path / "trained.pt"
    torch.save(without.state_dict(), weights)
    deeper = build_network(CenterNetSpec(192, 128, 8, 16, 24, width_stride32=32)).eval()
    load_initial_weights(deeper, weights)
    images = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        for before, after in zip(without(images), deeper(images), strict=True):
            assert torch.equal(before, after)
    # Weights of a different architecture are refused with the file named, not half-loaded.
    other = tmp_path / "other.pt"
    torch.save(build_network(CenterNetSpec(192, 128, 8, 16, 32)).state_dict(), other)
    with pytest.raises(UserError, match="other.pt: weights do not fit .*size mismatch"):
        load_initial_weights(deeper, other)
    missing = tmp_path / "partial.pt"
    torch.save({key: value for key, value in without.state_dict().items() if not key.startswith("stem.")}, missing)
    with pytest.raises(UserError, match="partial.pt: weights do not fit"):
        load_initial_weights(deeper, missing)
