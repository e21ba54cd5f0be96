"""`gcvit detect train|eval|predict|scenes`: detection and instance segmentation on a GC ViT backbone."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gcvit.cli.args import DefaultsFormatter, add_dense_training_flags, dense_task_settings, parse_seed

# this module's command and its line in `gcvit --help`
COMMANDS = {"detect": "detection and instance segmentation: train, eval, predict, and the digit scenes"}


def _train(args: argparse.Namespace) -> None:
    from gcvit.train.detection import DetectConfig, detect_config_from
    from gcvit.train.loop import train

    paths = ("train_ann", "train_images", "val_ann", "val_images")
    given = dense_task_settings(args, DetectConfig, paths, "detection")
    cfg = detect_config_from(given)
    progress = not args.no_progress and sys.stderr.isatty()
    result = train(cfg, resume=args.resume, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    run = result.run_dir
    row = next(r for r in result.history if r["epoch"] == result.best_epoch) if result.best_epoch else {}
    mask = f", mask AP50 {row['val_segm_AP50']:.3f}" if row.get("val_segm_AP50") is not None else ""
    ap50 = f", box AP50 {row['val_bbox_AP50']:.3f}" if row else ""
    print(
        f"done: {result.epochs_done} epochs, best box AP {result.best_top1:.3f}{ap50}{mask} (epoch "
        f"{result.best_epoch}) -> {run}"
    )
    print(f"checkpoints: {run / 'best'}, {run / 'last'}; metrics: {run / 'metrics.csv'}; plots: {run / 'plots'}")


def _eval(args: argparse.Namespace) -> None:
    from gcvit.train.detect_eval import evaluate_detector

    scores = evaluate_detector(
        args.run, args.ann, args.images, out=args.out, batch_size=args.batch_size, device=args.device
    )
    for iou_type, values in scores.items():
        kind = "box" if iou_type == "bbox" else "mask"
        stats = "  ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "per_category")
        print(f"{kind}: {stats}")
    target = Path(args.out) if args.out else Path(args.run) / "eval.json"
    if target.is_file():
        print(f"wrote {target}")


def _predict(args: argparse.Namespace) -> None:
    from gcvit.train.detect_eval import predict_detections

    results = predict_detections(
        args.inputs, args.model, args.out_dir, score_threshold=args.score_threshold, device=args.device
    )
    per_file: dict[str, list[str]] = {}
    for r in results:  # best first within an image, as the detector gives them
        per_file.setdefault(r["file_name"], []).append(f"{r['category_name']} {r['score']:.2f}")
    for file, found in per_file.items():
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        print(f"{file}: {len(found)} objects ({shown})")
    print(f"wrote {args.out_dir}/predictions.json and a PNG per image")


def _scenes(args: argparse.Namespace) -> None:
    from gcvit.data.digit_scenes import write_digit_scenes

    paths = write_digit_scenes(args.out, args.train, args.val, args.size, args.seed)
    counts = {k: len(json.loads(paths[f"{k}_ann"].read_text())["annotations"]) for k in ("train", "val")}
    for split, n in (("train", args.train), ("val", args.val)):
        images, ann = paths[f"{split}_images"], paths[f"{split}_ann"]
        print(f"wrote {n} {split} scenes ({counts[split]} digits): {images}/, {ann}")


def add_subcommands(subparsers: Any) -> None:
    """Add `detect` (with its own subcommands) to the `gcvit` command's subparsers."""
    detect = subparsers.add_parser("detect", help=COMMANDS["detect"])
    sub = detect.add_subparsers(dest="detect_command", required=True, metavar="{train,eval,predict,scenes}")

    p = sub.add_parser(
        "train", help="train a detector (the digit scenes when no data is given)", formatter_class=DefaultsFormatter
    )
    for flag in ("--train-ann", "--train-images", "--val-ann", "--val-images"):
        p.add_argument(flag, default=None, help="COCO annotations JSON / image folder (all four, or none)")
    p.add_argument("--scenes", type=int, default=None, help="digit scenes to train on without data (default 400)")
    p.add_argument("--arch", default=None, choices=["mask_rcnn", "faster_rcnn"], help="(default mask_rcnn)")
    p.add_argument("--model", default=None, help="backbone: a GC ViT or Swin name, or resnet50 (default gcvit_nano)")
    p.add_argument("--pretrained", default=None, help="backbone weights: 'true' (the tag's), a path or URL")
    p.add_argument("--img-size", type=int, default=None, help="shorter side (default 800; the digit scenes 128)")
    p.add_argument("--max-size", type=int, default=None, help="longest longer side (default img-size * 1333 / 800)")
    p.add_argument(
        "--scale-aug",
        default=None,
        choices=["none", "multiscale", "lsj"],
        help="multiscale: the official DETR-style resize and crop; lsj: large-scale jitter (default none)",
    )
    p.add_argument("--flip", type=float, default=None, help="horizontal flip chance (default 0.5; digit scenes 0)")
    p.add_argument("--epochs", type=int, default=None, help="(default 12; the digit scenes 10; official 36)")
    p.add_argument("--batch-size", type=int, default=None, help="(default 4)")
    p.add_argument("--lr", type=float, default=None, help="(default 1e-4 with pretrained weights, 1e-3 from scratch)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default 0.05)")
    p.add_argument("--warmup-iters", type=int, default=None, help="(default 100; official 2500)")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/detect-scenes or runs/detect-<images>)")
    p.add_argument("--recipe", default=None, choices=["default", "official"], help="official: Mask R-CNN 3x")
    p.add_argument("--strict-data", action="store_true", help="refuse unreadable images and unusable annotations")
    add_dense_training_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval", help="COCO box and mask AP of a run, into RUN/eval.json", formatter_class=DefaultsFormatter
    )
    p.add_argument("run", help="a detection run folder (its best/, else last/) or checkpoint folder")
    p.add_argument("--ann", default=None, help="COCO annotations of other data (default: the run's validation data)")
    p.add_argument("--images", default=None, help="their image folder")
    p.add_argument("--out", default=None, help="the JSON file (default RUN/eval.json)")
    p.add_argument("--batch-size", type=int, default=2, help="images read at a time (each detected on its own)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="draw a run's detections on images", formatter_class=DefaultsFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True, help="a detection run folder or checkpoint folder")
    p.add_argument("--out-dir", default="detections", help="PNGs and predictions.json")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_predict)

    p = sub.add_parser("scenes", help="write the digit scenes as COCO JSON and PNGs", formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="digit_scenes")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=parse_seed, default=0)
    p.set_defaults(func=_scenes)
