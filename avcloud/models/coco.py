"""COCO's 80 detection classes, in the contiguous order detectors trained on COCO 2017 output,
and how they map to Waymo object types.

Waymo's camera labels know vehicles, pedestrians, cyclists (and, in our synthetic scenes,
signs). From COCO: car, truck, bus and motorcycle are vehicles; a person is a pedestrian; a
bicycle is a cyclist (a card's `merge_riders` joins a person riding it into one box, as Waymo
labels a cyclist); a stop sign is the only sign COCO has. Every other class is dropped.
"""

from __future__ import annotations

COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

COCO_TO_WAYMO: dict[str, str] = {
    "car": "VEHICLE",
    "truck": "VEHICLE",
    "bus": "VEHICLE",
    "motorcycle": "VEHICLE",
    "person": "PEDESTRIAN",
    "bicycle": "CYCLIST",
    "stop sign": "SIGN",
}

__all__ = ["COCO_CLASS_NAMES", "COCO_TO_WAYMO"]
