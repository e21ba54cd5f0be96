"""The model a run trains: which one cfg describes (the named variant, each family's small digits model, a
--pretrained run's own architecture, a resumed run's), its settings checked without building it, built once, its
config.json, and its DDP wrapper."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvit.models.folder import model_config
from gcvit.models.pretrained import PretrainedCfg
from gcvit.models.registry import create_model, digits_overrides, family_of, model_settings
from gcvit.train import distributed as D
from gcvit.train.config import SMALL_MODELS, TrainConfig, saved_model_config


def _model_overrides(cfg: TrainConfig, architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config fields of the model to build: `architecture` (a resumed run's own, from its checkpoint's config.json:
    the --pretrained source is not read again), else what cfg says."""
    if architecture is not None:
        return {k: v for k, v in architecture.items() if k not in ("num_classes", "img_size")}
    overrides = dict(cfg.model_overrides) if cfg.model_overrides is not None else {}
    if cfg.model_overrides is None and cfg.pretrained:
        overrides = _saved_architecture(cfg)
    elif cfg.model_overrides is None and _digits_model_of(cfg):
        overrides = digits_overrides(cfg.model, cfg.img_size or 32)  # each family's small model, at this size
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    return overrides


def _digits_model_of(cfg: TrainConfig) -> bool:
    """Whether the run trains the family's small 32 px digits model in place of --model: on the digits, from
    scratch, for a model not made for small data (gcvit_tiny on the digits trains the small GC ViT)."""
    return cfg.data == "digits" and not cfg.pretrained and cfg.model not in SMALL_MODELS


def _saved_architecture(cfg: TrainConfig) -> dict[str, Any]:
    """The architecture recorded in config.json of a local --pretrained checkpoint of this package, when it is of
    --model's family: fine-tuning a run's weights rebuilds the run's model (its fields may differ from any named
    variant). The head, the input size and stochastic depth stay the new run's."""
    saved = saved_model_config(cfg.pretrained)
    if saved is None:
        return {}
    if family_of(str(saved.get("model", "")).split(".")[0]) is not family_of(str(cfg.model)):
        return {}
    drop = ("num_classes", "img_size", "drop_path_rate")
    return {k: v for k, v in (saved.get("config") or {}).items() if k not in drop}


def run_settings(
    cfg: TrainConfig, architecture: dict[str, Any] | None = None, num_classes: int | None = None
) -> tuple[Any, PretrainedCfg]:
    """(config, preprocessing) of the model cfg describes, without building it (no memory, no weights read): its
    settings are checked and its preprocessing known before any data is read or any training starts."""
    overrides = _model_overrides(cfg, architecture)
    return model_settings(cfg.model, num_classes=num_classes, img_size=cfg.img_size, **overrides)


def build_model(cfg: TrainConfig, num_classes: int, architecture: dict[str, Any] | None) -> nn.Module:
    """The model to train, built once per run; a resumed run's (`architecture` given) without pretrained weights,
    which its checkpoint replaces."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    pretrained = cfg.pretrained if architecture is None else False
    overrides = _model_overrides(cfg, architecture)
    return create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, img_size=cfg.img_size, **overrides)


def checkpoint_config(
    cfg: TrainConfig, model: nn.Module, classes: list[str], crop_pct: float, crop_mode: str
) -> dict[str, Any]:
    """config.json of every checkpoint (the one writer, `gcvit.models.folder.model_config`): what `gcvit.load`
    needs to rebuild the model and prepare its inputs, with this run's size and evaluation crop."""
    meta = model_config(model, classes, cfg.model)
    meta |= {"img_size": [cfg.img_size, cfg.img_size], "crop_pct": crop_pct, "crop_mode": crop_mode}
    if not cfg.pretrained:  # trained from scratch: NVIDIA's licence does not bind these weights
        meta["license"] = ""
    return meta


def wrap_ddp(model: nn.Module, info: D.DistInfo) -> nn.Module:
    """The model in DistributedDataParallel on this rank's device."""
    # A stage with a single block has no global block, so its global query generator gets no gradient (in a
    # classifier, or in the backbone of a detector).
    unused = any(d < 2 for m in model.modules() for d in getattr(getattr(m, "cfg", None), "depths", ()))
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
