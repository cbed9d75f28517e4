"""The project's own detector family: a tiny CenterNet-style single-stage detector (torch).

One network per model: a strided conv backbone down to stride 16 (32 for the largest input,
whose near objects span hundreds of pixels and need the wider receptive field), a light
top-down path back to stride 4 (small objects need the fine grid), and three heads at stride 4: a heatmap per
class, log box size and sub-cell centre offset. `DecodedCenterNet` puts the decoding inside the
exported graph (3x3 max-pool peaks + TopK), so every exported model outputs [B, K, 6] =
x1, y1, x2, y2, score, class-index in input-image pixels, which is the zoo's output convention.

Importing this module imports torch; the runtime (Detector, backends) never needs it unless the
torch backend is chosen.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

OUTPUT_STRIDE = 4
MAX_DETECTIONS = 100
NUM_CLASSES = 4
# Model class index -> Waymo ObjectType name, shared by the whole family.
FAMILY_CLASS_MAP: dict[int, str] = {0: "VEHICLE", 1: "PEDESTRIAN", 2: "SIGN", 3: "CYCLIST"}


@dataclass(frozen=True)
class CenterNetSpec:
    """Architecture of one family member: channel widths per stride and the input size."""

    input_width: int
    input_height: int
    width_stride4: int
    width_stride8: int
    width_stride16: int
    blocks_stride4: int = 1
    blocks_stride16: int = 1
    # 0 = no stride-32 stage (the backbone stops at stride 16).
    width_stride32: int = 0
    num_classes: int = NUM_CLASSES

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CenterNetLite(nn.Module):
    """Raw network: image [B, 3, H, W] (normalised) -> heatmap logits, log sizes, offsets at stride 4."""

    def __init__(self, spec: CenterNetSpec) -> None:
        super().__init__()
        self.spec = spec
        c4, c8, c16 = spec.width_stride4, spec.width_stride8, spec.width_stride16
        stem_width = max(8, c4 // 2)
        self.stem = nn.Sequential(_conv_bn_relu(3, stem_width, 2), _conv_bn_relu(stem_width, c4, 2))
        self.stage4 = nn.Sequential(*[_conv_bn_relu(c4, c4) for _ in range(spec.blocks_stride4)])
        self.stage8 = nn.Sequential(_conv_bn_relu(c4, c8, 2), _conv_bn_relu(c8, c8))
        self.stage16 = nn.Sequential(
            _conv_bn_relu(c8, c16, 2), *[_conv_bn_relu(c16, c16) for _ in range(spec.blocks_stride16)]
        )
        if spec.width_stride32:
            self.stage32 = nn.Sequential(
                _conv_bn_relu(c16, spec.width_stride32, 2), _conv_bn_relu(spec.width_stride32, spec.width_stride32)
            )
            self.lateral32 = nn.Conv2d(spec.width_stride32, c16, 1)
            # Zero-initialised: a stride-32 stage added to trained stride-16 weights starts as a no-op.
            nn.init.zeros_(self.lateral32.weight)
            nn.init.zeros_(self.lateral32.bias)
        self.lateral16 = nn.Conv2d(c16, c8, 1)
        self.fuse8 = _conv_bn_relu(c8, c8)
        self.lateral8 = nn.Conv2d(c8, c4, 1)
        self.fuse4 = _conv_bn_relu(c4, c4)
        self.heatmap_head = nn.Conv2d(c4, spec.num_classes, 1)
        self.size_head = nn.Conv2d(c4, 2, 1)
        self.offset_head = nn.Conv2d(c4, 2, 1)
        # Focal-loss prior: start with a low object probability everywhere (CenterNet's -2.19).
        nn.init.constant_(self.heatmap_head.bias, -2.19)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features4 = self.stage4(self.stem(images))
        features8 = self.stage8(features4)
        features16 = self.stage16(features8)
        if self.spec.width_stride32:
            features32 = self.stage32(features16)
            features16 = features16 + functional.interpolate(self.lateral32(features32), size=features16.shape[-2:])
        top8 = self.fuse8(features8 + functional.interpolate(self.lateral16(features16), size=features8.shape[-2:]))
        top4 = self.fuse4(features4 + functional.interpolate(self.lateral8(top8), size=features4.shape[-2:]))
        return self.heatmap_head(top4), self.size_head(top4), self.offset_head(top4)


class DecodedCenterNet(nn.Module):
    """Network plus in-graph decoding: image [B, 3, H, W] -> detections [B, K, 6] in input pixels."""

    def __init__(self, network: CenterNetLite, max_detections: int = MAX_DETECTIONS) -> None:
        super().__init__()
        self.network = network
        self.max_detections = max_detections

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        heatmap_logits, log_sizes, offsets = self.network(images)
        batch, classes, height, width = heatmap_logits.shape
        heatmap = torch.sigmoid(heatmap_logits)
        peaks = functional.max_pool2d(heatmap, 3, stride=1, padding=1)
        heatmap = heatmap * (heatmap == peaks).to(heatmap.dtype)
        scores, flat_indices = torch.topk(heatmap.reshape(batch, -1), self.max_detections)
        cells = height * width
        class_index = torch.div(flat_indices, cells, rounding_mode="floor")
        cell_index = flat_indices - class_index * cells
        cell_y = torch.div(cell_index, width, rounding_mode="floor")
        cell_x = cell_index - cell_y * width
        gather_index = cell_index.unsqueeze(1).expand(batch, 2, self.max_detections)
        sizes = torch.exp(torch.gather(log_sizes.reshape(batch, 2, cells), 2, gather_index)) * OUTPUT_STRIDE
        shifts = torch.gather(offsets.reshape(batch, 2, cells), 2, gather_index)
        centre_x = (cell_x.to(heatmap.dtype) + shifts[:, 0]) * OUTPUT_STRIDE
        centre_y = (cell_y.to(heatmap.dtype) + shifts[:, 1]) * OUTPUT_STRIDE
        half_w, half_h = sizes[:, 0] / 2, sizes[:, 1] / 2
        return torch.stack(
            [centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h, scores,
             class_index.to(heatmap.dtype)],
            dim=2,
        )


def build_network(spec: CenterNetSpec) -> CenterNetLite:
    return CenterNetLite(spec)


def load_network(weights_path: str | Path, spec: CenterNetSpec) -> CenterNetLite:
    network = CenterNetLite(spec)
    network.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return network.eval()


def export_onnx(network: CenterNetLite, onnx_path: str | Path, max_detections: int = MAX_DETECTIONS) -> None:
    """Export with decoding in the graph; the batch axis is dynamic, the input size fixed."""
    spec = network.spec
    decoded = DecodedCenterNet(network.eval(), max_detections).eval()
    example = torch.zeros(1, 3, spec.input_height, spec.input_width)
    # The TorchScript exporter is the one that handles this small graph without onnxscript;
    # its deprecation notices are not actionable here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            decoded,
            (example,),
            str(onnx_path),
            input_names=["images"],
            output_names=["detections"],
            dynamic_axes={"images": {0: "batch"}, "detections": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


# The shipped family: input resolution and capacity grow from the on-car model to the largest
# cloud model (3:2 inputs; the 1920x886 side cameras are stretched to the same size).
FAMILY: dict[str, tuple[str, CenterNetSpec]] = {
    "avd-onboard": ("onboard", CenterNetSpec(384, 256, 16, 24, 32)),
    "avd-cloud-s": ("cloud", CenterNetSpec(576, 384, 16, 32, 48)),
    "avd-cloud-m": ("cloud", CenterNetSpec(768, 512, 24, 32, 64, blocks_stride16=2)),
    "avd-cloud-l": ("cloud", CenterNetSpec(1152, 768, 24, 48, 64, blocks_stride4=2, blocks_stride16=2,
                                           width_stride32=96)),
}
