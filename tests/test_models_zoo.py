"""Model cards, the zoo and `avcloud models register`: clear errors, ONNX output convention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from avcloud.cli import main as cli_main
from avcloud.errors import ConfigError, UserError
from avcloud.models import SHIPPED_DIR, get_card, list_cards, load_card, register_model

FAMILY = ("avd-onboard", "avd-cloud-s", "avd-cloud-m", "avd-cloud-l")


def card_mapping(**changes) -> dict:
    data = {
        "name": "my-detector",
        "onnx": "my-detector.onnx",
        "input_width": 64,
        "input_height": 48,
        "channel_order": "rgb",
        "mean": [0, 0, 0],
        "std": [255, 255, 255],
        "class_map": {0: "VEHICLE", 1: "PEDESTRIAN"},
        "place": "cloud",
    }
    data.update(changes)
    return data


def write_card(directory: Path, **changes) -> Path:
    path = directory / "card.yaml"
    path.write_text(yaml.safe_dump(card_mapping(**changes)))
    return path


def export_tiny_onnx(path: Path, output: str) -> None:
    """A minimal ONNX 'detector' for a 64x48 input: [1,5,6] rows (the convention) or a feature map (not)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 48, 64])
    if output == "rows":
        rows = np.tile(np.array([[[4.0, 4.0, 20.0, 30.0, 0.9, 1.0]]], np.float32), (1, 5, 1))
        nodes = [
            helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "rows"], ["out"]),
        ]
        initialisers = [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(rows, "rows")]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, 6])
    else:
        nodes = [helper.make_node("Identity", ["images"], ["out"])]
        initialisers = []
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 48, 64])
    graph = helper.make_graph(nodes, "tiny", [images], [out], initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shipped_family_cards_are_valid_and_ordered():
    cards = {card.name: card for card in list_cards()}
    assert set(FAMILY) <= set(cards)
    assert cards["avd-onboard"].place == "onboard"
    assert all(cards[name].place == "cloud" for name in FAMILY[1:])
    widths = [cards[name].input_width for name in FAMILY]
    assert widths == sorted(widths) and len(set(widths)) == 4
    for name in FAMILY:
        card = cards[name]
        assert card.onnx_path.is_file()
        assert card.input_width * 2 == card.input_height * 3  # 3:2 like the Waymo front cameras
    shipped_bytes = sum(path.stat().st_size for path in SHIPPED_DIR.iterdir() if path.is_file())
    assert shipped_bytes < 20e6


def test_load_card_resolves_the_onnx_next_to_the_card(tmp_path):
    card = load_card(write_card(tmp_path))
    assert card.onnx_path == tmp_path / "my-detector.onnx"
    assert card.waymo_class_lookup() == {0: 1, 1: 2}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"channel_order": "bgra"}, "channel_order"),
        ({"input_width": 0}, "input_width"),
        ({"class_map": {0: "TRUCK"}}, "class_map"),
        ({"place": "edge"}, "place"),
        ({"std": [1, 0, 1]}, "std"),
        ({"name": "bad-imgcomp50-name"}, "name"),
        ({"unexpected": 1}, "unexpected"),
        ({"output": {"format": "cxcywh"}}, "output.format"),
    ],
)
def test_card_errors_are_one_line_naming_file_and_field(tmp_path, changes, field):
    path = write_card(tmp_path, **changes)
    with pytest.raises(ConfigError) as error:
        load_card(path)
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"'{field}" in message


def test_missing_field_is_named(tmp_path):
    data = card_mapping()
    del data["class_map"]
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"card\.yaml: field 'class_map': Field required"):
        load_card(path)


def test_unknown_model_lists_known_names():
    with pytest.raises(UserError, match="unknown model 'nope'.*avd-cloud-l"):
        get_card("nope")


def test_register_accepts_an_onnx_following_the_convention(tmp_path, cache):
    onnx_path = tmp_path / "good.onnx"
    export_tiny_onnx(onnx_path, "rows")
    card = register_model(onnx_path, write_card(tmp_path))
    assert card.name == "my-detector"
    assert card.onnx_path == cache / "models" / "my-detector" / "my-detector.onnx"
    assert "my-detector" in [c.name for c in list_cards()]
    # It runs through the same Detector path as the family, classes mapped to Waymo types.
    from avcloud.models import Detector

    detections = Detector.load("my-detector", "onnxruntime").detect(np.zeros((96, 128, 3), np.uint8))
    assert detections.shape == (5, 6)
    np.testing.assert_allclose(detections[0], [8, 8, 40, 60, 0.9, 2.0], rtol=1e-5)


def test_register_rejects_an_onnx_with_another_output_convention(tmp_path, cache):
    onnx_path = tmp_path / "feature_map.onnx"
    export_tiny_onnx(onnx_path, "feature_map")
    with pytest.raises(ConfigError, match=r"shape \[1, 3, 48, 64\].*convention is \[N, 6\]"):
        register_model(onnx_path, write_card(tmp_path))
    assert not (cache / "models" / "my-detector").exists()


def test_register_rejects_input_size_mismatch_and_garbage(tmp_path, cache):
    onnx_path = tmp_path / "good.onnx"
    export_tiny_onnx(onnx_path, "rows")
    with pytest.raises(ConfigError, match="does not match the card.s 3x100x64 \\(NCHW\\)"):
        register_model(onnx_path, write_card(tmp_path, input_height=100))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx")
    with pytest.raises(ConfigError, match="not a loadable ONNX model"):
        register_model(garbage, write_card(tmp_path))
    with pytest.raises(ConfigError, match="shipped model"):
        register_model(onnx_path, write_card(tmp_path, name="avd-cloud-l"))


def test_cli_models_list_json_and_register_errors(tmp_path, cache, capsys):
    assert cli_main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["name"] for entry in listed} >= set(FAMILY)
    onnx_path = tmp_path / "feature_map.onnx"
    export_tiny_onnx(onnx_path, "feature_map")
    assert cli_main(["models", "register", str(onnx_path), "--card", str(write_card(tmp_path))]) == 2
    error = capsys.readouterr().err
    assert "avcloud models: error:" in error and "output convention" in error and "Traceback" not in error


def test_registered_copy_survives_moving_the_original(tmp_path, cache):
    source = tmp_path / "src"
    source.mkdir()
    export_tiny_onnx(source / "good.onnx", "rows")
    register_model(source / "good.onnx", write_card(source))
    shutil.rmtree(source)
    assert get_card("my-detector").onnx_path.is_file()
