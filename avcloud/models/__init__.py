"""Model runtime shared by car and cloud: cards, zoo, inference backends, the detector family.

Importing this package does not import torch; the family's architecture and training live in
`avcloud.models.centernet` (torch) and `avcloud.training` (data loop).
"""

from avcloud.models.backends import BACKEND_NAMES, BackendUnavailable, InferenceBackend, open_backend
from avcloud.models.cards import ModelCard, OutputConvention, load_card, save_card
from avcloud.models.detector import Detector
from avcloud.models.zoo import (
    FAMILIES,
    SHIPPED_DIR,
    Family,
    family_for_scene,
    family_of,
    get_card,
    is_synthetic_scene_name,
    list_cards,
    register_model,
    registered_dir,
    validate_onnx,
)

__all__ = [
    "BACKEND_NAMES",
    "FAMILIES",
    "Family",
    "family_for_scene",
    "family_of",
    "is_synthetic_scene_name",
    "SHIPPED_DIR",
    "BackendUnavailable",
    "Detector",
    "InferenceBackend",
    "ModelCard",
    "OutputConvention",
    "get_card",
    "list_cards",
    "load_card",
    "open_backend",
    "register_model",
    "registered_dir",
    "save_card",
    "validate_onnx",
]
