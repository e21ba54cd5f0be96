"""The exponential moving average of a run's weights: torch's AveragedModel with timm's ModelEmaV3 decay and
warmup, exact for integer buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

EMA_WARMUP_POWER = 0.75  # timm's ModelEmaV3 warmup power for runs shorter than about 200k steps


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay at update `step` (1 for the first average after the copy): `decay`, or with warmup
    min(decay, 1 - (1 + step) ** -0.75), as timm's ModelEmaV3 with use_warmup (gamma 1). The warmup lets the average
    follow the weights early on: at 0.99 a plain EMA still holds a third of a 100-step run's first weights."""
    return min(decay, 1.0 - (1.0 + step) ** -EMA_WARMUP_POWER) if warmup else decay


def ema_update(decay: float, warmup: bool) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """AveragedModel's update: floating tensors move to d * ema + (1 - d) * current (d = `ema_decay`, from the
    count of averages, which AveragedModel keeps in its state dict), the others (integer buffers such as the
    relative-position index, batch norm's step count) are copied. torch's own EMA function averages those too, in
    float, and truncates: for decays like 0.9999 index k became k - 1."""

    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        d = ema_decay(decay, int(num_averaged), warmup)
        with torch.no_grad():
            floats = [(e, c) for e, c in zip(ema, current) if e.is_floating_point()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1.0 - d)
            for e, c in zip(ema, current):
                if not e.is_floating_point():
                    e.copy_(c)

    return update


def averaged(model: nn.Module, decay: float, warmup: bool) -> AveragedModel:
    """The EMA of `model` (its buffers averaged too), updated by `ema_update`."""
    return AveragedModel(model, multi_avg_fn=ema_update(decay, warmup), use_buffers=True)
