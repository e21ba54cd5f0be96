"""What a run is about to do, said before its first step: model, input, data per class, schedule, device.

A from-scratch run of a large model on few images says so and names the small models made for it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from gcvit.train.config import SMALL_MODELS, TrainConfig

FEW_IMAGES = 20_000  # fewer training images than this: a model from scratch should be one of SMALL_MODELS
MAX_CLASS_ROWS = 30  # more classes than this: the smallest and largest counts instead of one row each


def _source(cfg: TrainConfig) -> str:
    if cfg.pretrained is True:
        return "NVIDIA's ImageNet weights"
    return f"weights from {cfg.pretrained}" if cfg.pretrained else "from scratch"


def _data(cfg: TrainConfig) -> str:
    if cfg.data == "digits":
        return f"the bundled digits (val split {cfg.val_fraction:g}, seed {cfg.seed})"
    if cfg.data_dir:
        return f"{cfg.data_dir} (val split {cfg.val_fraction:g}, seed {cfg.seed})"
    return f"{cfg.train_dir} (train) and {cfg.val_dir} (val)"


def _class_rows(classes: list[str], train: Any, val: Any) -> list[str]:
    """A row per class: its name and its image counts in train and val."""
    n_train, n_val = Counter(train.targets), Counter(val.targets)
    width = max(5, *(len(c) for c in classes))
    rows = [f"  {'class':<{width}}  {'train':>6}  {'val':>6}"]
    if len(classes) > MAX_CLASS_ROWS:
        counts = sorted((n_train[i], c) for i, c in enumerate(classes))
        for label, (count, name) in (("fewest", counts[0]), ("most", counts[-1])):
            rows.append(f"  {name:<{width}}  {count:>6}  {n_val[classes.index(name)]:>6}  ({label} training images)")
        return rows
    rows += [f"  {c:<{width}}  {n_train[i]:>6}  {n_val[i]:>6}" for i, c in enumerate(classes)]
    return rows


def run_header(
    cfg: TrainConfig, model: nn.Module, train: Any, val: Any, classes: list[str], steps_per_epoch: int, device: Any
) -> list[str]:
    """The lines a run starts with.

    Args:
        cfg: the resolved config.
        model: the model as built (its parameters are counted).
        train, val: the datasets (with `targets`, a class index per image).
        classes: class names, index = label.
        steps_per_epoch: optimizer steps per epoch.
        device: where it trains.
    """
    params = sum(p.numel() for p in model.parameters())
    name = cfg.model
    built = getattr(model, "cfg", None)
    if cfg.data == "digits" and cfg.model not in SMALL_MODELS and not cfg.pretrained:
        name = f"{cfg.model} (on the digits: its family's small 32 px model; --model-override changes its fields)"
    lines = [
        f"model {name}: {params / 1e6:.2f} M parameters, {_source(cfg)}, input {cfg.img_size}x{cfg.img_size} px"
        + (f", windows {','.join(map(str, built.window_size))}" if hasattr(built, "window_size") else ""),
        f"data {_data(cfg)}: {len(classes)} classes, {len(train)} training and {len(val)} validation images",
        *_class_rows(classes, train, val),
        f"schedule: {cfg.epochs} epochs"
        + (f" + {cfg.cooldown_epochs} at min_lr" if cfg.cooldown_epochs else "")
        + f", {steps_per_epoch} steps of batch {cfg.batch_size} each; lr {cfg.lr:.2e}, recipe {cfg.recipe}",
        f"device {device}, {torch.get_num_threads()} threads, amp {cfg.amp}; run folder {cfg.out_dir}",
    ]
    if not cfg.pretrained and cfg.model not in SMALL_MODELS and cfg.data != "digits" and len(train) < FEW_IMAGES:
        lines.append(
            f"note: {params / 1e6:.1f} M parameters from scratch on {len(train)} images will likely overfit; "
            f"--model gcvit_micro (1.9 M, 64 px) or gcvit_nano (1.4 M, 32 px) suit a few hundred to a few thousand "
            f"images, or fine-tune pretrained weights (--pretrained)"
        )
    return lines
