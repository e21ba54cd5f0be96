"""Semantic segmentation as a task of the shared training loop: image and mask folders (or ADE20K's layout, or the
digit scenes by default), UPerNet on a GC ViT or Swin backbone (`gcvit.create_segmenter`), cross-entropy with the
auxiliary head's loss at 0.4, and mIoU on the validation images (`gcvit.train.segment_eval`).

`SegmentConfig` holds a segmentation run's settings. The official recipe (`recipe: official`, the UPerNet ADE20K
recipe of Swin's mmseg config that the paper's numbers follow): AdamW lr 6e-5, weight decay 0.01 (none on norms,
biases and bias tables), a linear warmup over 1500 iterations from 1e-6 x, then poly decay (power 1) to 0 over 160k
iterations at batch 16, 512 x 512 crops of images resized to 0.5-2x of 2048 x 512.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from gcvit.data import DataError
from gcvit.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, NVIDIA_LICENSE
from gcvit.train import distributed as D
from gcvit.train.metrics import plot_history, plot_title
from gcvit.train.task import Task, TaskData, autocast, backbone_overrides, check_common_settings, config_from

SCENE_SIZE = 128  # px a side of the digit scenes
IGNORE = 255  # the label of pixels no class is scored on
SEGMENT_RECIPES = ("default", "official")


@dataclass
class SegmentConfig:
    """A segmentation run's settings: the data, the segmenter, the schedule, and what the shared loop reads."""

    # data: image and mask folders (masks: PNGs of class indices, 255 ignored, matched by file stem), or ADE20K's
    # folder; none given: the digit scenes with per-pixel labels, written once into the cache
    train_images: str | None = None
    train_masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    ade20k: str | None = None  # a folder holding ADEChallengeData2016: 150 classes, label 0 ignored
    num_classes: int | None = None  # needed with image folders; the digit scenes 11, ADE20K 150
    class_names: str | None = None  # a text file, one class name a line; None: the numbers
    reduce_zero_label: bool = False  # label 0 ignored and the others shifted down by one (ADE20K's)
    scenes: int = 400  # digit scenes to train on when no data is given (a quarter as many to validate on)
    strict_data: bool = False  # refuse unusable images and masks instead of counting them
    flip: float | None = None  # the chance of a horizontal flip in training; None: 0.5, the digit scenes 0
    # the segmenter
    arch: str = "upernet"
    model: str = "gcvit_nano"  # the backbone: a GC ViT or Swin name
    pretrained: bool | str = False  # the backbone's weights, as gcvit.create_backbone takes them
    window_size: int | None = None  # every stage's window; None: 24 (the detection backbone's), 8 on the scenes
    frozen_stages: int = -1
    drop_path: float | None = None  # the backbone's stochastic depth; None: its variant's
    head_channels: int | None = None  # UPerNet's channels; None: 512 (the standard), 64 on the digit scenes
    img_size: int | None = None  # the crop side; None: 512, the digit scenes' 128
    grad_checkpointing: bool = False
    # schedule
    recipe: str = "default"
    epochs: int | None = None  # None: from iters, else 12 (the digit scenes 10)
    iters: int | None = None  # optimizer steps; sets the epochs (rounded up) and the poly decay's length
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: 6e-5 (official) with a pretrained backbone, 1e-3 from scratch
    weight_decay: float = 0.01
    warmup_iters: int = 100
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    clip_grad: float | None = None
    amp: str = "none"
    ema: float | None = None
    ema_warmup: bool = False
    keep_best: str = "better"
    seed: int = 0
    num_workers: int = 0
    device: str | None = None
    out_dir: str | None = None
    time_limit: float | None = None
    task: str = "segmentation"  # what config.yaml records, so that a resumed run knows its task
    # what the shared loop reads, fixed for segmentation
    cooldown_epochs: int = 0
    layer_decay: float | None = None
    decay_bias_tables: bool = False  # the standard recipe exempts the bias tables

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fill in the defaults that follow from the data, and raise a ValueError naming the first impossible value."""
        if self.recipe not in SEGMENT_RECIPES:
            raise ValueError(f"recipe must be one of {SEGMENT_RECIPES}; got {self.recipe!r}")
        if self.arch != "upernet":
            raise ValueError(f"arch must be 'upernet'; got {self.arch!r}")
        given = [self.train_images, self.train_masks, self.val_images, self.val_masks]
        if any(v is not None for v in given) and not all(v is not None for v in given):
            raise ValueError(
                "give all four of --train-images --train-masks --val-images --val-masks, or none (digit scenes)"
            )
        if self.ade20k is not None and given[0] is not None:
            raise ValueError("give --ade20k or the four folders, not both")
        scenes = self.train_images is None and self.ade20k is None
        if self.ade20k is not None:
            self.num_classes, self.reduce_zero_label = self.num_classes or 150, True
        if scenes:
            self.num_classes = 11
        if self.num_classes is None:
            raise ValueError("--num-classes is needed with image and mask folders (labels 0..num_classes-1)")
        if self.img_size is None:
            self.img_size = SCENE_SIZE if scenes else 512
        if self.flip is None:
            self.flip = 0.0 if scenes else 0.5  # a flipped digit is no digit
        if self.window_size is None and self.model.startswith("gcvit"):
            self.window_size = 8 if scenes else 24
        if self.head_channels is None:
            self.head_channels = 64 if scenes else 512
        if self.epochs is None and self.iters is None:
            self.epochs = 10 if scenes else 12
        if self.lr is None:
            self.lr = 6e-5 if self.pretrained else 1e-3
        if self.out_dir is None:
            name = "scenes" if scenes else Path(self.ade20k or self.train_images or "data").name
            self.out_dir = str(Path("runs") / f"segment-{name}")
        positive = ("batch_size", "grad_accum", "scenes", "img_size", "num_classes", "head_channels")
        check_common_settings(self, positive, optional=("epochs", "iters"))
        if self.num_classes > 255:
            raise ValueError(f"num_classes must be at most 255 (255 marks ignored pixels); got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def official_segment_recipe() -> dict[str, Any]:
    """The standard UPerNet ADE20K settings (`../shared/GCVIT_SPEC.md`, "Dense prediction")."""
    return {
        "lr": 6e-5,
        "weight_decay": 0.01,
        "warmup_iters": 1500,
        "warmup_ratio": 1e-6,
        "poly_power": 1.0,
        "iters": 160_000,
        "batch_size": 16,  # 2 images on each of 8 GPUs
        "img_size": 512,
        "head_channels": 512,
        "decay_bias_tables": False,
    }


def scene_paths(cfg: SegmentConfig) -> dict[str, Path]:
    """The digit scenes with per-pixel labels (written into the cache the first time, then reused)."""
    from gcvit.data.digit_scenes import write_segmentation_scenes
    from gcvit.download import cache_dir

    n_val = max(1, cfg.scenes // 4)
    folder = cache_dir() / "segmentation_scenes" / f"{SCENE_SIZE}px-{cfg.scenes}-{n_val}-seed{cfg.seed}"
    done = folder / "complete"
    if not done.is_file():  # written last: its presence means the folder is whole
        write_segmentation_scenes(folder, cfg.scenes, n_val, SCENE_SIZE, cfg.seed)
        done.write_text("")
    return {k: folder / split / kind for k, split, kind in _KEYS}


_KEYS = (
    ("train_images", "train", "images"),
    ("train_masks", "train", "masks"),
    ("val_images", "val", "images"),
    ("val_masks", "val", "masks"),
)


def data_paths(cfg: SegmentConfig) -> dict[str, Path]:
    """{"train_images", "train_masks", "val_images", "val_masks"} of the run: its folders, ADE20K's, or the scenes."""
    if cfg.ade20k is not None:
        from gcvit.data.segmentation import ade20k_paths

        return ade20k_paths(cfg.ade20k)
    if cfg.train_images is None:
        return scene_paths(cfg)
    return {k: Path(getattr(cfg, k)) for k, *_ in _KEYS}


def _class_names(cfg: SegmentConfig) -> list[str] | None:
    if cfg.train_images is None and cfg.ade20k is None:
        from gcvit.data.digit_scenes import SEGMENTATION_CLASSES

        return list(SEGMENTATION_CLASSES)
    if cfg.class_names is None:
        return None
    from gcvit.data.segmentation import read_class_names

    return read_class_names(cfg.class_names)


def collate(batch: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training crops share one size: (images (B, 3, H, W) float, masks (B, H, W) int64)."""
    images, masks = zip(*batch)
    return torch.stack([torch.as_tensor(i) for i in images]), torch.stack([torch.as_tensor(m) for m in masks])


def eval_collate(batch: list[tuple[Any, Any]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validation images keep their own sizes: lists."""
    images, masks = zip(*batch)
    return [torch.as_tensor(i) for i in images], [torch.as_tensor(m) for m in masks]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> ImageNet-normalised, as the backbones were trained."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts of pixels of label i predicted as j; pixels labelled IGNORE left out."""
    keep = label != IGNORE
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def scores(matrix: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class": {name: {"IoU", "accuracy"}}} of a confusion matrix,
    0-1 values; a class with no pixel in the labels or the predictions has IoU None and is left out of the mean
    (accuracy likewise for a class with no labelled pixel)."""
    m = matrix.double()
    tp, labelled, predicted = m.diag(), m.sum(1), m.sum(0)
    union = labelled + predicted - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    acc = [float(t / n) if n > 0 else None for t, n in zip(tp, labelled)]
    present = [v for v in iou if v is not None]
    accs = [v for v in acc if v is not None]
    return {
        "mIoU": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": float(tp.sum() / m.sum()) if m.sum() > 0 else 0.0,
        "mean_accuracy": sum(accs) / len(accs) if accs else 0.0,
        "per_class": {name: {"IoU": i, "accuracy": a} for name, i, a in zip(classes, iou, acc)},
    }


def _train_transform(cfg: SegmentConfig) -> Any:
    """The standard pipeline (`gcvit.data.segmentation.seg_train_transform`) at the run's crop, padding images with
    the mean colour (zero once normalised, as mmseg pads after normalising)."""
    from gcvit.data.segmentation import seg_train_transform

    fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
    return seg_train_transform(cfg.img_size, flip=cfg.flip, fill=fill)


class SegmentationTask(Task):
    """`gcvit segment train`: UPerNet on image and mask folders (`SegmentConfig`)."""

    metric, ema_metric = "val_mIoU", "ema_mIoU"
    command = "gcvit segment train"
    cfg: SegmentConfig

    def datasets(self, architecture: dict[str, Any] | None) -> TaskData:
        from gcvit.data.segmentation import SegmentationFolder, seg_eval_transform

        cfg = self.cfg
        paths = data_paths(cfg)
        common = {
            "num_classes": cfg.num_classes,
            "reduce_zero_label": cfg.reduce_zero_label,
            "strict_data": cfg.strict_data,
            "class_names": _class_names(cfg),
        }
        train = SegmentationFolder(paths["train_images"], paths["train_masks"], _train_transform(cfg), **common)
        val = SegmentationFolder(paths["val_images"], paths["val_masks"], seg_eval_transform(), **common)
        self.data_name = (
            "digit scenes" if cfg.train_images is None and cfg.ade20k is None else str(paths["train_images"])
        )
        if cfg.iters is not None:  # the epochs that hold `iters` optimizer steps
            per_epoch = len(train) // cfg.batch_size
            if per_epoch == 0:
                raise DataError(f"{len(train)} training images make no batch of {cfg.batch_size}: lower --batch-size")
            cfg.epochs = math.ceil(cfg.iters / per_epoch)
        return TaskData(train, val, list(train.classes), collate)

    def build_model(self, data: TaskData, architecture: dict[str, Any] | None) -> nn.Module:
        from gcvit.models.segmenter import create_segmenter

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = create_segmenter(
            cfg.arch,
            backbone=cfg.model,
            num_classes=cfg.num_classes,
            pretrained_backbone=cfg.pretrained if architecture is None else False,  # a resumed run loads its own
            frozen_stages=cfg.frozen_stages,
            backbone_overrides=backbone_overrides(cfg),
            channels=cfg.head_channels,
        )
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
        """Linear warmup from warmup_ratio * lr over warmup_iters steps, times poly decay (1 - step / total) **
        poly_power to 0 over `iters` (or every step of the run), as mmseg's poly policy with warmup."""
        cfg = self.cfg
        total = cfg.iters or cfg.epochs * steps_per_epoch
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]

        def factor(step: int) -> float:
            warm = 1.0
            if step < cfg.warmup_iters:
                warm = cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
            return warm * max(0.0, 1 - step / total) ** cfg.poly_power

        return LambdaLR(optimizer, factor)

    def header(self, model: nn.Module, data: TaskData, steps_per_epoch: int, device: torch.device) -> list[str]:
        cfg = self.cfg
        params = sum(p.numel() for p in model.parameters())
        windows = f", windows {cfg.window_size}" if cfg.window_size else ""
        total = cfg.iters or cfg.epochs * steps_per_epoch
        return [
            f"segmenter {cfg.arch} on {cfg.model}{windows}: {params / 1e6:.2f} M parameters, head channels "
            f"{cfg.head_channels}, crops {cfg.img_size} px",
            f"data {self.data_name}: {len(data.classes)} classes, {len(data.train)} training and {len(data.val)} "
            "validation images",
            f"schedule: {cfg.epochs} epochs, {steps_per_epoch} steps of batch {cfg.batch_size} each; lr {cfg.lr:.2e}, "
            f"warmup {cfg.warmup_iters} steps, poly decay over {total} steps; recipe {cfg.recipe}",
            f"device {device}, {torch.get_num_threads()} threads, amp {cfg.amp}; run folder {cfg.out_dir}",
        ]

    def checkpoint_config(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        """config.json of a segmenter: what `gcvit.load` needs to build it again and prepare its inputs."""
        cfg = self.cfg
        body = model.backbone  # GC ViT's backbone holds its config, Swin's body the classifier that does
        backbone_cfg = getattr(body, "cfg", None) or getattr(getattr(body, "model", None), "cfg", None)
        return {
            "task": "segmentation",
            "arch": cfg.arch,
            "model": cfg.model,
            "config": dataclasses.asdict(backbone_cfg) if backbone_cfg is not None else {},
            "classes": list(data.classes),
            "num_classes": len(data.classes),
            "head_channels": cfg.head_channels,
            "crop_size": cfg.img_size,
            "reduce_zero_label": cfg.reduce_zero_label,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "license": NVIDIA_LICENSE if cfg.pretrained else "",
        }

    def loss(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """Cross-entropy over the labelled pixels plus 0.4 x the auxiliary head's (`UPerNet.losses`)."""
        images, masks = batch
        images = normalize(images.to(device, non_blocking=True))
        masks = masks.to(device, non_blocking=True)
        with autocast(self.cfg.amp, device):
            losses = net(images, masks)  # the losses, through forward: DDP syncs their gradients
        return sum(losses.values()), len(images)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Any, info: D.DistInfo) -> dict[str, float]:
        """mIoU and pixel accuracy of whole-image inference on the validation images (fp32), summed over ranks."""
        model.eval()
        k = self.cfg.num_classes
        total = torch.zeros(k, k, dtype=torch.int64)
        for images, masks in loader:
            for image, mask in zip(images, masks):
                logits = model(normalize(image[None].to(info.device)))
                total += confusion(logits.argmax(1)[0], mask.to(info.device), k)
        if info.distributed:
            summed = total.to(info.device)
            torch.distributed.all_reduce(summed)
            total = summed.cpu()
        result = scores(total, [str(i) for i in range(k)])
        return {"mIoU": result["mIoU"], "pixel_accuracy": result["pixel_accuracy"]}

    def row(self, val: dict[str, float], ema: dict[str, float] | None) -> dict[str, Any]:
        return {
            "val_mIoU": val["mIoU"],
            "val_pixel_accuracy": val["pixel_accuracy"],
            "ema_mIoU": ema["mIoU"] if ema is not None else None,
        }

    def log_fields(self, row: dict[str, Any]) -> str:
        text = f"mIoU {row['val_mIoU']:.3f}  pixel acc {row['val_pixel_accuracy']:.3f}"
        if row["ema_mIoU"] is not None:
            text += f"  ema mIoU {row['ema_mIoU']:.3f}"
        return text

    def plot(self, run_dir: Path, history: list[dict[str, Any]], best: tuple[int, str]) -> None:
        """plots/loss.png and plots/miou.png, titled with the run and its data; the epoch best/ keeps marked."""
        epoch, _ = best
        title = plot_title(str(run_dir), self.data_name, f"best/: epoch {epoch}")
        keys = ("val_mIoU", "val_pixel_accuracy", "ema_mIoU")
        panels = (("loss", ("train_loss",), "training loss"), ("miou", keys, "mIoU and pixel accuracy"))
        plot_history(run_dir / "plots", history, title=title, best_epoch=epoch, panels=panels)


def segment_config_from(values: dict[str, Any]) -> SegmentConfig:
    """A SegmentConfig from flags or a saved config.yaml (the official recipe's settings under the given ones)."""
    return config_from(SegmentConfig, values, official_segment_recipe, "segmentation")
