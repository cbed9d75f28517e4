"""The model zoo: cards shipped with the package plus models registered by the user.

Shipped: avcloud/models/zoo/<name>.yaml next to <name>.onnx. Registered: cache_dir()/models/
<name>/ holding a copy of the ONNX file and its card. Registering validates the ONNX against
the card (loads in onnxruntime, runs a blank input, checks the [N, 6] output convention).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from avcloud.errors import ConfigError, UserError
from avcloud.models.cards import ModelCard, load_card, save_card
from avcloud.paths import cache_dir
from avcloud.types import DETECTION_COLUMNS

SHIPPED_DIR = Path(__file__).resolve().parent / "zoo"


def registered_dir() -> Path:
    return cache_dir() / "models"


def _card_paths() -> list[Path]:
    shipped = sorted(SHIPPED_DIR.glob("*.yaml")) if SHIPPED_DIR.is_dir() else []
    registered_root = registered_dir()
    registered = sorted(registered_root.glob("*/*.yaml")) if registered_root.is_dir() else []
    return shipped + registered


def list_cards() -> list[ModelCard]:
    """Every model known here: shipped first, then registered, each name once."""
    cards: dict[str, ModelCard] = {}
    for path in _card_paths():
        card = load_card(path)
        cards.setdefault(card.name, card)
    return list(cards.values())


def get_card(name: str) -> ModelCard:
    for card in list_cards():
        if card.name == name:
            return card
    known = ", ".join(card.name for card in list_cards()) or "none"
    raise UserError(f"unknown model '{name}' (known: {known}; add one with `avcloud models register`)")


def validate_onnx(onnx_path: Path, card: ModelCard) -> None:
    """Reject an ONNX file that cannot run with this card or does not follow the output convention."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types
        raise ConfigError(f"{onnx_path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"{onnx_path}: expected exactly one image input, the graph has {len(inputs)}")
    shape = inputs[0].shape
    if len(shape) != 4:
        raise ConfigError(f"{onnx_path}: input '{inputs[0].name}' must be NCHW (4-D), it is {shape}")
    expected = {1: 3, 2: card.input_height, 3: card.input_width}
    for axis, size in expected.items():
        if isinstance(shape[axis], int) and shape[axis] != size:
            raise ConfigError(
                f"{onnx_path}: input shape {shape} does not match the card's 3x{card.input_height}x{card.input_width}"
            )
    blank = np.zeros((1, 3, card.input_height, card.input_width), dtype=np.float32)
    try:
        output = np.asarray(session.run(None, {inputs[0].name: blank})[0])
    except Exception as error:
        raise ConfigError(f"{onnx_path}: running a blank input failed ({str(error).splitlines()[0]})") from None
    follows_convention = (output.ndim == 2 and output.shape[1] == DETECTION_COLUMNS) or (
        output.ndim == 3 and output.shape[0] == 1 and output.shape[2] == DETECTION_COLUMNS
    )
    if not follows_convention:
        raise ConfigError(
            f"{onnx_path}: first output has shape {list(output.shape)}; the output convention is [N, 6] or "
            "[1, N, 6] rows of x1, y1, x2, y2, score, class (decode and NMS in the graph)"
        )


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
    stored = card.model_copy(update={"onnx": target_onnx.name, "torch": None, "card_dir": target_dir})
    save_card(stored, target_dir / f"{card.name}.yaml")
    return load_card(target_dir / f"{card.name}.yaml")
