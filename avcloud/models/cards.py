"""Model cards: the small YAML file that says how to feed an ONNX detector and read its output.

A model is an ONNX file plus a card (Triton's model-repository idea: config next to weights).
The card names the input (size, channel order, normalisation, NCHW or NHWC layout, float32 or
uint8, stretch or letterbox resize), the class map to Waymo object types, the output
convention, where the model is meant to run (onboard or cloud), and its family, licence and
provenance.

Output conventions (`output.format`); every decoder yields rows of x1, y1, x2, y2, score,
model class index in input pixels, and the same post-processing follows (score threshold,
class map, optional NMS per Waymo type, cap):
- `xyxy_score_class`: the graph outputs float [K, 6] or [B, K, 6] rows of x1, y1, x2, y2, score,
  class index, boxes in input pixels (`boxes: input_pixels`) or in [0, 1] (`boxes: normalized`);
  decoding (and usually NMS) happened in the graph.
- `yolo`: raw YOLO heads, [B, 4+C, N] (`yolo_layout: channels_first`, Ultralytics v8+) or
  [B, N, 4+C] (`channels_last`), or with an objectness column [B, N, 5+C] (`objectness: true`,
  YOLOv5/v7): centre x, centre y, width, height, then per-class scores; NMS in post-processing.
- `tf_object_detection`: the TF Object Detection API's four outputs: detection_boxes [B, N, 4]
  normalised y1, x1, y2, x2; detection_scores [B, N]; detection_classes [B, N]; num_detections
  [B]. Outputs are recognised by name, or by `tf_output_order`.
- `nanodet_gfl`: NanoDet's Generalized Focal Loss heads: per stride a score map [B, N_s, C]
  (sigmoid applied in the graph) and a distance distribution [B, N_s, 4*(reg_max+1)], or one
  concatenated [B, sum N_s, C + 4*(reg_max+1)] tensor; distances are the expectation of the
  softmaxed bins times the stride, from cell centres ((i + cell_offset) * stride); NMS in
  post-processing.

The class map's keys are the model's class indices or, when `class_names` lists them, its
class names; classes the map leaves out are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from avcloud.config import read_yaml_mapping, validate
from avcloud.errors import ConfigError
from avcloud.types import ObjectType

WAYMO_TYPE_NAMES = tuple(member.name for member in ObjectType if member is not ObjectType.UNKNOWN)


OUTPUT_FORMATS = ("xyxy_score_class", "yolo", "tf_object_detection", "nanodet_gfl")
# Formats whose raw output has one candidate per anchor/cell: they always need NMS.
FORMATS_NEEDING_NMS = ("yolo", "nanodet_gfl")
DEFAULT_NMS_IOU = 0.5
TF_OUTPUT_ROLES = ("boxes", "scores", "classes", "num_detections")


class OutputConvention(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    format: Literal["xyxy_score_class", "yolo", "tf_object_detection", "nanodet_gfl"] = "xyxy_score_class"
    boxes: Literal["input_pixels", "normalized"] = "input_pixels"
    score_threshold: float = pydantic.Field(0.05, ge=0.0, le=1.0)
    max_detections: int | None = pydantic.Field(None, gt=0)
    # IoU of the per-Waymo-type NMS in post-processing; None = none for `xyxy_score_class` and
    # `tf_object_detection` (decoded in the graph), 0.5 for the raw-head formats.
    nms_iou: float | None = pydantic.Field(None, gt=0.0, le=1.0)
    # yolo
    yolo_layout: Literal["auto", "channels_first", "channels_last"] = "auto"
    objectness: bool = False
    # tf_object_detection: the role of each graph output, in output order (default: by name)
    tf_output_order: tuple[Literal["boxes", "scores", "classes", "num_detections"], ...] | None = None
    # nanodet_gfl
    strides: tuple[int, ...] = (8, 16, 32)
    reg_max: int = pydantic.Field(7, ge=1)
    cell_offset: float = pydantic.Field(0.5, ge=0.0, le=1.0)
    # Waymo labels a cyclist as one box around rider and bicycle; COCO-style models see a
    # `person` on a `bicycle`. When set, a person box standing on a bicycle box becomes one
    # CYCLIST box (their union) and a bicycle without a rider is kept at half its score.
    # Needs `class_names` with 'person' and 'bicycle'.
    merge_riders: bool = False

    @property
    def effective_nms_iou(self) -> float | None:
        if self.nms_iou is not None:
            return self.nms_iou
        return DEFAULT_NMS_IOU if self.format in FORMATS_NEEDING_NMS else None

    @pydantic.field_validator("tf_output_order")
    @classmethod
    def _roles_once(cls, value):
        if value is not None and sorted(value) != sorted(set(value)):
            raise ValueError("each role may appear once")
        if value is not None and not {"boxes", "scores", "classes"} <= set(value):
            raise ValueError("must name at least boxes, scores and classes")
        return value


class ExtraPass(pydantic.BaseModel):
    """One more run of the same graph at another input size (the graph's H and W must be symbolic)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    input_width: int = pydantic.Field(gt=0, le=8192)
    input_height: int = pydantic.Field(gt=0, le=8192)
    # Keep only boxes whose longer side, in this pass's input pixels, is at least this.
    min_box_px: float = pydantic.Field(0.0, ge=0.0)


class MultiScale(pydantic.BaseModel):
    """Several input sizes, one graph: large inputs find small objects, a small one the large ones.

    A detector whose box regression is bounded (NanoDet: at most reg_max * stride from the
    cell centre) cannot box an object larger than about twice that at its input scale; a pass
    at a smaller input covers those. Each pass keeps the box sizes it is good at; NMS per
    Waymo type merges them.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    # The main pass (the card's input size) keeps boxes whose longer side is at most this (input px).
    max_box_px: float | None = pydantic.Field(None, gt=0.0)
    passes: tuple[ExtraPass, ...] = ()


class TorchWeights(pydantic.BaseModel):
    """Optional native weights so the torch backend can run the model without ONNX."""

    model_config = pydantic.ConfigDict(extra="forbid")

    architecture: Literal["centernet-lite"]
    weights: str
    spec: dict[str, int]


class ModelCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*(-[A-Za-z0-9_.]+)*$")
    onnx: str
    input_width: int = pydantic.Field(gt=0, le=8192)
    input_height: int = pydantic.Field(gt=0, le=8192)
    channel_order: Literal["bgr", "rgb"] = "bgr"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    input_layout: Literal["nchw", "nhwc"] = "nchw"
    # uint8 feeds the resized pixels as they are (mean/std are then ignored).
    input_dtype: Literal["float32", "uint8"] = "float32"
    # stretch: resize to the input size; letterbox: keep the aspect ratio, pad with letterbox_fill.
    resize: Literal["stretch", "letterbox"] = "stretch"
    letterbox_fill: int = pydantic.Field(114, ge=0, le=255)
    # The model's own class names, by class index (optional; lets class_map use names).
    class_names: tuple[str, ...] | None = None
    class_map: dict[int | str, str]
    output: OutputConvention = OutputConvention()
    multi_scale: MultiScale | None = None
    place: Literal["onboard", "cloud"]
    torch: TorchWeights | None = None
    description: str = ""
    # Which family the model belongs to (e.g. 'avd' trained on synthetic scenes, 'coco-human'
    # pretrained on real photos), its licence and where its weights come from.
    family: str = ""
    license: str = ""
    provenance: str = ""
    # Informational figures written by training/evaluation (e.g. held-out mAP); never read by code.
    metrics: dict[str, float] = pydantic.Field(default_factory=dict)
    # Directory the card was loaded from; relative file names resolve against it.
    card_dir: Path | None = pydantic.Field(None, exclude=True)

    @pydantic.field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(component <= 0 for component in value):
            raise ValueError("every std component must be > 0")
        return value

    @pydantic.field_validator("class_map", mode="before")
    @classmethod
    def _numeric_keys_are_indices(cls, value: Any) -> Any:
        # YAML and JSON may give indices as strings ('0'); a key made of digits is an index.
        if isinstance(value, dict):
            return {int(key) if isinstance(key, str) and key.isdigit() else key: name for key, name in value.items()}
        return value

    @pydantic.field_validator("class_map")
    @classmethod
    def _class_map_names_waymo_types(cls, value: dict[int | str, str]) -> dict[int | str, str]:
        if not value:
            raise ValueError("must map at least one model class to a Waymo type")
        for index, type_name in value.items():
            if isinstance(index, int) and index < 0:
                raise ValueError(f"class index {index} must be >= 0")
            if type_name not in WAYMO_TYPE_NAMES:
                raise ValueError(f"class {index}: '{type_name}' is not one of {', '.join(WAYMO_TYPE_NAMES)}")
        return value

    @pydantic.model_validator(mode="after")
    def _class_names_resolve(self) -> ModelCard:
        names = self.class_names or ()
        unknown = [key for key in self.class_map if isinstance(key, str) and key not in names]
        if unknown:
            raise ValueError(f"class_map names {', '.join(map(repr, unknown))} are not in class_names")
        if self.output.merge_riders and not {"person", "bicycle"} <= set(names):
            raise ValueError("output.merge_riders needs class_names with 'person' and 'bicycle'")
        return self

    @pydantic.field_validator("name")
    @classmethod
    def _name_without_configuration_words(cls, value: str) -> str:
        # Configuration names are '{model}-imgcomp..-inpcomp..'; a model name containing those
        # words would make them ambiguous.
        if "-imgcomp" in value or "-inpcomp" in value:
            raise ValueError("must not contain '-imgcomp' or '-inpcomp'")
        return value

    @property
    def input_wh(self) -> tuple[int, int]:
        return (self.input_width, self.input_height)

    @property
    def onnx_path(self) -> Path:
        path = Path(self.onnx)
        return path if path.is_absolute() or self.card_dir is None else self.card_dir / path

    @property
    def torch_weights_path(self) -> Path | None:
        if self.torch is None:
            return None
        path = Path(self.torch.weights)
        return path if path.is_absolute() or self.card_dir is None else self.card_dir / path

    def class_index(self, name: str) -> int:
        """Index of one of the model's own class names."""
        return (self.class_names or ()).index(name)

    def waymo_class_lookup(self) -> dict[int, int]:
        """Model class index -> ObjectType value."""
        lookup = {}
        for key, type_name in self.class_map.items():
            index = key if isinstance(key, int) else self.class_index(key)
            lookup[index] = int(ObjectType[type_name])
        return lookup

    @property
    def channels_last(self) -> bool:
        return self.input_layout == "nhwc"

    def to_yaml_mapping(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"card_dir"})
        data["class_map"] = {
            int(key) if isinstance(key, int) or str(key).isdigit() else key: name
            for key, name in self.class_map.items()
        }
        if self.class_names is not None:
            data["class_names"] = list(self.class_names)
        # Defaults stay out of the file, so a card says only what differs from the convention.
        if self.multi_scale is None:
            data.pop("multi_scale", None)
        if not self.metrics:
            data.pop("metrics", None)
        defaults = ModelCard.model_construct()
        for field in ("input_layout", "input_dtype", "resize", "letterbox_fill", "family", "license", "provenance"):
            if getattr(self, field) == getattr(defaults, field, None) and field in data:
                del data[field]
        output_defaults = OutputConvention()
        data["output"] = {key: value for key, value in data["output"].items()
                          if key in ("format", "boxes", "score_threshold", "max_detections")
                          or getattr(self.output, key) != getattr(output_defaults, key)}
        return data


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a card; errors are one line naming the file and the field."""
    path = Path(path)
    data = read_yaml_mapping(path)
    card = validate(ModelCard, data, str(path))
    return card.model_copy(update={"card_dir": path.resolve().parent})


def save_card(card: ModelCard, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(card.to_yaml_mapping(), sort_keys=False))


def card_from_mapping(data: dict[str, Any], source: str, card_dir: Path | None = None) -> ModelCard:
    card = validate(ModelCard, data, source)
    return card.model_copy(update={"card_dir": card_dir})


__all__ = ["OUTPUT_FORMATS", "ConfigError", "ModelCard", "OutputConvention", "TorchWeights", "load_card", "save_card"]
