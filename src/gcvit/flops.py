"""Parameter and FLOP counts, measured with torch's own FLOP counter on the meta device (no real compute)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: tuple[int, int], batch: int = 1) -> float:
    """Multiply-accumulates of one forward pass per image (torch's FLOP counter / 2, the convention papers call
    FLOPs). Counts on the meta device, on a copy when the model is elsewhere: there every op is a standard one the
    counter knows (the fused CPU kernels for attention and linear layers are not); build the model under
    `torch.device("meta")` to skip the copy. The input has the model's `cfg.in_chans` channels (3 without one)."""
    if next(model.parameters()).device.type != "meta":
        model = copy.deepcopy(model).to("meta")
    p = next(model.parameters())
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    x = torch.zeros(batch, in_chans, *img_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / batch
