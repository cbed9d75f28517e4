"""Output conventions and input options of the model card, each on a tiny ONNX graph built here.

Every graph ignores its input's values (it adds input * 0 so the input stays connected) and
emits fixed raw outputs whose decoded boxes are known, so a test checks the whole path a user's
detector takes: pre-processing, backend, decoder, class map, NMS, mapping back to the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avcloud.errors import ConfigError
from avcloud.models import Detector, validate_onnx
from avcloud.models.cards import card_from_mapping
from avcloud.models.conventions import merge_riders
from avcloud.types import ObjectType

VEHICLE, PEDESTRIAN, CYCLIST = int(ObjectType.VEHICLE), int(ObjectType.PEDESTRIAN), int(ObjectType.CYCLIST)


def constant_graph(path: Path, outputs: dict[str, np.ndarray], input_shape: list, input_type: str = "float") -> Path:
    """An ONNX graph with one image input whose outputs are the given constants (plus input * 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"float": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[input_type]
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0)]
    if input_type == "uint8":
        nodes = [helper.make_node("Cast", ["images"], ["images_float"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["images_float"], ["mean"], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["mean", "zero"], ["nothing"]))
    initialisers = [numpy_helper.from_array(np.float32(0.0), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        value = np.asarray(value, np.float32)
        initialisers.append(numpy_helper.from_array(value, f"{name}_value"))
        nodes.append(helper.make_node("Add", ["nothing", f"{name}_value"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    images = helper.make_tensor_value_info("images", elem, input_shape)
    graph = helper.make_graph(nodes, "tiny", [images], graph_outputs, initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_card(onnx_path: Path, **fields):
    data = {"name": "tiny", "onnx": str(onnx_path), "input_width": 64, "input_height": 64, "place": "cloud",
            "class_map": {0: "VEHICLE", 1: "PEDESTRIAN"}, **fields}
    return card_from_mapping(data, "test card")


def run(card, image_wh=(64, 64), output_size_wh=None) -> np.ndarray:
    validate_onnx(card.onnx_path, card)
    image = np.zeros((image_wh[1], image_wh[0], 3), np.uint8)
    return Detector.load(card, "onnxruntime").detect(image, output_size_wh)


# ----------------------------------------------------------------------------- YOLO


def yolo_rows(with_objectness: bool = False) -> np.ndarray:
    """Four anchors over 2 classes: a vehicle, a near-duplicate of it, a pedestrian, a low-score one."""
    rows = [
        # cx, cy, w, h, (obj), class 0, class 1
        [20, 20, 16, 8, 0.9, 0.1],
        [21, 20, 16, 8, 0.6, 0.0],  # IoU ~0.88 with the first: NMS removes it
        [40, 44, 8, 24, 0.0, 0.8],
        [50, 10, 4, 4, 0.01, 0.02],  # below the score threshold
    ]
    array = np.array(rows, np.float32)
    if with_objectness:
        array = np.insert(array, 4, 1.0, axis=1)
    return array


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "auto"])
def test_yolo_heads_decode_centre_boxes_with_nms(tmp_path, layout):
    rows = yolo_rows()
    head = rows.T[None] if layout != "channels_last" else rows[None]  # [1, 4+C, N] or [1, N, 4+C]
    if layout == "auto":
        # Many anchors, as a real head has: the decoder must find the anchor axis by itself.
        head = np.concatenate([head, np.zeros((1, 6, 60), np.float32)], axis=2)
    onnx_path = constant_graph(tmp_path / "yolo.onnx", {"output0": head}, [1, 3, 64, 64])
    card = make_card(onnx_path, output={"format": "yolo", "yolo_layout": layout, "score_threshold": 0.25})
    detections = run(card, image_wh=(128, 64))  # a 2:1 image, stretched into the 64x64 input
    assert detections.shape == (2, 6)
    np.testing.assert_allclose(detections[0], [24, 16, 56, 24, 0.9, VEHICLE], atol=1e-4)
    np.testing.assert_allclose(detections[1], [72, 32, 88, 56, 0.8, PEDESTRIAN], atol=1e-4)


def test_yolo_with_objectness_multiplies_scores(tmp_path):
    rows = yolo_rows(with_objectness=True)
    rows[0, 4] = 0.5  # objectness of the vehicle
    onnx_path = constant_graph(tmp_path / "yolo5.onnx", {"output": rows[None]}, [1, 3, 64, 64])
    card = make_card(onnx_path, output={"format": "yolo", "yolo_layout": "channels_last", "objectness": True,
                                        "score_threshold": 0.25})
    detections = run(card)
    # The vehicle now scores 0.9 * 0.5 = 0.45, below its near-duplicate (0.6), which NMS keeps instead.
    np.testing.assert_allclose(detections[:, 4], [0.8, 0.6], atol=1e-5)
    np.testing.assert_allclose(detections[1, :4], [13, 16, 29, 24], atol=1e-4)


# ----------------------------------------------------------------------------- TF Object Detection API


def tf_outputs() -> dict[str, np.ndarray]:
    return {
        "detection_boxes": np.array([[[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]]]),
        "detection_classes": np.array([[3.0, 1.0, 3.0]]),  # COCO ids, 1-based: 3 = car, 1 = person
        "detection_scores": np.array([[0.9, 0.7, 0.95]]),
        "num_detections": np.array([2.0]),  # the third row is padding
    }


def test_tf_object_detection_layout_with_nhwc_uint8_input(tmp_path):
    onnx_path = constant_graph(tmp_path / "tfod.onnx", tf_outputs(), [1, 64, 64, 3], input_type="uint8")
    card = make_card(onnx_path, input_layout="nhwc", input_dtype="uint8", channel_order="rgb",
                     class_map={3: "VEHICLE", 1: "PEDESTRIAN"}, output={"format": "tf_object_detection"})
    detections = run(card, image_wh=(200, 100))
    np.testing.assert_allclose(detections, [[100, 25, 200, 75, 0.9, VEHICLE], [0, 0, 50, 50, 0.7, PEDESTRIAN]],
                               atol=1e-4)


def test_tf_object_detection_output_order_from_the_card(tmp_path):
    outputs = tf_outputs()
    unnamed = {f"out{index}": outputs[key] for index, key in
               enumerate(["detection_scores", "detection_boxes", "detection_classes"])}
    onnx_path = constant_graph(tmp_path / "tfod.onnx", unnamed, [1, 3, 64, 64])
    card = make_card(onnx_path, class_map={3: "VEHICLE", 1: "PEDESTRIAN"},
                     output={"format": "tf_object_detection", "tf_output_order": ["scores", "boxes", "classes"]})
    assert len(run(card)) == 3  # no num_detections: every row counts
    nameless = make_card(onnx_path, class_map={3: "VEHICLE"}, output={"format": "tf_object_detection"})
    with pytest.raises(ConfigError, match="cannot tell which is boxes"):
        validate_onnx(onnx_path, nameless)


# ----------------------------------------------------------------------------- NanoDet GFL

STRIDES = (8, 16, 32)
REG_MAX = 3  # 4 bins per side


def gfl_outputs(input_wh=(64, 64), num_classes=2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stride: scores [N, C] and distance logits [N, 4 * (REG_MAX + 1)], one object at stride 16.

    Cell (row 1, col 2) of the 4x4 stride-16 grid has centre (40, 24); its distance bins peak at
    bin 1 (left), 2 (top), 1 (right), 0 (bottom), i.e. 16, 32, 16, 0 px: box (24, -8, 56, 24).
    """
    bins = REG_MAX + 1
    levels = []
    for stride in STRIDES:
        cells = (input_wh[0] // stride) * (input_wh[1] // stride)
        scores = np.zeros((cells, num_classes), np.float32)
        distances = np.zeros((cells, 4 * bins), np.float32)
        if stride == 16:
            cell = 1 * (input_wh[0] // 16) + 2
            scores[cell, 1] = 0.8
            peaks = np.full((4, bins), -20.0, np.float32)
            for side, peak in enumerate([1, 2, 1, 0]):
                peaks[side, peak] = 20.0
            distances[cell] = peaks.reshape(-1)
        levels.append((scores, distances))
    return levels


@pytest.mark.parametrize("packing", ["per_stride", "concatenated"])
def test_nanodet_gfl_heads_decode_distance_distributions(tmp_path, packing):
    levels = gfl_outputs()
    if packing == "per_stride":
        outputs = {}
        for stride, (scores, distances) in zip(STRIDES, levels, strict=True):
            outputs[f"cls_{stride}"] = scores[None]
            outputs[f"reg_{stride}"] = distances[None]
    else:
        outputs = {"output": np.concatenate([np.concatenate(level, axis=1) for level in levels])[None]}
    onnx_path = constant_graph(tmp_path / "nanodet.onnx", outputs, [1, 3, 64, 64])
    card = make_card(onnx_path, output={"format": "nanodet_gfl", "strides": list(STRIDES), "reg_max": REG_MAX})
    detections = run(card, image_wh=(128, 128))
    np.testing.assert_allclose(detections, [[48, 0, 112, 48, 0.8, PEDESTRIAN]], atol=1e-3)  # clipped at y = 0


def test_nanodet_outputs_that_do_not_fit_the_strides_are_rejected(tmp_path):
    scores, distances = gfl_outputs()[0]
    onnx_path = constant_graph(tmp_path / "bad.onnx", {"cls": scores[None], "reg": distances[None]}, [1, 3, 64, 64])
    card = make_card(onnx_path, output={"format": "nanodet_gfl", "reg_max": REG_MAX})
    with pytest.raises(ConfigError, match="output convention 'nanodet_gfl' does not fit"):
        validate_onnx(onnx_path, card)


# ----------------------------------------------------------------------------- inputs and class map


def xyxy_graph(tmp_path: Path, rows: list[list[float]], input_shape=(1, 3, 64, 64)) -> Path:
    return constant_graph(tmp_path / "rows.onnx", {"detections": np.array([rows], np.float32)}, list(input_shape))


def test_letterbox_maps_boxes_back_through_the_padding(tmp_path):
    # 64x64 input, 128x64 image: scale 0.5, 16 px bars above and below.
    onnx_path = xyxy_graph(tmp_path, [[8, 16, 24, 48, 0.9, 0]])
    card = make_card(onnx_path, resize="letterbox")
    np.testing.assert_allclose(run(card, image_wh=(128, 64)), [[16, 0, 48, 64, 0.9, VEHICLE]], atol=1e-4)
    stretched = make_card(onnx_path)
    np.testing.assert_allclose(run(stretched, image_wh=(128, 64)), [[16, 16, 48, 48, 0.9, VEHICLE]], atol=1e-4)


def test_class_map_by_name_drops_unmapped_classes(tmp_path):
    rows = [[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 1], [20, 20, 30, 30, 0.7, 2]]
    onnx_path = xyxy_graph(tmp_path, rows)
    card = make_card(onnx_path, class_names=["person", "kite", "bus"], class_map={"person": "PEDESTRIAN", "bus": "VEHICLE"})
    detections = run(card)
    assert detections[:, 5].tolist() == [PEDESTRIAN, VEHICLE]


def test_nms_of_decoded_models_is_per_waymo_type(tmp_path):
    # A van seen as both 'car' and 'truck' (two COCO classes, one Waymo type) is one vehicle.
    rows = [[0, 0, 20, 10, 0.9, 0], [0, 0, 20, 11, 0.6, 1], [0, 0, 20, 10, 0.5, 2]]
    onnx_path = xyxy_graph(tmp_path, rows)
    card = make_card(onnx_path, class_names=["car", "truck", "person"],
                     class_map={"car": "VEHICLE", "truck": "VEHICLE", "person": "PEDESTRIAN"},
                     output={"nms_iou": 0.5})
    np.testing.assert_allclose(run(card)[:, 4:], [[0.9, VEHICLE], [0.5, PEDESTRIAN]], rtol=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input_layout": "nhwc"}, r"does not match the card's 64x64x3 \(NHWC\)"),
        ({"input_dtype": "uint8"}, "input type tensor\\(float\\) does not match the card's input_dtype 'uint8'"),
    ],
)
def test_validation_names_layout_and_dtype_mismatches(tmp_path, fields, message):
    onnx_path = xyxy_graph(tmp_path, [[0, 0, 1, 1, 0.9, 0]])
    with pytest.raises(ConfigError, match=message):
        validate_onnx(onnx_path, make_card(onnx_path, **fields))


def test_card_rejects_class_names_it_does_not_list(tmp_path):
    with pytest.raises(ConfigError, match="class_map names 'car' are not in class_names"):
        make_card(tmp_path / "x.onnx", class_names=["person"], class_map={"car": "VEHICLE"})
    with pytest.raises(ConfigError, match="merge_riders needs class_names"):
        make_card(tmp_path / "x.onnx", output={"merge_riders": True})


# ----------------------------------------------------------------------------- multi-scale


def size_dependent_graph(path: Path) -> Path:
    """Symbolic H, W; one row: box (0, 0, 0.9 W, 0.9 H), score 0.9, class 0, in input pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    constants = {"scale": np.float32(0.9), "zeros2": np.zeros(2, np.float32), "tail": np.array([0.9, 0.0], np.float32),
                 "hw_index": np.array([3, 2], np.int64), "shape_out": np.array([1, 1, 6], np.int64)}
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "hw_index"], ["wh_int"]),
        helper.make_node("Cast", ["wh_int"], ["wh"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wh", "scale"], ["corner"]),
        helper.make_node("Concat", ["zeros2", "corner", "tail"], ["row"], axis=0),
        helper.make_node("Reshape", ["row", "shape_out"], ["detections"]),
    ]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])
    out = helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 1, 6])
    graph = helper.make_graph(nodes, "sized", [images], [out],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_multi_scale_keeps_each_pass_to_its_box_sizes(tmp_path):
    onnx_path = size_dependent_graph(tmp_path / "sized.onnx")
    base = {"input_width": 128, "input_height": 128}
    only_main = make_card(onnx_path, **base)
    np.testing.assert_allclose(run(only_main, image_wh=(256, 256))[:, :4], [[0, 0, 230.4, 230.4]], atol=1e-3)
    # The main pass's box (115 px in its input) is too large for it; the 32x32 pass's (29 px) is kept.
    two_passes = make_card(onnx_path, **base, multi_scale={
        "max_box_px": 100, "passes": [{"input_width": 32, "input_height": 32, "min_box_px": 20}]})
    detections = run(two_passes, image_wh=(256, 256))
    np.testing.assert_allclose(detections[:, :4], [[0, 0, 230.4, 230.4]], atol=1e-3)
    nothing_fits = make_card(onnx_path, **base, multi_scale={
        "max_box_px": 100, "passes": [{"input_width": 32, "input_height": 32, "min_box_px": 50}]})
    assert len(run(nothing_fits, image_wh=(256, 256))) == 0


# ----------------------------------------------------------------------------- rider merge


def rider_card(tmp_path: Path):
    return make_card(tmp_path / "x.onnx", class_names=["person", "bicycle"],
                     class_map={"person": "PEDESTRIAN", "bicycle": "CYCLIST"}, output={"merge_riders": True})


def test_a_person_riding_a_bicycle_becomes_one_cyclist_box(tmp_path):
    rows = np.array([
        [100, 50, 130, 130, 0.8, 0],   # rider: above the bicycle, overlapping it
        [95, 100, 140, 150, 0.6, 1],   # bicycle
        [300, 50, 330, 150, 0.9, 0],   # a pedestrian elsewhere
        [500, 100, 540, 150, 0.5, 1],  # a parked bicycle
    ], np.float32)
    merged = merge_riders(rows, rider_card(tmp_path))
    np.testing.assert_allclose(merged, [
        [95, 50, 140, 150, 0.7, 1],
        [300, 50, 330, 150, 0.9, 0],
        [500, 100, 540, 150, 0.25, 1],
    ], rtol=1e-6)


def test_a_weak_bicycle_does_not_take_a_walker(tmp_path):
    rows = np.array([[100, 50, 130, 150, 0.8, 0], [100, 110, 130, 150, 0.15, 1]], np.float32)
    merged = merge_riders(rows, rider_card(tmp_path))
    assert merged[:, 5].tolist() == [0, 1]
    np.testing.assert_array_equal(merged[0], rows[0])


def test_multi_scale_needs_a_graph_with_symbolic_height_and_width(tmp_path):
    onnx_path = xyxy_graph(tmp_path, [[0, 0, 10, 10, 0.9, 0]])  # fixed 64x64 input
    card = make_card(onnx_path, multi_scale={"passes": [{"input_width": 32, "input_height": 32}]})
    with pytest.raises(ConfigError, match="'multi_scale' runs the graph at other input sizes"):
        validate_onnx(onnx_path, card)
