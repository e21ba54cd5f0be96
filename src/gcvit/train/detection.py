"""Detection and instance segmentation as a task of the shared training loop: COCO-format data (the digit scenes by
default), torchvision's Faster R-CNN or Mask R-CNN on a GC ViT backbone (`gcvit.create_detector`), the detector's own
losses, and COCO box and mask AP on the validation set (`gcvit.train.coco_eval`).

`DetectConfig` holds a detection run's settings. The official recipe (`recipe: official`, NVIDIA's Mask R-CNN 3x):
AdamW lr 1e-4, weight decay 0.05 (the bias tables decayed too, as the official config's exemption matched nothing),
36 epochs, lr x0.1 after epochs 27 and 33, a linear warmup over 2500 iterations from 0.001x, shorter side 800
(longer at most 1333), windows 24.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchvision import tv_tensors
from torchvision.transforms import v2

from gcvit.data import DataError
from gcvit.data.coco import CocoInstances
from gcvit.models.detector import ARCHS, create_detector, samplers
from gcvit.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, NVIDIA_LICENSE
from gcvit.train import distributed as D
from gcvit.train.coco_eval import coco_ap, to_coco_results
from gcvit.train.metrics import plot_history, plot_title
from gcvit.train.task import Task, TaskData, autocast, backbone_overrides, check_common_settings, config_from

logger = logging.getLogger(__name__)

SCENE_SIZE = 128  # px a side of the digit scenes
# on the digit scenes (2-5 digits of 19-51 px an image, 128 px): lighter heads than the official 256-channel FPN,
# 1024-wide box head and 4-conv mask head, anchors of 16 to 256 px instead of 32 to 512, fewer region proposals and
# half the sampled RoIs. A training step of batch 4 on gcvit_nano took 0.25-0.33 s with these against 5-7 s with
# torchvision's defaults (2-core AMD EPYC, AVX2), where RoIAlign's backward and the mask head took most of the time;
# 10 epochs reach box and mask AP50 0.85 (benchmarks/RESULTS.md)
SCENE_OPTIONS = {
    "fpn_channels": 64,
    "box_head_width": 256,
    "mask_head_convs": 1,
    "anchor_sizes": (16, 32, 64, 128, 256),
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}
SCENE_EPOCHS = 10  # the digit scenes' default: about 7 minutes on the 2-core CPU
DETECT_RECIPES = ("default", "official")
SCALE_AUGS = ("none", "multiscale", "lsj")


@dataclass
class DetectConfig:
    """A detection run's settings: the data, the detector, the schedule, and what the shared loop reads."""

    # data: COCO annotations and image folders; none given: the digit scenes, written once into the cache
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    scenes: int = 400  # digit scenes to train on when no data is given (a quarter as many to validate on)
    strict_data: bool = False  # refuse unreadable images and unusable annotations instead of counting them
    scale_aug: str = "none"  # 'multiscale': the official DETR-style resize (and crop); 'lsj': large-scale jitter
    flip: float | None = None  # the chance of a horizontal flip in training; None: 0.5 (official), 0 on the digit
    # scenes (a flipped digit is no digit)
    # the detector
    arch: str = "mask_rcnn"  # or faster_rcnn
    model: str = "gcvit_nano"  # the backbone: a GC ViT or Swin name, or resnet50
    pretrained: bool | str = False  # the backbone's weights, as gcvit.create_backbone takes them
    window_size: int | None = None  # every stage's window; None: 24 (official), 8 on the digit scenes
    frozen_stages: int = -1  # -1: train all; 0 the stem; k >= 1 the stem and the first k stages
    drop_path: float | None = None  # the backbone's stochastic depth; None: its variant's
    img_size: int | None = None  # the shorter side images are resized to; None: 800, the digit scenes' 128
    max_size: int | None = None  # the longest the longer side may become; None: img_size * 1333 / 800
    grad_checkpointing: bool = False  # recompute the backbone's activations in the backward pass
    detector_options: dict[str, Any] | None = None  # torchvision's FasterRCNN/MaskRCNN arguments; None: on the digit
    # scenes a lighter sampling (SCENE_OPTIONS), elsewhere torchvision's defaults (the official Mask R-CNN's)
    # schedule
    recipe: str = "default"  # 'official': NVIDIA's Mask R-CNN 3x (module docstring)
    epochs: int | None = None  # None: 12; the digit scenes SCENE_EPOCHS
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 (the official recipe's) with a pretrained backbone, 1e-3 from scratch
    weight_decay: float = 0.05
    lr_steps: tuple[int, ...] | None = None  # epochs after which the lr drops x0.1; None: at 2/3 and 11/12 of the
    # run; on the digit scenes before the last epoch
    warmup_iters: int = 100  # linear warmup from warmup_ratio * lr over this many optimizer steps
    warmup_ratio: float = 0.001
    clip_grad: float | None = None
    amp: str = "none"  # none, bf16 or fp16 (CUDA)
    ema: float | None = None  # EMA decay of the weights; None: none (the official recipe keeps none)
    ema_warmup: bool = False
    keep_best: str = "better"  # best/ keeps the better of the raw and EMA weights on box AP ('ema': the EMA's)
    seed: int = 0
    num_workers: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    out_dir: str | None = None  # None: runs/detect-<data>
    time_limit: float | None = None  # seconds; the run stops after the epoch that passes it
    task: str = "detection"  # what config.yaml records, so that a resumed run knows its task
    # what the shared loop reads, fixed for detection
    cooldown_epochs: int = 0
    layer_decay: float | None = None
    decay_bias_tables: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fill in the defaults that follow from the data, and raise a ValueError naming the first impossible value."""
        if self.recipe not in DETECT_RECIPES:
            raise ValueError(f"recipe must be one of {DETECT_RECIPES}; got {self.recipe!r}")
        if self.scale_aug not in SCALE_AUGS:
            raise ValueError(f"scale_aug must be one of {SCALE_AUGS}; got {self.scale_aug!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}; got {self.arch!r} (Cascade Mask R-CNN is not built)")
        given = [self.train_ann, self.train_images, self.val_ann, self.val_images]
        if any(v is not None for v in given) and not all(v is not None for v in given):
            raise ValueError(
                "give all four of --train-ann --train-images --val-ann --val-images, or none (digit scenes)"
            )
        scenes = self.train_ann is None
        if self.epochs is None:
            self.epochs = SCENE_EPOCHS if scenes else 12
        if self.img_size is None:
            self.img_size = SCENE_SIZE if scenes else 800
        if self.max_size is None:
            self.max_size = round(self.img_size * 1333 / 800)
        if self.window_size is None and self.model.startswith("gcvit"):
            self.window_size = 8 if scenes else 24
        if self.flip is None:
            self.flip = 0.0 if scenes else 0.5
        if self.lr is None:  # from scratch on the scenes 1e-3 reached box AP50 0.34 in 5 min, 1e-4 0.28 in 9
            self.lr = 1e-4 if self.pretrained else 1e-3
        if self.detector_options is None:
            self.detector_options = dict(SCENE_OPTIONS) if scenes else {}
        if self.lr_steps is None:  # the digit scenes' short run: x0.1 for its last epoch (box AP50 0.81 with
            # drops after epochs 7 and 9 of 10, 0.86 with one after 9, the same 10 epochs otherwise)
            last = (self.epochs - 1,) if self.epochs > 1 else ()
            self.lr_steps = last if scenes else (round(self.epochs * 2 / 3), round(self.epochs * 11 / 12))
        self.lr_steps = tuple(self.lr_steps)
        if self.out_dir is None:
            self.out_dir = str(Path("runs") / ("detect-scenes" if scenes else f"detect-{Path(self.train_images).name}"))
        check_common_settings(self, ("epochs", "batch_size", "grad_accum", "scenes", "img_size", "max_size"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def official_detect_recipe() -> dict[str, Any]:
    """NVIDIA's Mask R-CNN 3x settings (`../shared/GCVIT_SPEC.md`, "Dense prediction")."""
    return {
        "arch": "mask_rcnn",
        "lr": 1e-4,
        "weight_decay": 0.05,
        "epochs": 36,
        "lr_steps": (27, 33),
        "warmup_iters": 2500,
        "warmup_ratio": 0.001,
        "img_size": 800,
        "max_size": 1333,
        "window_size": 24,
        "scale_aug": "multiscale",
        "batch_size": 16,  # 2 images on each of 8 GPUs
    }


def scene_paths(cfg: DetectConfig) -> dict[str, Path]:
    """The digit scenes of `cfg` (written into the cache the first time, atomically, then reused)."""
    from gcvit.data.digit_scenes import write_digit_scenes
    from gcvit.download import cache_dir

    n_val = max(1, cfg.scenes // 4)
    folder = cache_dir() / "digit_scenes" / f"{SCENE_SIZE}px-{cfg.scenes}-{n_val}-seed{cfg.seed}"
    paths = {
        "train_ann": folder / "train.json",
        "train_images": folder / "train",
        "val_ann": folder / "val.json",
        "val_images": folder / "val",
    }
    if not paths["val_ann"].is_file():  # written last: its presence means the folder is whole
        write_digit_scenes(folder, cfg.scenes, n_val, SCENE_SIZE, cfg.seed)
    return paths


def data_paths(cfg: DetectConfig) -> dict[str, Path]:
    """{"train_ann", "train_images", "val_ann", "val_images"} of the run: its data, or the digit scenes."""
    if cfg.train_ann is None:
        return scene_paths(cfg)
    return {k: Path(getattr(cfg, k)) for k in ("train_ann", "train_images", "val_ann", "val_images")}


# images to float in [0, 1]; boxes, masks and the rest pass through unchanged
TO_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


class SampleSeed:
    """The last training transform: adds target["seed"], an int drawn from the generator the shared loader seeds
    from (run seed, epoch, image index), from which the detector draws that image's anchors and RoIs."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return image, target | {"seed": int(torch.randint(2**62, ()).item())}


class RandomSizeCrop(v2.Transform):
    """A crop of random height and width, each drawn from [min_size, max_size] px (at most the image's), at a random
    place: the crop of DETR's multi-scale augmentation, which torchvision's v2 lacks."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        H, W = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.min_size, H), min(self.max_size, H) + 1, ()))
        w = int(torch.randint(min(self.min_size, W), min(self.max_size, W) + 1, ()))
        top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def train_sizes(cfg: DetectConfig) -> tuple[int, ...]:
    """The shorter sides the detector resizes training images to, one drawn per image: with 'multiscale' the
    official 480 to 800 in steps of 32 (scaled by img_size / 800), else img_size alone."""
    if cfg.scale_aug != "multiscale":
        return (cfg.img_size,)
    return tuple(sorted({round(cfg.img_size * s / 800) for s in range(480, 801, 32)}))


def train_transform(cfg: DetectConfig) -> v2.Compose:
    """Flip, then the scale augmentation: 'multiscale' crops half the images first as DETR does (shorter side to
    400, 500 or 600, then a random 384-600 px crop, all scaled by img_size / 800; the detector then resizes to one of
    `train_sizes`); 'lsj' resizes by 0.1-2x of an img_size square and crops or pads to that square. Boxes that a
    crop leaves empty are dropped with their labels and masks."""
    steps: list[Any] = [v2.RandomHorizontalFlip(cfg.flip)]
    k = cfg.img_size / 800
    if cfg.scale_aug == "multiscale":
        shorter = v2.RandomShortestSize([round(k * s) for s in (400, 500, 600)])
        steps.append(v2.RandomApply([v2.Compose([shorter, RandomSizeCrop(round(k * 384), round(k * 600))])], p=0.5))
    elif cfg.scale_aug == "lsj":
        size = (cfg.img_size, cfg.img_size)
        steps += [v2.ScaleJitter(size, scale_range=(0.1, 2.0)), v2.RandomCrop(size, pad_if_needed=True)]
    if cfg.scale_aug != "none":
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)]
    return v2.Compose([*steps, TO_FLOAT, SampleSeed()])


def collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Detection batches stay lists: images of different sizes, targets of different lengths."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def detect_each(model: nn.Module, images: list[torch.Tensor], device: torch.device | str) -> list[dict[str, Any]]:
    """The detections of each image on its own: torchvision's detectors pad a batch to its largest image, which
    changes the detections of the others, so that validation, `gcvit detect eval` and predict would disagree."""
    return [model([image.to(device)])[0] for image in images]


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A target's tensors on `device` as plain tensors (what torchvision's detectors take)."""
    return {k: v.as_subclass(torch.Tensor).to(device) for k, v in target.items() if k in ("boxes", "labels", "masks")}


# torchvision's mean losses and the sampler count each one divides by: 0 anchors, 1 RoIs, 2 positive RoIs
_DENOMINATORS = {"loss_objectness": 0, "loss_rpn_box_reg": 0, "loss_classifier": 1, "loss_box_reg": 1, "loss_mask": 2}


def _batch_means(losses: dict[str, torch.Tensor], counts: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Each of this process's mean losses scaled to its share of the mean over every process's images: DDP
    averages the gradients over processes, which then equal those of the mean over the whole batch."""
    world = torch.distributed.get_world_size()
    totals = torch.tensor(counts, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    scale = [world * c / t if t > 0 else 0.0 for c, t in zip(counts, totals.tolist())]
    return {k: v * scale[_DENOMINATORS[k]] if k in _DENOMINATORS else v for k, v in losses.items()}


class DetectionTask(Task):
    """`gcvit detect train`: a detector on COCO-format data (`DetectConfig`)."""

    metric, ema_metric = "val_bbox_AP", "ema_bbox_AP"
    command = "gcvit detect train"
    cfg: DetectConfig

    def datasets(self, architecture: dict[str, Any] | None) -> TaskData:
        cfg = self.cfg
        paths = data_paths(cfg)
        masks = cfg.arch == "mask_rcnn"
        train = CocoInstances(
            paths["train_ann"],
            paths["train_images"],
            train_transform(cfg),
            masks=masks,
            strict_data=cfg.strict_data,
        )
        val = CocoInstances(paths["val_ann"], paths["val_images"], TO_FLOAT, masks=masks, strict_data=cfg.strict_data)
        if train.category_ids != val.category_ids:
            raise DataError(
                f"{paths['train_ann']} and {paths['val_ann']} list other categories: ids {train.category_ids[1:]} "
                f"against {val.category_ids[1:]}"
            )
        self.classes, self.category_ids, self.val_coco = train.classes, train.category_ids, val.coco
        self.data_name = "digit scenes" if cfg.train_ann is None else str(paths["train_images"])
        return TaskData(train, val, train.classes, collate)

    def build_model(self, data: TaskData, architecture: dict[str, Any] | None) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        detector = create_detector(
            cfg.arch,
            backbone=cfg.model,
            num_classes=len(data.classes),
            pretrained_backbone=cfg.pretrained if architecture is None else False,  # a resumed run loads its own
            min_size=train_sizes(cfg),  # evaluation resizes to the largest, img_size
            max_size=cfg.max_size,
            frozen_stages=cfg.frozen_stages,
            backbone_overrides=backbone_overrides(cfg),
            **cfg.detector_options,
        )
        if cfg.grad_checkpointing:
            body = detector.backbone.body
            if not hasattr(body, "set_grad_checkpointing"):
                raise ValueError(f"--grad-checkpointing goes with a GC ViT backbone; {cfg.model} has none")
            body.set_grad_checkpointing(True)
        return detector

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
        """Linear warmup from warmup_ratio * lr over warmup_iters steps, then x0.1 after each of lr_steps (epochs), as
        mmdet's step policy."""
        cfg = self.cfg
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]

        def factor(step: int) -> float:
            drops = sum(step >= e * steps_per_epoch for e in cfg.lr_steps)
            warm = (
                1.0 if step >= cfg.warmup_iters else cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
            )
            return warm * 0.1**drops

        return LambdaLR(optimizer, factor)

    def header(self, model: nn.Module, data: TaskData, steps_per_epoch: int, device: torch.device) -> list[str]:
        cfg = self.cfg
        params = sum(p.numel() for p in model.parameters())
        objects = sum(len(t) for t in data.train.targets.values())
        windows = f", windows {cfg.window_size}" if cfg.window_size else ""
        epochs = ", ".join(map(str, cfg.lr_steps))
        drops = f"x0.1 after epoch{'s' if len(cfg.lr_steps) > 1 else ''} {epochs}" if cfg.lr_steps else "no lr drop"
        return [
            f"detector {cfg.arch} on {cfg.model}{windows}: {params / 1e6:.2f} M parameters, shorter side "
            f"{cfg.img_size} px (longer at most {cfg.max_size})",
            f"data {self.data_name}: {len(data.classes)} categories, {len(data.train)} training images ({objects} "
            f"objects) and {len(data.val)} validation images",
            f"schedule: {cfg.epochs} epochs, {steps_per_epoch} steps of batch {cfg.batch_size} each; lr {cfg.lr:.2e}, "
            f"{drops}; warmup {cfg.warmup_iters} steps; recipe {cfg.recipe}",
            f"device {device}, {torch.get_num_threads()} threads, amp {cfg.amp}; run folder {cfg.out_dir}",
        ]

    def checkpoint_config(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        """config.json of a detector: what `gcvit.load` needs to build it again and name its outputs."""
        cfg = self.cfg
        body = model.backbone.body
        backbone_cfg = getattr(body, "cfg", None) or getattr(getattr(body, "model", None), "cfg", None)
        return {
            "task": "detection",
            "arch": cfg.arch,
            "model": cfg.model,
            "config": dataclasses.asdict(backbone_cfg) if backbone_cfg is not None else {},
            "classes": list(data.classes),
            "num_classes": len(data.classes),
            "category_ids": list(self.category_ids),
            "detector_options": dict(cfg.detector_options or {}),
            "min_size": cfg.img_size,
            "max_size": cfg.max_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "license": NVIDIA_LICENSE if cfg.pretrained else "",  # from scratch: NVIDIA's licence binds nothing
        }

    def loss(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """The sum of the detector's losses. Each image's anchors and RoIs are drawn from its own seed (`SampleSeed`),
        and across processes each mean loss is rescaled to the mean over the whole batch, so that a run gives the
        same steps however many processes share its batches."""
        images, targets = batch
        detector = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        rpn, roi = samplers(detector)
        rpn.seeds = roi.seeds = [t["seed"] for t in targets] if all("seed" in t for t in targets) else None
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [_to_device(t, device) for t in targets]
        with autocast(self.cfg.amp, device):
            losses = net(images, targets)
        rpn.seeds = roi.seeds = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            losses = _batch_means(losses, [rpn.sampled, roi.sampled, roi.positives], device)
        return sum(losses.values()), len(images)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Any, info: D.DistInfo) -> dict[str, float]:
        """COCO AP of the detections on the validation images (in fp32), gathered from every rank."""
        model.eval()
        results = []
        for images, targets in loader:
            outputs = detect_each(model, images, info.device)
            results += to_coco_results(outputs, [t["image_id"] for t in targets], self.category_ids)
        if info.distributed:
            gathered: list[Any] = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        iou_types = ("bbox", "segm") if self.cfg.arch == "mask_rcnn" else ("bbox",)
        ap = coco_ap(self.val_coco, results, iou_types)
        scores = {"bbox_AP": ap["bbox"]["AP"], "bbox_AP50": ap["bbox"]["AP50"]}
        if "segm" in ap:
            scores |= {"segm_AP": ap["segm"]["AP"], "segm_AP50": ap["segm"]["AP50"]}
        return scores

    def row(self, val: dict[str, float], ema: dict[str, float] | None) -> dict[str, Any]:
        return {
            "val_bbox_AP": val["bbox_AP"],
            "val_bbox_AP50": val["bbox_AP50"],
            "val_segm_AP": val.get("segm_AP"),
            "val_segm_AP50": val.get("segm_AP50"),
            "ema_bbox_AP": ema["bbox_AP"] if ema is not None else None,
        }

    def log_fields(self, row: dict[str, Any]) -> str:
        text = f"box AP {row['val_bbox_AP']:.3f} AP50 {row['val_bbox_AP50']:.3f}"
        if row["val_segm_AP"] is not None:
            text += f"  mask AP {row['val_segm_AP']:.3f} AP50 {row['val_segm_AP50']:.3f}"
        if row["ema_bbox_AP"] is not None:
            text += f"  ema box AP {row['ema_bbox_AP']:.3f}"
        return text

    def plot(self, run_dir: Path, history: list[dict[str, Any]], best: tuple[int, str]) -> None:
        """plots/loss.png and plots/ap.png, titled with the run and its data; the epoch best/ keeps marked."""
        epoch, _ = best
        title = plot_title(str(run_dir), self.data_name, f"best/: epoch {epoch}")
        keys = ("val_bbox_AP", "val_bbox_AP50", "val_segm_AP", "val_segm_AP50", "ema_bbox_AP")
        panels = (("loss", ("train_loss",), "training loss"), ("ap", keys, "COCO AP"))
        plot_history(run_dir / "plots", history, title=title, best_epoch=epoch, panels=panels)


def detect_config_from(values: dict[str, Any]) -> DetectConfig:
    """A DetectConfig from flags or a saved config.yaml (the official recipe's settings under the given ones)."""
    return config_from(DetectConfig, values, official_detect_recipe, "detection")
