"""Stochastic depth (drop path; Huang et al., 2016) that leaves out the work it drops.

In training, x + drop_path(branch(x)) keeps each image's residual branch with probability 1 - p and scales the kept
outputs by 1 / (1 - p). The usual form runs the branch on every image and multiplies the dropped ones by zero, so their
forward and backward work is thrown away. `DropPath.residual` runs the branch on the kept images alone and adds the
result into their rows (`index_add`): the same values and gradients, with the dropped share of the branch's work,
forward and backward, left out (on average p of it: 10% over gcvit_tiny's blocks, 25% over gcvit_base's). This needs
a branch that treats each image on its own (no batch norm across images); `DropPath(p, skip_dropped=False)` keeps
the multiply-by-zero form for one that does not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Branch = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DropPath(nn.Module):
    """Stochastic depth with drop probability `p`, applied per image by `residual`; identity in eval mode.
    `skip_dropped=False` runs the branch on every image (for a branch whose images interact, e.g. batch norm)."""

    def __init__(self, p: float, skip_dropped: bool = True) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop path probability must be in [0, 1]; got {p}")
        self.p = p
        self.skip_dropped = skip_dropped

    def extra_repr(self) -> str:
        return f"p={self.p}, skip_dropped={self.skip_dropped}"

    def draw(self, batch: int) -> torch.Tensor:
        """Which images keep their branch: bool (batch,) on the CPU, from the CPU generator, so reading it needs no
        device sync, and gradient checkpointing (which restores the CPU generator) replays the same draw."""
        return torch.rand(batch) >= self.p

    def residual(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """x + drop_path(branch(x)).

        Args:
            x: (B, ...), contiguous.
            branch: `branch(x_rows, rows)` gets the images it runs on (`rows`, their indices on x's device, or None
                for all of x) and returns its output for those images: a tensor with as many elements per image as
                x, in any shape that x's rows can be viewed as (the residual is added in that shape).
        Returns:
            Like x.
        """
        if not self.training or self.p == 0.0:
            return _add(x, branch(x, None), 1.0)
        keep = self.draw(x.shape[0])
        scale = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0
        if not self.skip_dropped or torch.compiler.is_compiling():  # (a traced graph has fixed shapes) the
            # multiply-by-mask form
            y = branch(x, None)
            mask = keep.to(device=x.device, dtype=y.dtype) * scale
            return _add(x, y * mask.view(-1, *[1] * (y.ndim - 1)), 1.0)
        if bool(keep.all()):
            return _add(x, branch(x, None), scale)
        rows = keep.nonzero().squeeze(1)  # (kept,)
        if rows.numel() == 0:  # every image dropped: one runs with weight 0, so every parameter still gets a
            rows, scale = torch.zeros(1, dtype=torch.long), 0.0  # (zero) gradient, as DistributedDataParallel expects
        rows = rows.to(x.device, non_blocking=True)
        y = branch(x.index_select(0, rows), rows)  # (kept, ...)
        dtype = torch.promote_types(x.dtype, y.dtype)  # as x + y would (under autocast y may be in bf16)
        out = x.to(dtype).view(x.shape[0], *y.shape[1:])  # a new tensor when the dtype changes, else x's view
        return out.index_add(0, rows, y.to(dtype), alpha=scale).view(x.shape)


def _add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x + alpha * y, with x viewed in y's shape (y may be a strided view, such as windows read in map order)."""
    return torch.add(x.view(y.shape), y, alpha=alpha).view(x.shape)
