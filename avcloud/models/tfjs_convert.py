"""Convert a TensorFlow.js graph model (model.json + weight shards) to ONNX, optionally at a new input size.

This file is a stand-alone script run by `avcloud models import` in the *conversion*
environment (tensorflow-cpu + tf2onnx, the optional extra `import`); it imports nothing from
avcloud, and the product never imports it. Usage:

    python tfjs_convert.py MODEL.json OUT.onnx [--input-size WxH --resize-rule centernet]
                           [--outputs NAME ...] [--dynamic-spatial] [--opset 17]

What it does, in order:
1. reads model.json and its shards (float16 / uint8 quantised weights are dequantised);
2. fills node attributes that TF.js drops but TensorFlow's op registry requires (e.g. `TArgs`
   of `_FusedConv2D`, `index_type` of `TopKV2`) from TensorFlow's own op definitions;
3. with --input-size, rewrites the input placeholder and the graph's shape-dependent constants
   (folded at TF.js export time) for the new size, using the named resize rule;
4. writes the patched model (all weights unquantised) to a temporary folder and converts it
   with tf2onnx's TF.js front end, keeping only the requested outputs;
5. with --dynamic-spatial, makes the input's height and width symbolic in the ONNX file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

# tf2onnx 1.17 still calls np.product, removed in NumPy 2.
if not hasattr(np, "product"):
    np.product = np.prod

_QUANTISED_DTYPES = {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}
_WEIGHT_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


def read_weights(model: dict, model_dir: Path) -> dict[str, np.ndarray]:
    """Every weight of a TF.js graph model as a numpy array of its declared dtype."""
    weights: dict[str, np.ndarray] = {}
    for group in model["weightsManifest"]:
        data = b"".join((model_dir / path).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            count = int(np.prod(entry["shape"])) if entry["shape"] else 1
            quantisation = entry.get("quantization")
            stored = np.dtype(_QUANTISED_DTYPES[quantisation["dtype"]] if quantisation else _WEIGHT_DTYPES[entry["dtype"]])
            values = np.frombuffer(data, dtype=stored, count=count, offset=offset)
            offset += count * stored.itemsize
            if quantisation and quantisation["dtype"] in ("uint8", "uint16"):
                values = values.astype(np.float32) * quantisation["scale"] + quantisation["min"]
            weights[entry["name"]] = values.astype(_WEIGHT_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if offset != len(data):
            raise ValueError(f"weight shards hold {len(data)} bytes, the manifest describes {offset}")
    return weights


def _attr_json(attr_value) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(attr_value)


def fill_attributes(nodes: list[dict]) -> int:
    """Add attributes missing from TF.js nodes with TensorFlow's defaults; returns how many were added."""
    from tensorflow.python.framework import op_def_registry

    added = 0
    for node in nodes:
        op_name = "_FusedDepthwiseConv2dNative" if node["op"] == "FusedDepthwiseConv2dNative" else node["op"]
        op_def = op_def_registry.get(op_name)
        if op_def is None:
            continue
        attrs = node.setdefault("attr", {})
        for attr in op_def.attr:
            if attr.name in attrs:
                continue
            if attr.name == "TArgs" and "T" in attrs and "num_args" in attrs:
                # The fused ops' extra inputs (bias, BN offsets) share the op's element type.
                attrs["TArgs"] = {"list": {"type": [attrs["T"]["type"]] * int(attrs["num_args"]["i"])}}
                added += 1
            elif attr.HasField("default_value"):
                attrs[attr.name] = _attr_json(attr.default_value)
                added += 1
    return added


def _node(nodes: list[dict], name: str) -> dict:
    for node in nodes:
        if node["name"] == name:
            return node
    raise KeyError(f"graph has no node '{name}'")


def _set_placeholder_shape(model: dict, nodes: list[dict], shape: list[int]) -> None:
    dims = [{"size": str(size)} for size in shape]
    for node in nodes:
        if node["op"] == "Placeholder":
            node["attr"]["shape"] = {"shape": {"dim": dims}}
            for signature_input in model.get("signature", {}).get("inputs", {}).values():
                if signature_input["name"].split(":")[0] == node["name"]:
                    signature_input["tensorShape"] = {"dim": dims}


def resize_centernet(model: dict, weights: dict[str, np.ndarray], width: int, height: int) -> None:
    """MobileNetV3-CenterNet (NHWC, stride-4 heads): the constants folded from a 512x512 input."""
    if width % 32 or height % 32:
        raise ValueError(f"CenterNet input {width}x{height}: both sides must be multiples of 32")
    nodes = model["modelTopology"]["node"]
    _set_placeholder_shape(model, nodes, [1, height, width, 3])
    grid_w, grid_h = width // 4, height // 4
    weights["tower_0/BatchGather/concat"] = np.array([grid_w * grid_h, 4], np.int32)
    weights["tower_0/strided_slice_6"] = np.array(grid_w, np.int32)  # heatmap width: cell -> (x, y)
    upsample = {
        "tower_0/CenternetHead/c5_upsample/up_sampling2d/mul": (height // 16, width // 16),
        "tower_0/CenternetHead/c4_upsample/up_sampling2d_1/mul": (height // 8, width // 8),
        "tower_0/CenternetHead/c3_upsample/up_sampling2d_2/mul": (height // 4, width // 4),
    }
    for name, size in upsample.items():
        weights[name] = np.array(size, np.int32)
    for output in model.get("signature", {}).get("outputs", {}).values():
        dims = output.get("tensorShape", {}).get("dim", [])
        if len(dims) == 4:  # the raw heads: [1, H/4, W/4, C]
            dims[1], dims[2] = {"size": str(grid_h)}, {"size": str(grid_w)}


RESIZE_RULES = {"centernet": resize_centernet}


def write_model(model: dict, weights: dict[str, np.ndarray], out_dir: Path) -> Path:
    """model.json + one shard with every weight unquantised (float32 / int32 / bool)."""
    entries, blobs = [], []
    for group in model["weightsManifest"]:
        for entry in group["weights"]:
            # np.asarray, not np.ascontiguousarray: the latter turns a scalar into shape [1].
            array = np.asarray(weights[entry["name"]], dtype=_WEIGHT_DTYPES[entry["dtype"]])
            entries.append({"name": entry["name"], "shape": list(array.shape), "dtype": entry["dtype"]})
            blobs.append(array.tobytes())
    patched = dict(model)
    patched["weightsManifest"] = [{"paths": ["weights.bin"], "weights": entries}]
    (out_dir / "weights.bin").write_bytes(b"".join(blobs))
    path = out_dir / "model.json"
    path.write_text(json.dumps(patched))
    return path


def make_spatial_dims_dynamic(onnx_path: Path) -> None:
    """Height and width of the input (and the length of every output) become symbolic.

    For graphs whose upsampling uses scale factors and whose reshapes are computed from shapes
    (NanoDet), the graph converted at its native size then runs at any multiple of the largest
    stride; shapes recorded for the native size are dropped so none contradicts another size.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    layout_axes = (2, 3) if dims[1].dim_value == 3 else (1, 2)
    for axis, name in zip(layout_axes, ("height", "width"), strict=True):
        dims[axis].Clear()
        dims[axis].dim_param = name
    for output in model.graph.output:
        output_dims = output.type.tensor_type.shape.dim
        for axis in range(1, len(output_dims) - 1):
            output_dims[axis].Clear()
            output_dims[axis].dim_param = f"{output.name.split(':')[0]}_{axis}"
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def convert(model_json: Path, out_path: Path, input_size: tuple[int, int] | None = None, resize_rule: str | None = None,
            outputs: list[str] | None = None, opset: int = 17, dynamic_spatial: bool = False) -> None:
    model = json.loads(model_json.read_text())
    weights = read_weights(model, model_json.parent)
    nodes = model["modelTopology"]["node"]
    fill_attributes(nodes)
    if input_size is not None:
        if resize_rule not in RESIZE_RULES:
            raise ValueError(f"--input-size needs --resize-rule (known: {', '.join(RESIZE_RULES)})")
        RESIZE_RULES[resize_rule](model, weights, *input_size)
    from tf2onnx import convert as tf2onnx_convert

    with tempfile.TemporaryDirectory(prefix="tfjs-convert-") as work:
        patched = write_model(model, weights, Path(work))
        argv = ["tf2onnx.convert", "--tfjs", str(patched), "--output", str(out_path), "--opset", str(opset)]
        if outputs:
            argv += ["--outputs", ",".join(outputs)]
        saved_argv = sys.argv
        sys.argv = argv
        try:
            tf2onnx_convert.main()
        finally:
            sys.argv = saved_argv
    if dynamic_spatial:
        make_spatial_dims_dynamic(out_path)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_json", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--input-size", type=_size, default=None, metavar="WxH")
    parser.add_argument("--resize-rule", choices=sorted(RESIZE_RULES), default=None)
    parser.add_argument("--outputs", nargs="+", default=None)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic-spatial", action="store_true",
                        help="make the input's height and width symbolic after conversion")
    args = parser.parse_args(argv)
    convert(args.model_json, args.out, args.input_size, args.resize_rule, args.outputs, args.opset, args.dynamic_spatial)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert", "fill_attributes", "make_spatial_dims_dynamic", "read_weights", "resize_centernet"]
