"""The profiler: real encode -> decode -> detect per frame, profile table, detection cache, resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from avcloud import profiler
from avcloud.compression import CompressionConfig, decode_image, encode_for_model
from avcloud.models import Detector
from avcloud.profile_format import DetectionCache
from avcloud.profiler import ensure_profile, run_profile

MODELS = ["avd-onboard", "avd-cloud-s"]
CODECS = ["inpcomp50", "imgcomp90"]
CONFIGS = {
    "avd-onboard-imgcompNone-inpcompNone",
    "avd-cloud-s-imgcompNone-inpcomp50",
    "avd-cloud-s-imgcomp90-inpcompNone",
}


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    from datasets.synthetic import write_synthetic_scene

    path = tmp_path_factory.mktemp("scene") / "tiny.tfrecord"
    return write_synthetic_scene(path, seed=0, frames=4, cameras=("FRONT", "SIDE_LEFT"), progress=False, workers=1)


@pytest.fixture(scope="module")
def profiled(tiny_scene, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("profile")
    return run_profile(tiny_scene, MODELS, CODECS, out_dir, window_frames=2, workers=1, progress=False)


def test_profile_table_has_turbo_columns_per_service_and_window(profiled):
    table = pq.read_table(profiled.table_path).to_pylist()
    assert {row["Model"] for row in table} == CONFIGS
    assert {row["Service"] for row in table} == {"FRONT", "SIDE_LEFT"}
    assert {row["Window"] for row in table} == {-1, 0, 1}
    assert len(table) == len(CONFIGS) * 2 * 3
    for row in table:
        assert 0.0 <= row["Utility"] <= 1.0
        assert row["Runtime [ms]"] > 0
        assert row["Backend"] == "onnxruntime[CPUExecutionProvider]"
    whole = {(row["Model"], row["Service"]): row for row in table if row["Window"] == -1}
    assert whole[("avd-onboard-imgcompNone-inpcompNone", "FRONT")]["Network Transport Size [Mb]"] == 0.0
    input50 = whole[("avd-cloud-s-imgcompNone-inpcomp50", "FRONT")]["Network Transport Size [Mb]"]
    image90 = whole[("avd-cloud-s-imgcomp90-inpcompNone", "FRONT")]["Network Transport Size [Mb]"]
    assert 0 < input50 * 5 < image90
    assert whole[("avd-cloud-s-imgcomp90-inpcompNone", "FRONT")]["Encode [ms]"] > 0
    assert profiled.table_path.with_suffix(".csv").read_text().startswith("Model,Network Transport Size [Mb]")


def test_cache_holds_detections_of_the_really_compressed_pixels(profiled, tiny_scene):
    from datasets.scene import open_scene

    cache = DetectionCache(profiled.cache_path)
    assert set(cache.configs) == CONFIGS
    assert cache.frame_indices == [0, 1, 2, 3]
    assert cache.cameras == ["FRONT", "SIDE_LEFT"]
    camera_image = open_scene(tiny_scene).frame(2).cameras["SIDE_LEFT"]
    image = camera_image.image_bgr()
    detector = Detector.load("avd-cloud-s", "onnxruntime")
    encoded = encode_for_model(image, CompressionConfig("None", "50"), detector.card.input_wh)
    expected = detector.detect(decode_image(encoded.payload, encoded.codec, encoded.width, encoded.height),
                               output_size_wh=(1920, 886))
    cached = cache.detections(2, "SIDE_LEFT", "avd-cloud-s-imgcompNone-inpcomp50")
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-2)
    assert cache.size_bytes(2, "SIDE_LEFT", "avd-cloud-s-imgcompNone-inpcomp50") == encoded.size_bytes
    assert cache.size_bytes(2, "SIDE_LEFT", "avd-onboard-imgcompNone-inpcompNone") == 0
    truth = cache.ground_truth(2, "SIDE_LEFT")
    np.testing.assert_array_equal(truth.classes, camera_image.ground_truth.classes)
    with pytest.raises(KeyError, match="frame 9"):
        cache.detections(9, "FRONT", "avd-cloud-s-imgcompNone-inpcomp50")


def test_interrupted_profile_resumes_without_redoing_frames(tiny_scene, tmp_path, monkeypatch):
    real_profile_frame = profiler._profile_frame
    done: list[int] = []

    def interrupted_after_two(frame_index):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(real_profile_frame(frame_index))
        return frame_index

    monkeypatch.setattr(profiler, "_profile_frame", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_profile(tiny_scene, ["avd-onboard"], [], tmp_path, window_frames=None, workers=1, progress=False)
    assert done == [0, 1]
    resumed: list[int] = []

    def counting(frame_index):
        resumed.append(frame_index)
        return real_profile_frame(frame_index)

    monkeypatch.setattr(profiler, "_profile_frame", counting)
    result = run_profile(tiny_scene, ["avd-onboard"], [], tmp_path, window_frames=None, workers=1, progress=False)
    assert resumed == [2, 3]
    assert DetectionCache(result.cache_path).frame_indices == [0, 1, 2, 3]
    assert not (tmp_path / ".profile-work").exists()


def test_frame_stride_and_parallel_workers(tiny_scene, tmp_path):
    result = run_profile(tiny_scene, ["avd-onboard"], [], tmp_path, window_frames=None, frame_stride=2, workers=2,
                         progress=False)
    assert DetectionCache(result.cache_path).frame_indices == [0, 2]


def test_ensure_profile_computes_once_then_reuses(tiny_scene, tmp_path, monkeypatch):
    monkeypatch.setenv("AVCLOUD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(profiler.PROFILE_PRESETS, "tiny", profiler.ProfilePreset(("avd-onboard",), (), None))
    first = ensure_profile(tiny_scene, "tiny", progress=False, workers=1)
    assert first.table_path.is_relative_to(tmp_path / "cache" / "profiles")

    def must_not_run(*args, **kwargs):
        raise AssertionError("profile recomputed")

    monkeypatch.setattr(profiler, "run_profile", must_not_run)
    assert ensure_profile(tiny_scene, "tiny", progress=False) == first


def test_bad_inputs_are_user_errors(tiny_scene, tmp_path):
    from avcloud.errors import UserError

    with pytest.raises(UserError, match="unknown model"):
        run_profile(tiny_scene, ["nope"], CODECS, tmp_path, None, progress=False)
    with pytest.raises(UserError, match="codec 'inpcomp42'"):
        run_profile(tiny_scene, MODELS, ["inpcomp42"], tmp_path, None, progress=False)
    with pytest.raises(UserError, match="no such file"):
        run_profile(tmp_path / "missing.tfrecord", MODELS, CODECS, tmp_path, None, progress=False)
    with pytest.raises(UserError, match="unknown profile preset"):
        ensure_profile(tiny_scene, "everything")


def test_cli_profile_writes_table_and_cache_beside_it(tiny_scene, tmp_path, capsys):
    from avcloud.cli import main

    out = tmp_path / "runs" / "mine.parquet"
    code = main(["profile", "--scene", str(tiny_scene), "--models", "avd-onboard", "avd-cloud-s", "--codecs",
                 "inpcomp75", "--window", "2", "--max-frames", "2", "--workers", "1", "--out", str(out)])
    assert code == 0
    assert "2 of 4 frames" in capsys.readouterr().out  # subsampling is said out loud
    assert {row["Model"] for row in pq.read_table(out).to_pylist()} == {
        "avd-onboard-imgcompNone-inpcompNone", "avd-cloud-s-imgcompNone-inpcomp75"}
    assert DetectionCache(out.parent / "detections.parquet").frame_indices == [0, 1]
    assert out.with_suffix(".csv").exists()


def test_cli_profile_bad_arguments_exit_2_with_one_line(tiny_scene, tmp_path, capsys):
    from avcloud.cli import main

    assert main(["profile", "--scene", str(tiny_scene), "--out", str(tmp_path / "x.csv")]) == 2
    assert main(["profile", "--scene", str(tiny_scene), "--codecs", "inpcomp12", "--out", str(tmp_path / "x.parquet")]) == 2
    blocker = tmp_path / "a-file"  # a folder that cannot be made: refused before any profiling
    blocker.write_text("not a folder\n")
    assert main(["profile", "--scene", str(tiny_scene), "--out", str(blocker / "x.parquet")]) == 2
    assert main(["profile", "--scene", str(tiny_scene), "--cloud-table", str(blocker / "t.csv")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("avcloud profile: error:") for line in errors)
    assert all("cannot write there" in line for line in errors[2:])
