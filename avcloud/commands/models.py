"""`avcloud models`: list the zoo, register an ONNX detector, train or evaluate the family."""

from __future__ import annotations

import argparse
import json
import logging

from avcloud.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="model zoo: list, register, train, evaluate")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="list shipped and registered models")
    listing.add_argument("--json", action="store_true", help="print the cards as JSON")
    listing.set_defaults(handler=run_list)

    adding = actions.add_parser("register", help="validate an ONNX detector against its card and add it to the zoo")
    adding.add_argument("onnx", metavar="PATH.onnx")
    adding.add_argument("--card", required=True, metavar="CARD.yaml", help="the model card (YAML)")
    adding.set_defaults(handler=run_register)

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

    evaluating = actions.add_parser("evaluate", help="held-out (seed 0) raw-input mAP and recall per object size")
    evaluating.add_argument("--models", nargs="+", default=None, help="models to evaluate (default: the family)")
    evaluating.add_argument("--frames", type=int, default=10, help="held-out frames per camera")
    evaluating.add_argument("--json", action="store_true")
    evaluating.add_argument("--record", action="store_true",
                            help="write the figures into each model card's informational 'metrics' field")
    evaluating.set_defaults(handler=run_evaluate)


def run_list(args: argparse.Namespace) -> int:
    from avcloud.models import list_cards

    cards = list_cards()
    if args.json:
        print(json.dumps([{**card.to_yaml_mapping(), "onnx_path": str(card.onnx_path)} for card in cards], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="avcloud model zoo")
    for column in ("name", "place", "input", "classes", "onnx"):
        table.add_column(column)
    for card in cards:
        table.add_row(card.name, card.place, f"{card.input_width}x{card.input_height}",
                      ", ".join(card.class_map.values()), str(card.onnx_path))
    Console().print(table)
    return 0


def run_register(args: argparse.Namespace) -> int:
    from avcloud.models import register_model

    card = register_model(args.onnx, args.card)
    print(f"registered {card.name} ({card.place}, {card.input_width}x{card.input_height}) in {card.card_dir}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from avcloud.training import train_family

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
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
