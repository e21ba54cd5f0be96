"""`gcvit segment train|eval|predict|scenes`: semantic segmentation with UPerNet on a GC ViT backbone."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gcvit.cli.args import DefaultsFormatter, add_dense_training_flags, dense_task_settings, parse_seed

# this module's command and its line in `gcvit --help`
COMMANDS = {"segment": "semantic segmentation: train, eval, predict, and the digit scenes' label maps"}


def _train(args: argparse.Namespace) -> None:
    from gcvit.train.loop import train
    from gcvit.train.segmentation import SegmentConfig, segment_config_from

    paths = ("train_images", "train_masks", "val_images", "val_masks", "ade20k", "class_names")
    given = dense_task_settings(args, SegmentConfig, paths, "segmentation")
    cfg = segment_config_from(given)
    progress = not args.no_progress and sys.stderr.isatty()
    result = train(cfg, resume=args.resume, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    run = result.run_dir
    row = next(r for r in result.history if r["epoch"] == result.best_epoch) if result.best_epoch else {}
    accuracy = f", pixel accuracy {row['val_pixel_accuracy']:.3f}" if row else ""
    print(
        f"done: {result.epochs_done} epochs, best mIoU {result.best_top1:.3f}{accuracy} "
        f"(epoch {result.best_epoch}) -> {run}"
    )
    print(f"checkpoints: {run / 'best'}, {run / 'last'}; metrics: {run / 'metrics.csv'}; plots: {run / 'plots'}")


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ratios separated by commas, like 0.75,1,1.25; got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ratios; got {text!r}")
    return values


def _eval(args: argparse.Namespace) -> None:
    from gcvit.train.segment_eval import evaluate_segmenter

    result = evaluate_segmenter(
        args.run,
        args.images,
        args.masks,
        out=args.out,
        mode=args.mode,
        window=args.window,
        stride=args.stride,
        scales=args.scales,
        flip=args.flip,
        device=args.device,
    )
    s = result["settings"]
    how = f"{s['mode']}" + (f" (window {s['window']}, stride {s['stride']})" if s["mode"] == "slide" else "")
    print(
        f"mIoU {result['mIoU']:.3f}  pixel accuracy {result['pixel_accuracy']:.3f}  mean accuracy "
        f"{result['mean_accuracy']:.3f}  ({how}, scales {s['scales']}{', flip' if s['flip'] else ''})"
    )
    for name, v in result["per_class"].items():
        iou = "-" if v["IoU"] is None else f"{v['IoU']:.3f}"
        acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        print(f"  {name:<16} IoU {iou}  accuracy {acc}")
    target = Path(args.out) if args.out else Path(args.run) / "eval.json"
    if target.is_file():
        print(f"wrote {target}")


def _predict(args: argparse.Namespace) -> None:
    from gcvit.train.segment_eval import predict_segmentation

    records = predict_segmentation(
        args.inputs,
        args.model,
        args.out_dir,
        mode=args.mode,
        window=args.window,
        stride=args.stride,
        device=args.device,
    )
    for r in records:
        top = sorted(r["classes"].items(), key=lambda kv: -kv[1])[:4]
        shown = ", ".join(f"{name} {share:.0%}" for name, share in top)
        print(f"{r['file']}: {shown}")
    print(f"wrote {args.out_dir}/<name>_overlay.png and <name>_labels.png per image")


def _scenes(args: argparse.Namespace) -> None:
    from gcvit.data.digit_scenes import write_segmentation_scenes

    paths = write_segmentation_scenes(args.out, args.train, args.val, args.size, args.seed)
    for split, n in (("train", args.train), ("val", args.val)):
        print(f"wrote {n} {split} scenes: {paths[f'{split}_images']}/, label maps {paths[f'{split}_masks']}/")
    print(json.dumps({"classes": 11, "background": 0, "digit d": "d + 1"}))


def add_subcommands(subparsers: Any) -> None:
    """Add `segment` (with its own subcommands) to the `gcvit` command's subparsers."""
    segment = subparsers.add_parser("segment", help=COMMANDS["segment"])
    sub = segment.add_subparsers(dest="segment_command", required=True, metavar="{train,eval,predict,scenes}")

    p = sub.add_parser(
        "train", help="train a segmenter (the digit scenes when no data is given)", formatter_class=DefaultsFormatter
    )
    for flag in ("--train-images", "--train-masks", "--val-images", "--val-masks"):
        p.add_argument(flag, default=None, help="image / mask folder (all four, or none); masks matched by file stem")
    p.add_argument("--ade20k", default=None, help="a folder holding ADEChallengeData2016 (150 classes)")
    p.add_argument("--num-classes", type=int, default=None, help="labels 0..N-1 (255 ignored); needed with folders")
    p.add_argument("--class-names", default=None, help="a text file, one class name a line")
    p.add_argument("--reduce-zero-label", action="store_true", help="ignore label 0 and shift the others down")
    p.add_argument("--scenes", type=int, default=None, help="digit scenes to train on without data (default 400)")
    p.add_argument("--model", default=None, help="backbone: a GC ViT or Swin name (default gcvit_nano)")
    p.add_argument("--pretrained", default=None, help="backbone weights: 'true' (the tag's), a path, URL or run")
    p.add_argument("--img-size", type=int, default=None, help="crop side (default 512; the digit scenes 128)")
    p.add_argument("--flip", type=float, default=None, help="horizontal flip chance (default 0.5; digit scenes 0)")
    p.add_argument("--head-channels", type=int, default=None, help="UPerNet's channels (default 512; scenes 64)")
    p.add_argument("--epochs", type=int, default=None, help="(default 12; the digit scenes 10)")
    p.add_argument("--iters", type=int, default=None, help="optimizer steps instead of epochs (official 160000)")
    p.add_argument("--batch-size", type=int, default=None, help="(default 8; official 16)")
    p.add_argument("--lr", type=float, default=None, help="(default 6e-5 with pretrained weights, 1e-3 from scratch)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default 0.01)")
    p.add_argument("--warmup-iters", type=int, default=None, help="(default 100; official 1500)")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/segment-scenes or runs/segment-<images>)")
    p.add_argument("--recipe", default=None, choices=["default", "official"], help="official: UPerNet 160k")
    p.add_argument("--strict-data", action="store_true", help="refuse unusable images and masks")
    add_dense_training_flags(p)
    p.set_defaults(func=_train)

    def inference_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mode", default="whole", choices=["whole", "slide"], help="the image at once, or windows")
        p.add_argument("--window", type=int, default=None, help="sliding window side (default: the crop size)")
        p.add_argument("--stride", type=int, default=None, help="sliding window stride (default 2/3 of the window)")
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval", help="mIoU of a run, into RUN/eval.json", formatter_class=DefaultsFormatter)
    p.add_argument("run", help="a segmentation run folder (its best/, else last/) or checkpoint folder")
    p.add_argument("--images", default=None, help="images of other data (default: the run's validation data)")
    p.add_argument("--masks", default=None, help="their masks")
    p.add_argument("--out", default=None, help="the JSON file (default RUN/eval.json)")
    p.add_argument("--scales", type=_scales, default=[1.0], help="ratios of the image size, e.g. 0.75,1,1.25")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    inference_flags(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="label maps and overlays of images", formatter_class=DefaultsFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True, help="a segmentation run folder or checkpoint folder")
    p.add_argument("--out-dir", default="segmentations", help="the PNGs")
    inference_flags(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("scenes", help="write the digit scenes with label maps", formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="segmentation_scenes")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=parse_seed, default=0)
    p.set_defaults(func=_scenes)
