"""Model cards: the small YAML file that says how to feed an ONNX detector and read its output.

A model is an ONNX file plus a card (Triton's model-repository idea: config next to weights).
The card names the input size, channel order and normalisation, the class map to Waymo object
types, the output convention, and where the model is meant to run (onboard or cloud).

Output convention `xyxy_score_class`: the graph outputs float [K, 6] or [B, K, 6] rows of
x1, y1, x2, y2, score, class index (a key of `class_map`); boxes in input-image pixels
(`boxes: input_pixels`) or in [0, 1] of the input size (`boxes: normalized`). Rows with a
score below `score_threshold` are dropped in post-processing (a fixed K padded with low
scores is fine: that is what TopK decoding in the graph produces).
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


class OutputConvention(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    format: Literal["xyxy_score_class"] = "xyxy_score_class"
    boxes: Literal["input_pixels", "normalized"] = "input_pixels"
    score_threshold: float = pydantic.Field(0.05, ge=0.0, le=1.0)
    max_detections: int | None = pydantic.Field(None, gt=0)


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
    class_map: dict[int, str]
    output: OutputConvention = OutputConvention()
    place: Literal["onboard", "cloud"]
    torch: TorchWeights | None = None
    description: str = ""
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

    @pydantic.field_validator("class_map")
    @classmethod
    def _class_map_names_waymo_types(cls, value: dict[int, str]) -> dict[int, str]:
        if not value:
            raise ValueError("must map at least one model class index to a Waymo type")
        for index, type_name in value.items():
            if index < 0:
                raise ValueError(f"class index {index} must be >= 0")
            if type_name not in WAYMO_TYPE_NAMES:
                raise ValueError(f"class {index}: '{type_name}' is not one of {', '.join(WAYMO_TYPE_NAMES)}")
        return value

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

    def waymo_class_lookup(self) -> dict[int, int]:
        """Model class index -> ObjectType value."""
        return {index: int(ObjectType[type_name]) for index, type_name in self.class_map.items()}

    def to_yaml_mapping(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"card_dir"})
        data["class_map"] = {int(index): name for index, name in data["class_map"].items()}
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


__all__ = ["ConfigError", "ModelCard", "OutputConvention", "TorchWeights", "load_card", "save_card"]
