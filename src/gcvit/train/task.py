"""What one kind of training brings to the shared loop (`gcvit.train.loop`): its data, its model, its loss and its
validation. Everything else is the loop's, the same for every task: loaders with augmentations that replay on resume,
DDP, the optimizer and schedule, autocast, the EMA, atomic checkpoints and exact resume, metrics.csv, TensorBoard,
progress and Ctrl-C.

A task names the validation number best/ is chosen by (`metric`, and `ema_metric` for the EMA weights); each epoch's
history row holds the loop's columns (epoch, train_loss, lr, epoch_time) around the task's (`row`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit.train import distributed as D


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The training's autocast: none, bf16 or fp16 (`TrainConfig.amp`)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class TaskData:
    train: Any  # the training dataset, with its train transform
    val: Any  # the validation dataset, with its eval transform
    classes: list[str]  # class names, label order
    collate: Callable[[list[Any]], Any] | None = None  # batches of the loaders; None: torch's default


class Task(ABC):
    """One kind of training (classification, detection); built from the run's config."""

    metric: str  # the history column best/ is chosen by, of the raw weights (higher is better)
    ema_metric: str  # the same number of the EMA weights
    command: str  # the command that trains it, e.g. "gcvit train" (named in the line a Ctrl-C ends with)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def datasets(self, architecture: dict[str, Any] | None) -> TaskData:
        """The train and val datasets; unusable data raises DataError before any model is built. `architecture`: a
        resumed run's model config (from its checkpoint), else None."""

    @abstractmethod
    def build_model(self, data: TaskData, architecture: dict[str, Any] | None) -> nn.Module:
        """The model to train, built once (on the CPU; the loop moves it)."""

    @abstractmethod
    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The per-optimizer-step lr schedule."""

    @abstractmethod
    def header(self, model: nn.Module, data: TaskData, steps_per_epoch: int, device: torch.device) -> list[str]:
        """The lines the run starts with."""

    @abstractmethod
    def checkpoint_config(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        """config.json of every checkpoint: what loads the model back and prepares its inputs."""

    def warnings(self) -> list[str]:
        """Settings worth a warning before the run starts."""
        return []

    def start(self, data: TaskData) -> None:  # noqa: B027 -- optional
        """Called once everything else is built, before training (classification builds its batch mixer here)."""

    @abstractmethod
    def loss(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """(the training loss of a micro-batch under the run's autocast, its number of samples)."""

    @abstractmethod
    def validate(self, model: nn.Module, loader: Any, info: D.DistInfo) -> dict[str, float]:
        """Validation numbers of `model` over `loader`, summed over ranks when distributed."""

    @abstractmethod
    def row(self, val: dict[str, float], ema: dict[str, float] | None) -> dict[str, Any]:
        """The task's columns of an epoch's history row, from the raw and the EMA weights' validation."""

    @abstractmethod
    def log_fields(self, row: dict[str, Any]) -> str:
        """The task's part of an epoch's log line."""

    @abstractmethod
    def plot(self, run_dir: Path, history: list[dict[str, Any]], best: tuple[int, str]) -> None:
        """plots/ of the run; `best`: (epoch, weights file) best/ holds."""


def check_common_settings(cfg: Any, positive: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """The checks the dense tasks' settings share, each a ValueError naming the value: `positive` fields are
    positive integers (`optional` ones too, or None), amp is none, bf16 or fp16, lr > 0 and weight_decay >= 0."""
    for name in positive + optional:
        value = getattr(cfg, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be one of ('none', 'bf16', 'fp16'); got {cfg.amp!r}")
    if not cfg.lr > 0 or cfg.weight_decay < 0:
        raise ValueError(f"expected lr > 0 and weight_decay >= 0; got {cfg.lr}, {cfg.weight_decay}")


def config_from(cls: type, values: dict[str, Any], official: Callable[[], dict[str, Any]], kind: str) -> Any:
    """A dense task's config (`cls`, a dataclass) from flags or a saved config.yaml: the official recipe's settings
    (`official()`) under the given ones when `recipe` is 'official'; unknown keys named."""
    if values.get("recipe") == "official":
        values = official() | {k: v for k, v in values.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {unknown}; expected among {sorted(fields)}")
    return cls(**{k: v for k, v in values.items() if v is not None or k in ("ema", "clip_grad")})


def backbone_overrides(cfg: Any) -> dict[str, Any]:
    """The backbone config fields a dense task's settings give: its window and stochastic depth, where set."""
    overrides: dict[str, Any] = {}
    if cfg.window_size is not None:
        overrides["window_size"] = cfg.window_size
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    return overrides
