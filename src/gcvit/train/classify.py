"""Image classification as a task of the shared training loop: the digits or image folders, a GC ViT (Swin, ViT)
classifier, mixup/cutmix with soft cross-entropy, and top-1 / top-5 validation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.data import DataError, mixup_cutmix
from gcvit.models.folder import EMA_FILE
from gcvit.train import distributed as D
from gcvit.train.build import build_model, checkpoint_config, run_settings
from gcvit.train.config import TrainConfig
from gcvit.train.data import build_datasets
from gcvit.train.header import run_header
from gcvit.train.metrics import describe_data, plot_history, plot_title
from gcvit.train.optim import build_scheduler
from gcvit.train.task import Task, TaskData, autocast


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)); targets (B, K) are soft (mixed, smoothed)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def validate(
    model: nn.Module, loader: Any, device: torch.device, info: D.DistInfo | None = None, amp: str = "none"
) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) of `model` over `loader`, summed over ranks when distributed."""
    info = info or D.DistInfo(device=device)
    model.eval()
    loss_sum, correct1, correct5, n = 0.0, 0.0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
        with ctx:
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(-1).sum().item()
        n += len(labels)
    loss_sum, correct1, correct5, n = D.all_reduce_sum([loss_sum, correct1, correct5, n], info)
    return {"loss": loss_sum / n, "top1": 100 * correct1 / n, "top5": 100 * correct5 / n}


class ClassificationTask(Task):
    """`gcvit train`: a classifier on the digits or on image folders (`TrainConfig`)."""

    metric, ema_metric = "val_top1", "ema_top1"
    command = "gcvit train"
    cfg: TrainConfig

    def datasets(self, architecture: dict[str, Any] | None) -> TaskData:
        cfg = self.cfg
        _, probe = run_settings(cfg, architecture)  # its preprocessing; the settings checked before the data is read
        self.crop_pct = cfg.crop_pct if cfg.crop_pct is not None else (probe.crop_pct if cfg.pretrained else 1.0)
        self.crop_mode = probe.crop_mode if cfg.crop_pct is None and cfg.pretrained else "center"  # 384/512: squash
        data = build_datasets(cfg, probe.mean, probe.std, self.crop_pct, probe.interpolation, self.crop_mode)
        num_classes = cfg.num_classes or len(data.classes)
        if len(data.classes) < 2:
            raise DataError(f"expected at least 2 classes to tell apart; the data has {data.classes}")
        if num_classes != len(data.classes):  # a head with outputs no class is named for could not be evaluated
            raise ValueError(f"num_classes={num_classes} but the data has {len(data.classes)} classes: {data.classes}")
        self.classes = list(data.classes)
        return TaskData(data.train, data.val, data.classes)

    def build_model(self, data: TaskData, architecture: dict[str, Any] | None) -> nn.Module:
        return build_model(self.cfg, len(data.classes), architecture)

    def warnings(self) -> list[str]:
        cfg = self.cfg
        if cfg.warmup_epochs >= cfg.epochs:
            return [
                f"warmup_epochs ({cfg.warmup_epochs:g}) is not below epochs ({cfg.epochs}): the lr rises for the whole "
                "run and never decays (--warmup-epochs sets a shorter warmup)"
            ]
        return []

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup, then cosine to min_lr over the run's epochs (`gcvit.train.optim.build_scheduler`)."""
        cfg = self.cfg
        return build_scheduler(
            optimizer,
            cfg.epochs * steps_per_epoch,
            round(cfg.warmup_epochs * steps_per_epoch),
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_lr,
            warmup_prefix=cfg.warmup_prefix,
        )

    def header(self, model: nn.Module, data: TaskData, steps_per_epoch: int, device: torch.device) -> list[str]:
        return run_header(self.cfg, model, data.train, data.val, data.classes, steps_per_epoch, device)

    def checkpoint_config(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        return checkpoint_config(self.cfg, model, data.classes, self.crop_pct, self.crop_mode)

    def start(self, data: TaskData) -> None:
        cfg = self.cfg
        self.mixer = mixup_cutmix(len(data.classes), cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing)

    def loss(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        images, labels = batch
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)  # see models.base.stem_conv
        labels = labels.to(device, non_blocking=True)
        images, targets = self.mixer(images, labels)
        with autocast(self.cfg.amp, device):
            return soft_cross_entropy(net(images), targets), len(images)

    def validate(self, model: nn.Module, loader: Any, info: D.DistInfo) -> dict[str, float]:
        """In fp32 whatever the training's amp, so the logged numbers (and the choice of best/) are what `gcvit eval`
        reports for the saved weights."""
        return validate(model, loader, info.device, info)

    def row(self, val: dict[str, float], ema: dict[str, float] | None) -> dict[str, Any]:
        return {
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "ema_top1": ema["top1"] if ema is not None else None,
        }

    def log_fields(self, row: dict[str, Any]) -> str:
        ema = f" ema_top1 {row['ema_top1']:.2f}" if row["ema_top1"] is not None else ""
        top5 = f"  top5 {row['val_top5']:.2f}" if self.num_classes > 5 else ""  # with 5 classes or fewer it is 100
        return f"val_loss {row['val_loss']:.4f}  top1 {row['val_top1']:.2f}{top5}{ema}"

    def plot(self, run_dir: Path, history: list[dict[str, Any]], best: tuple[int, str]) -> None:
        """plots/: loss and accuracy, titled with the run, its validation data and the weights best/ keeps
        (marked)."""
        cfg = self.cfg
        epoch, weights = best
        which = "EMA" if weights == EMA_FILE else "raw"
        if cfg.data == "digits":
            data = describe_data("digits", True)
        else:
            data = describe_data(cfg.val_dir, False) if cfg.val_dir else describe_data(cfg.data_dir, True)
        title = plot_title(str(run_dir), data, f"best/: {which} weights, epoch {epoch}")
        plot_history(run_dir / "plots", history, title=title, best_epoch=epoch, num_classes=self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
